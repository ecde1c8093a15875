"""Publish time: `fleetmesh release create` of the realistic image, v1 then v2, against an
anchor measured in the same run (issue 12: the publish is part of a rollout's time budget).

    python -m bench.publish [--anchor-level LEVEL]

Starts its own Docker engine (a private dockerd: own data root, exec root, socket; stopped by
its PID and its data root removed at the end) and a coordinator on loopback
(`fleetmesh coordinator serve --no-hub`, stopped by PID), builds lab/realimage.py's v1 and v2
into the engine (parts cached in $FLEETMESH_BENCH_CACHE), then for v1 then v2:

- fleetmesh: the real CLI, `fleetmesh release create IMAGE --app realistic`, with an empty
  layer cache (what an operator's first publish of that version costs), under `/usr/bin/time`;
- anchor: `docker save IMAGE | zstd -LEVEL -T0 > /dev/null`, the same image through Docker's
  own export and the zstd CLI at the chunks' level (mesh.release CHUNK_ZSTD_LEVEL, 19) on every
  core: the bytes a whole-image push at that ratio would cost, without chunking, hashing,
  deltas, signing or upload.

Each line: wall seconds, CPU seconds (user + system of the process tree) and peak RSS of both,
and the ratios fleetmesh / anchor. On a shared machine, wall time depends on the other load;
CPU seconds do not, so both are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lab._host import LabError
from lab.engines import SHUTDOWN_TIMEOUT_S, ping
from lab.realimage import APP_NAME, build
from mesh.release import CHUNK_ZSTD_LEVEL
from mesh.tlspin import CertificateFetchError, fetch_certificate, fingerprint

FLEETMESH: Final = str(Path(sys.executable).parent / "fleetmesh")
ENGINE_EXEC_ROOT: Final = Path("/run/fleetmesh-bench-publish")
ENGINE_DATA_ROOT: Final = Path("/var/lib/fleetmesh-bench-publish")
READY_S: Final = 60.0
FLEET: Final = "bench"


@dataclass(frozen=True, slots=True)
class Run:
    wall: float
    cpu: float  # user + system seconds of the process and its children
    peak_rss: int  # KiB, the largest process of the tree


def timed(argv: list[str], env: dict[str, str]) -> tuple[Run, str]:
    """`argv` under GNU time; its run and its stdout. Exits the bench if it fails."""
    fd, report = tempfile.mkstemp(prefix="fleetmesh-bench-time-")
    os.close(fd)
    try:
        r = subprocess.run(["/usr/bin/time", "-o", report, "-f", "%e %U %S %M", *argv],
                           capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:
            sys.exit(f"bench.publish: {' '.join(argv[:4])}...: {r.stderr.strip()[-400:]}")
        wall, user, system, rss = Path(report).read_text().split()[-4:]
    finally:
        os.unlink(report)
    return Run(float(wall), float(user) + float(system), int(rss)), r.stdout


@contextmanager
def private_engine() -> Iterator[str]:
    """A dockerd of our own (the recipe of lab/engines.py `dockerd_argv`, outside the lab's
    directories and cgroups); yields its DOCKER_HOST. Stopped by its PID, data root removed."""
    ENGINE_EXEC_ROOT.mkdir(parents=True, exist_ok=True)
    ENGINE_DATA_ROOT.mkdir(parents=True, exist_ok=True)
    config = ENGINE_EXEC_ROOT / "daemon.json"
    config.write_text(json.dumps({"deprecated-key-path": str(ENGINE_EXEC_ROOT / "key.json"),
                                  "log-level": "warn"}))
    sock = ENGINE_EXEC_ROOT / "docker.sock"
    log = open(ENGINE_EXEC_ROOT / "dockerd.log", "ab")  # noqa: SIM115 - the child's
    proc = subprocess.Popen(
        ["dockerd", "--config-file", str(config), "--data-root", str(ENGINE_DATA_ROOT),
         "--exec-root", str(ENGINE_EXEC_ROOT), "-H", f"unix://{sock}",
         "--pidfile", str(ENGINE_EXEC_ROOT / "docker.pid"), "--bridge", "none",
         "--iptables=false", "--ip-masq=false", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")})
    log.close()
    try:
        deadline = time.monotonic() + READY_S
        while not ping(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench.publish: dockerd did not start (see {log.name})")
            time.sleep(0.1)
        yield f"unix://{sock}"
    finally:
        _stop(proc, 30)
        shutil.rmtree(ENGINE_DATA_ROOT, ignore_errors=True)
        shutil.rmtree(ENGINE_EXEC_ROOT, ignore_errors=True)


@contextmanager
def coordinator(data: Path) -> Iterator[dict[str, str]]:
    """`fleetmesh coordinator serve --no-hub` on a free loopback port; yields an operator's
    environment for it. Stopped by its PID."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETMESH_", "XDG_"))}
    with open(data.parent / "coordinator.log", "w") as log:
        proc = subprocess.Popen([FLEETMESH, "coordinator", "serve", "--data", str(data),
                                 "--listen", f"127.0.0.1:{port}", "--no-hub"],
                                stdout=log, stderr=subprocess.STDOUT, env=clean)
    try:
        deadline = time.monotonic() + READY_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench.publish: the coordinator did not start (see {log.name})")
            if (data / "operator.key").exists():
                try:
                    der = fetch_certificate("127.0.0.1", port, timeout=2)
                    break
                except CertificateFetchError:
                    pass
            time.sleep(0.1)
        yield {**clean, "HOME": str(data.parent / "home"),
               "FLEETMESH_URL": f"https://127.0.0.1:{port}",
               "FLEETMESH_API_KEY": (data / "operator.key").read_text().strip(),
               "FLEETMESH_FINGERPRINT": fingerprint(der), "FLEETMESH_FLEET": FLEET}
    finally:
        _stop(proc, 10)


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float) -> None:
    """SIGTERM to the process we started (by its PID), SIGKILL after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _line(what: str, run: Run) -> str:
    return f"{what:<34} {run.wall:7.1f} s wall {run.cpu:7.1f} s CPU {run.peak_rss / 1024:7.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__.split("\n")[0])
    p.add_argument("--anchor-level", type=int, default=CHUNK_ZSTD_LEVEL,
                   help="zstd level of the anchor (default: the chunks' level)")
    args = p.parse_args(argv)
    if shutil.which("zstd") is None or shutil.which("dockerd") is None:
        sys.exit("bench.publish: needs the zstd CLI and dockerd (Debian zstd, docker.io)")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="fleetmesh-bench-publish-") as tmp, \
            private_engine() as docker_host:
        work = Path(tmp)
        (work / "coord").mkdir()
        try:
            images = [build(v, docker_host) for v in (1, 2)]
        except LabError as exc:
            sys.exit(f"bench.publish: {exc}")
        with coordinator(work / "coord") as env:
            env["DOCKER_HOST"] = docker_host
            key = work / "home" / "release.key"
            key.parent.mkdir(parents=True)
            env["FLEETMESH_SIGNING_KEY"] = str(key)
            for cmd in (["release", "keygen", "--out", str(key)], ["release", "set-key"]):
                timed([FLEETMESH, *cmd], env)
            print(f"publish of the realistic image (lab/realimage.py), {cores} cores; anchor: "
                  f"docker save IMAGE | zstd -{args.anchor_level} -T0 > /dev/null")
            for built in images:
                shutil.rmtree(work / "home" / ".cache", ignore_errors=True)  # a cold layer cache
                ours, out = timed([FLEETMESH, "release", "create", built.tag, "--app", APP_NAME,
                                   "--json"], env)
                result = json.loads(out)
                anchor, _ = timed(["sh", "-c", f"docker save {built.tag} | zstd "
                                   f"-{args.anchor_level} -T0 -q > /dev/null"], env)
                print(f"{built.tag} (numpy {built.numpy}, {built.unpacked_bytes / 1e6:.1f} MB "
                      f"unpacked): uploaded {result['uploaded_blobs']} blobs, "
                      f"{result['uploaded_bytes'] / 1e6:.1f} MB")
                print("  " + _line("fleetmesh release create", ours))
                print("  " + _line(f"anchor (docker save | zstd -{args.anchor_level})", anchor))
                print(f"  ratio fleetmesh/anchor: {ours.wall / anchor.wall:.2f} x wall, "
                      f"{ours.cpu / anchor.cpu:.2f} x CPU, "
                      f"{ours.peak_rss / anchor.peak_rss:.2f} x peak RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
