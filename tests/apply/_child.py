"""The apply engine in its own process, for the SIGKILL crash test (test_apply_docker.py):

    python -m tests.apply._child DATA DEVICE FLEET APP KEY_HEX TARGET_FILE

Arms the crash points of DATA, sets the target from TARGET_FILE (a signed manifest, its blobs
already in DATA/blobs), reconciles against the host's Docker engine until the journal is idle
and the app runs its target or has failed back, prints the app's status as JSON and exits 0.
Exits 3 if that does not happen within DEADLINE_S.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from agent._apply_driver import Applier
from agent._blobstore import BlobStore
from agent._crashpoints import arm
from agent._engine import DockerEngine
from mesh.release import ReleaseError, verify_release

DEADLINE_S = 240.0


def main(argv: list[str]) -> int:
    data, device, fleet, app, key_hex, target_file = argv
    arm(data)
    applier = Applier(device=device, fleet=fleet, data_dir=Path(data), engine=DockerEngine(),
                      store=BlobStore(Path(data) / "blobs"), release_key_hex=key_hex,
                      log=lambda m: print(f"child: {m}", file=sys.stderr, flush=True),
                      follow_logs=False)
    try:  # verified once, where the bytes arrive (as the agent does)
        release = verify_release(Path(target_file).read_bytes(), bytes.fromhex(key_hex),
                                 fleet=fleet, app=app)
    except ReleaseError:
        return 2
    if not applier.set_target(release, ready=True):
        return 2
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        wake = applier.reconcile_all()
        status = applier.status(app)
        journal = json.loads((Path(data) / "apply" / app / "journal.json").read_text())
        if status and status.state in ("running", "failed") and journal["phase"] == "idle":
            print(json.dumps(status.to_json()), flush=True)
            return 0
        time.sleep(max(0.05, min(wake - time.time(), 0.5)))
    last = applier.status(app)
    print(json.dumps(None if last is None else last.to_json()), flush=True)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
