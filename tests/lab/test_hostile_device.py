"""A device whose agent is replaced by a hostile program (tests/lab/hostile_agent.py: the real
agent with its gossip driver turned against its peers) during a rollout, on real parts: two
home-router LANs behind 4 Mbit/s uplinks, real WireGuard, the real coordinator. It claims every
blob and serves random bytes, accuses its peers of death at incarnation 2^64-1, vouches for
ghost members, replays an old manifest and forges the new one, sends undecodable frames, and
tries to re-enroll under a neighbour's name. The rollout to the others completes, nobody else
is hurt, and the operator sees the device counted and named in `fleetmesh devices show`
(docs/security.md, "Misbehaving peers")."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import (
    FLEET,
    LOG_DIR,
    Lab,
    Topology,
    access,
    agent_status,
    fleetmesh,
    parse_topology,
    start_agent,
    stop_agent,
    wait_online,
)
from lab.rollout import rollout

from .conftest import lab_skip_reason, lab_up, log_tail

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

RELEASE_BYTES = 1_500_000  # the first release, before the attack
ATTACKED_BYTES = 9_000_000  # 3 chunks, ~18 s across a 4 Mbit/s uplink: time to be lied to
HOSTILE = "lana-3"
VICTIM = "lana-1"  # whose name the hostile device tries to enroll under
HOSTILE_PROGRAM = [sys.executable, str(Path(__file__).with_name("hostile_agent.py"))]
REASONS = ("corrupt_blob", "bad_frame", "ghost_member", "implausible_incarnation",
           "forged_manifest")
REPORT_WAIT = 90.0  # s: reports go every 10 s during a rollout, every 60 s when idle


def topology() -> Topology:
    return parse_topology({
        "lan": [{"name": "lana", "nat": "firewall", "devices": 3, "uplink": "4mbit"},
                {"name": "lanb", "nat": "firewall", "devices": 2, "uplink": "4mbit"}],
    }, source="tests/lab/test_hostile_device.py")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_up(topology(), network_only=False) as lab:
        wait_online(lab, [d.name for d in lab.devices], 60)
        time.sleep(10)  # LAN discovery
        yield lab


def log_of(device: str) -> str:
    try:
        return (LOG_DIR / f"{device}.log").read_text(errors="replace")
    except OSError:
        return ""


def device_json(lab: Lab, name: str) -> dict[str, Any]:
    out = fleetmesh(lab, "coordinator", "devices", "show", name, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def named_for(lab: Lab, name: str) -> Counter[str]:
    """What the other devices report `name` for, summed over reporters."""
    total: Counter[str] = Counter()
    for entry in device_json(lab, name).get("reported_by", []):
        total.update(entry["counts"])
    return total


def honest_wan_bytes(lab: Lab, names: list[str], version: int, size: int) -> dict[str, int]:
    """Bytes each device fetched across the WAN (coordinator and other LANs' peers) for
    `version`, from its agent's reports, once every one has reported the whole download."""
    deadline = time.monotonic() + REPORT_WAIT
    while True:
        apps = {n: [a for a in device_json(lab, n)["apps"] if a["target"] == version]
                for n in names}
        if all(a and a[0]["bytes_done"] >= a[0]["bytes_total"] >= size for a in apps.values()):
            return {n: a[0]["by_source"]["coordinator"] + a[0]["by_source"]["wan_peer"]
                    for n, a in apps.items()}
        assert time.monotonic() < deadline, f"reports of v{version} incomplete: {apps}"
        time.sleep(2)


def test_a_hostile_device_does_not_stop_the_rollout_and_is_named(lab: Lab,
                                                                  tmp_path: Path) -> None:
    everyone = [d.name for d in lab.devices]
    honest = [n for n in everyone if n != HOSTILE]
    rollout(lab, version=1, size=RELEASE_BYTES, devices=everyone)
    victim_key = device_json(lab, VICTIM)["public_key"]

    # The device's owner replaces its agent with the hostile program.
    assert stop_agent(lab, HOSTILE) == 1
    start_agent(lab, HOSTILE, program=HOSTILE_PROGRAM)
    deadline = time.monotonic() + 60
    while "hostile: accused" not in log_of(HOSTILE):
        assert time.monotonic() < deadline, f"the hostile program did not start:\n" \
                                            f"{log_of(HOSTILE)[-3000:]}"
        time.sleep(0.5)

    # It claims a neighbour's identity: a fresh token, the victim's name.
    token = json.loads(fleetmesh(lab, "coordinator", "token", "create", "--fleet", FLEET,
                                 "--uses", "1", "--expires", "10m", "--json").stdout)["token"]
    acc = access(lab)
    assert acc is not None
    claim = lab.run(HOSTILE, [str(Path(sys.executable).parent / "fleetmesh-agent"), "join",
                              acc.url, "--token", token, "--data", str(tmp_path / "claim"),
                              "--name", VICTIM, "--wg-port", "51821"],
                    capture_output=True, text=True, timeout=60)
    print(f"re-enrolling as {VICTIM}: exit {claim.returncode}: {claim.stderr.strip()}")
    assert claim.returncode != 0
    assert len(claim.stderr.strip().splitlines()) == 1 and "Traceback" not in claim.stderr

    # The rollout to the others completes, and the honest devices of each LAN pull it across
    # their WAN about once: what their agents report by source (the LAN router also carries
    # the hostile device's own downloads, printed for the record: an enrolled device may fetch
    # the release from the coordinator, and this one does).
    r = rollout(lab, version=2, size=ATTACKED_BYTES, seed=2, devices=honest)
    wan = honest_wan_bytes(lab, honest, 2, r.release_bytes)
    for lan, rx in r.rollout_rx.items():
        mine = sum(b for n, b in wan.items() if n.startswith(lan))
        print(f"{lan}: honest devices fetched {mine} bytes across the WAN for a "
              f"{r.release_bytes}-byte release (x{mine / r.release_bytes:.2f}); the router "
              f"counted {rx} (x{r.ratio(lan):.2f}) in {r.seconds:.1f} s")
        assert mine <= 1.15 * r.release_bytes, (lan, wan, "\n".join(
            f"--- {n}'s log:\n{log_tail(n, 80)}" for n in honest if n.startswith(lan)))
    hostile_log = log_of(HOSTILE)
    for attack in ("served", "accused", "undecodable", "replayed an old manifest",
                   "forged manifest"):
        assert attack in hostile_log, f"the hostile program never did: {attack}"

    # Nobody else was hurt: every honest agent kept running (no restart), and the victim's
    # enrollment is untouched.
    for name in honest:
        st = agent_status(lab, name)
        assert st["state"] == "running" and st["restarts"] == 0, (name, st)
    victim = device_json(lab, VICTIM)
    assert victim["public_key"] == victim_key and victim["state"] != "revoked"
    listed = json.loads(fleetmesh(lab, "coordinator", "devices", "list", "--json").stdout)
    assert [d["name"] for d in listed["devices"]].count(VICTIM) == 1

    # The operator sees the hostile device counted and named, by reason.
    deadline = time.monotonic() + REPORT_WAIT
    while True:
        counts = named_for(lab, HOSTILE)
        if all(counts[reason] > 0 for reason in REASONS):
            break
        assert time.monotonic() < deadline, f"{HOSTILE} named for {dict(counts)} only"
        time.sleep(2)
    reporters = {e["reporter"] for e in device_json(lab, HOSTILE)["reported_by"]}
    print(f"{HOSTILE} reported by {sorted(reporters)}: {dict(counts)}")
    assert len(reporters) >= 2
    shown = fleetmesh(lab, "coordinator", "devices", "show", HOSTILE)
    assert shown.returncode == 0 and "reported misbehaving by" in shown.stdout, shown.stdout
    print(shown.stdout)
    for name in honest:
        others = named_for(lab, name)
        print(f"{name} named for {dict(others)}")
        assert not others, f"an honest device is named: {name} for {dict(others)}"
