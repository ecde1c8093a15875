"""The delta bench's corpus: real layer pairs, fetched from their registries and tarred
reproducibly.

Every pair was chosen before any result was looked at (issue 15, item 1), and carries a kind:

- `pypi-ext`: CPython 3.11 manylinux x86_64 wheels with big compiled extensions, patch and minor
  releases;
- `pypi-pure`: pure-Python framework upgrades, minor and major;
- `deb`: Debian packages installed as a layer (`apt-get download NAME=VERSION`, `dpkg-deb -x`):
  the two versions Debian 12 and its security/updates suites carry;
- `npm`: a node_modules tree of a fixed list of top-level packages at fixed versions (their
  registry tarballs; transitive dependencies are not resolved, so the list is the tree);
- `static`: statically linked executables (musllinux wheels of ruff and uv: one static-pie Rust
  binary each);
- `big`: a >= 500 MiB layer: a data-science wheel stack in one site-packages, every package one
  release apart.

Each pair's side is unpacked into a directory as it would sit in an image (wheels under
site-packages, packages under /, npm packages under /app/node_modules) and tarred
deterministically (`tree_tar`). Downloads and layers are cached under the cache directory,
never in git; a layer's file name carries a digest of its spec, so a changed spec rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

SITE_PACKAGES: Final = "usr/local/lib/python3.11/site-packages"
NODE_MODULES: Final = "app/node_modules"
MANYLINUX: Final = "manylinux2014_x86_64"
MUSLLINUX: Final = "musllinux_1_2_x86_64"
NPM_REGISTRY: Final = "https://registry.npmjs.org"
SOURCES: Final = ("pypi", "deb", "npm")
DEFAULT_CACHE: Final = Path.home() / ".cache" / "fleetmesh-bench"
KINDS: Final = ("pypi-ext", "pypi-pure", "deb", "npm", "static", "big")


@dataclass(frozen=True, slots=True)
class Bump:
    """One package of a layer, at its old and its new version (equal when it did not change)."""

    source: str  # one of SOURCES
    package: str
    old: str
    new: str
    platform: str = ""  # pypi only: a pip --platform; empty means MANYLINUX


@dataclass(frozen=True, slots=True)
class Pair:
    name: str
    kind: str
    bumps: tuple[Bump, ...]

    def spec(self, side: str) -> list[tuple[str, str, str, str]]:
        """What one side's layer is made of, in order: (source, package, version, platform)."""
        return [(b.source, b.package, b.old if side == "old" else b.new, b.platform)
                for b in self.bumps]


def _pypi(kind: str, dist: str, old: str, new: str, platform: str = "") -> Pair:
    return Pair(f"{dist} {old}->{new}", kind, (Bump("pypi", dist, old, new, platform),))


def _deb(name: str, packages: Sequence[str], old: str, new: str) -> Pair:
    return Pair(name, "deb", tuple(Bump("deb", p, old, new) for p in packages))


_NPM_TREE: Final = (
    ("typescript", "5.4.5", "5.5.4"),
    ("lodash", "4.17.20", "4.17.21"),
    ("express", "4.18.2", "4.19.2"),
    ("react", "18.2.0", "18.3.1"),
    ("react-dom", "18.2.0", "18.3.1"),
    ("moment", "2.29.4", "2.30.1"),
    ("axios", "1.6.8", "1.7.2"),
    ("rxjs", "7.8.0", "7.8.1"),
    ("@babel/core", "7.24.5", "7.24.7"),
    ("prettier", "3.2.5", "3.3.2"),
    ("webpack", "5.91.0", "5.92.1"),
)

_BIG_STACK: Final = (
    ("numpy", "1.26.3", "1.26.4"),
    ("scipy", "1.13.0", "1.13.1"),
    ("pandas", "2.2.1", "2.2.2"),
    ("pyarrow", "16.0.0", "16.1.0"),
    ("opencv-python-headless", "4.9.0.80", "4.10.0.82"),
    ("llvmlite", "0.42.0", "0.43.0"),
    ("polars", "0.20.30", "0.20.31"),
    ("scikit-learn", "1.5.0", "1.5.1"),
    ("matplotlib", "3.9.0", "3.9.1"),
    ("grpcio", "1.64.0", "1.64.1"),
)

# Fixed before any result was seen; the first 7 are the original corpus.
CORPUS: Final = (
    _pypi("pypi-ext", "msgpack", "1.0.7", "1.0.8"),
    _pypi("pypi-ext", "PyYAML", "6.0.1", "6.0.2"),
    _pypi("pypi-ext", "MarkupSafe", "2.1.4", "2.1.5"),
    _pypi("pypi-ext", "charset-normalizer", "3.3.1", "3.3.2"),
    _pypi("pypi-ext", "orjson", "3.10.6", "3.10.7"),
    _pypi("pypi-ext", "pydantic-core", "2.20.0", "2.20.1"),
    _pypi("pypi-ext", "regex", "2024.5.15", "2024.7.24"),
    _pypi("pypi-ext", "numpy", "1.26.3", "1.26.4"),
    _pypi("pypi-ext", "pandas", "2.2.1", "2.2.2"),
    _pypi("pypi-ext", "scipy", "1.13.0", "1.13.1"),
    _pypi("pypi-ext", "pillow", "10.3.0", "10.4.0"),
    _pypi("pypi-pure", "Django", "4.2.13", "4.2.14"),
    _pypi("pypi-pure", "Django", "4.2.14", "5.0.7"),
    _pypi("pypi-pure", "Flask", "2.3.3", "3.0.3"),
    _deb("postgresql-15 15.18->15.20", ("postgresql-15",), "15.18-0+deb12u1", "15.20-0+deb12u1"),
    _deb("libssl3+openssl 3.0.20->3.0.22", ("libssl3", "openssl"), "3.0.20-1~deb12u2",
         "3.0.22-1~deb12u2"),
    _deb("python3.11 deb12u8->u9",
         ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11"),
         "3.11.2-6+deb12u8", "3.11.2-6+deb12u9"),
    _deb("libc6 deb12u7->u14", ("libc6",), "2.36-9+deb12u7", "2.36-9+deb12u14"),
    _deb("systemd 252.38->252.39", ("systemd", "libsystemd-shared"), "252.38-1~deb12u1",
         "252.39-1~deb12u2"),
    _deb("git 2.39.5 deb12u2->u3", ("git", "git-man"), "1:2.39.5-0+deb12u2",
         "1:2.39.5-0+deb12u3"),
    Pair("node_modules (11 packages)", "npm",
         tuple(Bump("npm", n, o, v) for n, o, v in _NPM_TREE)),
    _pypi("static", "ruff", "0.4.9", "0.4.10", MUSLLINUX),
    _pypi("static", "uv", "0.1.41", "0.1.42", MUSLLINUX),
    Pair("wheel stack (10 packages)", "big",
         tuple(Bump("pypi", d, o, n) for d, o, n in _BIG_STACK)),
)


def validate(corpus: Sequence[Pair]) -> None:
    """Raise ValueError, naming the pair, if the corpus spec is malformed."""
    seen: set[str] = set()
    for pair in corpus:
        if not pair.name or pair.name in seen:
            raise ValueError(f"pair name empty or repeated: {pair.name!r}")
        seen.add(pair.name)
        if pair.kind not in KINDS:
            raise ValueError(f"{pair.name}: unknown kind {pair.kind!r} (known: {', '.join(KINDS)})")
        if not pair.bumps:
            raise ValueError(f"{pair.name}: no packages")
        packages = [(b.source, b.package) for b in pair.bumps]
        if len(set(packages)) != len(packages):
            raise ValueError(f"{pair.name}: a package is listed twice")
        for b in pair.bumps:
            if b.source not in SOURCES:
                raise ValueError(f"{pair.name}: unknown source {b.source!r}")
            if not b.package or not b.old or not b.new:
                raise ValueError(f"{pair.name}: {b.package or '?'}: empty name or version")
            if b.platform and b.source != "pypi":
                raise ValueError(f"{pair.name}: {b.package}: a platform is for pypi only")
        if all(b.old == b.new for b in pair.bumps):
            raise ValueError(f"{pair.name}: nothing changes between old and new")


def select(corpus: Sequence[Pair], only: Sequence[str], kinds: Sequence[str]) -> list[Pair]:
    """The pairs named by --only (pair name, or a package of it) and of --kinds; all if empty.

    Raises ValueError for a name or kind that selects nothing."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    for name in only:
        if not any(_named(p, name) for p in corpus):
            raise ValueError(f"no pair named {name!r}")
    return [p for p in corpus
            if (not only or any(_named(p, n) for n in only)) and (not kinds or p.kind in kinds)]


def _named(pair: Pair, name: str) -> bool:
    wanted = name.lower()
    return pair.name.lower() == wanted or any(b.package.lower() == wanted for b in pair.bumps)


# ---- deterministic tar ------------------------------------------------------------------------

def tree_tar(root: Path, out: Path) -> None:
    """Tar the tree under `root` to `out` reproducibly: entries sorted by path, mtime 0, owner
    0:0 without names, directories 0755, files and symlinks as found (mode bits only); hard
    links become regular files. The same tree gives the same bytes whatever its timestamps,
    owners or creation order."""
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            entries.append((rel / name).as_posix())
    entries.sort()
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in entries:
            full = root / path
            st = full.lstat()
            ti = tarfile.TarInfo(path)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
            if stat.S_ISLNK(st.st_mode):
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, os.readlink(full), 0o777
                tar.addfile(ti)
            elif stat.S_ISDIR(st.st_mode):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            elif stat.S_ISREG(st.st_mode):
                ti.size, ti.mode = st.st_size, stat.S_IMODE(st.st_mode)
                with full.open("rb") as f:
                    tar.addfile(ti, f)
            else:
                raise ValueError(f"{path}: not a file, directory or symlink")


def _safe_join(root: Path, name: str) -> Path:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts:
        raise ValueError(f"unsafe path in an archive: {name!r}")
    return root.joinpath(*parts)


def unpack_wheel(wheel: Path, root: Path) -> None:
    """A wheel as pip installs it into site-packages (files only; mode 0755 if the zip says
    executable, else 0644)."""
    base = root / SITE_PACKAGES
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            dest = _safe_join(base, info.filename)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            dest.chmod(0o755 if (info.external_attr >> 16) & 0o111 else 0o644)


def unpack_npm(tgz: Path, package: str, root: Path) -> None:
    """An npm registry tarball (files under `package/`) as node_modules/NAME."""
    base = root / NODE_MODULES / package
    with tarfile.open(tgz, mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            _, _, rest = member.name.partition("/")
            dest = _safe_join(base, rest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                raise ValueError(f"{tgz.name}: {member.name}: unreadable")
            with src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            dest.chmod(0o755 if member.mode & 0o111 else 0o644)


# ---- fetching (cached) ------------------------------------------------------------------------

def _wheel(cache: Path, dist: str, version: str, platform: str) -> Path:
    wheels = cache / "wheels" / (platform or MANYLINUX)
    wheels.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    found = [p for p in wheels.glob("*.whl")
             if p.name.split("-")[0].lower() == stem and p.name.split("-")[1] == version]
    if found:
        return found[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.11", "--platform",
                    platform or MANYLINUX, "-d", str(wheels), f"{dist}=={version}"], check=True)
    return _wheel(cache, dist, version, platform)


def _deb_file(cache: Path, package: str, version: str) -> Path:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for path in debs.glob(f"{package}_*.deb"):
        got = subprocess.run(["dpkg-deb", "-f", str(path), "Package", "Version"],
                             capture_output=True, text=True, check=True).stdout.split("\n")
        if got[0].split(": ", 1)[1] == package and got[1].split(": ", 1)[1] == version:
            return path
    subprocess.run(["apt-get", "download", "-q", f"{package}={version}"], cwd=debs,
                   check=True, capture_output=True)
    return _deb_file(cache, package, version)


def _npm_tgz(cache: Path, package: str, version: str) -> Path:
    npm = cache / "npm"
    npm.mkdir(parents=True, exist_ok=True)
    base = package.rsplit("/", 1)[-1]
    path = npm / f"{package.replace('/', '__')}-{version}.tgz"
    if not path.exists():
        url = f"{NPM_REGISTRY}/{package}/-/{base}-{version}.tgz"
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (fixed https URL)
            data = resp.read()
        path.with_suffix(".part").write_bytes(data)
        path.with_suffix(".part").rename(path)
    return path


def spec_digest(spec: Sequence[tuple[str, str, str, str]]) -> str:
    return hashlib.sha256(repr(list(spec)).encode()).hexdigest()[:12]


def build_layer(cache: Path, spec: Sequence[tuple[str, str, str, str]], out: Path) -> None:
    """Fetch every package of `spec` and write its layer tar to `out` (atomically)."""
    with tempfile.TemporaryDirectory(prefix="fm-layer-", dir=cache) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        for source, package, version, platform in spec:
            if source == "pypi":
                unpack_wheel(_wheel(cache, package, version, platform), root)
            elif source == "deb":
                deb = _deb_file(cache, package, version)
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            elif source == "npm":
                unpack_npm(_npm_tgz(cache, package, version), package, root)
            else:
                raise ValueError(f"unknown source {source!r}")
        part = Path(tmp) / "layer.tar"
        tree_tar(root, part)
        part.rename(out)


def layers(cache: Path, pair: Pair) -> tuple[Path, Path]:
    """The pair's old and new layer tars, built on first use."""
    directory = cache / "layers"
    directory.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", pair.name)
    paths = []
    for side in ("old", "new"):
        spec = pair.spec(side)
        path = directory / f"{slug}-{side}-{spec_digest(spec)}.tar"
        if not path.exists():
            build_layer(cache, spec, path)
        paths.append(path)
    return paths[0], paths[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Build (fetch and tar) every layer of the corpus: `python -m bench.delta_corpus [CACHE]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    cache = Path(args[0]) if args else DEFAULT_CACHE
    validate(CORPUS)
    for pair in CORPUS:
        old, new = layers(cache, pair)
        print(f"{pair.kind:9} {pair.name:34} {old.stat().st_size / 2**20:8.1f} MiB -> "
              f"{new.stat().st_size / 2**20:8.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
