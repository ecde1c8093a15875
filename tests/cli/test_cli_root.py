"""`fleetmesh root ...` as an operator runs it: the real console script in a child process, real
key files, a real coordinator process for `root publish`; the SDK's root methods against it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from mesh.release import (
    decode_root_body,
    decode_signed_root,
    key_id,
    read_signing_key,
    root_fingerprint,
    verify_root,
    verify_root_chain,
)
from ops.client import ApiError, OperatorClient
from tests.coordinator_process import FLEETMESH, running_coordinator
from tests.rootkit import root

from .test_cli import assert_one_line_error as one_line_error


def fleetmesh(*args: str | Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEETMESH, *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False, env=env)


def keygen(path: Path) -> str:
    out = fleetmesh("release", "keygen", "--out", path)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0]


def make_keys(tmp_path: Path) -> tuple[list[Path], list[str], Path, Path]:
    """Three root key files and their public keys; two release key files."""
    files = [tmp_path / f"root-{n}.key" for n in "abc"]
    pubs = [keygen(f) for f in files]
    rel1, rel2 = tmp_path / "release-1.key", tmp_path / "release-2.key"
    keygen(rel1)
    keygen(rel2)
    return files, pubs, rel1, rel2


def test_init_sign_show_rotate(tmp_path: Path) -> None:
    files, pubs, rel1, rel2 = make_keys(tmp_path)
    v1 = tmp_path / "root-1.json"
    out = fleetmesh("root", "init", "--fleet", "cams", "--root-key", *pubs, "--threshold", "2",
                    "--release-key", rel1, "-o", v1)
    assert out.returncode == 0, out.stderr
    assert "unsigned" in out.stdout and "2 of 3" in out.stdout
    for n, key in enumerate(files[:2], start=1):
        out = fleetmesh("root", "sign", v1, "--key", key)
        assert out.returncode == 0, out.stderr
        assert f"{n} of the 2 signatures" in out.stdout
    signed = decode_signed_root(v1.read_bytes())
    meta = verify_root(signed, None, root_fingerprint(signed))
    assert meta.release_key == bytes(read_signing_key(rel1).verify_key)
    assert meta.root_keys == tuple(bytes.fromhex(p) for p in pubs)
    shown = json.loads(fleetmesh("root", "show", v1, "--json").stdout)
    assert shown["version"] == 1 and shown["fleet"] == "cams" and shown["threshold"] == 2
    assert shown["valid_signatures"] == 2 and shown["fingerprint"] == root_fingerprint(signed)
    assert shown["root_keys"] == [key_id(bytes.fromhex(p)) for p in pubs]
    assert shown["signatures"] == [key_id(bytes.fromhex(p)) for p in pubs[:2]]
    text = fleetmesh("root", "show", v1).stdout
    assert root_fingerprint(signed) in text and "2 valid" in text

    # Rotate the release key: same root keys; signed by B and C (of v1, and of v2 itself).
    v2 = tmp_path / "root-2.json"
    out = fleetmesh("root", "rotate", v1, "--release-key",
                    bytes(read_signing_key(rel2).verify_key).hex(), "-o", v2)
    assert out.returncode == 0, out.stderr
    for key in files[1:]:
        assert fleetmesh("root", "sign", v2, "--key", key).returncode == 0
    shown = json.loads(fleetmesh("root", "show", v2, "--previous", v1, "--json").stdout)
    assert shown["version"] == 2 and shown["successor_of_previous"] == "ok"
    chain = [decode_signed_root(v1.read_bytes()), decode_signed_root(v2.read_bytes())]
    assert verify_root_chain(None, root_fingerprint(chain[0]), chain).release_key == bytes(
        read_signing_key(rel2).verify_key)

    # New root keys and threshold: the old keys must still sign (TUF), `show --previous` says so.
    new_key = tmp_path / "root-d.key"
    new_pub = keygen(new_key)
    v3 = tmp_path / "root-3.json"
    assert fleetmesh("root", "rotate", v2, "--release-key", rel2, "--root-key", new_pub,
                     "--threshold", "1", "-o", v3).returncode == 0
    assert fleetmesh("root", "sign", v3, "--key", new_key).returncode == 0
    shown = json.loads(fleetmesh("root", "show", v3, "--previous", v2, "--json").stdout)
    assert "0 valid signatures of root version 2's keys, needs 2" in shown[
        "successor_of_previous"]
    out = fleetmesh("root", "sign", v3, "--key", files[0])
    assert "not one of its root keys" in out.stdout
    assert fleetmesh("root", "sign", v3, "--key", files[2]).returncode == 0
    shown = json.loads(fleetmesh("root", "show", v3, "--previous", v2, "--json").stdout)
    assert shown["successor_of_previous"] == "ok"
    assert decode_root_body(decode_signed_root(v3.read_bytes()).body).threshold == 1


def test_bad_files_and_arguments_are_one_line_exit_2(tmp_path: Path) -> None:
    files, pubs, rel1, _ = make_keys(tmp_path)
    v1 = tmp_path / "root-1.json"
    base = ("root", "init", "--fleet", "cams", "--release-key", rel1, "-o", v1)
    assert "threshold 4 is not between 1 and the 3 root keys" in one_line_error(
        fleetmesh(*base, "--root-key", *pubs, "--threshold", "4"))
    assert "not distinct" in one_line_error(
        fleetmesh(*base, "--root-key", pubs[0], pubs[0], "--threshold", "1"))
    assert "neither 64 hex digits nor a key file" in one_line_error(
        fleetmesh(*base, "--root-key", "abc", "--threshold", "1"))
    one_line_error(fleetmesh("root", "init", "--fleet", "cams"))  # argparse: missing options
    assert not v1.exists()
    assert fleetmesh(*base, "--root-key", *pubs, "--threshold", "2").returncode == 0
    assert "already exists" in one_line_error(
        fleetmesh(*base, "--root-key", *pubs, "--threshold", "2"))
    assert fleetmesh("root", "sign", v1, "--key", files[0]).returncode == 0
    before = v1.read_bytes()
    assert "already signed" in one_line_error(fleetmesh("root", "sign", v1, "--key", files[0]))
    assert v1.read_bytes() == before
    assert "not a fleetmesh release key file" in one_line_error(
        fleetmesh("root", "sign", v1, "--key", v1))
    for garbage in (b"", b"{}", b"\xff" * 10, b"[" * 100_000, before[:-40]):
        bad = tmp_path / "bad.json"
        bad.write_bytes(garbage)
        for args in (("show", bad), ("sign", bad, "--key", files[1]),
                     ("rotate", bad, "--release-key", rel1, "-o", tmp_path / "x.json")):
            assert str(bad) in one_line_error(fleetmesh("root", *args))
    assert "No such file" in one_line_error(fleetmesh("root", "show", tmp_path / "nope"))


def test_publish_to_a_real_coordinator_and_read_back(tmp_path: Path) -> None:
    files, pubs, rel1, rel2 = make_keys(tmp_path)
    v1, v2 = tmp_path / "root-1.json", tmp_path / "root-2.json"
    assert fleetmesh("root", "init", "--fleet", "cams", "--root-key", *pubs, "--threshold", "2",
                     "--release-key", rel1, "-o", v1).returncode == 0
    assert fleetmesh("root", "sign", v1, "--key", files[0]).returncode == 0
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        env = coord.operator_env(tmp_path)
        # One signature of the two needed: the coordinator refuses (exit 1, one line).
        assert "1 valid signatures of its own root keys, needs 2" in one_line_error(
            fleetmesh("root", "publish", v1, env=env), code=1)
        assert fleetmesh("root", "sign", v1, "--key", files[1]).returncode == 0
        out = fleetmesh("root", "publish", v1, env=env)
        assert out.returncode == 0, out.stderr
        assert f"release key {key_id(read_signing_key(rel1).verify_key)}" in out.stdout
        assert fleetmesh("root", "rotate", v1, "--release-key", rel2, "-o", v2).returncode == 0
        assert fleetmesh("root", "sign", v2, "--key", files[2]).returncode == 0
        assert fleetmesh("root", "sign", v2, "--key", files[0]).returncode == 0
        assert fleetmesh("root", "publish", v2, env=env).returncode == 0
        # `release set-key` no longer moves the key past the roots.
        env_key = {**env, "FLEETMESH_SIGNING_KEY": str(rel1)}
        assert "root metadata" in one_line_error(
            fleetmesh("release", "set-key", "--fleet", "cams", env=env_key), code=1)

        with OperatorClient(coord.url, coord.api_key, cert_der=coord.der) as op:
            chain = op.roots("cams")
            assert chain == [decode_signed_root(v1.read_bytes()),
                             decode_signed_root(v2.read_bytes())]
            assert op.roots("cams", since=1) == chain[1:]
            assert op.roots("cams", since=2) == []
            meta = verify_root_chain(None, root_fingerprint(chain[0]), chain)
            assert meta.release_key == bytes(read_signing_key(rel2).verify_key)
            # Version 3 signed only by a key no root lists: refused, nothing stored.
            stranger = SigningKey(os.urandom(32))
            with pytest.raises(ApiError) as refused:
                op.put_root("cams", root("cams", 3, stranger, stranger, keys=[stranger],
                                         threshold=1))
            assert refused.value.status == 403
            assert op.roots("cams", since=2) == []
