"""The delta and keygen commands through the real `fleetmesh` parser and dispatcher."""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.clikit import run
from ops.cli import build_parser


def _parser() -> argparse.ArgumentParser:
    return build_parser()


def fleetmesh(*argv: str | Path) -> int:
    return run(_parser(), [str(a) for a in argv])


def test_delta_create_apply_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old.tar", tmp_path / "new.tar"
    old.write_bytes(b"layer contents " * 5000)
    new.write_bytes(b"layer contents " * 2500 + b"new bits" + b"layer contents " * 2500)
    assert fleetmesh("delta", "create", old, new, tmp_path / "p") == 0
    assert fleetmesh("delta", "apply", old, tmp_path / "p", tmp_path / "out") == 0
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
    assert "sha256:" in capsys.readouterr().out


def test_corrupt_patch_is_one_line_error(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"a" * 1000)
    new.write_bytes(b"b" * 1000)
    assert fleetmesh("delta", "create", old, new, tmp_path / "p") == 0
    capsys.readouterr()
    patch = bytearray((tmp_path / "p").read_bytes())
    patch[-5] ^= 0xFF
    (tmp_path / "p").write_bytes(bytes(patch))
    code = fleetmesh("delta", "apply", old, tmp_path / "p", tmp_path / "out")
    err = capsys.readouterr().err
    assert code != 0 and not (tmp_path / "out").exists()
    assert err.count("\n") == 1 and "Traceback" not in err and "corrupted" in err


def test_missing_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = fleetmesh("delta", "apply", tmp_path / "nope", tmp_path / "p", tmp_path / "o")
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "no such file" in err


def test_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "release.key"
    assert fleetmesh("release", "keygen", "--out", key) == 0
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert len(capsys.readouterr().out.split()[0]) == 64
    assert fleetmesh("release", "keygen", "--out", key) != 0
    assert "already exists" in capsys.readouterr().err


def test_subprocess_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"x")
    (tmp_path / "p").write_bytes(b"FMDL garbage")
    here = str(Path(__file__).parent)
    code = ("import sys; from mesh.clikit import run; "
            f"sys.path.insert(0, {here!r}); from test_cli_release import _parser; "
            "sys.exit(run(_parser(), sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "delta", "apply", str(tmp_path / "old"),
                           str(tmp_path / "p"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_bare_patch_create_and_apply_with_expect(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old.tar", tmp_path / "new.tar"
    old.write_bytes(b"layer contents " * 5000)
    new.write_bytes(b"layer contents " * 2500 + b"new bits" + b"layer contents " * 2500)
    diff_id = "sha256:" + hashlib.sha256(new.read_bytes()).hexdigest()
    assert fleetmesh("delta", "create", old, new, tmp_path / "self") == 0
    assert fleetmesh("delta", "create", "--bare", old, new, tmp_path / "bare") == 0
    out = capsys.readouterr().out
    assert "bare" in out and f"target {diff_id}\n" in out  # the full diff ID, to pass to --expect
    assert (tmp_path / "bare").stat().st_size < (tmp_path / "self").stat().st_size - 24
    assert fleetmesh("delta", "apply", old, tmp_path / "bare", tmp_path / "out",
                     "--expect", diff_id) == 0
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
    assert capsys.readouterr().out.strip().endswith(f"bytes, {diff_id}")


def test_bare_patch_without_expect_is_one_line_error(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"a" * 1000)
    new.write_bytes(b"a" * 500 + b"b" * 500)
    assert fleetmesh("delta", "create", "--bare", old, new, tmp_path / "p") == 0
    capsys.readouterr()
    code = fleetmesh("delta", "apply", old, tmp_path / "p", tmp_path / "out")
    err = capsys.readouterr().err
    assert code != 0 and not (tmp_path / "out").exists()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "a bare patch needs the expected diff ID (it carries no digest of its own)" in err


def test_apply_prints_the_full_sha256_of_the_output(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"x" * 3000)
    new.write_bytes(b"x" * 1500 + b"y" + b"x" * 1500)
    assert fleetmesh("delta", "create", old, new, tmp_path / "p") == 0
    assert fleetmesh("delta", "apply", old, tmp_path / "p", tmp_path / "out") == 0
    full = "sha256:" + hashlib.sha256(new.read_bytes()).hexdigest()
    assert capsys.readouterr().out.splitlines()[-1].endswith(full)
