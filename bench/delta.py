"""Delta benchmark: fleetmesh against zstd --patch-from, xdelta3 and bsdiff4 on real layers.

    .venv/bin/python -m bench.delta [--cache DIR] [--only NAME ...]

The corpus is fixed below (chosen before tuning): consecutive releases of real PyPI packages,
CPython 3.11 manylinux x86_64 wheels, most with compiled extensions. Each wheel is unpacked as
it would be in a site-packages image layer and tarred deterministically (sorted names, mtime 0,
uid/gid 0, fixed modes), so numbers are reproducible. Every tool runs in its own process under
`/usr/bin/time -v` (peak RSS) and every decoded output is checked against the new layer's sha256.

fleetmesh's column is what a device downloads: `plan_layer`'s bare patch (the form a release
manifest names, without the self-check digests; docs/delta.md), applied with the diff ID.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import hdiffpatch
from backports import zstd

from mesh.delta import HDIFF_ZSTD_LEVEL, HDIFF_ZSTD_WINDOW_LOG
from mesh.release import CHUNK_SIZE, chunk_layer

# (distribution, old version, new version): fixed before any tuning.
CORPUS: Final = (
    ("msgpack", "1.0.7", "1.0.8"),
    ("PyYAML", "6.0.1", "6.0.2"),
    ("MarkupSafe", "2.1.4", "2.1.5"),
    ("charset-normalizer", "3.3.1", "3.3.2"),
    ("orjson", "3.10.6", "3.10.7"),
    ("pydantic-core", "2.20.0", "2.20.1"),
    ("regex", "2024.5.15", "2024.7.24"),
)
DEFAULT_CACHE: Final = Path.home() / ".cache" / "fleetmesh-bench"
SITE_PACKAGES: Final = "usr/local/lib/python3.11/site-packages"
TOOLS: Final = ("fleetmesh", "zstd", "xdelta3", "bsdiff4")


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    peak_rss: int  # bytes


@dataclass(frozen=True, slots=True)
class Result:
    tool: str
    patch_bytes: int
    encode: Run
    decode: Run


# ---- corpus --------------------------------------------------------------------------------

def _wheel(cache: Path, dist: str, version: str) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    for path in wheels.glob("*.whl"):
        name, ver = path.name.split("-")[:2]
        if name.lower() == stem and ver == version:
            return path
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.11", "--platform",
                    "manylinux2014_x86_64", "-d", str(wheels), f"{dist}=={version}"], check=True)
    return _wheel(cache, dist, version)


def layer_tar(wheel: Path) -> bytes:
    """The wheel as a site-packages layer, tarred deterministically."""
    buf = io.BytesIO()
    with zipfile.ZipFile(wheel) as zf, tarfile.open(fileobj=buf, mode="w",
                                                     format=tarfile.PAX_FORMAT) as tar:
        files = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        dirs = {SITE_PACKAGES.rsplit("/", n)[0] for n in range(SITE_PACKAGES.count("/") + 1)}
        for name in files:
            parts = name.split("/")[:-1]
            dirs.update(f"{SITE_PACKAGES}/" + "/".join(parts[:i + 1]) for i in range(len(parts)))
        entries = sorted([(d, None) for d in dirs] +
                         [(f"{SITE_PACKAGES}/{n}", files[n]) for n in files], key=lambda e: e[0])
        for path, info in entries:
            ti = tarfile.TarInfo(path)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
            if info is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                data = zf.read(info)
                ti.size = len(data)
                ti.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def corpus(cache: Path, only: Sequence[str]) -> list[tuple[str, Path, Path]]:
    layers = cache / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    pairs = []
    for dist, old_v, new_v in CORPUS:
        if only and dist not in only:
            continue
        paths = []
        for version in (old_v, new_v):
            path = layers / f"{dist}-{version}.tar"
            if not path.exists():
                path.write_bytes(layer_tar(_wheel(cache, dist, version)))
            paths.append(path)
        pairs.append((f"{dist} {old_v}->{new_v}", paths[0], paths[1]))
    return pairs


# ---- measuring -----------------------------------------------------------------------------

def measure(argv: Sequence[str], workdir: Path) -> Run:
    report = workdir / "time.txt"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *argv],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                          check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.strip()[-500:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
    return Run(seconds, int(match.group(1)) * 1024 if match else 0)


def commands(tool: str, old: Path, new: Path, patch: Path, out: Path,
             report: Path) -> tuple[list[str], list[str]]:
    py = sys.executable
    if tool == "fleetmesh":
        # Created as publishing does (plan_layer: a bare patch) and applied as an agent does:
        # with the manifest's diff ID, so the full sha256 is checked.
        diff_id = "sha256:" + hashlib.sha256(new.read_bytes()).hexdigest()
        return ([py, "-m", "bench._fleetmesh", "create", str(old), str(new), str(patch),
                 str(report)],
                [py, "-m", "bench._fleetmesh", "apply", str(old), str(patch), str(out), diff_id])
    if tool == "zstd":
        return (["zstd", "-q", "-f", "-19", "--long=31", f"--patch-from={old}", str(new), "-o",
                 str(patch)],
                ["zstd", "-q", "-f", "-d", "--long=31", f"--patch-from={old}", str(patch), "-o",
                 str(out)])
    if tool == "xdelta3":
        return (["xdelta3", "-9", "-f", "-e", "-s", str(old), str(new), str(patch)],
                ["xdelta3", "-f", "-d", "-s", str(old), str(patch), str(out)])
    if tool == "bsdiff4":
        return ([py, "-c", "import bsdiff4, sys; bsdiff4.file_diff(*sys.argv[1:])", str(old),
                 str(new), str(patch)],
                [py, "-c", "import bsdiff4, sys; bsdiff4.file_patch(*sys.argv[1:])", str(old),
                 str(out), str(patch)])
    raise ValueError(tool)


def bench_pair(old: Path, new: Path, work: Path) -> tuple[list[Result], dict[str, object]]:
    want = hashlib.sha256(new.read_bytes()).digest()
    results = []
    fm_report: dict[str, object] = {}
    for tool in TOOLS:
        patch, out, report = work / f"{tool}.patch", work / f"{tool}.out", work / "fm.json"
        enc, dec = commands(tool, old, new, patch, out, report)
        encode = measure(enc, work)
        decode = measure(dec, work)
        if tool == "fleetmesh":
            # Its peak RSS is checked against a bar: the median of 3 runs (about ±0.1 MB of
            # noise per run, a tenth of the budget on the smallest pairs).
            decode = sorted([decode, measure(dec, work), measure(dec, work)],
                            key=lambda r: r.peak_rss)[1]
        if hashlib.sha256(out.read_bytes()).digest() != want:
            raise RuntimeError(f"{tool} decoded the wrong bytes")
        results.append(Result(tool, patch.stat().st_size, encode, decode))
        if tool == "fleetmesh":
            fm_report = json.loads(report.read_text())
        out.unlink()
    return results, fm_report


# ---- report --------------------------------------------------------------------------------

def _kb(n: int) -> str:
    return f"{n}B" if n < 10_000 else f"{n / 1024:,.1f}K"


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f}M"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.delta", description=__doc__)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", nargs="*", default=[], help="distribution names")
    args = parser.parse_args(argv)
    try:
        import bsdiff4  # noqa: F401
    except ImportError:
        print("bench.delta: bsdiff4 missing: pip install 'fleetmesh[bench]'", file=sys.stderr)
        return 2
    for exe in ("zstd", "xdelta3", "/usr/bin/time"):
        if shutil.which(exe) is None:
            print(f"bench.delta: {exe} not found", file=sys.stderr)
            return 2

    # The baseline: the same interpreter with apply's imports and no work (bench._fleetmesh:
    # `idle` imports exactly what `apply` does), median of 5 runs.
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
        idle = sorted(measure([sys.executable, "-m", "bench._fleetmesh", "idle"],
                              Path(tmp)).peak_rss for _ in range(5))[2]
    rows = []
    for name, old, new in corpus(args.cache, args.only):
        with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
            results, fm = bench_pair(old, new, Path(tmp))
        new_bytes = new.read_bytes()
        full = len(zstd.compress(new_bytes, level=19))
        chunked = sum(c.ref.stored_size for c in chunk_layer(new_bytes))
        # Untimed: what HDiffPatch with zstd alone (the starting point) would have shipped.
        fm["hdiff_zstd_only"] = len(hdiffpatch.diff(
            old.read_bytes(), new_bytes, validate=False,
            compression=hdiffpatch.ZStdConfig(level=HDIFF_ZSTD_LEVEL,
                                              window=HDIFF_ZSTD_WINDOW_LOG)))
        rows.append((name, old.stat().st_size, new.stat().st_size, full, chunked, results, fm))
        print(f"done {name}", file=sys.stderr, flush=True)

    header = (f"{'pair':34} {'tool':9} {'patch':>10} {'enc s':>6} {'dec s':>6} {'enc RSS':>8} "
              f"{'dec RSS':>8}")
    print(header)
    print("-" * len(header))
    for name, old_size, new_size, _full, _chunked, results, _fm in rows:
        for i, r in enumerate(results):
            label = f"{name} ({_mb(old_size)}->{_mb(new_size)})" if i == 0 else ""
            print(f"{label:34} {r.tool:9} {_kb(r.patch_bytes):>10} {r.encode.seconds:6.2f} "
                  f"{r.decode.seconds:6.2f} {_mb(r.encode.peak_rss):>8} "
                  f"{_mb(r.decode.peak_rss):>8}")
    print()
    summary = (f"{'pair':34} {'fm/best':>8} {'best other':>10} {'fm/full':>8} "
               f"{'chunks/full':>11} {'dec RSS/1.5(o+n)':>16} {'net':>5} {'hdiff+zstd':>10}"
               "  fleetmesh tried")
    print(summary)
    print("-" * len(summary))
    worst = 0.0
    for name, old_size, new_size, full, chunked, results, fm in rows:
        fleet = results[0]
        best = min(results[1:], key=lambda r: r.patch_bytes)
        ratio = fleet.patch_bytes / best.patch_bytes
        worst = max(worst, ratio)
        budget = 1.5 * (old_size + new_size)
        tried = ", ".join(f"{m} {_kb(n)}" for m, n in fm["tried"])  # type: ignore[attr-defined]
        print(f"{name:34} {ratio:8.3f} {best.tool:>10} {fleet.patch_bytes / full:8.3f} "
              f"{chunked / full:11.3f} {fleet.decode.peak_rss / budget:16.2f} "
              f"{(fleet.decode.peak_rss - idle) / budget:5.2f} "
              f"{_kb(fm['hdiff_zstd_only']):>10}  {tried}")  # type: ignore[arg-type]
    print(f"\nfm/full: fleetmesh patch / new layer at zstd -19 (one frame); chunks/full: the "
          f"layer as {_mb(CHUNK_SIZE)} chunks / one frame;\nnet: fleetmesh's decode peak RSS "
          f"(median of 3) minus the same interpreter with apply's imports and no work "
          f"({_mb(idle)}), over 1.5 x (old + new);\nhdiff+zstd: HDiffPatch with zstd only, "
          "before the smallest-of selection\n(body only: add fleetmesh's bare header, ~8 B, "
          "to compare)")
    print(f"\nfleetmesh <= best other on every pair: {'yes' if worst <= 1.0 else 'NO'} "
          f"(worst ratio {worst:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
