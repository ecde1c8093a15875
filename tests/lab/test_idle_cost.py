"""The arithmetic of `scripts/bench idle` (bench/idle.py): per device and hour from the routers'
counters, the month, the bar, and the sampled device's split. The lab run itself is the bench."""

from __future__ import annotations

from bench.idle import BAR, IdleCost


def cost(lanc_tx: int) -> IdleCost:
    parts = {"link": 9000, "lan": 3000, "hub": 2500, "api": 500, "gossip": 1000}
    return IdleCost(
        seconds=900.0, devices={"lana": 3, "lanc": 1},
        wan={"lana": (6000, 3000), "lanc": (2000, lanc_tx)},
        sampled={"lana": ("lana-1", parts)},
        accounts={"lana-1": (600.0, {"wireguard": 2000, "control": 500, "gossip": 0,
                                     "blobs": 0, "logs": 0}),
                  "lanc-1": (0.0, {})})


def test_bytes_per_device_per_hour_in_and_out_and_the_verdict() -> None:
    c = cost(lanc_tx=1000)
    assert c.per_device("lana") == (8000.0, 4000.0)  # 6000 B in 900 s / 3 devices -> per hour
    assert c.per_device("lanc") == (8000.0, 4000.0)
    assert c.worst() == 12000.0 <= BAR
    lines = c.lines()
    assert lines[1] == ("  lana (3 devices):    12.0 kB/h per device = in 8.0 + out 4.0; "
                        "8.6 MB per month; x0.60 of the bar (20 kB/h)")
    assert lines[2].startswith("  lanc (1 device):    12.0 kB/h")
    assert lines[3] == ("  lana-1 (both ways on its LAN link, kB/h): 36.0 = hub 10.0 + LAN "
                        "neighbours 12.0 (free) + other WAN 14.0; inside the tunnel: "
                        "coordinator API 2.0, gossip 4.0")
    assert lines[4] == ("  lana-1's own account (kB/h over 600 s): 15.0 = wireguard 12.0, "
                        "control 3.0, gossip 0.0, blobs 0.0, logs 0.0")
    assert lines[5] == "  lanc-1's own account: not saved twice in the window"
    assert lines[-1].startswith("issue 14 idle bar: met (worst LAN 12.0 kB/h")


def test_one_lan_over_the_bar_misses_it() -> None:
    c = cost(lanc_tx=4000)  # lanc: 8 + 16 kB/h
    assert c.worst() == 24000.0
    assert c.lines()[-1].startswith("issue 14 idle bar: missed (worst LAN 24.0 kB/h")
