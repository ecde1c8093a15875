"""Attack: a compromised coordinator hands a new device root metadata of its own (a root
version 1 signed by keys it holds, naming its release key), so that the device follows the
attacker's rotations. Defence: the operator's tooling writes the fingerprint of the fleet's
root version 1 into the enrollment token (`fm1.<cert fp>.<secret>.r<root fp>`); `join` fetches
the roots, verifies them from that version 1 and pins the release key the newest names, or
refuses (one line, exit 4, nothing written). docs/security.md, "Release key rotation".

Against a real `fleetmesh coordinator serve` child process, through the real `fleetmesh` and
`fleetmesh-agent` command lines. The attacker is the operator API publishing a self-signed
root version 1 first, which is what a coordinator that lies looks like to a device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from agent import DataDir
from mesh.clikit import EXIT_REFUSED, EXIT_UNTRUSTED
from mesh.control import ControlError, TokenParts
from mesh.release import encode_signed_root, root_fingerprint, write_signing_key
from ops.client import OperatorClient
from tests.coordinator_process import running_coordinator
from tests.rootkit import ROOT_KEYS, root

from .test_enroll_release_key import fleetmesh, join

A, B, C = ROOT_KEYS


def test_token_parts_carry_a_root_fingerprint() -> None:
    cert, secret, fp = "a" * 64, "s" * 32, "b" * 64
    parts = TokenParts.parse(f"fm1.{cert}.{secret}.r{fp}")
    assert (parts.root_fp, parts.release_key_fp) == (fp, None)
    assert str(parts) == f"fm1.{cert}.{secret}.r{fp}"
    assert TokenParts.parse(f"fm1.{cert}.{secret}.{fp}").release_key_fp == fp  # unchanged
    for bad in (f"r{fp[:-1]}", f"r{fp}0", f"R{fp}", f"r{'g' * 64}", "r"):
        with pytest.raises(ControlError, match="fingerprint"):
            TokenParts.parse(f"fm1.{cert}.{secret}.{bad}")
    with pytest.raises(ControlError, match="not both"):
        TokenParts(cert, secret, fp, fp)


def test_a_device_pins_the_release_key_of_the_newest_verified_root(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release_1 = write_signing_key(tmp_path / "release-1.key")
    release_2 = write_signing_key(tmp_path / "release-2.key")
    v1 = root("cams", 1, release_1, A, B)
    v2 = root("cams", 2, release_2, B, C)
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        op.put_root("cams", v1)
        op.put_root("cams", v2)
        env = coord.operator_env(tmp_path / "home")
        env["FLEETMESH_SIGNING_KEY"] = str(tmp_path / "release-2.key")
        out = fleetmesh(env, "token", "create", "--fleet", "cams", "--uses", "5")
        assert out.returncode == 0, out.stderr
        token = out.stdout.strip()
        assert TokenParts.parse(token).root_fp == root_fingerprint(v1)
        assert "the token pins the fleet's root version 1" in out.stderr
        out = fleetmesh(env, "devices", "provision", "cam-9", "--fleet", "cams")
        assert out.returncode == 0, out.stderr
        assert TokenParts.parse(json.loads(out.stdout)["token"]).root_fp == root_fingerprint(v1)

        capsys.readouterr()
        assert join(coord.url, token, tmp_path / "dev", "cam-1") == 0, capsys.readouterr()
        assert "named by the fleet's root metadata" in capsys.readouterr().err
        data = DataDir(tmp_path / "dev")
        assert data.read_identity().enrollment.release_key == bytes(
            release_2.verify_key).hex()
        assert data.read_root() == v2


def test_a_coordinator_cannot_hand_a_new_device_roots_of_its_own(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release = write_signing_key(tmp_path / "release.key")
    operator_v1 = root("cams", 1, release, A, B)
    (tmp_path / "root-1.json").write_bytes(encode_signed_root(operator_v1))
    attacker = SigningKey(b"\x66" * 32)
    forged_v1 = root("cams", 1, attacker, attacker, keys=[attacker], threshold=1)
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        op.put_root("cams", forged_v1)  # the coordinator's own roots, first
        env = coord.operator_env(tmp_path / "home")
        env["FLEETMESH_SIGNING_KEY"] = str(tmp_path / "release.key")
        # Without --root the tooling checks the coordinator's roots against the local key.
        out = fleetmesh(env, "token", "create", "--fleet", "cams")
        assert out.returncode == EXIT_REFUSED and "not yours" in out.stderr, out
        # With the operator's own root file, the token names it ...
        out = fleetmesh(env, "token", "create", "--fleet", "cams", "--root",
                        str(tmp_path / "root-1.json"))
        assert out.returncode == 0, out.stderr
        token = out.stdout.strip()
        assert TokenParts.parse(token).root_fp == root_fingerprint(operator_v1)
        # ... and the device refuses the coordinator's roots: one line, exit 4, nothing kept.
        capsys.readouterr()
        assert join(coord.url, token, tmp_path / "victim", "cam-1") == EXIT_UNTRUSTED
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not the pinned" in err, err
        victim = DataDir(tmp_path / "victim")
        assert not victim.is_enrolled() and victim.read_root() is None
