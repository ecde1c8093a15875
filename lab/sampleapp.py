"""The lab's sample app, built in the operator's engine on the lab's busybox base image:

    fleetmesh-lab exec operator -- python -m lab.sampleapp 2 [--unhealthy]
    # -> fleetmesh-sample:v2, then: fleetmesh release create fleetmesh-sample:v2 --app sample

What the image does (`/app/bin/run`, busybox sh):

- prints ``fleetmesh-sample vN`` once at start, then ``fleetmesh-sample vN heartbeat K`` every
  ``$HEARTBEAT`` seconds (default 3);
- serves ``/app/www`` with busybox httpd on ``$PORT`` (default 8080): ``GET /`` answers
  ``fleetmesh-sample vN``; the image's HEALTHCHECK fetches it every 2 s;
- ``--unhealthy`` builds the same app whose HTTP server never starts (so the HEALTHCHECK, or an
  HTTP/TCP health check on $PORT, fails: the rollback case);
- exits promptly on SIGTERM.

Layers above the base: ``/app/assets`` (~192 KB of fixed pseudo-random bytes, identical in every
version, so it dedups across releases) and ``/app/bin`` + ``/app/www`` + ``/app/VERSION`` (a few
hundred bytes that change with the version: the v1 -> v2 delta is tiny). ``--payload BYTES`` adds
a layer ``/app/payload`` of that many pseudo-random bytes drawn afresh for each version: a
release whose bytes B are about BYTES (no delta or compression shrinks them), for tests that
measure WAN bytes against B.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Final

from ._host import LabError
from .engines import BUSYBOX_IMAGE, docker, operator_docker_host
from .network import LabNetwork

REPOSITORY: Final = "fleetmesh-sample"
DEFAULT_PORT: Final = 8080
DEFAULT_HEARTBEAT_S: Final = 3
ASSET_BYTES: Final = 192 * 1024  # "a few hundred KB above busybox"
ASSET_SEED: Final = 20240601
MAX_PAYLOAD: Final = 256 * 1024 * 1024
FIXED_MTIME: Final = 1_700_000_000  # same file times in every build: same layer, same diff ID

_RUN: Final = """#!/bin/sh
# fleetmesh-sample: says its version, serves it over HTTP on $PORT, and keeps a heartbeat.
VERSION={version}
echo "fleetmesh-sample $VERSION"
trap 'exit 0' TERM INT
{http}
n=0
while :; do
  sleep "${{HEARTBEAT:-{heartbeat}}}" & wait $!
  n=$((n + 1))
  echo "fleetmesh-sample $VERSION heartbeat $n"
done
"""
_HTTP_ON: Final = f'httpd -f -p "${{PORT:-{DEFAULT_PORT}}}" -h /app/www &'
_HTTP_OFF: Final = 'echo "fleetmesh-sample $VERSION: unhealthy build, no HTTP server"'

_DOCKERFILE: Final = f"""FROM {BUSYBOX_IMAGE}
COPY assets /app/assets
{{payload}}COPY app /app
ENV PORT={DEFAULT_PORT} HEARTBEAT={DEFAULT_HEARTBEAT_S}
HEALTHCHECK --interval=2s --timeout=2s --retries=3 \\
  CMD wget -q -O /dev/null "http://127.0.0.1:$PORT/" || exit 1
CMD ["/app/bin/run"]
"""


def tag(version: int) -> str:
    return f"{REPOSITORY}:v{version}"


def context_files(version: int, unhealthy: bool = False, payload: int = 0
                  ) -> dict[str, tuple[bytes, int]]:
    """The build context: path -> (content, mode)."""
    label = f"v{version}"
    run = _RUN.format(version=label, http=_HTTP_OFF if unhealthy else _HTTP_ON,
                      heartbeat=DEFAULT_HEARTBEAT_S)
    dockerfile = _DOCKERFILE.format(payload="COPY payload /app/payload\n" if payload else "")
    files = {
        "Dockerfile": (dockerfile.encode(), 0o644),
        "assets/data.bin": (random.Random(ASSET_SEED).randbytes(ASSET_BYTES), 0o644),
        "app/bin/run": (run.encode(), 0o755),
        "app/www/index.html": (f"fleetmesh-sample {label}\n".encode(), 0o644),
        "app/VERSION": (f"{label}\n".encode(), 0o644),
    }
    if payload:
        files["payload/data.bin"] = (random.Random(ASSET_SEED + version).randbytes(payload), 0o644)
    return files


def build(version: int, docker_host: str, *, unhealthy: bool = False, payload: int = 0) -> str:
    """Build fleetmesh-sample:vVERSION in the engine at docker_host; returns the tag."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise LabError(f"sample app version must be an integer >= 1, got {version!r}")
    with tempfile.TemporaryDirectory(prefix="fleetmesh-sample-") as tmp:
        root = Path(tmp)
        for rel, (data, mode) in context_files(version, unhealthy, payload).items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(mode)
        for path in sorted(root.rglob("*"), reverse=True):
            os.utime(path, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
        r = docker(docker_host, "build", "-q", "-t", tag(version), str(root), timeout=300,
                   env={"DOCKER_BUILDKIT": "0"})
    if r.returncode != 0:
        last = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        raise LabError(f"docker build {tag(version)}: {last[0]}")
    return tag(version)


def build_sample(lab: LabNetwork, version: int, *, unhealthy: bool = False) -> str:
    """Build the sample app's version in the lab operator's engine; returns its tag."""
    return build(version, operator_docker_host(lab), unhealthy=unhealthy)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.sampleapp",
                                description="build fleetmesh-sample:vVERSION in $DOCKER_HOST's "
                                            "engine (run it on the lab's operator node)")
    p.add_argument("version", metavar="VERSION", help="release number, 1 or more")
    p.add_argument("--unhealthy", action="store_true",
                   help="the app's HTTP server does not start (health checks fail)")
    p.add_argument("--payload", type=int, default=0, metavar="BYTES",
                   help="add a layer of BYTES pseudo-random bytes, new in every version")
    args = p.parse_args(argv)
    try:
        version = int(args.version.removeprefix("v"))
    except ValueError:
        version = 0
    host = os.environ.get("DOCKER_HOST")
    try:
        if version < 1:
            raise LabError(f"VERSION must be an integer >= 1, got {args.version!r}")
        if not 0 <= args.payload <= MAX_PAYLOAD:
            raise LabError(f"--payload must be 0..{MAX_PAYLOAD} bytes, got {args.payload}")
        if not host:
            raise LabError("DOCKER_HOST is not set: run this in a lab node with an engine "
                           "(fleetmesh-lab exec operator -- python -m lab.sampleapp N)")
        print(build(version, host, unhealthy=args.unhealthy, payload=args.payload))
    except LabError as e:
        print(f"lab.sampleapp: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
