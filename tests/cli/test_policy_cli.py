"""`fleetmesh policy check|set|show|explain` as an operator runs them (docs/policy.md): `check`
offline, the others against a real coordinator process with devices enrolled and tagged through
the SDK. Bad input is one line and exit 2, before any network call."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from ops.client import OperatorClient, enroll
from tests.coordinator_process import FLEETMESH, RunningCoordinator, running_coordinator
from vpn import generate_keypair

FLEET = "polfleet"
POLICY = """\
# cameras stream to the recorders
role=cam -> role=nvr tcp/554
role=nvr <-> role=nvr tcp/7000
"""


@dataclass
class Fleet:
    coord: RunningCoordinator
    home: Path

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.coord.cli(self.home, *argv)

    def ok(self, *argv: str) -> str:
        return self.coord.cli_ok(self.home, *argv)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data = tmp_path_factory.mktemp("coord")
    home = tmp_path_factory.mktemp("home")
    with running_coordinator(data, data.parent / f"{data.name}.log") as coord:
        with OperatorClient(coord.url, coord.api_key, cert_der=coord.der) as op:
            token = op.create_token(FLEET, uses=3)["token"]

            async def join() -> None:
                for name in ("cam-1", "nvr-1", "nvr-2"):
                    await enroll(coord.url, token, generate_keypair().public, name=name)
            trio.run(join)
            for name, role in (("cam-1", "cam"), ("nvr-1", "nvr"), ("nvr-2", "nvr")):
                op.tag_device(name, {"role": role})
        yield Fleet(coord, home)


def _one_line(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _file(tmp_path: Path, text: str | bytes, name: str = "fleet.policy") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_check_offline(tmp_path: Path) -> None:
    good = _file(tmp_path, POLICY)
    result = subprocess.run([FLEETMESH, "policy", "check", good], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout == f"{good}: valid, 2 rules\n"
    result = subprocess.run([FLEETMESH, "policy", "check", "--json", good],
                            capture_output=True, text=True, timeout=60, check=False)
    assert [r["line"] for r in json.loads(result.stdout)["rules"]] == [2, 3]
    for text, error in (
            ("role=cam -> role=nvr tcp/554\n* -> * tcp/99999\n",
             "line 2: 'tcp/99999' must be ports 1-65535, first <= last"),
            ("\n\nrole=cam => role=nvr any", "line 3: 'role=cam => role=nvr any' must be "
             "SRC -> DST PORTS or SRC <-> DST PORTS"),
            (b"\xff -> * any", "not UTF-8 text")):
        bad = _file(tmp_path, text, "bad.policy")
        line = _one_line(subprocess.run([FLEETMESH, "policy", "check", bad],
                                        capture_output=True, text=True, timeout=60,
                                        check=False))
        assert line == f"fleetmesh: {bad}: {error}"
    line = _one_line(subprocess.run([FLEETMESH, "policy", "check", str(tmp_path / "none")],
                                    capture_output=True, text=True, timeout=60, check=False))
    assert line == f"fleetmesh: cannot read {tmp_path / 'none'}: No such file or directory"


def test_set_show_explain(fleet: Fleet, tmp_path: Path) -> None:
    assert "no policy (the default only" in fleet.ok("policy", "show", "--fleet", FLEET)
    out = fleet.ok("policy", "set", "--fleet", FLEET, _file(tmp_path, POLICY))
    assert out == f"fleet {FLEET}: policy version 1, 2 rules\n"
    assert fleet.ok("policy", "show", "--fleet", FLEET) == \
        f"# fleet {FLEET}, policy version 1\n{POLICY}"
    shown = json.loads(fleet.ok("policy", "show", "--fleet", FLEET, "--json"))
    assert shown["version"] == 1 and shown["policy"] == POLICY
    compiled = json.loads(fleet.ok("policy", "explain", "--fleet", FLEET, "cam-1", "--json"))
    # all three enrolled from loopback: one public address, so LAN neighbours too
    assert [(g["peer"], g["ports"], g["why"]) for g in compiled["reach"]] == [
        (peer, "any", ["line 2: role=cam -> role=nvr tcp/554",
                       "default: LAN neighbour (same public address)"])
        for peer in ("nvr-1", "nvr-2")]
    table = fleet.ok("policy", "explain", "--fleet", FLEET, "nvr-1")
    assert table.splitlines()[0] == (f"nvr-1 in fleet {FLEET} (policy version 1): operators "
                                     "and hubs any, both ways; 4 device grants")
    assert "line 3: role=nvr <-> role=nvr tcp/7000" in table
    assert "reached by" in table


def test_refusals_are_one_line(fleet: Fleet, tmp_path: Path) -> None:
    bad = _file(tmp_path, "* -> *\n")
    # checked before any call: the stored policy stays
    before = json.loads(fleet.ok("policy", "show", "--fleet", FLEET, "--json"))["version"]
    assert _one_line(fleet.run("policy", "set", "--fleet", FLEET, bad)) == \
        f"fleetmesh: {bad}: line 1: no ports after the destination (write any, or e.g. tcp/554)"
    assert json.loads(fleet.ok("policy", "show", "--fleet", FLEET, "--json"))["version"] == \
        before
    assert "no active device 'ghost'" in _one_line(
        fleet.run("policy", "explain", "--fleet", FLEET, "ghost"), 1)
    assert _one_line(fleet.run("policy", "show", "--fleet", "Bad_Fleet")).startswith(
        "fleetmesh: fleet: must be")
    assert "required: --fleet" in _one_line(fleet.run("policy", "show"))
