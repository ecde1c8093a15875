"""The device's own firewall (agent/_devfilter.py): the table's text for a map with ports, none
for a map without, and (root, nft) the kernel enforcing it in network namespaces this test
creates and deletes: a peer reaches only the ports its entry's `accept` allows, plus
fleetmesh's own port; a source that is no peer reaches nothing; `stop` removes the table."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agent._devfilter import TABLE, DeviceFilter, ruleset
from mesh.control import HubInfo, PeerEntry, PeerMap
from mesh.policy import ANY, Ports, parse_ports
from vpn import generate_keypair

HUB = HubInfo(generate_keypair().public, "198.51.100.1:51820", "10.99.0.254", "fd7a:f1ee:7000::fe",
              "https://10.99.0.254:8443")
KEY = generate_keypair().public


def entry(i: int, accept: Ports | None) -> PeerEntry:
    return PeerEntry(f"p{i}", KEY, f"10.99.0.{i}", f"fd7a:f1ee:7000::{i:x}",
                     send=None if accept is None else Ports(()), accept=accept)


def peermap(*peers: PeerEntry) -> PeerMap:
    return PeerMap(3, HUB, peers, relay_ips=("10.99.1.7/32", "fd7a:f1ee:7001::7/128"))


def elements(text: str, name: str) -> set[str]:
    m = re.search(rf"set {name} {{ type \w+;(?: flags interval;)?"
                  rf"(?: elements = {{ ([^}}]*) }})? }}", text)
    assert m is not None, name
    return set(m.group(1).split(", ")) if m.group(1) else set()


def test_no_ports_in_the_map_means_no_table() -> None:
    assert ruleset("fm0", peermap(entry(1, None), entry(3, None))) is None
    assert ruleset("fm0", peermap()) is None


def test_each_peer_gets_its_accept_ports_grouped_by_port_set() -> None:
    text = ruleset("fm0", peermap(entry(1, parse_ports("tcp/554")), entry(2, ANY),
                                  entry(3, Ports(())), entry(4, parse_ports("tcp/554"))))
    assert text is not None
    assert text.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")
    chain = text.split("chain input {")[1]
    assert 'iifname != "fm0" accept' in chain
    assert elements(text, "trusted4") == {"10.99.0.254", "10.99.1.7/32"}
    assert elements(text, "trusted6") == {"fd7a:f1ee:7000::fe", "fd7a:f1ee:7001::7/128"}
    assert elements(text, "peers4") == {"10.99.0.1", "10.99.0.2", "10.99.0.3", "10.99.0.4"}
    assert "ip saddr @peers4 tcp dport { 7946 } accept" in chain  # fleetmesh's own
    # one set per distinct port set: p1 and p4 share one; p3 (nothing) has none
    sets = {name: elements(text, name) for name in re.findall(r"set (accept\d+_4)", text)}
    assert sorted(sets.values(), key=len) == [{"10.99.0.2"}, {"10.99.0.1", "10.99.0.4"}]
    for name, members in sets.items():
        rule = "accept" if members == {"10.99.0.2"} else "tcp dport { 554 } accept"
        assert f"ip saddr @{name} {rule}" in chain
    assert chain.rstrip().endswith("counter drop\n  }\n}")


def test_a_bad_interface_name_is_refused() -> None:
    with pytest.raises(ValueError, match="bad interface name"):
        ruleset('fm0" accept', peermap(entry(1, ANY)))


# -- the kernel: two namespaces joined by a veth, the device's end named like a mesh interface

LAB_READY = os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "nft"))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """(peer side, device side): namespaces `fm-dfw-…`, deleted by name whatever happens."""
    tag = secrets.token_hex(3)
    peer, dev = f"fm-dfw-{tag}-p", f"fm-dfw-{tag}-d"
    try:
        _ip("netns", "add", peer)
        _ip("netns", "add", dev)
        _ip("-n", peer, "link", "add", "veth0", "type", "veth", "peer", "name", "fmmesh0",
            "netns", dev)
        for i in (1, 2, 3, 5):  # p1, p2, p3 of the map and a stranger (.5)
            _ip("-n", peer, "addr", "add", f"10.99.0.{i}/24", "dev", "veth0")
        _ip("-n", dev, "addr", "add", "10.99.0.100/24", "dev", "fmmesh0")
        for ns, ifname in ((peer, "veth0"), (dev, "fmmesh0")):
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield peer, dev
    finally:
        for ns in (peer, dev):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30,
                           check=False)


CONNECT = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.settimeout(20)
try:
    s.connect(("10.99.0.100", int(sys.argv[2])))
except ConnectionRefusedError:
    print("refused")  # it got through the firewall: nobody listens, the kernel said RST
except TimeoutError:
    print("timeout")
"""


def _through(peer_ns: str, source: str, port: int) -> bool:
    """Whether a TCP SYN from `source` to the device's `port` gets through (no listener: an
    accepted SYN is answered by RST at once)."""
    done = subprocess.run(["ip", "netns", "exec", peer_ns, sys.executable, "-c", CONNECT,
                           source, str(port)], capture_output=True, text=True, timeout=60,
                          check=True)
    return done.stdout.strip() == "refused"


def _drops(dev_ns: str) -> int:
    done = subprocess.run(["ip", "netns", "exec", dev_ns, "nft", "list", "chain", "inet", TABLE,
                           "input"], capture_output=True, text=True, timeout=30, check=True)
    m = re.search(r"counter packets (\d+) bytes \d+ drop", done.stdout)
    assert m is not None, done.stdout
    return int(m.group(1))


def _send_syn(peer_ns: str, source: str, port: int) -> None:
    """One SYN that the firewall should drop: sent without waiting for an answer."""
    code = ("import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); "
            "s.setblocking(False)\ntry:\n    s.connect(('10.99.0.100', int(sys.argv[2])))\n"
            "except BlockingIOError:\n    pass")
    subprocess.run(["ip", "netns", "exec", peer_ns, sys.executable, "-c", code, source,
                    str(port)], check=True, capture_output=True, timeout=30)


def _wait_drops(dev_ns: str, above: int) -> int:
    """The drop counter once it exceeds `above` (a dropped SYN is counted when the kernel
    processes it; this waits for that, it does not time it)."""
    deadline = time.monotonic() + 30
    while (n := _drops(dev_ns)) <= above:
        assert time.monotonic() < deadline, "the SYN was never counted as dropped"
        time.sleep(0.05)
    return n


@pytest.mark.skipif(not LAB_READY, reason="needs root, ip and nft")
def test_the_kernel_accepts_only_what_the_map_allows(netns: tuple[str, str]) -> None:
    peer_ns, dev_ns = netns
    pm = peermap(entry(1, parse_ports("tcp/554")), entry(2, ANY), entry(3, Ports(())))
    script = ruleset("fmmesh0", pm)
    assert script is not None
    subprocess.run(["ip", "netns", "exec", dev_ns, "nft", "-f", "-"], input=script, text=True,
                   check=True, capture_output=True, timeout=30)
    assert _through(peer_ns, "10.99.0.1", 554)  # its rule
    assert _through(peer_ns, "10.99.0.1", 7946)  # fleetmesh's own port
    assert _through(peer_ns, "10.99.0.2", 8080)  # any
    assert _through(peer_ns, "10.99.0.3", 7946)  # only fleetmesh's own port
    drops = _drops(dev_ns)
    for source, port in (("10.99.0.1", 555), ("10.99.0.3", 554), ("10.99.0.5", 7946)):
        _send_syn(peer_ns, source, port)
        drops = _wait_drops(dev_ns, drops)
    # deleted: everything gets through again
    subprocess.run(["ip", "netns", "exec", dev_ns, "nft", "delete", "table", "inet", TABLE],
                   check=True, capture_output=True, timeout=30)
    assert _through(peer_ns, "10.99.0.5", 7946)


@pytest.mark.skipif(not LAB_READY, reason="needs root, ip and nft")
def test_device_filter_applies_on_change_and_removes_the_table(netns: tuple[str, str]) -> None:
    """DeviceFilter itself, run inside the device's namespace (a child process)."""
    _, dev_ns = netns
    code = f"""
import subprocess, sys
sys.path.insert(0, {os.getcwd()!r})
from agent._devfilter import TABLE, DeviceFilter
from tests.agent.test_devfilter import ANY, entry, parse_ports, peermap
f = DeviceFilter("fmmesh0")
def tables():
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
f.apply(peermap(entry(1, parse_ports("tcp/554"))))
print("installed", TABLE in tables(), f.installed)
f.apply(peermap(entry(1, None)))  # the fleet's policy is gone: no table
print("no-policy", TABLE in tables(), f.installed)
f.apply(peermap(entry(1, ANY)))
f.stop()
print("stopped", TABLE in tables(), f.installed)
"""
    done = subprocess.run(["ip", "netns", "exec", dev_ns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["installed True True", "no-policy False False",
                                           "stopped False False"]


def test_device_filter_without_a_policy_never_runs_nft(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("agent._devfilter.run_nft", calls.append)
    f = DeviceFilter("fmmesh0")
    f.apply(peermap(entry(1, None)))  # no ports: nothing to install, nothing to remove
    f.stop()
    assert not f.installed
    assert calls == []
    f.apply(peermap(entry(1, ANY)))  # the check itself sees a call when there is one
    assert len(calls) == 1


def test_fleetmesh_own_port_is_the_agents_gossip_port() -> None:
    from agent import GOSSIP_PORT
    from mesh.policy import MESH_PORTS
    assert Ports(MESH_PORTS) == parse_ports(f"tcp/{GOSSIP_PORT}")


@pytest.mark.skipif(not LAB_READY, reason="needs root, ip and nft")
def test_an_agent_on_another_gossip_port_opens_that_port_not_7946(
        netns: tuple[str, str]) -> None:
    """`fleetmesh-agent run --gossip-port 7950`: its peers reach it there; 7946 is then only
    what the map allows."""
    peer_ns, dev_ns = netns
    pm = peermap(entry(3, Ports(())))
    script = ruleset("fmmesh0", pm, DeviceFilter("fmmesh0", 7950).mesh)
    assert script is not None
    subprocess.run(["ip", "netns", "exec", dev_ns, "nft", "-f", "-"], input=script, text=True,
                   check=True, capture_output=True, timeout=30)
    assert _through(peer_ns, "10.99.0.3", 7950)
    drops = _drops(dev_ns)
    _send_syn(peer_ns, "10.99.0.3", 7946)
    _wait_drops(dev_ns, drops)
