"""Delta benchmark: fleetmesh against zstd --patch-from, xdelta3, bsdiff4 and plain HDiffPatch.

    .venv/bin/python -m bench.delta [--cache DIR] [--only NAME ...] [--kinds KIND ...]
                                    [--json FILE] [--mem-budget GIB] [--timeout S]

The corpus (bench/delta_corpus.py) is fixed: real layer pairs of six kinds, fetched from PyPI,
Debian and npm and tarred deterministically, so numbers are reproducible. Every tool runs in its
own process under `/usr/bin/time -v` (its peak RSS, wall time) and every decoded output is
checked against the new layer's sha256. An anchor whose estimated memory exceeds --mem-budget on
a pair, or that runs past --timeout, is reported as skipped with the reason, never silently.

Anchors: `zstd -19 --long=31 --patch-from`, `xdelta3 -9` (its source window raised to cover the
old layer when that is over xdelta3's 64 MiB default), bsdiff4, and plain HDiffPatch
(bench/_hdiff.py: the hdiffpatch module's default diff, compressed by its zstd -19 or LZMA -9
plugin, the smaller). fleetmesh's column is what a device downloads: `plan_layer`'s bare patch
(the form a release manifest names, without the self-check digests; docs/delta.md), applied
with the diff ID, in memory as the agent does today.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from bench.delta_corpus import CORPUS, DEFAULT_CACHE, KINDS, Pair, layers, select, validate

ANCHORS: Final = ("zstd", "xdelta3", "bsdiff4", "hdiffpatch")
CLASSIC: Final = ANCHORS[:3]
TOOLS: Final = ("fleetmesh", *ANCHORS)
XDELTA_DEFAULT_WINDOW: Final = 64 << 20
GIB: Final = 1 << 30


@dataclass(frozen=True, slots=True)
class Run:
    seconds: float
    peak_rss: int  # bytes


@dataclass(frozen=True, slots=True)
class Result:
    tool: str
    patch_bytes: int = 0
    create: Run | None = None
    apply: Run | None = None
    skipped: str = ""  # why the tool has no figure on this pair


@dataclass(slots=True)
class Row:
    name: str
    kind: str
    old_bytes: int
    new_bytes: int
    results: list[Result] = field(default_factory=list)
    tried: list[list[object]] = field(default_factory=list)  # fleetmesh's plan_layer candidates

    def result(self, tool: str) -> Result | None:
        found = [r for r in self.results if r.tool == tool and not r.skipped]
        return found[0] if found else None

    def best_anchor(self) -> Result | None:
        ran = [r for r in self.results if r.tool in ANCHORS and not r.skipped]
        return min(ran, key=lambda r: r.patch_bytes) if ran else None

    def ratio_best(self) -> float | None:
        best = self.best_anchor()
        return ratio(self.result("fleetmesh"), best)

    def ratio_classic(self) -> float | None:
        """ours / the best of zstd, xdelta3 and bsdiff4 (the README's older claim)."""
        ran = [r for r in self.results if r.tool in CLASSIC and not r.skipped]
        return ratio(self.result("fleetmesh"),
                     min(ran, key=lambda r: r.patch_bytes) if ran else None)

    def ratio_hdiff(self) -> float | None:
        return ratio(self.result("fleetmesh"), self.result("hdiffpatch"))


# ---- pure parts ---------------------------------------------------------------------------------

def ratio(ours: Result | None, anchor: Result | None) -> float | None:
    """ours / anchor by patch size; None when either has no figure."""
    if ours is None or anchor is None:
        return None
    if anchor.patch_bytes <= 0:
        raise ValueError(f"{anchor.tool}: patch of {anchor.patch_bytes} bytes")
    return ours.patch_bytes / anchor.patch_bytes


def geomean(values: Sequence[float | None]) -> float | None:
    """The geometric mean of the values that exist; None if there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if any(v <= 0 for v in present):
        raise ValueError("geometric mean of a non-positive ratio")
    return math.exp(sum(math.log(v) for v in present) / len(present))


def memory_estimate(tool: str, old: int, new: int) -> int:
    """Bytes the tool needs to create a patch, by its own documentation: bsdiff's
    max(17n, 9n + m); HDiffPatch's in-memory diff ~ old + new + 5 x old (a 32-bit suffix array
    and its match cache) plus the bench's own copies of both; the others stream or use a
    window of the old layer."""
    if tool == "bsdiff4":
        return max(17 * old, 9 * old + new) + old + new
    if tool == "hdiffpatch":
        return 7 * old + 2 * new
    return 2 * (old + new)


def skip_reason(tool: str, old: int, new: int, budget: int) -> str:
    """Why `tool` does not run on a pair of these sizes under a memory budget ("" if it runs)."""
    need = memory_estimate(tool, old, new)
    if tool in ANCHORS and need > budget:
        return (f"needs ~{need / GIB:.1f} GiB to create (estimate) > --mem-budget "
                f"{budget / GIB:.1f} GiB")
    return ""


def xdelta_window(old: int) -> int:
    """xdelta3's -B: its default 64 MiB, or the next power of two covering the old layer."""
    return max(XDELTA_DEFAULT_WINDOW, 1 << max(old - 1, 1).bit_length())


def _tried(tried: Sequence[Sequence[object]]) -> str:
    """plan_layer's candidates as `METHOD size`, e.g. "HDIFF 21.3K, TAR_MEMBERS 36.3K"."""
    return ", ".join(f"{method} {_size(size) if isinstance(size, int) else size}"
                     for method, size in tried)


def _worst(values: Sequence[float | None]) -> float | None:
    return max((v for v in values if v is not None), default=None)


def _size(n: int) -> str:
    if n < 10_000:
        return f"{n}B"
    if n < 10 << 20:
        return f"{n / 1024:,.1f}K"
    return f"{n / 2**20:,.1f}M"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}M"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(rows: Sequence[Row]) -> str:
    """The bench's report: per pair and tool, then per pair the ratios, then the means."""
    out = []
    head = (f"{'pair':34} {'tool':10} {'patch':>9} {'create s':>9} {'apply s':>8} "
            f"{'create RSS':>10} {'apply RSS':>9}")
    out += [head, "-" * len(head)]
    for row in rows:
        for i, r in enumerate(row.results):
            label = row.name if i == 0 else ""
            if r.skipped:
                out.append(f"{label:34} {r.tool:10} skipped: {r.skipped}")
                continue
            assert r.create is not None and r.apply is not None
            out.append(f"{label:34} {r.tool:10} {_size(r.patch_bytes):>9} "
                       f"{r.create.seconds:9.2f} {r.apply.seconds:8.2f} "
                       f"{_mib(r.create.peak_rss):>10} {_mib(r.apply.peak_rss):>9}"
                       + (f"  tried {_tried(row.tried)}" if r.tool == "fleetmesh" else ""))
    out.append("")
    head = (f"{'pair':34} {'kind':9} {'old':>7} {'new':>7} {'zstd':>9} {'xdelta3':>9} "
            f"{'bsdiff4':>9} {'hdiff':>9} {'ours':>9} {'ours/best':>9} {'best':>10} "
            f"{'ours/hdiff':>10} {'apply RSS ours':>14} {'zstd -d':>7} {'hdiff':>6}")
    out += [head, "-" * len(head)]
    for row in rows:
        sizes = []
        for tool in (*ANCHORS, "fleetmesh"):
            got = row.result(tool)
            sizes.append(f"{_size(got.patch_bytes) if got else 'skip':>9}")
        best = row.best_anchor()
        rss = []
        for tool, width in (("fleetmesh", 14), ("zstd", 7), ("hdiffpatch", 6)):
            got = row.result(tool)
            rss.append(f"{_mib(got.apply.peak_rss) if got and got.apply else '-':>{width}}")
        out.append(f"{row.name:34} {row.kind:9} {_size(row.old_bytes):>7} "
                   f"{_size(row.new_bytes):>7} {' '.join(sizes)} {_fmt(row.ratio_best()):>9} "
                   f"{best.tool if best else '-':>10} {_fmt(row.ratio_hdiff()):>10} "
                   f"{' '.join(rss)}")
    worst = _worst([r.ratio_best() for r in rows])
    losses = [ours.patch_bytes - best.patch_bytes for row in rows
              if (ours := row.result("fleetmesh")) and (best := row.best_anchor())
              and ours.patch_bytes > best.patch_bytes]
    out += ["",
            f"geometric mean over {sum(r.ratio_best() is not None for r in rows)} pairs: "
            f"ours/best anchor {_fmt(geomean([r.ratio_best() for r in rows]))}, "
            f"ours/HDiffPatch {_fmt(geomean([r.ratio_hdiff() for r in rows]))}",
            f"ours <= best anchor on every pair: "
            f"{'yes' if worst is not None and worst <= 1.0 else 'NO'} "
            f"(worst ours/best {_fmt(worst)}; pairs where ours is larger: {len(losses)}"
            + (f", by {min(losses)} to {max(losses)} bytes)" if losses else ")"),
            f"without HDiffPatch: ours / best of zstd, xdelta3, bsdiff4: geometric mean "
            f"{_fmt(geomean([r.ratio_classic() for r in rows]))}, worst "
            f"{_fmt(_worst([r.ratio_classic() for r in rows]))}",
            "best anchor: the smallest of zstd -19 --long=31 --patch-from, xdelta3 -9, bsdiff4 "
            "and plain HDiffPatch that ran on the pair; RSS: peak of the tool's own process "
            "(/usr/bin/time -v)"]
    return "\n".join(out)


def to_json(rows: Sequence[Row], command: Sequence[str]) -> dict[str, object]:
    pairs = []
    for row in rows:
        data = asdict(row)
        best = row.best_anchor()
        data["best_anchor"] = best.tool if best else None
        data["ours_over_best"] = row.ratio_best()
        data["ours_over_hdiffpatch"] = row.ratio_hdiff()
        pairs.append(data)
    return {"command": list(command), "pairs": pairs,
            "geomean_ours_over_best": geomean([r.ratio_best() for r in rows]),
            "geomean_ours_over_hdiffpatch": geomean([r.ratio_hdiff() for r in rows])}


def rows_from_json(data: object) -> list[Row]:
    """The rows of a table `to_json` wrote (ValueError if it is not one)."""
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, list):
        raise ValueError("not a bench.delta table: no list of pairs")
    rows = []
    try:
        for p in pairs:
            row = Row(p["name"], p["kind"], p["old_bytes"], p["new_bytes"], tried=p["tried"])
            for r in p["results"]:
                runs = [Run(**r[k]) if r[k] is not None else None for k in ("create", "apply")]
                row.results.append(Result(r["tool"], r["patch_bytes"], runs[0], runs[1],
                                          r["skipped"]))
            rows.append(row)
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a bench.delta table: {e!r}") from None
    return rows


# ---- measuring ----------------------------------------------------------------------------------

class Timeout(Exception):
    pass


def measure(argv: Sequence[str], workdir: Path, timeout: float) -> Run:
    """Run argv in its own process group under /usr/bin/time -v: wall time and peak RSS."""
    report = workdir / "time.txt"
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(report), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise Timeout(f"ran past --timeout {timeout:.0f} s") from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {err.strip()[-500:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
    return Run(seconds, int(match.group(1)) * 1024 if match else 0)


def _sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def commands(tool: str, old: Path, new: Path, patch: Path, out: Path,
             report: Path, new_sha256: bytes) -> tuple[list[str], list[str]]:
    py = sys.executable
    if tool == "fleetmesh":
        # Created as publishing does (plan_layer: a bare patch) and applied as an agent does:
        # with the manifest's diff ID, so the full sha256 is checked.
        diff_id = "sha256:" + new_sha256.hex()
        return ([py, "-m", "bench._fleetmesh", "create", str(old), str(new), str(patch),
                 str(report)],
                [py, "-m", "bench._fleetmesh", "apply", str(old), str(patch), str(out), diff_id])
    if tool == "zstd":
        return (["zstd", "-q", "-f", "-19", "--long=31", f"--patch-from={old}", str(new), "-o",
                 str(patch)],
                ["zstd", "-q", "-f", "-d", "--long=31", f"--patch-from={old}", str(patch), "-o",
                 str(out)])
    if tool == "xdelta3":
        window = str(xdelta_window(old.stat().st_size))
        return (["xdelta3", "-9", "-B", window, "-f", "-e", "-s", str(old), str(new), str(patch)],
                ["xdelta3", "-B", window, "-f", "-d", "-s", str(old), str(patch), str(out)])
    if tool == "bsdiff4":
        return ([py, "-c", "import bsdiff4, sys; bsdiff4.file_diff(*sys.argv[1:])", str(old),
                 str(new), str(patch)],
                [py, "-c", "import bsdiff4, sys; bsdiff4.file_patch(*sys.argv[1:])", str(old),
                 str(out), str(patch)])
    if tool == "hdiffpatch":
        return ([py, "-m", "bench._hdiff", "create", str(old), str(new), str(patch)],
                [py, "-m", "bench._hdiff", "apply", str(old), str(patch), str(out)])
    raise ValueError(tool)


def bench_pair(pair: Pair, old: Path, new: Path, work: Path, budget: int,
               timeout: float, progress: Callable[[Row], None],
               tools: Sequence[str] = TOOLS) -> Row:
    """Run the tools on the pair; `progress` sees the row after each tool."""
    want = _sha256(new)
    row = Row(pair.name, pair.kind, old.stat().st_size, new.stat().st_size)
    for tool in TOOLS:
        reason = ("not run (--tools)" if tool not in tools
                  else skip_reason(tool, row.old_bytes, row.new_bytes, budget))
        if reason:
            row.results.append(Result(tool, skipped=reason))
            progress(row)
            continue
        patch, out, report = work / f"{tool}.patch", work / f"{tool}.out", work / "fm.json"
        create_argv, apply_argv = commands(tool, old, new, patch, out, report, want)
        try:
            create = measure(create_argv, work, timeout)
            apply = measure(apply_argv, work, timeout)
        except Timeout as e:
            row.results.append(Result(tool, skipped=str(e)))
            progress(row)
            continue
        if _sha256(out) != want:
            raise RuntimeError(f"{pair.name}: {tool} decoded the wrong bytes")
        row.results.append(Result(tool, patch.stat().st_size, create, apply))
        if tool == "fleetmesh":
            row.tried = json.loads(report.read_text())["tried"]
        out.unlink()
        patch.unlink()
        progress(row)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.delta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", nargs="+", default=[],
                        help="pairs by name, or by a package they contain")
    parser.add_argument("--kinds", nargs="+", default=[], help=f"of: {', '.join(KINDS)}")
    parser.add_argument("--json", type=Path, help="also write the table to this file")
    parser.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: print the tables of earlier --json runs as one")
    parser.add_argument("--mem-budget", type=float, default=8.0,
                        help="GiB an anchor may need to create a patch (default 8)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds one create or apply may take (default 1800)")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS,
                        help="run only these tools (the others are printed as not run)")
    args = parser.parse_args(argv)
    if args.report:
        try:
            saved = [row for path in args.report
                     for row in rows_from_json(json.loads(path.read_text()))]
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            print(f"bench.delta: --report: {e}", file=sys.stderr)
            return 2
        print(render(saved))
        return 0
    try:
        validate(CORPUS)
        pairs = select(CORPUS, args.only, args.kinds)
    except ValueError as e:
        print(f"bench.delta: {e}", file=sys.stderr)
        return 2
    if args.mem_budget <= 0 or args.timeout <= 0:
        print("bench.delta: --mem-budget and --timeout must be positive", file=sys.stderr)
        return 2
    try:
        import bsdiff4  # noqa: F401
    except ImportError:
        print("bench.delta: bsdiff4 missing: pip install 'fleetmesh[bench]'", file=sys.stderr)
        return 2
    for exe in ("zstd", "xdelta3", "/usr/bin/time", "dpkg-deb", "apt-get"):
        if shutil.which(exe) is None:
            print(f"bench.delta: {exe} not found", file=sys.stderr)
            return 2

    command = ["python", "-m", "bench.delta", *(sys.argv[1:] if argv is None else argv)]
    rows: list[Row] = []

    def save(current: Row) -> None:
        # After every tool, so that a long run keeps what it finished (a pair cut short is
        # saved with the tools it got to).
        if args.json:
            args.json.write_text(json.dumps(to_json([*rows, current], command), indent=1) + "\n")

    for pair in pairs:
        old, new = layers(args.cache, pair)
        with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
            rows.append(bench_pair(pair, old, new, Path(tmp), int(args.mem_budget * GIB),
                                   args.timeout, save, args.tools))
        print(f"done {pair.name}", file=sys.stderr, flush=True)
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
