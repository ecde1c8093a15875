"""bench.delta and bench.delta_corpus: the pure parts (no network, no anchor tool run)."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench.delta import (
    Result,
    Row,
    Run,
    bench_pair,
    geomean,
    main,
    ratio,
    render,
    rows_from_json,
    skip_reason,
    to_json,
    xdelta_window,
)
from bench.delta_corpus import (
    CORPUS,
    KINDS,
    NODE_MODULES,
    SITE_PACKAGES,
    Bump,
    Pair,
    select,
    spec_digest,
    tree_tar,
    unpack_npm,
    unpack_wheel,
    validate,
)

MIB = 1 << 20


def _res(tool: str, size: int, rss: int = 10 * MIB) -> Result:
    return Result(tool, size, Run(1.0, 50 * MIB), Run(0.5, rss))


def _row(name: str, sizes: dict[str, int], skipped: dict[str, str] | None = None) -> Row:
    row = Row(name, "pypi-ext", 2 * MIB, 3 * MIB)
    row.results = [_res(t, n) for t, n in sizes.items()]
    row.results += [Result(t, skipped=why) for t, why in (skipped or {}).items()]
    return row


# ---- ratios -------------------------------------------------------------------------------

def test_ratio_and_missing_figures() -> None:
    assert ratio(_res("fleetmesh", 90), _res("zstd", 100)) == pytest.approx(0.9)
    assert ratio(None, _res("zstd", 100)) is None
    assert ratio(_res("fleetmesh", 90), None) is None
    with pytest.raises(ValueError, match="zstd"):
        ratio(_res("fleetmesh", 90), _res("zstd", 0))


def test_geomean() -> None:
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert geomean([0.5, None, 2.0]) == pytest.approx(1.0)  # missing ratios are left out
    assert geomean([None]) is None
    assert geomean([]) is None
    with pytest.raises(ValueError):
        geomean([1.0, 0.0])


def test_best_anchor_ignores_ours_and_skipped_anchors() -> None:
    row = _row("p", {"fleetmesh": 50, "zstd": 120, "xdelta3": 100, "hdiffpatch": 80},
               skipped={"bsdiff4": "too big"})
    best = row.best_anchor()
    assert best is not None and best.tool == "hdiffpatch"
    assert row.ratio_best() == pytest.approx(50 / 80)
    assert row.ratio_hdiff() == pytest.approx(50 / 80)
    no_hdiff = _row("q", {"fleetmesh": 50, "zstd": 40}, skipped={"hdiffpatch": "too big"})
    assert no_hdiff.ratio_best() == pytest.approx(1.25)
    assert no_hdiff.ratio_hdiff() is None


# ---- skipping -----------------------------------------------------------------------------

def test_bsdiff4_skipped_with_a_reason_when_over_budget() -> None:
    budget = 8 << 30
    assert skip_reason("bsdiff4", 100 * MIB, 100 * MIB, budget) == ""
    reason = skip_reason("bsdiff4", 600 * MIB, 600 * MIB, budget)
    assert "GiB" in reason and "--mem-budget" in reason
    assert skip_reason("zstd", 600 * MIB, 600 * MIB, budget) == ""
    # ours is measured whatever its size: the bench exists to show it
    assert skip_reason("fleetmesh", 6000 * MIB, 6000 * MIB, budget) == ""


def test_xdelta_window_covers_the_old_layer() -> None:
    assert xdelta_window(1000) == 64 * MIB
    assert xdelta_window(64 * MIB) == 64 * MIB
    assert xdelta_window(64 * MIB + 1) == 128 * MIB
    assert xdelta_window(600 * MIB) == 1024 * MIB


# ---- table and JSON -----------------------------------------------------------------------

def test_render_shows_ratios_means_and_skips() -> None:
    rows = [_row("win", {"fleetmesh": 90, "zstd": 100, "xdelta3": 120, "bsdiff4": 110,
                         "hdiffpatch": 100}),
            _row("lose", {"fleetmesh": 200, "zstd": 100, "xdelta3": 120, "hdiffpatch": 150},
                 skipped={"bsdiff4": "needs ~9.9 GiB"})]
    rows[0].tried = [["HDIFF", 95], ["ZSTD_PREFIX", 90]]
    text = render(rows)
    assert "skipped: needs ~9.9 GiB" in text
    assert "tried HDIFF 95B, ZSTD_PREFIX 90B" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("win", "lose"))
             and "pypi-ext" in line}
    assert "0.900" in lines["win"] and "2.000" in lines["lose"] and "1.333" in lines["lose"]
    assert f"ours/best anchor {math.sqrt(0.9 * 2.0):.3f}" in text
    assert f"ours/HDiffPatch {math.sqrt(0.9 * 200 / 150):.3f}" in text
    # without HDiffPatch: 90/100 and 200/100
    assert f"best of zstd, xdelta3, bsdiff4: geometric mean {math.sqrt(0.9 * 2.0):.3f}, " \
           "worst 2.000" in text
    assert "every pair: NO" in text and "pairs where ours is larger: 1, by 100 to 100 bytes" in text


def test_render_says_yes_only_when_ours_never_loses() -> None:
    text = render([_row("a", {"fleetmesh": 90, "zstd": 100, "hdiffpatch": 95})])
    assert "every pair: yes" in text


def test_json_round_trips_the_table() -> None:
    rows = [_row("a", {"fleetmesh": 90, "zstd": 100, "hdiffpatch": 120},
                 skipped={"bsdiff4": "big"})]
    data = json.loads(json.dumps(to_json(rows, ["python", "-m", "bench.delta"])))
    assert data["command"] == ["python", "-m", "bench.delta"]
    pair = data["pairs"][0]
    assert pair["name"] == "a" and pair["best_anchor"] == "zstd"
    assert pair["ours_over_best"] == pytest.approx(0.9)
    assert pair["ours_over_hdiffpatch"] == pytest.approx(0.75)
    assert {r["tool"]: r["skipped"] for r in pair["results"]}["bsdiff4"] == "big"
    assert data["geomean_ours_over_best"] == pytest.approx(0.9)


def test_report_renders_saved_tables_as_one(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    first = [_row("a", {"fleetmesh": 90, "zstd": 100, "hdiffpatch": 120},
                  skipped={"bsdiff4": "big"})]
    second = [_row("b", {"fleetmesh": 300, "zstd": 200, "hdiffpatch": 250})]
    for name, rows in (("1.json", first), ("2.json", second)):
        (tmp_path / name).write_text(json.dumps(to_json(rows, ["x"])))
    back = rows_from_json(json.loads((tmp_path / "1.json").read_text()))
    assert render(back) == render(first)
    assert main(["--report", str(tmp_path / "1.json"), str(tmp_path / "2.json")]) == 0
    assert capsys.readouterr().out.strip() == render(first + second)


@pytest.mark.parametrize("content", ["{", "{}", "[1]", '{"pairs": [{"name": "a"}]}'])
def test_report_refuses_what_is_not_a_table(tmp_path: Path, content: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.json").write_text(content)
    assert main(["--report", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench.delta: --report:")


# ---- corpus spec --------------------------------------------------------------------------

def test_the_corpus_is_valid_and_covers_every_kind() -> None:
    validate(CORPUS)
    assert len(CORPUS) >= 20
    assert {p.kind for p in CORPUS} == set(KINDS)


@pytest.mark.parametrize(("pair", "message"), [
    (Pair("x", "wheel", (Bump("pypi", "a", "1", "2"),)), "unknown kind"),
    (Pair("x", "deb", ()), "no packages"),
    (Pair("x", "deb", (Bump("apt", "a", "1", "2"),)), "unknown source"),
    (Pair("x", "deb", (Bump("deb", "a", "", "2"),)), "empty name or version"),
    (Pair("x", "deb", (Bump("deb", "a", "1", "1"),)), "nothing changes"),
    (Pair("x", "deb", (Bump("deb", "a", "1", "2", "musllinux_1_2_x86_64"),)), "pypi only"),
    (Pair("x", "npm", (Bump("npm", "a", "1", "2"), Bump("npm", "a", "1", "3"))), "twice"),
])
def test_validate_refuses_a_malformed_pair(pair: Pair, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate([pair])


def test_validate_refuses_repeated_names() -> None:
    pair = Pair("x", "deb", (Bump("deb", "a", "1", "2"),))
    with pytest.raises(ValueError, match="repeated"):
        validate([pair, pair])


def test_select_by_name_package_and_kind() -> None:
    assert [p.name for p in select(CORPUS, ["numpy 1.26.3->1.26.4"], [])] == [
        "numpy 1.26.3->1.26.4"]
    # a package name selects every pair holding it (numpy is also in the big stack)
    assert {p.kind for p in select(CORPUS, ["numpy"], [])} == {"pypi-ext", "big"}
    assert {p.kind for p in select(CORPUS, [], ["deb", "npm"])} == {"deb", "npm"}
    assert select(CORPUS, [], []) == list(CORPUS)
    with pytest.raises(ValueError, match="no pair named"):
        select(CORPUS, ["nosuch"], [])
    with pytest.raises(ValueError, match="unknown kind"):
        select(CORPUS, [], ["wheels"])


def test_spec_digest_follows_the_spec() -> None:
    pair = CORPUS[0]
    assert spec_digest(pair.spec("old")) != spec_digest(pair.spec("new"))
    assert spec_digest(pair.spec("old")) == spec_digest(list(pair.spec("old")))


def test_cli_refuses_bad_selection_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kinds", "wheels"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown kind" in err


def test_tools_runs_ours_alone_on_the_streaming_apply(tmp_path: Path) -> None:
    """`--tools fleetmesh`: ours is created and applied (in child processes, through
    apply_delta_file), its output checked; every other tool is printed as not run."""
    layers = []
    for side, text in (("old", b"print(1)\n" * 500), ("new", b"print(2)\n" * 501)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("app/main.py")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
        (tmp_path / f"{side}.tar").write_bytes(buf.getvalue())
        layers.append(tmp_path / f"{side}.tar")
    work = tmp_path / "work"
    work.mkdir()
    row = bench_pair(Pair("tiny", "pypi-pure", ()), layers[0], layers[1], work, 1 << 30, 120.0,
                     lambda _row: None, tools=("fleetmesh",))
    ours = row.result("fleetmesh")
    assert ours is not None and ours.patch_bytes > 0
    assert ours.apply is not None and ours.apply.peak_rss > 0
    assert {r.tool: r.skipped for r in row.results if r.tool != "fleetmesh"} == {
        tool: "not run (--tools)" for tool in ("zstd", "xdelta3", "bsdiff4", "hdiffpatch")}


# ---- deterministic tar ----------------------------------------------------------------------

def _tree(root: Path, order: list[str], mtime: int) -> None:
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode() * 3)
        path.chmod(0o755 if name.endswith(".sh") else 0o600)
        os.utime(path, (mtime, mtime))
    (root / "d").mkdir(exist_ok=True)
    (root / "d" / "link").symlink_to("../a.txt")


def test_tree_tar_is_deterministic(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _tree(one, ["a.txt", "d/b.sh", "d/e/c"], 1_000)
    _tree(two, ["d/e/c", "d/b.sh", "a.txt"], 2_000_000)
    tree_tar(one, tmp_path / "one.tar")
    tree_tar(two, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with tarfile.open(tmp_path / "one.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["a.txt", "d", "d/b.sh", "d/e", "d/e/c", "d/link"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        modes = {m.name: m.mode for m in members}
        assert modes["d"] == 0o755 and modes["d/b.sh"] == 0o755 and modes["a.txt"] == 0o600
        link = tar.getmember("d/link")
        assert link.issym() and link.linkname == "../a.txt"
        member = tar.extractfile("d/e/c")
        assert member is not None and member.read() == b"d/e/c" * 3


def test_tree_tar_changes_with_content(tmp_path: Path) -> None:
    _tree(tmp_path / "t", ["a.txt"], 0)
    tree_tar(tmp_path / "t", tmp_path / "1.tar")
    (tmp_path / "t" / "a.txt").write_bytes(b"other")
    tree_tar(tmp_path / "t", tmp_path / "2.tar")
    assert (tmp_path / "1.tar").read_bytes() != (tmp_path / "2.tar").read_bytes()


def test_unpack_wheel_into_site_packages(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        info = zipfile.ZipInfo("pkg/tool")
        info.external_attr = 0o100755 << 16
        zf.writestr(info, b"#!")
        zf.writestr("pkg/__init__.py", b"x = 1")
    unpack_wheel(wheel, tmp_path / "root")
    base = tmp_path / "root" / SITE_PACKAGES / "pkg"
    assert (base / "__init__.py").read_bytes() == b"x = 1"
    assert (base / "tool").stat().st_mode & 0o777 == 0o755
    assert (base / "__init__.py").stat().st_mode & 0o777 == 0o644


def test_unpack_wheel_refuses_escaping_paths(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("../../evil", b"x")
    with pytest.raises(ValueError, match="unsafe path"):
        unpack_wheel(wheel, tmp_path / "root")
    assert not (tmp_path / "evil").exists()


def test_unpack_npm_into_node_modules(tmp_path: Path) -> None:
    tgz = tmp_path / "p.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data, mode in (("package/index.js", b"js", 0o644),
                                 ("package/bin/cli", b"#!", 0o755)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), mode
            tar.addfile(ti, io.BytesIO(data))
    unpack_npm(tgz, "@scope/p", tmp_path / "root")
    base = tmp_path / "root" / NODE_MODULES / "@scope" / "p"
    assert (base / "index.js").read_bytes() == b"js"
    assert (base / "bin" / "cli").stat().st_mode & 0o777 == 0o755
