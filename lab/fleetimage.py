"""fleetmesh's own container images, `fleetmesh/agent:<version>` and
`fleetmesh/coordinator:<version>`, built without any registry but PyPI and the Debian mirror:

- the base is lab/realimage.py's Debian root filesystem (debootstrap minbase) with the packages
  the agent needs (BASE_PACKAGES), `docker import`ed as `fleetmesh/base:<hash of its inputs>`;
- one layer of dependency wheels (cp311 manylinux, downloaded on this host with `pip download`)
  unpacked into Debian's site directory, and one layer with fleetmesh's own wheel (`pip wheel
  --no-deps` of this tree) plus its console scripts in /usr/local/bin. Both are reproducible
  tars made here, so `docker build` runs with `--network none` and there is no pip, pip cache,
  apt list or compiler in the images;
- docker/agent/Dockerfile adds them to the base; docker/coordinator/Dockerfile adds to the agent
  image only the wheels of the coordinator's extra that the agent lacks.

The agent image installs `fleetmesh`, the coordinator image `fleetmesh[coordinator]` (pip drops
an extra the wheel does not declare, with a warning). Downloads and the root filesystem are
cached under lab/realimage.py's CACHE_DIR, keyed by their inputs.

    scripts/build-images [--engine DOCKER_HOST] [--version V]
"""

from __future__ import annotations

import argparse
import configparser
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from . import realimage
from ._host import LabError
from .engines import docker
from .realimage import (
    CACHE_DIR,
    FIXED_MTIME,
    PLATFORM,
    PYPI,
    PYTHON_TAG,
    import_base,
    site_files,
    tar_of_files,
)

ROOT: Final = Path(__file__).resolve().parents[1]
DOCKERFILES: Final = ROOT / "docker"
BASE_REPOSITORY: Final = "fleetmesh/base"
# python3 runs the agent; wireguard-go is its WireGuard; wireguard-tools (`wg`), iproute2 and
# iptables to look at and fix the host's network from inside; nftables for the coordinator's
# relay hub filter; ca-certificates for https coordinators with a public certificate.
# util-linux (nsenter, unshare) is in minbase.
BASE_PACKAGES: Final = ("python3", "wireguard-go", "wireguard-tools", "iproute2", "iptables",
                        "nftables", "ca-certificates")
# Debian 12 has glibc 2.36: any manylinux wheel up to it runs on the base
PLATFORMS: Final = (PLATFORM, "manylinux_2_28_x86_64", "manylinux_2_34_x86_64",
                    "manylinux_2_36_x86_64")


@dataclass(frozen=True, slots=True)
class Kind:
    name: str  # fleetmesh/NAME:<version>, docker/NAME/Dockerfile
    extra: str | None  # the wheel's extra to install
    # built FROM this kind's image of the same version, adding only the wheels it lacks (so
    # the two images share every layer but the last two)
    over: str | None = None


TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a Docker tag
KINDS: Final = (Kind("agent", None), Kind("coordinator", "coordinator", over="agent"))


@dataclass(frozen=True, slots=True)
class BuiltImage:
    tag: str
    image_id: str
    size: int  # bytes, as `docker image inspect` counts them (all layers, unpacked)


def project_version(pyproject: Path = ROOT / "pyproject.toml") -> str:
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise LabError(f"no project version in {pyproject}: {e}") from e


def _run(argv: list[str], what: str, timeout: float = 900,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       check=False)
    if r.returncode != 0:
        lines = [x for x in (r.stderr or r.stdout).strip().splitlines()
                 if x.startswith(("ERROR", "error"))] or (r.stderr or r.stdout).splitlines()
        raise LabError(f"{what}: {(lines[-1:] or ['failed'])[0].strip()}")
    return r


def fleetmesh_wheel(out: Path, root: Path = ROOT) -> Path:
    """`pip wheel --no-deps` of the tree at ROOT (its git-tracked and untracked, not ignored
    files, copied first: a build directory left in the tree could add stale modules)."""
    listed = _run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                   "--exclude-standard"], "git ls-files").stdout.split("\0")
    with tempfile.TemporaryDirectory(prefix="fleetmesh-wheel-") as tmp:
        src = Path(tmp) / "src"
        for rel in filter(None, listed):
            path = root / rel
            if path.is_file() and not path.is_symlink():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, src / rel)
        out.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
             "pip wheel fleetmesh")
    found = sorted(out.glob("fleetmesh-*.whl"))
    if len(found) != 1:
        raise LabError(f"pip wheel fleetmesh: expected one wheel in {out}, found {len(found)}")
    return found[0]


def _metadata(whl: Path, name: str) -> str:
    with zipfile.ZipFile(whl) as z:
        infos = [i for i in z.namelist() if i.endswith(f".dist-info/{name}")]
        return z.read(infos[0]).decode() if infos else ""


def dependency_wheels(own: Path, extra: str | None, cache: Path = CACHE_DIR) -> list[Path]:
    """The wheels fleetmesh's wheel needs (with EXTRA), for Debian 12's python3 on amd64;
    downloaded once per (requirements, extra), listed in a manifest next to them."""
    requires = sorted(email.parser.Parser().parsestr(_metadata(own, "METADATA"))
                      .get_all("Requires-Dist") or [])
    key = hashlib.sha256(json.dumps([requires, extra, PLATFORMS, PYTHON_TAG]).encode()).hexdigest()
    where = cache / "fleet-wheels"
    manifest = where / f"manifest-{key[:16]}.json"
    try:
        names = json.loads(manifest.read_text())
        found = [where / n for n in names]
        if all(p.is_file() for p in found):
            return found
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory(prefix="fleetmesh-deps-") as tmp:
        spec = f"{own}[{extra}]" if extra else str(own)
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        # --isolated: this machine's pip configuration (constraints, local indexes) is no input
        _run([sys.executable, "-m", "pip", "download", "-q", "--isolated", "--only-binary=:all:",
              *platforms, "--python-version", PYTHON_TAG, "--implementation", "cp",
              "--abi", f"cp{PYTHON_TAG}", "--index-url", PYPI, "-d", tmp, spec],
             f"pip download {own.name}" + (f"[{extra}]" if extra else ""))
        where.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in Path(tmp).glob("*.whl") if p.name != own.name)
        for n in names:
            if not (where / n).is_file():
                shutil.move(Path(tmp) / n, where / n)
    manifest.write_text(json.dumps(names))
    return [where / n for n in names]


def stripped(files: dict[str, tuple[bytes, int]]) -> dict[str, tuple[bytes, int]]:
    """FILES with the debug information of their shared objects removed (`strip --strip-debug`;
    some wheels ship it: hdiffpatch's extension is 38 MB with, 5 MB without). The wheels' RECORD
    hashes no longer match those files; there is no pip in the images to check them."""
    if shutil.which("strip") is None:
        raise LabError("strip is not installed: apt install binutils")
    out = dict(files)
    with tempfile.TemporaryDirectory(prefix="fleetmesh-strip-") as tmp:
        for name, (data, mode) in files.items():
            if not (name.endswith(".so") or ".so." in name.rsplit("/", 1)[-1]):
                continue
            if not data.startswith(b"\x7fELF"):
                continue
            path = Path(tmp) / "x.so"
            path.write_bytes(data)
            _run(["strip", "--strip-debug", str(path)], f"strip {name}")
            out[name] = (path.read_bytes(), mode)
    return out


def console_scripts(wheels: list[Path]) -> dict[str, tuple[bytes, int]]:
    """/usr/local/bin launchers for the wheels' console scripts (what pip would write)."""
    files: dict[str, tuple[bytes, int]] = {}
    for whl in wheels:
        points = configparser.ConfigParser(delimiters=("=",))
        points.optionxform = str  # type: ignore[assignment,method-assign]
        points.read_string(_metadata(whl, "entry_points.txt"))
        if not points.has_section("console_scripts"):
            continue
        for name, target in points.items("console_scripts"):
            module, _, func = target.strip().partition(":")
            text = (f"#!/usr/bin/python3\nimport sys\nfrom {module} import {func}\n"
                    f"sys.exit({func}())\n")
            files[f"usr/local/bin/{name}"] = (text.encode(), 0o755)
    return files


def context(kind: Kind, own: Path, cache: Path, into: Path) -> None:
    """The build context of KIND in INTO: its Dockerfile and its layer tars (the dependency
    wheels, fleetmesh's own; over another kind: the wheels that one lacks)."""
    deps = dependency_wheels(own, kind.extra, cache)
    shutil.copy(DOCKERFILES / kind.name / "Dockerfile", into / "Dockerfile")
    if kind.over is not None:
        over = next(k for k in KINDS if k.name == kind.over)
        has = {p.name for p in dependency_wheels(own, over.extra, cache)}
        deps = [p for p in deps if p.name not in has]
    else:
        (into / "fleetmesh.tar").write_bytes(tar_of_files(site_files([own])
                                                          | console_scripts([own])))
    (into / "deps.tar").write_bytes(tar_of_files(stripped(site_files(deps))))
    for p in into.iterdir():
        os.utime(p, (FIXED_MTIME, FIXED_MTIME))


def base_tag(cache: Path = CACHE_DIR) -> str:
    """The images' base tag (its root filesystem is built first if the cache lacks it)."""
    return realimage.base_tag(realimage.rootfs_tar(cache, include=BASE_PACKAGES, slim=True),
                              BASE_REPOSITORY)


def build(docker_host: str, version: str | None = None, cache: Path = CACHE_DIR,
          kinds: tuple[Kind, ...] = KINDS) -> list[BuiltImage]:
    """Build fleetmesh/KIND:VERSION for each kind in the engine at DOCKER_HOST."""
    version = version or project_version()
    base = import_base(docker_host, cache, BASE_PACKAGES, BASE_REPOSITORY, slim=True)
    built: list[BuiltImage] = []
    replaced: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fleetmesh-images-") as tmp:
        own = fleetmesh_wheel(Path(tmp) / "wheel")
        for kind in kinds:
            ctx = Path(tmp) / kind.name
            ctx.mkdir()
            context(kind, own, cache, ctx)
            tag = f"fleetmesh/{kind.name}:{version}"
            before = docker(docker_host, "image", "inspect", "-f", "{{.Id}}", tag)
            on = base if kind.over is None else f"fleetmesh/{kind.over}:{version}"
            r = docker(docker_host, "build", "-q", "--network", "none", "--build-arg",
                       f"BASE={on}", "--build-arg", f"VERSION={version}", "-t", tag,
                       str(ctx), timeout=1800, env={"DOCKER_BUILDKIT": "0"})
            if r.returncode != 0:
                last = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
                raise LabError(f"docker build {tag}: {last[0]}")
            info = json.loads(docker(docker_host, "image", "inspect", tag).stdout)[0]
            built.append(BuiltImage(tag, str(info["Id"]), int(info["Size"])))
            old = before.stdout.decode().strip()
            if before.returncode == 0 and old != info["Id"]:
                replaced.append(old)
    # the images these tags named before, now untagged (children first; an image a container
    # uses is kept)
    for old in reversed(replaced):
        docker(docker_host, "rmi", old)
    return built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/build-images",
        description="build fleetmesh/agent:VERSION and fleetmesh/coordinator:VERSION from this "
                    "tree (see lab/fleetimage.py)")
    p.add_argument("--engine", metavar="DOCKER_HOST", default=None,
                   help="the engine to build in (default: $DOCKER_HOST, else the local socket)")
    p.add_argument("--version", metavar="V", default=None,
                   help="the images' tag (default: the version in pyproject.toml)")
    args = p.parse_args(argv)
    if args.version is not None and not TAG.fullmatch(args.version):
        print(f"build-images: bad --version {args.version!r}: a Docker tag (letters, digits, "
              "'.', '-', '_', at most 128)",
              file=sys.stderr)
        return 2
    host = args.engine or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    start = time.monotonic()
    try:
        for image in build(host, args.version):
            print(f"{image.tag} {image.image_id[7:19]} {image.size / 1e6:.1f} MB")
    except (LabError, subprocess.TimeoutExpired) as e:
        print(f"build-images: {e}", file=sys.stderr)
        return 2
    print(f"built in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
