"""Topology files: valid ones parse into the documented addressing plan, bad ones fail with one
line naming the field. No root needed."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import NAT_KINDS, TopologyError, load_topology, parse_topology
from lab.network import plan
from lab.topology import parse_rate

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "lab").glob("*.toml"))
CLI = REPO / ".venv" / "bin" / "fleetmesh-lab"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(text)
    return p


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"nat-kinds.toml", "home-office.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    topo = load_topology(path)
    assert topo.lans
    nodes, links = plan(topo)
    names = [n.name for n in nodes]
    assert len(names) == len(set(names))
    assert "coordinator" in names
    # every interface name fits IFNAMSIZ
    for link in links:
        assert len(link.a_if) <= 15 and len(link.b_if) <= 15


def test_nat_kinds_example_has_every_kind() -> None:
    topo = load_topology(REPO / "examples/lab/nat-kinds.toml")
    assert sorted(lan.nat for lan in topo.lans) == sorted(NAT_KINDS)
    assert topo.operator is not None and topo.operator.on == "wan"
    assert any(lan.shaping.rate_bps == 4_000_000 for lan in topo.lans)


def test_addressing_plan() -> None:
    topo = parse_topology(
        {
            "operator": {"on": "b"},
            "lan": [
                {"name": "a", "nat": "firewall", "devices": 2},
                {"name": "b", "nat": "double", "devices": 1},
                {"name": "c", "nat": "none", "devices": 2},
                {"name": "d", "nat": "hard", "subnet": "10.9.0.0/16"},
            ],
        }
    )
    assert topo.wan_subnet == ipaddress.IPv4Network("198.51.100.0/24")
    nodes = {n.name: n for n in plan(topo)[0]}
    assert nodes["coordinator"].underlay_ipv4 == "198.51.100.1"
    assert nodes["a-router"].underlay_ipv4 == "198.51.100.10"
    assert nodes["a-1"].underlay_ipv4 == "10.201.1.11"
    assert nodes["a-2"].underlay_ipv4 == "10.201.1.12"
    assert nodes["a-2"].gateway == "10.201.1.1"
    assert nodes["b-cgnat"].underlay_ipv4 == "198.51.100.11"
    assert nodes["b-router"].underlay_ipv4 == "100.64.1.2"
    assert nodes["b-router"].gateway == "100.64.1.1"
    assert nodes["b-1"].underlay_ipv4 == "10.201.2.11"
    assert nodes["operator"].underlay_ipv4 == "10.201.2.10"
    assert nodes["operator"].lan == "b"
    assert nodes["c-1"].underlay_ipv4 == "198.51.100.12"
    assert nodes["c-2"].underlay_ipv4 == "198.51.100.13"
    assert nodes["c-1"].lan == "c" and nodes["c-1"].gateway is None
    assert nodes["d-router"].underlay_ipv4 == "198.51.100.14"
    assert nodes["d-1"].underlay_ipv4 == "10.9.0.11"
    roles = {n.name: n.role for n in nodes.values()}
    assert roles["b-cgnat"] == roles["b-router"] == "router"
    assert nodes["b-1"].mountns_path and nodes["b-router"].mountns_path is None


def test_custom_wan_and_shaping() -> None:
    topo = parse_topology(
        {
            "wan": {"subnet": "203.0.113.0/24"},
            "lan": [{"name": "x", "nat": "symmetric", "uplink": "512kbit", "loss": 0.05}],
        }
    )
    assert str(topo.coordinator_ipv4) == "203.0.113.1"
    assert topo.lans[0].shaping.rate_bps == 512_000
    assert topo.lans[0].shaping.loss == 0.05
    assert topo.lans[0].devices == 1


@pytest.mark.parametrize(
    ("text", "bps"),
    [("4mbit", 4_000_000), ("512kbit", 512_000), ("1.5mbit", 1_500_000), ("1gbit", 10**9)],
)
def test_parse_rate(text: str, bps: int) -> None:
    assert parse_rate(text) == bps


BAD = [
    (
        '[[lan]]\nname = "a"\nnat = "cone"\n',
        "lan[0].nat: must be one of firewall, hard, symmetric, double, none",
    ),
    (
        '[[lan]]\nname = "a"\n[[lan]]\nname = "b"\nnat = "carrier"\n',
        "lan[1].nat: must be one of firewall, hard, symmetric, double, none",
    ),
    ('[[lan]]\nname = "Home"\n', "lan[0].name: must be 1-8 characters of [a-z0-9]"),
    ('[[lan]]\nname = "averylongname"\n', "lan[0].name: must be 1-8 characters of [a-z0-9]"),
    ('[[lan]]\nname = "a-b"\n', "lan[0].name: must be 1-8 characters of [a-z0-9]"),
    ('[[lan]]\nnat = "hard"\n', "lan[0].name: required"),
    ('[[lan]]\nname = "a"\n[[lan]]\nname = "a"\n', "lan[1].name: duplicate LAN name 'a'"),
    ('[[lan]]\nname = "a"\ndevices = 0\n', "lan[0].devices: must be between 1 and 200"),
    ('[[lan]]\nname = "a"\ndevices = 100000\n', "lan[0].devices: must be between 1 and 200"),
    ('[[lan]]\nname = "a"\ndevices = "2"\n', "lan[0].devices: must be an integer"),
    (
        '[[lan]]\nname = "a"\nuplink = "fast"\n',
        "lan[0].uplink: must be a rate like 512kbit, 4mbit or 1gbit",
    ),
    (
        '[[lan]]\nname = "a"\nuplink = "4mbps"\n',
        "lan[0].uplink: must be a rate like 512kbit, 4mbit or 1gbit",
    ),
    ('[[lan]]\nname = "a"\nuplink = 4\n', 'lan[0].uplink: must be a string like "4mbit"'),
    ('[[lan]]\nname = "a"\nloss = 1.0\n', "lan[0].loss: must be in [0, 1)"),
    ('[[lan]]\nname = "a"\nloss = -0.1\n', "lan[0].loss: must be in [0, 1)"),
    ('[[lan]]\nname = "a"\nloss = "lots"\n', "lan[0].loss: must be a number in [0, 1)"),
    (
        '[[lan]]\nname = "a"\ncolour = "red"\n',
        "lan[0].colour: unknown key (allowed: devices, loss, metered, name, nat, seed_ratio, "
        "subnet, udp_timeout, uplink)",
    ),
    ('[[lan]]\nname = "a"\nseed_ratio = -1\n', "lan[0].seed_ratio: must be between 0 and 1000"),
    ('[[lan]]\nname = "a"\nseed_ratio = "x"\n', "lan[0].seed_ratio: must be a number >= 0"),
    ('[[lan]]\nname = "a"\nseed_ratio = true\n', "lan[0].seed_ratio: must be a number >= 0"),
    ('[[lan]]\nname = "a"\nmetered = "no"\n', "lan[0].metered: must be true or false"),
    ('[[lan]]\nname = "a"\nudp_timeout = 2\n',
     "lan[0].udp_timeout: must be whole seconds from 5 to 3600"),
    ('[[lan]]\nname = "a"\nudp_timeout = 30.5\n',
     "lan[0].udp_timeout: must be whole seconds from 5 to 3600"),
    ('[[lan]]\nname = "a"\nnat = "none"\nudp_timeout = 30\n',
     'lan[0].udp_timeout: a nat="none" LAN has no router'),
    ('[agents]\nlazy_after = -1\n[[lan]]\nname = "a"\n',
     "agents.lazy_after: must be seconds from 0 to 86400"),
    (
        '[wan]\nsubnet = "198.51.100.0/24"\nmtu = 1400\n[[lan]]\nname = "a"\n',
        "wan.mtu: unknown key (allowed: subnet)",
    ),
    ("[lans]\n", "topology.lans: unknown key (allowed: agents, lan, operator, wan)"),
    (
        '[agents]\npeer_sharing = "no"\n[[lan]]\nname = "a"\n',
        "agents.peer_sharing: must be true or false",
    ),
    (
        '[agents]\nsharing = false\n[[lan]]\nname = "a"\n',
        "agents.sharing: unknown key (allowed: docker, image, lazy_after, mode, peer_sharing)",
    ),
    ('[agents]\nmode = "vm"\n[[lan]]\nname = "a"\n',
     "agents.mode: must be one of process, container"),
    ('[agents]\nmode = "container"\ndocker = false\n[[lan]]\nname = "a"\n',
     "agents.mode = container: needs each device's engine (agents.docker = true)"),
    ('[agents]\nimage = "fleetmesh/agent:1"\n[[lan]]\nname = "a"\n',
     "agents.image: an image reference (repository:tag), with mode = container only"),
    ('[agents]\nmode = "container"\nimage = "Fleetmesh/Agent"\n[[lan]]\nname = "a"\n',
     "agents.image: an image reference (repository:tag), with mode = container only"),
    ('[agents]\nmode = "container"\nimage = 3\n[[lan]]\nname = "a"\n',
     "agents.image: an image reference (repository:tag), with mode = container only"),
    (
        '[wan]\nsubnet = "10.201.0.0/16"\n[[lan]]\nname = "a"\n',
        "lan[0].subnet: 10.201.1.0/24 overlaps wan.subnet 10.201.0.0/16",
    ),
    (
        '[[lan]]\nname = "a"\nsubnet = "10.5.0.0/24"\n'
        '[[lan]]\nname = "b"\nsubnet = "10.5.0.0/25"\n',
        "lan[1].subnet: 10.5.0.0/25 overlaps lan[0].subnet 10.5.0.0/24",
    ),
    (
        '[[lan]]\nname = "a"\nsubnet = "100.64.1.0/24"\n[[lan]]\nname = "b"\nnat = "double"\n',
        "lan[1] carrier subnet: 100.64.1.0/24 overlaps lan[0].subnet 100.64.1.0/24",
    ),
    (
        '[[lan]]\nname = "a"\nsubnet = "10.5.0.7/24"\n',
        "lan[0].subnet: not an IPv4 network (10.5.0.7/24 has host bits set)",
    ),
    (
        '[wan]\nsubnet = "198.51.100.0/30"\n[[lan]]\nname = "a"\n',
        "wan.subnet: /30 is too small (at most /28)",
    ),
    (
        '[[lan]]\nname = "a"\nsubnet = "10.5.0.0/28"\ndevices = 5\n',
        "lan[0].subnet: 10.5.0.0/28 is too small for 5 devices",
    ),
    (
        '[[lan]]\nname = "a"\nnat = "none"\nsubnet = "10.5.0.0/24"\n',
        'lan[0].subnet: a nat="none" LAN has no subnet of its own',
    ),
    (
        '[operator]\non = "garage"\n[[lan]]\nname = "a"\n',
        "operator.on: no LAN named 'garage' (use \"wan\" or a LAN name)",
    ),
    (
        '[operator]\non = "a"\n[[lan]]\nname = "a"\nnat = "none"\n',
        'operator.on: LAN \'a\' has nat="none" (no LAN of its own); use "wan"',
    ),
    (
        '[operator]\nwhere = "wan"\n[[lan]]\nname = "a"\n',
        "operator.where: unknown key (allowed: on)",
    ),
    ("[wan]\n", "lan: at least one [[lan]] is required"),
    ('lan = "a"\n', "lan: must be an array of tables ([[lan]])"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_topology(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TopologyError) as e:
        load_topology(write(tmp_path, text))
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_toml_syntax_error(tmp_path: Path) -> None:
    p = write(tmp_path, '[[lan]\nname = "a"\n')
    with pytest.raises(TopologyError) as e:
        load_topology(p)
    assert str(e.value).startswith(f"{p}: TOML syntax error:")
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="no such file"):
        load_topology(tmp_path / "nope.toml")


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8).filter(
    lambda s: s != "wan"
)


@settings(max_examples=50, deadline=None)
@given(
    lans=st.lists(
        st.tuples(
            _names,
            st.sampled_from(NAT_KINDS),
            st.integers(1, 5),
            st.sampled_from([None, "4mbit", "256kbit"]),
            st.sampled_from([0.0, 0.01, 0.5]),
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    operator=st.sampled_from([None, "wan", "first"]),
)
def test_round_trip_and_plan(
    lans: list[tuple[str, str, int, str | None, float]], operator: str | None
) -> None:
    data: dict[str, object] = {"lan": []}
    for name, nat, devices, uplink, loss in lans:
        e: dict[str, object] = {"name": name, "nat": nat, "devices": devices, "loss": loss}
        if uplink:
            e["uplink"] = uplink
        data["lan"].append(e)  # type: ignore[attr-defined]
    if operator == "wan":
        data["operator"] = {"on": "wan"}
    elif operator == "first" and lans[0][1] != "none":
        data["operator"] = {"on": lans[0][0]}
    topo = parse_topology(data)
    assert parse_topology(topo.to_dict()).to_dict() == topo.to_dict()
    nodes, _ = plan(topo)
    addrs = [(n.underlay_ipv4, n.netns) for n in nodes]
    # no two nodes share an underlay address (routers of double LANs use the carrier /24)
    assert len({a for a, _ in addrs}) == len(addrs)
    assert all(len(n.netns) < 64 for n in nodes)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "lab.cli"]
    return subprocess.run(
        exe + list(args), check=False, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def _lab_traces() -> list[str]:
    """What a lab from these bad files would have made (LAN "a"): its namespaces."""
    netns_dir = Path("/var/run/netns")
    if not netns_dir.is_dir():
        return []
    return sorted(p for p in os.listdir(netns_dir) if p.startswith("fm-a-"))


@pytest.mark.parametrize("text", [BAD[0][0], '[[lan]\nname = "a"\n'], ids=["bad-nat", "syntax"])
def test_cli_bad_file_exits_2_with_one_line(tmp_path: Path, text: str) -> None:
    r = run_cli("up", str(write(tmp_path, text)))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetmesh-lab: "), r.stderr
    assert "Traceback" not in r.stderr
    assert _lab_traces() == []


def test_cli_missing_file(tmp_path: Path) -> None:
    r = run_cli("up", str(tmp_path / "missing.toml"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr


def test_cli_exec_without_command() -> None:
    r = run_cli("exec", "home-1")
    assert r.returncode == 2 and "no command" in r.stderr


def test_cross_lan_serving_keys_become_that_lans_agent_flags() -> None:
    topo = parse_topology({"lan": [
        {"name": "a", "seed_ratio": 1.5, "metered": False}, {"name": "b"},
        {"name": "c", "seed_ratio": 2}]})
    assert topo.lan("a").agent_args() == ["--seed-ratio", "1.5", "--unmetered"]
    assert topo.lan("b").agent_args() == []
    assert topo.lan("c").agent_args() == ["--seed-ratio", "2"]
    assert parse_topology(topo.to_dict()) == topo


def test_udp_timeout_and_lazy_after_round_trip() -> None:
    topo = parse_topology({"agents": {"lazy_after": 20}, "lan": [
        {"name": "a", "udp_timeout": 30}, {"name": "b"}]})
    assert topo.lan("a").udp_timeout == 30 and topo.lan("b").udp_timeout is None
    assert topo.agents.lazy_after == 20.0
    assert parse_topology(topo.to_dict()) == topo


def test_agents_mode_defaults_to_process_and_container_round_trips() -> None:
    assert parse_topology({"lan": [{"name": "a"}]}).agents.mode == "process"
    topo = parse_topology({"agents": {"mode": "container"}, "lan": [{"name": "a"}]})
    assert (topo.agents.mode, topo.agents.image) == ("container", None)
    assert topo.to_dict()["agents"] == {"peer_sharing": True, "docker": True,
                                        "mode": "container"}
    assert parse_topology(topo.to_dict()) == topo
    pinned = parse_topology({"agents": {"mode": "container", "image": "fleetmesh/agent:0.1.0"},
                             "lan": [{"name": "a"}]})
    assert pinned.agents.image == "fleetmesh/agent:0.1.0"
    assert parse_topology(pinned.to_dict()) == pinned
