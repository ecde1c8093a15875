"""A device that lost its enrollment but kept its WireGuard key joins again, through the real
`fleetmesh-agent join` and SDK against a real `fleetmesh coordinator serve` child process."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import DataDir
from agent.cli import main
from ops.client import OperatorClient
from tests.coordinator_process import running_coordinator
from vpn import public_key_from_private


def test_join_again_after_losing_the_enrollment_proves_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Legitimate re-enrollment: enrollment.json is gone, private.key is kept; `join` with the
    fleet token again must work (the agent answers the coordinator's challenge with its key)
    and keep the device's addresses. A token holder without that key is refused (the other
    tests of tests/adversarial/test_enroll_takeover.py)."""
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        token = op.create_token("cams", uses=5)["token"]
        data = tmp_path / "dev"
        argv = ["join", coord.url, "--token", token, "--name", "cam-1", "--data", str(data),
                "--lan-endpoint", "192.168.1.2:51820"]
        assert main(argv) == 0
        first = DataDir(data).read_identity().enrollment
        DataDir(data).enrollment_path.unlink()  # lost; the key stays
        assert main(argv) == 0, capsys.readouterr().err
        again = DataDir(data).read_identity().enrollment
        assert again.name == "cam-1" and again.mesh_ipv4 == first.mesh_ipv4
        assert again.credential != first.credential
        info = op.device("cam-1")
        key = public_key_from_private(DataDir(data).read_key())
        assert info["state"] == "active" and info["public_key"] == key
