"""The lab's network for real: one LAN of each NAT kind, reachability, firewall behaviour,
shaping, counters, exec, mount namespaces. Needs root; the lab is always torn down."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab, Router, Topology, parse_topology

from .conftest import CLI, lab_skip_reason, lab_up

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

RATE_BPS = 4_000_000
IPERF_SECONDS = 4
IPERF_PORT = 5201


def all_kinds() -> Topology:
    return parse_topology(
        {
            "operator": {"on": "wan"},
            "lan": [
                {"name": "fw", "nat": "firewall", "devices": 2, "uplink": "4mbit"},
                {"name": "hard", "nat": "hard", "devices": 2},
                {"name": "sym", "nat": "symmetric", "devices": 2},
                {"name": "dbl", "nat": "double", "devices": 2},
                {"name": "pub", "nat": "none", "devices": 2},
            ],
        },
        source="tests/lab/test_lab_network.py",
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up(all_kinds()) as lab:
        yield lab


def coord(lab: Lab) -> str:
    return str(lab.topology.coordinator_ipv4)


def ping(lab: Lab, node: str, dst: str, count: int = 2, size: int = 56) -> bool:
    # bounded: `count` echo requests, one second of waiting for each reply at most
    r = lab.run(
        node,
        ["busybox", "ping", "-c", str(count), "-W", "1", "-s", str(size), dst],
        capture_output=True,
        timeout=count * 2 + 5,
    )
    return r.returncode == 0


def test_every_node_reaches_the_coordinator(lab: Lab) -> None:
    sources = [n for n in lab.nodes if n.role in ("device", "operator")]
    assert len([n for n in sources if n.role == "device"]) == 10
    procs = {
        n.name: subprocess.Popen(
            lab.command(n, ["busybox", "ping", "-c", "3", "-W", "1", coord(lab)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in sources
    }
    failed = [name for name, p in procs.items() if p.wait(timeout=15) != 0]
    assert failed == []


def test_lab_addresses_stay_off_the_host(lab: Lab) -> None:
    host = subprocess.run(
        ["ip", "-4", "-o", "addr"], check=False, capture_output=True, text=True
    ).stdout
    assert "198.51.100." not in host and "10.201." not in host and "100.64." not in host
    links = subprocess.run(["ip", "-o", "link"], check=False, capture_output=True, text=True).stdout
    assert " p0" not in links and "wan0" not in links


@pytest.mark.parametrize(
    ("lan", "reachable"), [("fw", False), ("dbl", False), ("hard", True), ("sym", True)]
)
def test_unsolicited_inbound(lab: Lab, lan: str, reachable: bool) -> None:
    """Route the LAN's subnet to its router from the coordinator and ping a device: a home
    router (firewall, double) drops it; hard/symmetric NATs let it in (proves the check works)."""
    spec = lab.topology.lan(lan)
    edge = lab.router(lan, "carrier" if spec.nat == "double" else "home")
    added: list[tuple[str, list[str]]] = [
        ("coordinator", ["ip", "route", "add", str(spec.subnet), "via", edge.wan_ipv4]),
    ]
    if spec.nat == "double":
        home = lab.router(lan, "home")
        # a carrier doesn't know its customers' LANs; teach it, so only the drop rules remain
        added.append((edge.name, ["ip", "route", "add", str(spec.subnet), "via", home.wan_ipv4]))
    try:
        for node, argv in added:
            lab.run(node, argv, check=True)
        assert ping(lab, "coordinator", str(spec.device_ipv4(1))) is reachable
    finally:
        for node, argv in added:
            lab.run(node, [*argv[:2], "del", *argv[3:]], capture_output=True)


def _iperf(lab: Lab, client: str, reverse: bool, seconds: int = IPERF_SECONDS) -> float:
    server = lab.spawn(
        "coordinator",
        ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # bounded wait for the listener
            ss = lab.run(
                "coordinator",
                ["ss", "-Hltn", f"sport = :{IPERF_PORT}"],
                capture_output=True,
                text=True,
            )
            if ss.stdout.strip():
                break
            time.sleep(0.05)
        argv = ["iperf3", "-c", coord(lab), "-p", str(IPERF_PORT), "-t", str(seconds), "--json"]
        if reverse:
            argv.append("-R")
        r = lab.run(client, argv, capture_output=True, text=True, timeout=seconds + 30)
        assert r.returncode == 0, r.stdout[-500:] + r.stderr[-500:]
        return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"])
    finally:
        try:
            server.wait(timeout=5)  # `-s -1` exits after one test
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)


@pytest.mark.parametrize("reverse", [False, True], ids=["upload", "download"])
def test_iperf3_through_shaped_uplink(lab: Lab, reverse: bool) -> None:
    bps = _iperf(lab, "fw-1", reverse)
    print(f"iperf3 fw-1 {'download' if reverse else 'upload'}: {bps / 1e6:.2f} Mbit/s")
    assert 0.8 * RATE_BPS <= bps <= 1.2 * RATE_BPS


def test_unshaped_lan_is_faster(lab: Lab) -> None:
    bps = _iperf(lab, "hard-1", reverse=False, seconds=1)
    print(f"iperf3 hard-1 (unshaped): {bps / 1e6:.0f} Mbit/s")
    assert bps > 3 * RATE_BPS


def test_shaping_is_on_both_ends_of_the_wan_link(lab: Lab) -> None:
    r = lab.run("fw-router", ["tc", "qdisc", "show", "dev", "wan0"], capture_output=True, text=True)
    assert "tbf" in r.stdout and "4Mbit" in r.stdout
    r = lab.run(
        "hard-router", ["tc", "qdisc", "show", "dev", "wan0"], capture_output=True, text=True
    )
    assert "tbf" not in r.stdout
    r = subprocess.run(
        ["nsenter", "--net=/var/run/netns/fm-wan", "tc", "qdisc", "show"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.stdout.count("tbf") == 1


def _status() -> dict:  # type: ignore[type-arg]
    r = subprocess.run(
        [str(CLI), "status", "--json"], check=False, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_status_json_and_counters(lab: Lab) -> None:
    st = _status()
    nodes = {n["name"]: n for n in st["nodes"]}
    for n in st["nodes"]:
        assert {"name", "role", "lan", "netns", "underlay_ipv4"} <= n.keys()
    assert nodes["coordinator"]["role"] == "coordinator" and nodes["coordinator"]["lan"] is None
    assert nodes["operator"]["role"] == "operator"
    assert nodes["fw-1"] == nodes["fw-1"] | {
        "role": "device",
        "lan": "fw",
        "netns": "fm-fw-1",
        "underlay_ipv4": "10.201.1.11",
    }
    assert nodes["fw-router"]["role"] == "router"
    assert nodes["pub-1"]["lan"] == "pub" and nodes["pub-1"]["underlay_ipv4"].startswith("198.")
    routers = {r["name"]: r for r in st["routers"]}
    assert set(routers) == {"fw-router", "hard-router", "sym-router", "dbl-cgnat", "dbl-router"}
    for r in routers.values():
        assert {
            "name",
            "lan",
            "netns",
            "wan_if",
            "wan_ipv4",
            "wan_rx_bytes",
            "wan_tx_bytes",
        } <= r.keys()
    assert routers["fw-router"]["wan_ipv4"] == "198.51.100.10"

    before = routers["fw-router"]
    assert ping(lab, "fw-2", coord(lab), count=3, size=1000)
    after = {r["name"]: r for r in _status()["routers"]}["fw-router"]
    assert after["wan_tx_bytes"] - before["wan_tx_bytes"] >= 3 * 1000
    assert after["wan_rx_bytes"] - before["wan_rx_bytes"] >= 3 * 1000
    # the API says the same as the CLI
    rx, tx = lab.wan_counters("fw-router")
    assert rx >= after["wan_rx_bytes"] and tx >= after["wan_tx_bytes"]
    assert isinstance(lab.node("fw-router"), Router)


def test_cli_exec(lab: Lab) -> None:
    r = subprocess.run(
        [str(CLI), "exec", "fw-1", "--", "ip", "-4", "addr", "show", "eth0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "10.201.1.11/24" in r.stdout
    r = subprocess.run(
        [str(CLI), "exec", "dbl-2", "--", "sh", "-c", "exit 7"], check=False, timeout=30
    )
    assert r.returncode == 7
    r = subprocess.run(
        [str(CLI), "exec", "nosuch", "--", "true"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    # routers have no mount namespace but exec works there too
    r = subprocess.run(
        [str(CLI), "exec", "dbl-router", "--", "ip", "-4", "route"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "default via 100.64.1.1" in r.stdout


@pytest.mark.skipif(
    shutil.which("wireguard-go") is None or shutil.which("wg") is None,
    reason="needs wireguard-go and wg",
)
def test_private_mount_namespaces_for_wireguard(lab: Lab) -> None:
    """Two devices each run a wireguard-go called wg0; each sees only its own UAPI socket."""
    procs = [
        lab.spawn(
            d, ["wireguard-go", "-f", "wg0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for d in ("fw-1", "fw-2")
    ]
    try:
        for p in procs:
            sock = Path(f"/proc/{p.pid}/root/run/wireguard/wg0.sock")
            deadline = time.monotonic() + 5
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sock.exists()
        assert not Path("/run/wireguard/wg0.sock").exists()
        for d in ("fw-1", "fw-2"):
            r = lab.run(d, ["wg", "show", "interfaces"], capture_output=True, text=True)
            assert r.returncode == 0 and r.stdout.split() == ["wg0"]
        r = lab.run("fw-2", ["ls", "/run/wireguard"], capture_output=True, text=True)
        assert r.stdout.split() == ["wg0.sock"]
        # recorded, so `down` would stop them even if this process died now
        recorded = {p["pid"] for p in lab.status()["processes"]}
        assert {p.pid for p in procs} <= recorded
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
