"""The relay hub is not an open router: a device, through its own tunnel to the hub, tries to
reach a device of another fleet, the coordinator host's services on another address and a
network behind the coordinator host. Real coordinator (CLI) with its wireguard-go hub in a
throwaway namespace, three enrolled devices each running wireguard-go in its own namespace
(d1 and d3 in fleet `lab`, d2 in fleet `other`), and a namespace behind the coordinator.

The attacker controls its own WireGuard config, so d1 routes everything (0.0.0.0/0) to the hub.
Before the fix (forwarding switched on globally, no rules) every one of these got through.
Expected: within a fleet the relay works (d1 <-> d3) and the API answers on the hub address;
another fleet, another local address and the network behind are unreachable; on stop the
project's nftables table is gone and forwarding and `accept_ra` are as they were.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from tests.coordinator.test_hub_lab import HELPER
from vpn import DesiredDevice, DesiredPeer, Endpoint, UapiBackend, generate_keypair, reconcile

pytestmark = pytest.mark.lab

LAB_READY = os.geteuid() == 0 and all(shutil.which(t) for t in ("wireguard-go", "ip", "nft",
                                                                 "ping"))
BIN = Path(sys.executable).parent
WG_PORT = 51820
API_PORT = 8443
BEHIND_HOST = "203.0.113.1"  # the coordinator host's address towards the network behind it
BEHIND_PEER = "203.0.113.2"  # a host on that network (RFC 5737 TEST-NET-3)

CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
except OSError:
    sys.exit(1)
"""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *argv, check=check)


def veth(ns_a: str, name_a: str, addr_a: str, ns_b: str, name_b: str, addr_b: str) -> None:
    run("ip", "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b,
        "netns", ns_b)
    for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        in_ns(ns, "ip", "addr", "add", addr, "dev", name)
        in_ns(ns, "ip", "link", "set", name, "up")


def pings(ns: str, addr: str) -> bool:
    return in_ns(ns, "ping", "-n", "-c", "1", "-W", "2", addr, check=False).returncode == 0


def connects(ns: str, addr: str, port: int) -> bool:
    return in_ns(ns, sys.executable, "-c", CONNECT, addr, str(port), check=False).returncode == 0


def eventually_pings(ns: str, addr: str, timeout: float = 20.0) -> bool:
    """The first packets wait for a handshake: ping until one answer or the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pings(ns, addr):
            return True
    return False


@dataclass
class World:
    tag: str
    coord: str
    behind: str
    devices: dict[str, str]  # device name -> namespace
    procs: list[subprocess.Popen[str]]


@pytest.fixture
def world() -> Iterator[World]:
    if not LAB_READY:
        pytest.skip("lab test: needs root, wireguard-go, ip, nft and ping")
    tag = secrets.token_hex(3)
    coord, behind = f"fm-t{tag}c", f"fm-t{tag}b"
    devices = {f"d{i}": f"fm-t{tag}d{i}" for i in (1, 2, 3)}
    w = World(tag, coord, behind, devices, [])
    created: list[str] = []
    try:
        for ns in (coord, behind, *devices.values()):
            run("ip", "netns", "add", ns)
            created.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        for i, (name, ns) in enumerate(devices.items()):
            veth(coord, f"fmt{tag}{name}a", f"198.51.100.{4 * i + 1}/30",
                 ns, f"fmt{tag}{name}b", f"198.51.100.{4 * i + 2}/30")
        a = f"fmt{tag}xa"
        veth(coord, a, f"{BEHIND_HOST}/24", behind, f"fmt{tag}xb", f"{BEHIND_PEER}/24")
        in_ns(behind, "ip", "route", "add", "default", "via", BEHIND_HOST)
        # an interface that takes router advertisements, as a host's uplink does, on a host
        # that does not forward (a new namespace inherits the machine's setting)
        in_ns(coord, "sysctl", "-qw", f"net.ipv6.conf.{a}.accept_ra=1")
        in_ns(coord, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        in_ns(coord, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
        yield w
    finally:
        for p in w.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for ns in created:
            run("ip", "netns", "del", ns, check=False)


def start_wireguard(w: World, ns: str, ifname: str) -> UapiBackend:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", ifname],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    w.procs.append(proc)
    sock = Path(f"/var/run/wireguard/{ifname}.sock")
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "wireguard-go did not start"
        time.sleep(0.05)
    return UapiBackend(sock)


def test_a_device_reaches_only_its_own_fleet_through_the_hub(world: World,
                                                              tmp_path: Path) -> None:
    w = world
    data = tmp_path / "coord"
    coord_proc = subprocess.Popen(
        ["ip", "netns", "exec", w.coord, str(BIN / "fleetmesh"), "coordinator", "serve",
         "--data", str(data), "--listen", f"0.0.0.0:{API_PORT}",
         "--hub-endpoint", f"198.51.100.1:{WG_PORT}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    w.procs.insert(0, coord_proc)  # stopped first, so the hub's clean-up is what we check
    line = ""
    deadline = time.monotonic() + 30
    while "coordinator on" not in line:
        assert time.monotonic() < deadline and coord_proc.poll() is None, \
            coord_proc.stderr.read()  # type: ignore[union-attr]
        line = coord_proc.stdout.readline()  # type: ignore[union-attr]
    op_key = (data / "operator.key").read_text().strip()

    def call(method: str, path: str, auth: str = "", body: object = None) -> dict:
        done = in_ns(w.coord, sys.executable, "-c", HELPER, f"https://127.0.0.1:{API_PORT}",
                     str(data / "tls.crt"), method, path, auth,
                     json.dumps(body) if body is not None else "")
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    tokens = {fleet: call("POST", "/api/v1/tokens", op_key,
                          {"fleet": fleet, "uses": 2})["body"]["token"]
              for fleet in ("lab", "other")}
    fleets = {"d1": "lab", "d2": "other", "d3": "lab"}
    mesh: dict[str, str] = {}
    hub_v4 = ""
    for i, (name, ns) in enumerate(w.devices.items()):
        keys = generate_keypair()
        r = call("POST", "/api/v1/enroll", "", {"token": tokens[fleets[name]],
                                                 "public_key": keys.public, "name": name})
        assert r["status"] == 201, r
        body = r["body"]
        mesh[name], hub_v4 = body["mesh_ipv4"], body["hub"]["mesh_ipv4"]
        ifname = f"fmt{w.tag}{name}w"
        backend = start_wireguard(w, ns, ifname)
        reconcile(DesiredDevice(keys.private, peers=(DesiredPeer(
            body["hub"]["public_key"],
            allowed_ips=frozenset({ip_network("0.0.0.0/0"), ip_network("::/0")}),
            endpoint=Endpoint(ip_address(f"198.51.100.{4 * i + 1}"), WG_PORT),
            persistent_keepalive=5),)), backend)
        in_ns(ns, "ip", "addr", "add", f"{body['mesh_ipv4']}/16", "dev", ifname)
        in_ns(ns, "ip", "link", "set", ifname, "up")
        in_ns(ns, "ip", "route", "add", "203.0.113.0/24", "dev", ifname)

    d1, d2, d3 = (w.devices[n] for n in ("d1", "d2", "d3"))
    # every device is up on the hub, the API answers through the tunnel
    for ns in w.devices.values():
        assert eventually_pings(ns, hub_v4)
    assert connects(d1, hub_v4, API_PORT)
    # the relay works inside a fleet, both ways
    assert eventually_pings(d1, mesh["d3"])
    assert pings(d3, mesh["d1"])
    # ... and nowhere else
    assert not pings(d1, mesh["d2"]), "a device reached another fleet's device"
    assert not pings(d2, mesh["d1"]), "a device reached another fleet's device"
    assert not pings(d1, BEHIND_PEER), "a device reached the network behind the coordinator"
    assert not connects(d1, BEHIND_HOST, API_PORT), \
        "a device reached a coordinator host service on a non-hub address"
    assert not pings(d1, BEHIND_HOST)
    veth = f"fmt{w.tag}xa"
    assert in_ns(w.coord, "sysctl", "-n", f"net.ipv6.conf.{veth}.accept_ra").stdout.strip() \
        == "2", "IPv6 forwarding on without accept_ra=2 drops the host's router advertisements"

    coord_proc.send_signal(signal.SIGTERM)
    coord_proc.wait(30)
    assert coord_proc.returncode == 0, coord_proc.stderr.read()  # type: ignore[union-attr]
    assert "fleetmesh_hub" not in in_ns(w.coord, "nft", "list", "tables").stdout
    assert in_ns(w.coord, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    assert in_ns(w.coord, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "0"
    assert in_ns(w.coord, "sysctl", "-n", f"net.ipv6.conf.{veth}.accept_ra").stdout.strip() \
        == "1"
