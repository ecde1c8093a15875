"""The fleetmesh side of bench.delta, run in its own process so its peak RSS is its own.

    python -m bench._fleetmesh create OLD NEW PATCH REPORT   (REPORT: JSON of what was tried)
    python -m bench._fleetmesh apply OLD PATCH OUT DIFF_ID   (DIFF_ID: as a manifest gives it)

`apply` imports nothing an agent applying a patch would not: `mesh.delta` loads its decoders
only (no planner, no tarfile), and the encoder's imports (json, plan_layer) are made in
`create` alone, so apply's peak RSS is what a device's apply costs, interpreter included.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from mesh.delta import apply_delta_file


def main(argv: list[str]) -> int:
    if argv[0] == "create":
        # Not at the top: `apply` must import only what an agent applying a patch imports
        # (the module docstring); json and the planner (mesh.image.plan_layer) are the
        # encoder's alone. (hashlib is at the top: the decoders import it anyway.)
        import json  # the encoder's, as above

        from mesh.delta import Method, create_delta  # the encoder's, as above
        from mesh.image import plan_layer  # the encoder's, as above

        old, new = Path(argv[1]).read_bytes(), Path(argv[2]).read_bytes()
        old_id = "sha256:" + hashlib.sha256(old).hexdigest()
        # What publishing ships in a manifest: plan_layer's bare patches (no header digests;
        # the manifest's blob id and diff IDs cover them), applied below with the diff ID.
        plan = plan_layer(new, {old_id: old})
        # When the full layer wins, ship it as a FULL container so that apply stays uniform.
        patch = plan.patch if plan.patch is not None else create_delta(
            old, new, method=Method.FULL, self_check=False)
        Path(argv[3]).write_bytes(patch)
        Path(argv[4]).write_text(json.dumps({
            "full_size": plan.full_size,
            "chosen": "delta" if plan.patch is not None else "full",
            "tried": [[m, n] for _, m, n in plan.tried]}))
        return 0
    if argv[0] == "apply":
        # The streaming apply, as `fleetmesh delta apply` and the agent's rebuild run it.
        apply_delta_file(argv[1], argv[2], argv[3], argv[4])
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
