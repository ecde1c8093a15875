"""Lazy direct paths on real parts (issue 14): two devices behind two home routers punch a
direct path, go quiet, stop their keepalives (nothing crosses either WAN link between them,
and both routers forget the UDP bindings: their lifetime is 30 s here), and a ping wakes the
path at once: the sender punches again and asks the peer, through the coordinator, to punch
too; the ping is answered within 5 s; the path goes quiet again after."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from lab import LOG_DIR, Lab, parse_topology, wait_online

from .conftest import lab_skip_reason, lab_up, log_tail

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

A, B = "lana-1", "lanb-1"
LAZY_AFTER = 20  # the agents' --lazy-after (default 120 s): the test waits less
UDP_TIMEOUT = 30  # the routers' UDP binding lifetime: the quiet outlasts it
CHAIN = "FM-TEST-LAZY"  # lab-prefixed; only in the lab's device namespace


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    topology = parse_topology({
        "operator": {"on": "wan"},
        "agents": {"docker": False, "lazy_after": LAZY_AFTER},
        "lan": [{"name": "lana", "nat": "firewall", "devices": 1, "udp_timeout": UDP_TIMEOUT},
                {"name": "lanb", "nat": "firewall", "devices": 1, "udp_timeout": UDP_TIMEOUT}],
    }, source="tests/lab/test_lazy_paths.py")
    with lab_up(topology, network_only=False) as lab:
        wait_online(lab, [A, B], 90)
        yield lab


def until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n--- {A}:\n{log_tail(A)}"
                                 f"\n--- {B}:\n{log_tail(B)}")
        time.sleep(0.5)


def log_count(device: str, text: str) -> int:
    try:
        return (LOG_DIR / f"{device}.log").read_text(errors="replace").count(text)
    except OSError:
        return 0


def mesh_ipv4(lab: Lab, name: str) -> str:
    r = lab.run("operator", ["fleetmesh", "devices", "list", "--json"], capture_output=True,
                text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return str({d["name"]: d for d in json.loads(r.stdout)["devices"]}[name]["mesh_ipv4"])


def packets_between(lab: Lab, seconds: float) -> int:
    """Packets between A and B's router (both ways) on A's LAN link over `seconds`."""
    peer_wan = lab.router("lanb").wan_ipv4
    node = lab.node(A)

    def ipt(*argv: str) -> str:
        r = lab.run(node, ["iptables", "-w", *argv], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return str(r.stdout)

    ipt("-N", CHAIN)
    try:
        ipt("-I", "INPUT", "-j", CHAIN)
        ipt("-I", "OUTPUT", "-j", CHAIN)
        ipt("-A", CHAIN, "-s", peer_wan)
        ipt("-A", CHAIN, "-d", peer_wan)
        time.sleep(seconds)
        counted = [int(line.split()[0]) for line in ipt("-L", CHAIN, "-v", "-x", "-n")
                   .splitlines()[2:] if line.split() and line.split()[0].isdigit()]
    finally:
        for hook in ("INPUT", "OUTPUT"):
            lab.run(node, ["iptables", "-w", "-D", hook, "-j", CHAIN], capture_output=True)
        lab.run(node, ["iptables", "-w", "-F", CHAIN], capture_output=True)
        lab.run(node, ["iptables", "-w", "-X", CHAIN], capture_output=True)
    assert len(counted) == 2, counted
    return sum(counted)


def test_a_quiet_path_goes_lazy_sends_nothing_and_a_ping_wakes_it(lab: Lab) -> None:
    lazy = "peer {}: lazy, no keepalive"
    until("both sides punch, then go lazy",
          lambda: log_count(A, lazy.format(B)) >= 1 and log_count(B, lazy.format(A)) >= 1,
          120 + 3 * LAZY_AFTER)
    # Nothing between them for twice the routers' binding lifetime: both have forgotten it.
    assert packets_between(lab, 2 * UDP_TIMEOUT) == 0

    woke = log_count(A, f"peer {B}: trying")
    asked = log_count(B, f"({A} asked for a direct path")
    # one echo request a second until the first answer, for at most 5 s
    r = lab.run(A, ["ping", "-n", "-c", "1", "-w", "5", mesh_ipv4(lab, B)],
                capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, f"no answer within 5 s:\n{r.stdout}\n{log_tail(A)}\n{log_tail(B)}"
    until("our traffic wakes the path", lambda: log_count(A, f"peer {B}: trying") > woke, 5)
    until(f"{B} hears through the coordinator that {A} punches",
          lambda: log_count(B, f"({A} asked for a direct path") > asked, 10)
    until("direct again on both sides",
          lambda: log_count(A, f"peer {B}: direct") >= 2 and log_count(B, f"peer {A}: direct")
          >= 2, 30)
    # ... and quiet makes it lazy again
    until("lazy again", lambda: log_count(A, lazy.format(B)) >= 2, 3 * LAZY_AFTER + 60)
