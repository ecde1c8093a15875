"""A realistic release image for rollout measurements, built reproducibly from real parts:

- a Debian root filesystem from `debootstrap` (minbase + python3, from the machine's apt mirror),
  written as one normalized tar (sorted names, fixed mtimes, no logs or apt caches) and
  `docker import`ed as the base image;
- one layer of real PyPI wheels with compiled extensions (numpy + requests and its
  dependencies, pinned, cp311 manylinux for Debian 12's python3.11), unpacked into
  /usr/local/lib/python3.11/dist-packages;
- one app layer: /app/server.py imports numpy and requests and serves HTTP on $PORT with a
  health check (/health), so a device "running" the release runs the real thing.

Version 2 differs from version 1 in one compiled package only (numpy NUMPY[1] -> NUMPY[2], the
next patch release): what devices must fetch for v2 is that layer's delta.

Both added layers are tars made here (sorted, fixed mtimes, every parent directory listed) and
added with `ADD x.tar /` in a `docker build` on the imported base, so the same inputs give the
same layer diff IDs. Downloads and the built root filesystem are cached under CACHE_DIR, keyed
by their inputs (a second build reuses them and makes byte-identical tars).

    python -m lab.realimage build VERSION    # in a lab node with an engine ($DOCKER_HOST)
    python -m lab.realimage fetch            # only download and build the cached parts
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ._host import LabError
from .engines import docker, operator_docker_host
from .network import LabNetwork

CACHE_DIR: Final = Path(os.environ.get("FLEETMESH_BENCH_CACHE", "/var/cache/fleetmesh-bench"))
REPOSITORY: Final = "fleetmesh-bench-real"
BASE_REPOSITORY: Final = "fleetmesh-bench/debian"
APP_NAME: Final = "realistic"
PORT: Final = 8080
FIXED_MTIME: Final = 1_700_000_000  # every file of every tar made here: same inputs, same bytes

SUITE: Final = "bookworm"
VARIANT: Final = "minbase"
INCLUDE: Final = ("python3",)
DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
PYPI: Final = "https://pypi.org/simple"
PYTHON_TAG: Final = "311"  # Debian 12's python3.11
PLATFORM: Final = "manylinux2014_x86_64"
SITE: Final = "usr/local/lib/python3.11/dist-packages"  # on Debian's default sys.path

# numpy is the one compiled package a new version changes (X -> the next patch release).
NUMPY: Final = {1: "1.26.3", 2: "1.26.4"}
# requests and its dependencies (charset-normalizer has compiled extensions), the same in every
# version: they dedup across releases.
COMMON_WHEELS: Final = (("requests", "2.31.0"), ("urllib3", "2.2.1"), ("idna", "3.6"),
                        ("certifi", "2024.2.2"), ("charset-normalizer", "3.3.2"))

# Not in the image: logs, caches and state that differ between two debootstraps of the same
# packages (or are replaced at run time by the engine: /dev, hostname, resolv.conf).
_DROP_PREFIXES: Final = ("var/log/", "var/cache/apt/", "var/cache/debconf/", "var/lib/apt/lists/",
                         "dev/", "run/", "tmp/", "proc/", "sys/", "var/cache/ldconfig/")
_EMPTY_FILES: Final = ("etc/machine-id", "etc/hostname", "etc/resolv.conf")

_SERVER: Final = '''"""fleetmesh realistic bench app: numpy and requests, served over HTTP."""
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy
import requests

PORT = int(os.environ.get("PORT", "8080"))
# real work with the compiled extension at start, so a broken numpy fails the container
CHECK = float(numpy.linalg.norm(numpy.arange(12, dtype=numpy.float64).reshape(3, 4)))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"numpy": numpy.__version__, "requests": requests.__version__,
                           "check": CHECK}).encode()
        self.send_response(200 if self.path in ("/", "/health") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"realistic app: numpy {numpy.__version__} requests {requests.__version__} "
      f"on :{PORT}", flush=True)
ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
'''

_HEALTH: Final = '''import os, sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{os.environ.get('PORT', '8080')}/health", timeout=3)
except Exception:
    sys.exit(1)
'''

_DOCKERFILE: Final = """FROM {base}
ADD site.tar /
ADD app.tar /
ENV PORT={port} PYTHONDONTWRITEBYTECODE=1
HEALTHCHECK --interval=2s --timeout=5s --retries=5 CMD ["python3", "/app/health.py"]
CMD ["python3", "/app/server.py"]
"""


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def apt_mirror(sources: Iterable[Path] | None = None) -> str:
    """The machine's Debian mirror (first deb URI of the main archive in /etc/apt/sources*)."""
    paths = list(sources) if sources is not None else [
        Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            uri = m.group(1).rstrip("/")
            if uri.startswith("http") and "security" not in uri:
                return uri
    return DEFAULT_MIRROR


# --------------------------------------------------------------------------- tars


def _info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_of_files(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A reproducible tar of `path -> (content, mode)`, every parent directory listed (so
    extracting it over a root file system sets their times too), names sorted."""
    dirs: set[str] = set()
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(dirs | set(files)):
            if name in files:
                data, mode = files[name]
                tar.addfile(_info(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
            else:
                tar.addfile(_info(name + "/", tarfile.DIRTYPE, 0o755))
    return out.getvalue()


# Also not in a slim root filesystem: translations, manuals and documentation, but for each
# package's copyright file (what distributing the image requires).
_SLIM_PREFIXES: Final = ("usr/share/locale/", "usr/share/man/", "usr/share/info/",
                         "usr/share/lintian/")


def _dropped(rel: str, is_dir: bool, slim: bool = False) -> bool:
    probe = rel + "/" if is_dir else rel
    if slim and (any(probe.startswith(p) and probe != p for p in _SLIM_PREFIXES) or (
            not is_dir and rel.startswith("usr/share/doc/") and not rel.endswith("/copyright"))):
        return True
    return any(probe.startswith(p) and probe != p for p in _DROP_PREFIXES)


def normalize_rootfs(root: Path, out: Path, slim: bool = False) -> None:
    """Write `root` as a tar with sorted names, fixed times, numeric owners and without the
    logs, caches and per-run state listed in _DROP_PREFIXES / _EMPTY_FILES (and, when `slim`,
    _SLIM_PREFIXES and the documentation but for copyright files)."""
    with tarfile.open(out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(path: Path) -> None:
            rel = path.relative_to(root).as_posix()
            is_dir = path.is_dir() and not path.is_symlink()
            if _dropped(rel, is_dir, slim):
                return
            info = tar.gettarinfo(str(path), arcname=rel)
            info.mtime, info.uname, info.gname = FIXED_MTIME, "", ""
            if info.isreg() and rel in _EMPTY_FILES:
                info.size = 0
                tar.addfile(info, io.BytesIO())
            elif info.isreg() and rel == "etc/shadow":
                # the "last changed" day of each account is the day debootstrap ran
                data = re.sub(rb"^([^:\n]*:[^:\n]*:)\d*:", rb"\g<1>19000:", path.read_bytes(),
                              flags=re.M)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if is_dir:
                for child in sorted(path.iterdir(), key=lambda p: p.name):
                    add(child)

        for child in sorted(root.iterdir(), key=lambda p: p.name):
            add(child)


def _remove_build_dir(work: Path) -> None:
    """Remove a debootstrap target, unmounting first whatever debootstrap left mounted in it
    (/proc, /sys after a failure): rmtree must never walk into a live kernel file system."""
    prefix = str(work.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        inside = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for mount in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30, check=False)
    shutil.rmtree(work, ignore_errors=True)


def rootfs_tar(cache: Path = CACHE_DIR, mirror: str | None = None,
               include: tuple[str, ...] = INCLUDE, slim: bool = False) -> Path:
    """The Debian root filesystem tar with `include`'s packages (and without documentation
    when `slim`), built once per (suite, variant, packages, mirror, slim)."""
    mirror = mirror or apt_mirror()
    key = _key("rootfs", SUITE, VARIANT, include, mirror, "amd64", *(["slim"] if slim else []))
    out = cache / f"rootfs-{SUITE}-{key}.tar"
    if out.is_file():
        return out
    if shutil.which("debootstrap") is None:
        raise LabError("debootstrap is not installed (scripts/setup installs it)")
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f"rootfs-{key}.build"
    _remove_build_dir(work)
    try:
        r = subprocess.run(["debootstrap", f"--variant={VARIANT}", "--arch=amd64",
                            f"--include={','.join(include)}", SUITE, str(work), mirror],
                           capture_output=True, text=True, timeout=1800, check=False)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["failed"]
            raise LabError(f"debootstrap {SUITE} from {mirror}: {last[0]}")
        partial = out.with_suffix(".partial")
        normalize_rootfs(work, partial, slim)
        partial.rename(out)
    finally:
        _remove_build_dir(work)
    return out


def _wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel(name: str, version: str, cache: Path = CACHE_DIR) -> Path:
    """One pinned wheel from PyPI (cp311 manylinux or pure), downloaded once."""
    where = cache / "wheels"
    prefix = f"{_wheel_name(name)}-{version}-"
    found = sorted(p for p in where.glob("*.whl") if p.name.lower().startswith(prefix))
    if found:
        return found[0]
    where.mkdir(parents=True, exist_ok=True)
    # --isolated: this machine's pip configuration (constraints, local indexes) is not the input
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                        "--only-binary=:all:", "--platform", PLATFORM, "--python-version",
                        PYTHON_TAG, "--implementation", "cp", "--abi", f"cp{PYTHON_TAG}",
                        "--index-url", PYPI, "-d", str(where), f"{name}=={version}"],
                       capture_output=True, text=True, timeout=600, check=False)
    found = sorted(p for p in where.glob("*.whl") if p.name.lower().startswith(prefix))
    if r.returncode != 0 or not found:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise LabError(f"pip download {name}=={version}: {last[0]}")
    return found[0]


def wheels(version: int, cache: Path = CACHE_DIR) -> list[Path]:
    if version not in NUMPY:
        raise LabError(f"the realistic image has versions {sorted(NUMPY)}, not {version}")
    return [wheel(n, v, cache) for n, v in (("numpy", NUMPY[version]), *COMMON_WHEELS)]


def site_tar(wheel_files: Iterable[Path]) -> bytes:
    """The wheels unpacked into Debian's site directory, as one reproducible tar."""
    return tar_of_files(site_files(wheel_files))


def site_files(wheel_files: Iterable[Path]) -> dict[str, tuple[bytes, int]]:
    """The wheels' files as installed in Debian's site directory, `path -> (content, mode)` (a
    wheel is a zip laid out as installed; none of these has data to relocate)."""
    files: dict[str, tuple[bytes, int]] = {}
    for whl in wheel_files:
        with zipfile.ZipFile(whl) as z:
            for entry in z.infolist():
                if entry.is_dir():
                    continue
                mode = 0o755 if (entry.external_attr >> 16) & 0o111 else 0o644
                files[f"{SITE}/{entry.filename}"] = (z.read(entry), mode)
    return files


def app_tar() -> bytes:
    return tar_of_files({"app/server.py": (_SERVER.encode(), 0o644),
                         "app/health.py": (_HEALTH.encode(), 0o644)})


# --------------------------------------------------------------------------- images


@dataclass(frozen=True, slots=True)
class Built:
    tag: str
    base: str
    numpy: str
    diff_ids: tuple[str, ...]
    unpacked_bytes: int  # the layers' tar bytes (what the image occupies unpacked)


def tag(version: int) -> str:
    return f"{REPOSITORY}:v{version}"


def _check(r: subprocess.CompletedProcess[bytes], what: str) -> str:
    if r.returncode != 0:
        last = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        raise LabError(f"{what}: {last[0]}")
    return r.stdout.decode().strip()


def base_tag(rootfs: Path, repository: str = BASE_REPOSITORY) -> str:
    """The tag import_base gives the root filesystem tar ROOTFS."""
    return f"{repository}:{rootfs.stem.removeprefix('rootfs-')}"


def import_base(docker_host: str, cache: Path = CACHE_DIR, include: tuple[str, ...] = INCLUDE,
                repository: str = BASE_REPOSITORY, slim: bool = False) -> str:
    """`docker import` the cached root filesystem with `include`'s packages (once per engine)
    as REPOSITORY:<its key>; returns that tag."""
    rootfs = rootfs_tar(cache, include=include, slim=slim)
    base = base_tag(rootfs, repository)
    if docker(docker_host, "image", "inspect", base).returncode != 0:
        _check(docker(docker_host, "import", str(rootfs), base, timeout=600),
               f"docker import {rootfs.name}")
    return base


def build(version: int, docker_host: str, cache: Path = CACHE_DIR) -> Built:
    """Build fleetmesh-bench-real:vVERSION in the engine at docker_host."""
    base = import_base(docker_host, cache)
    with tempfile.TemporaryDirectory(prefix="fleetmesh-bench-real-") as tmp:
        ctx = Path(tmp)
        (ctx / "Dockerfile").write_text(_DOCKERFILE.format(base=base, port=PORT))
        (ctx / "site.tar").write_bytes(site_tar(wheels(version, cache)))
        (ctx / "app.tar").write_bytes(app_tar())
        for p in ctx.iterdir():
            os.utime(p, (FIXED_MTIME, FIXED_MTIME))
        _check(docker(docker_host, "build", "-q", "-t", tag(version), str(ctx), timeout=900,
                      env={"DOCKER_BUILDKIT": "0"}), f"docker build {tag(version)}")
    inspect = json.loads(_check(docker(docker_host, "image", "inspect", tag(version)),
                                "docker image inspect"))[0]
    diff_ids = tuple(inspect["RootFS"]["Layers"])
    return Built(tag(version), base, NUMPY[version], diff_ids, int(inspect["Size"]))


def build_in_lab(lab: LabNetwork, version: int) -> Built:
    """Build version VERSION in the lab operator's engine."""
    return build(version, operator_docker_host(lab))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.realimage",
                                description="the realistic bench image (see the module's doc)")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build fleetmesh-bench-real:vVERSION in $DOCKER_HOST")
    b.add_argument("version", type=int, choices=sorted(NUMPY))
    sub.add_parser("fetch", help="download and build the cached parts only")
    args = p.parse_args(argv)
    try:
        if args.command == "fetch":
            print(rootfs_tar())
            for v in sorted(NUMPY):
                for w in wheels(v):
                    print(w)
            return 0
        host = os.environ.get("DOCKER_HOST")
        if not host:
            raise LabError("DOCKER_HOST is not set: run this in a lab node with an engine")
        built = build(args.version, host)
        print(json.dumps({"tag": built.tag, "numpy": built.numpy,
                          "diff_ids": list(built.diff_ids), "size": built.unpacked_bytes}))
    except LabError as e:
        print(f"lab.realimage: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
