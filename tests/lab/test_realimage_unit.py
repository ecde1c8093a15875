"""The realistic bench image's reproducible parts (lab/realimage.py) and issue 12's arithmetic
on a rollout's figures (lab/rollout.py), without a lab: same inputs give the same tar bytes;
the root filesystem tar drops per-run state; B counts what a device holding v1 must fetch."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from lab.realimage import FIXED_MTIME, SITE, apt_mirror, normalize_rootfs, site_tar, tar_of_files
from lab.rollout import ImageRollout, WanWindow, release_bytes


def test_a_tar_of_files_is_the_same_bytes_for_the_same_files_and_lists_its_parents() -> None:
    files = {"app/b/x.py": (b"x", 0o644), "app/a.py": (b"a", 0o755)}
    one, two = tar_of_files(files), tar_of_files(dict(reversed(files.items())))
    assert one == two
    members = tarfile.open(fileobj=io.BytesIO(one)).getmembers()
    assert [m.name for m in members] == ["app", "app/a.py", "app/b", "app/b/x.py"]
    assert {m.mtime for m in members} == {FIXED_MTIME}
    assert members[1].mode == 0o755 and members[0].isdir()


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    import zipfile  # only this helper builds wheels

    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_wheels_are_unpacked_into_debians_site_directory(tmp_path: Path) -> None:
    whl = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl",
                 {"pkg/__init__.py": b"", "pkg-1.0.dist-info/METADATA": b"Name: pkg\n"})
    tar = tarfile.open(fileobj=io.BytesIO(site_tar([whl])))
    names = tar.getnames()
    assert f"{SITE}/pkg/__init__.py" in names and f"{SITE}/pkg-1.0.dist-info/METADATA" in names
    assert hashlib.sha256(site_tar([whl])).digest() == hashlib.sha256(site_tar([whl])).digest()


def test_the_root_filesystem_tar_drops_per_run_state_and_fixes_times(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for rel, data in {"etc/os-release": b"debian\n", "var/log/dpkg.log": b"today\n",
                      "etc/machine-id": b"1234\n", "etc/shadow": b"root:*:20425:0:99999:7:::\n",
                      "dev/null": b""}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("os-release", root / "etc" / "link")
    out = tmp_path / "rootfs.tar"
    normalize_rootfs(root, out)
    tar = tarfile.open(out)
    names = tar.getnames()
    assert "var/log" in names and "var/log/dpkg.log" not in names
    assert "dev" in names and "dev/null" not in names
    assert tar.getmember("etc/link").issym()
    assert tar.extractfile("etc/machine-id").read() == b""  # type: ignore[union-attr]
    assert tar.extractfile("etc/shadow").read() == b"root:*:19000:0:99999:7:::\n"  # type: ignore[union-attr]
    assert {m.mtime for m in tar.getmembers()} == {FIXED_MTIME}
    first = out.read_bytes()
    normalize_rootfs(root, out)
    assert out.read_bytes() == first


def test_the_apt_mirror_is_the_main_archive_of_the_machines_sources(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://deb.debian.org/debian-security\n\n"
                      "Types: deb\nURIs: http://mirror.example/debian/\n")
    assert apt_mirror([tmp_path / "absent", deb822]) == "http://mirror.example/debian"
    legacy = tmp_path / "sources.list"
    legacy.write_text("deb [arch=amd64] http://ftp.example/debian bookworm main\n")
    assert apt_mirror([legacy]) == "http://ftp.example/debian"


def test_b_is_what_a_device_holding_the_earlier_release_fetches() -> None:
    published = {"layers": [
        {"stored_size": 50_000_000, "reused_from": 1, "deltas": []},  # the base: unchanged
        {"stored_size": 20_000_000, "reused_from": None,
         "deltas": [{"size": 6_000_000}, {"size": 9_000_000}]},  # numpy: its best delta
        {"stored_size": 3_000, "reused_from": None, "deltas": []},  # new, no delta: its chunks
    ]}
    assert release_bytes(published) == (6_003_000, 70_003_000)


def _rollout(rx: int, tx: int, seconds: float, gap: float, complete: bool = True
             ) -> ImageRollout:
    return ImageRollout(version=1, release_bytes=1_000_000, image_bytes=3_000_000,
                        stored_bytes=1_000_000, publish_seconds=5.0, seconds=seconds,
                        complete=complete, devices_per_lan={"a": 3},
                        uplink_bps={"a": 4_000_000}, wan={"a": WanWindow(rx, tx, 800, 700)},
                        max_report_gap=gap, gap_device="a-1", max_progress_gap=gap, states={})


def test_issue_12_acceptance_names_each_criterion_missed() -> None:
    # allowance 3 x 4 kB + 8 kB = 20 kB; fluid bound 2 s; 1.3 x 2 + 30 = 32.6 s
    assert _rollout(1_070_000, 20_000, 32.0, 29.0).failures(30.0) == []
    bad = _rollout(1_070_001, 20_001, 33.0, 31.0, complete=False).failures(30.0)
    assert [line.split(":")[0] for line in bad] == ["v1", "v1 a", "v1 a", "v1", "v1"]
    assert "WAN in 1070001 > 1.05 x B + allowance = 1070000" in bad[1]
    assert "WAN out 20001 > allowance 20000" in bad[2]
    assert _rollout(1_000_000, 0, 10.0, 45.0).failures() == []  # no report limit given
