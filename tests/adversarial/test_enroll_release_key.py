"""Attack: a compromised coordinator hands a new device its own release key at enrollment, so
that everything it signs later is installed. Defence: the operator's tooling writes the
fingerprint of the fleet's release key into the enrollment token (`fm1.<certificate
fingerprint>.<secret>.<release key fingerprint>`), which reaches the device from the operator,
not from the coordinator; `fleetmesh-agent join` refuses an enrollment whose key does not match
(one line, exit 4, nothing written). Tokens without a fingerprint keep working and trust the
coordinator's key on first use, with a note (docs/security.md, "The enrollment token pins the
fleet's release key").

Against a real `fleetmesh coordinator serve` child process, through the real `fleetmesh` and
`fleetmesh-agent` command lines; the "compromised coordinator" is the operator API replacing
the fleet's key, which is exactly what such a coordinator's answer looks like to a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import DataDir
from agent.cli import main
from mesh.clikit import EXIT_UNTRUSTED
from mesh.control import TokenParts
from mesh.release import key_fingerprint, write_signing_key
from ops.client import OperatorClient
from tests.coordinator_process import running_coordinator

FLEETMESH = str(Path(sys.executable).parent / "fleetmesh")


def fleetmesh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEETMESH, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def join(coord_url: str, token: str, data: Path, name: str) -> int:
    return main(["join", coord_url, "--token", token, "--name", name, "--data", str(data),
                 "--lan-endpoint", "192.168.1.2:51820"])


def test_a_coordinator_cannot_hand_a_new_device_its_own_release_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    operator_key = write_signing_key(tmp_path / "release.key")
    attacker_key = write_signing_key(tmp_path / "attacker.key")
    fleet_key = bytes(operator_key.verify_key)
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        op.set_release_key("cams", fleet_key.hex())
        # the operator's CLI writes the fingerprint of its own key into the token
        env = coord.operator_env(tmp_path / "home")
        env["FLEETMESH_SIGNING_KEY"] = str(tmp_path / "release.key")
        out = fleetmesh(env, "token", "create", "--fleet", "cams", "--uses", "5")
        assert out.returncode == 0, out.stderr
        token = out.stdout.strip()
        assert TokenParts.parse(token).release_key_fp == key_fingerprint(fleet_key)
        out = fleetmesh(env, "devices", "provision", "cam-9", "--fleet", "cams")
        assert out.returncode == 0, out.stderr
        join_token = json.loads(out.stdout)["token"]
        assert TokenParts.parse(join_token).release_key_fp == key_fingerprint(fleet_key)

        # the coordinator now hands out another key (what a compromised one does)
        op.set_release_key("cams", bytes(attacker_key.verify_key).hex())
        capsys.readouterr()
        assert join(coord.url, token, tmp_path / "victim", "cam-1") == EXIT_UNTRUSTED
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "release key" in err, err
        assert "Traceback" not in err
        assert not DataDir(tmp_path / "victim").is_enrolled()

        # the honest key again: the same token enrolls, and the device pins that key
        op.set_release_key("cams", fleet_key.hex())
        assert join(coord.url, token, tmp_path / "good", "cam-2") == 0, capsys.readouterr()
        enrollment = DataDir(tmp_path / "good").read_identity().enrollment
        assert enrollment.release_key == fleet_key.hex()


def test_a_token_with_a_fingerprint_refuses_a_fleet_without_a_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    operator_key = write_signing_key(tmp_path / "release.key")
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        token = op.create_token("cams", uses=2,
                                release_key=bytes(operator_key.verify_key).hex())["token"]
        capsys.readouterr()
        assert join(coord.url, token, tmp_path / "dev", "cam-1") == EXIT_UNTRUSTED
        assert "no release key" in capsys.readouterr().err
        assert not DataDir(tmp_path / "dev").is_enrolled()


def test_an_old_token_without_a_fingerprint_still_enrolls_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    operator_key = write_signing_key(tmp_path / "release.key")
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        op.set_release_key("cams", bytes(operator_key.verify_key).hex())
        token = op.create_token("cams")["token"]
        assert TokenParts.parse(token).release_key_fp is None
        capsys.readouterr()
        assert join(coord.url, token, tmp_path / "dev", "cam-1") == 0
        assert "carries no release key fingerprint" in capsys.readouterr().err
        assert DataDir(tmp_path / "dev").read_identity().enrollment.release_key == \
            bytes(operator_key.verify_key).hex()


def test_token_create_pins_the_given_or_local_key_or_says_it_pins_none(
        tmp_path: Path) -> None:
    """`--release-key` wins over the local signing key; with neither, the token carries no
    fingerprint and the CLI says so on stderr."""
    write_signing_key(tmp_path / "release.key")
    attacker_key = write_signing_key(tmp_path / "attacker.key")
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        env = coord.operator_env(tmp_path / "home")
        env["FLEETMESH_SIGNING_KEY"] = str(tmp_path / "release.key")
        out = fleetmesh(env, "token", "create", "--fleet", "cams", "--release-key",
                        bytes(attacker_key.verify_key).hex())
        assert out.returncode == 0  # an explicit key is the operator's word
        explicit = TokenParts.parse(out.stdout.strip()).release_key_fp
        assert explicit == key_fingerprint(bytes(attacker_key.verify_key))
        del env["FLEETMESH_SIGNING_KEY"]
        env["HOME"] = str(tmp_path / "nokey")
        os.makedirs(env["HOME"], exist_ok=True)
        out = fleetmesh(env, "token", "create", "--fleet", "cams")
        assert out.returncode == 0 and "no release key fingerprint" in out.stderr
        assert TokenParts.parse(out.stdout.strip()).release_key_fp is None
