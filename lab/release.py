"""A synthetic release for the lab: one layer of incompressible bytes (so its size on the wire
is known), signed with the lab fleet's release key, uploaded to the coordinator, made the
fleet's target. It is published from the coordinator node (the host is not on the lab's WAN):

    python -m lab.release --version 1 --size 2000000 --seed 1 --signing-key KEY

prints one JSON line: {"version", "blobs": [hex ids], "blob_bytes": bytes devices must fetch}.
The Docker-image path (`fleetmesh release create`) is the operator's; this one isolates the
byte accounting of the mesh from image building.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import time
from typing import Any

from mesh.release import (
    ContainerSettings,
    Layer,
    ReleaseManifest,
    chunk_layer,
    diff_id,
    encode_signed_manifest,
    read_signing_key,
    sign_manifest,
)
from ops.client import ClientError, load_operator_config

APP = "lab-synthetic"


def layer_tar(size: int, seed: int) -> bytes:
    """A deterministic tar with one file of `size` incompressible bytes."""
    payload = random.Random(seed).randbytes(size)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("app/payload.bin")
        info.size, info.mtime, info.mode = size, 0, 0o644
        tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def publish(fleet: str, version: int, size: int, seed: int, signing_key_path: str
            ) -> dict[str, Any]:
    layer = layer_tar(size, seed)
    chunks = chunk_layer(layer)
    did = diff_id(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [did]},
                         "config": {"Cmd": ["true"]}}, sort_keys=True).encode()
    manifest = ReleaseManifest(fleet=fleet, app=APP, version=version, created_at=int(time.time()),
                               image_config=config,
                               layers=(Layer(did, len(layer), tuple(c.ref for c in chunks)),),
                               container=ContainerSettings())
    signed = encode_signed_manifest(sign_manifest(manifest, read_signing_key(signing_key_path)))
    with load_operator_config().client(timeout=120) as client:
        ids = [c.ref.id.hex() for c in chunks]
        missing = set(client.missing_blobs(ids))
        for c in chunks:
            if c.ref.id.hex() in missing:
                client.put_blob(c.ref.id.hex(), c.data, "chunk")
        client.publish_release(signed)
        client.set_target(fleet, APP, version)
    return {"version": version, "app": APP, "blobs": ids,
            "blob_bytes": sum(c.ref.stored_size for c in chunks)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.release")
    p.add_argument("--fleet", default="lab")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--size", type=int, required=True, help="payload bytes (incompressible)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--signing-key", required=True)
    args = p.parse_args(argv)
    try:
        print(json.dumps(publish(args.fleet, args.version, args.size, args.seed,
                                 args.signing_key)))
    except (ClientError, OSError, ValueError) as exc:
        print(f"lab.release: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
