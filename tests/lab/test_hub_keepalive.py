"""The hub keepalive follows each NAT's real binding lifetime (issue 14, agent/_keepalive.py), on
real parts: two devices behind two home routers, one forgetting a silent UDP binding after 30 s
(`udp_timeout`), the other after Linux's default 120 s. The agents' trials find a longer
keepalive behind the generous router and keep 25 s behind the strict one; both stay reachable
from the operator; `fleetmesh devices show` tells what each found."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lab import Lab, join_operator_to_mesh, parse_topology, wait_online

from .conftest import lab_skip_reason, lab_up, log_tail

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

STRICT, GENEROUS = "lana-1", "lanb-1"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    topology = parse_topology({
        "operator": {"on": "wan"},
        "agents": {"docker": False},
        "lan": [{"name": "lana", "nat": "firewall", "devices": 1, "udp_timeout": 30},
                {"name": "lanb", "nat": "firewall", "devices": 1}],
    }, source="tests/lab/test_hub_keepalive.py")
    with lab_up(topology, network_only=False) as lab:
        wait_online(lab, [STRICT, GENEROUS], 90)
        join_operator_to_mesh(lab)
        yield lab


def shown(lab: Lab, name: str) -> dict[str, Any]:
    r = lab.run("operator", ["fleetmesh", "devices", "show", name, "--json"],
                capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n--- {STRICT}:\n"
                                 f"{log_tail(STRICT)}\n--- {GENEROUS}:\n{log_tail(GENEROUS)}")
        time.sleep(2)


def test_each_device_keeps_the_keepalive_its_nat_allows_and_stays_reachable(lab: Lab) -> None:
    def link(name: str) -> dict[str, Any]:
        return shown(lab, name).get("link") or {}

    # trials of 50 s and 80 s of silence get through a 120 s binding: 56 s keepalive or more
    until(f"{GENEROUS} finds a longer keepalive",
          lambda: link(GENEROUS).get("hub_keepalive", 0) >= 50, 420)
    # a 50 s trial does not get through a 30 s binding: it keeps 25 s
    until(f"{STRICT} finds its NAT strict",
          lambda: link(STRICT).get("binding_lost") is not None, 300)
    strict, generous = link(STRICT), link(GENEROUS)
    assert strict["hub_keepalive"] == 25 and strict["binding_lost"] <= 50, strict
    assert generous["binding_survived"] >= 60 and generous["hub_keepalive"] < 120, generous
    for name in (STRICT, GENEROUS):
        info = shown(lab, name)
        assert info["online"] is True, info
        # the operator (on the WAN, through the hub) reaches it, whatever its keepalive
        r = lab.run("operator", ["ping", "-n", "-c", "1", "-w", "5", str(info["mesh_ipv4"])],
                    capture_output=True, text=True, timeout=15)
        assert r.returncode == 0, f"{name}: no answer within 5 s\n{r.stdout}\n{log_tail(name)}"
    text = lab.run("operator", ["fleetmesh", "devices", "show", GENEROUS], capture_output=True,
                   text=True, timeout=30).stdout
    assert f"keepalive {generous['hub_keepalive']} s; binding >= " in text
