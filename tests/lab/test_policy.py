"""Partial peer maps and policy enforcement on real parts (issue 18 item 6, docs/policy.md): a
fleet with a policy; each device's WireGuard interface holds only the peers the policy allows,
its LAN neighbours and its cross-LAN gossip partners (`wg show`); a packet no rule allows is
dropped at the device (its `inet fleetmesh_dev` drop counter) and, on a relayed path, at the
hub (`inet fleetmesh_hub`); an allowed one gets through.

Written to the fixtures of tests/lab/test_mesh_fleet.py.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator._peermap import Member
from lab import Lab, parse_topology, wait_online
from tests.coordinator.test_peermap_partial import ref_gossip

from .conftest import lab_skip_reason, lab_up, log_tail
from .test_mesh_fleet import listed, operator, outer_wan, until, wg_show

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

FLEET = "lab"
# 12 devices on 7 LANs: enough that a device's LAN neighbours, policy peers and up to 2 x 3
# gossip partners (coordinator/_peermap.py GOSSIP_PARTNERS, both ways) leave some devices out
ROLES = {"fwa-1": "cam", "fwa-2": "lamp", "fwb-1": "nvr",
         **{f"{lan}-{i}": "lamp" for lan in ("fwc", "fwd", "fwe", "fwf") for i in (1, 2)},
         "sym-1": "cam"}
POLICY = "role=cam -> role=nvr tcp/554\n"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    topology = parse_topology({
        "operator": {"on": "wan"},
        "agents": {"docker": False},
        "lan": [{"name": "fwa", "nat": "firewall", "devices": 2},
                {"name": "fwb", "nat": "firewall", "devices": 1},
                *({"name": n, "nat": "firewall", "devices": 2}
                  for n in ("fwc", "fwd", "fwe", "fwf")),
                {"name": "sym", "nat": "symmetric", "devices": 1}],
    }, source="tests/lab/test_policy.py")
    with lab_up(topology, network_only=False) as lab:
        wait_online(lab, list(ROLES), 120)
        for name, role in ROLES.items():
            r = operator(lab, "devices", "tag", name, f"role={role}")
            assert r.returncode == 0, r.stderr
        with tempfile.NamedTemporaryFile("w", suffix=".policy", delete=False) as f:
            f.write(POLICY)
        try:
            r = operator(lab, "policy", "set", "--fleet", FLEET, f.name)
            assert r.returncode == 0, r.stderr
        finally:
            Path(f.name).unlink()
        yield lab


def expected_peers(lab: Lab) -> dict[str, set[str]]:
    """What each device's map must hold: the policy's peers (`policy explain`), its LAN
    neighbours, and its gossip partners on the coordinator's ring (the same rule, recomputed
    from the devices' public addresses)."""
    shown = listed(lab)
    members = [Member(n, FLEET, str(d["public_key"]), str(d["mesh_ipv4"]), str(d["mesh_ipv6"]),
                      public_ip=outer_wan(lab, n)) for n, d in shown.items()]
    out: dict[str, set[str]] = {}
    for name in shown:
        r = operator(lab, "policy", "explain", "--fleet", FLEET, name, "--json")
        assert r.returncode == 0, r.stderr
        explained = json.loads(r.stdout)
        allowed = {g["peer"] for g in explained["reach"] + explained["reached_by"]}
        out[name] = allowed | ref_gossip(members, name)
    return out


def test_wg_show_holds_only_the_allowed_peers_and_gossip_partners(lab: Lab) -> None:
    shown = listed(lab)
    by_key = {str(d["public_key"]): n for n, d in shown.items()}
    want = expected_peers(lab)

    def configured(name: str) -> set[str]:
        return {by_key[k] for k in wg_show(lab, name, "endpoints") if k in by_key}

    for name in ROLES:
        until(f"{name}'s interface holds its partial map",
              lambda name=name: configured(name) == want[name], 60)  # type: ignore[misc]
        assert len(want[name]) < len(ROLES) - 1 or ROLES[name] == "nvr", want[name]
    # a lamp reaches no device by rule: the cam's map does not hold it unless it is a gossip
    # partner or a LAN neighbour (fwa-2 is the cam's)
    assert "fwa-2" in want["fwa-1"]


def _counter(lab: Lab, node: str, table: str, chain: str) -> int:
    r = lab.run(node, ["nft", "list", "chain", "inet", table, chain], capture_output=True,
                text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    m = re.search(r"counter packets (\d+) bytes \d+ drop", r.stdout)
    assert m is not None, r.stdout
    return int(m.group(1))


def _connect(lab: Lab, src: str, dst_ip: str, port: int) -> str:
    """'refused' (it got through: nobody listens) or 'timeout' (dropped on the way)."""
    code = ("import socket, sys\ns = socket.socket(); s.settimeout(5)\n"
            "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
            "except ConnectionRefusedError:\n    print('refused')\n"
            "except OSError:\n    print('timeout')\n")
    r = lab.run(src, ["python3", "-c", code, dst_ip, str(port)], capture_output=True,
                text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_port_no_rule_allows_is_dropped_at_the_device_and_the_hub(lab: Lab) -> None:
    shown = listed(lab)
    nvr = str(shown["fwb-1"]["mesh_ipv4"])
    # a direct path (two filtering NATs): the nvr's own firewall decides
    assert _connect(lab, "fwa-1", nvr, 554) == "refused", log_tail("fwb-1")
    before = _counter(lab, "fwb-1", "fleetmesh_dev", "input")
    assert _connect(lab, "fwa-1", nvr, 555) == "timeout"
    assert _counter(lab, "fwb-1", "fleetmesh_dev", "input") > before
    # a relayed path (symmetric NAT against a filtering one): the hub drops it first
    hub_before = _counter(lab, "coordinator", "fleetmesh_hub", "forward")
    assert _connect(lab, "sym-1", nvr, 554) == "refused"
    assert _connect(lab, "sym-1", nvr, 555) == "timeout"
    deadline = time.monotonic() + 10
    while _counter(lab, "coordinator", "fleetmesh_hub", "forward") <= hub_before:
        assert time.monotonic() < deadline, "the hub did not count the drop"
        time.sleep(0.5)
    # fleetmesh's own port between paired devices is always open
    assert _connect(lab, "fwa-1", nvr, 7946) in ("open", "refused")
