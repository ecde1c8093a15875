"""Gossip in the simulator: manifest delivery, failure detection and idle cost.

    python -m bench.gossip [--seed 1] [--quick]

1. A new manifest published on one node at N = 100, 1,000 (full SWIM + dissemination) and
   10,000 (dissemination over a static full view: full SWIM at 10k is too slow in-process):
   time and rounds to 99.9 % and 100 % of the nodes, forwarding hops, messages and bytes per
   node, next to the push-pull bound log3(N) + ln ln N rounds (Karp, Schindelhauer, Shenker,
   Voecking, "Randomized Rumor Spreading", FOCS 2000) and the ratio.
2. A stopped node at N = 100: time to first suspicion and until every member marks it dead,
   against the configured suspicion timeouts.
3. Idle cost (no release) per node per hour for the LAN and METERED configurations (METERED
   with the whole fleet in scope, as before issue 14, and LAN-local, its default since).
4. Idle WAN cost of gossip per device per hour (in + out at its LAN's WAN link) with METERED,
   gossiping with the whole fleet (before issue 14) and LAN-local while the coordinator
   answers (the default since), on the lab's shape (2 LANs x 3 devices + 1 alone) and at
   N = 100.
Network: LANs of 10 devices, 1 ms in a LAN, 40 ms between LANs, 1 Mbit/s per LAN uplink and
downlink, bytes include 60 bytes of WireGuard/UDP/IPv4 per message.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

from mesh.membership import LAN, METERED, MembershipConfig, suspicion_timeout
from mesh.rumor import LAN_RUMOR, METERED_RUMOR, RumorConfig
from mesh.sim import NetConfig, SimConfig, Simulator, idle_wan_cost

SETTLE = 20.0  # seconds of membership traffic before the release is published
WINDOW = 90.0  # seconds observed after publishing
DISSEMINATION = ("Rumor", "ManifestRequest")


def karp_bound(n: int) -> float:
    return math.log(n, 3) + math.log(math.log(n))


def delivery(n: int, seed: int, full_swim: bool) -> dict[str, float]:
    sim = Simulator(SimConfig(n=n, seed=seed, membership=LAN if full_swim else None,
                              net=NetConfig()))
    sim.run(SETTLE)
    before = {k: (sim.stats.msgs_by_type.get(k, 0), sim.stats.bytes_by_type.get(k, 0))
              for k in DISSEMINATION}
    t0 = time.perf_counter()
    sim.publish(0, 2, SETTLE)
    sim.run(SETTLE + WINDOW)
    wall = time.perf_counter() - t0
    times = [t - SETTLE for t in sim.delivery_times(2)]
    hops = sorted(sim.hops[2].values())
    msgs = sum(sim.stats.msgs_by_type.get(k, 0) - before[k][0] for k in DISSEMINATION)
    byts = sum(sim.stats.bytes_by_type.get(k, 0) - before[k][1] for k in DISSEMINATION)
    q = math.ceil(0.999 * n) - 1
    complete = len(times) == n
    return {"n": n, "got": len(times), "t999": times[q] if len(times) > q else math.inf,
            "t100": times[-1] if complete else math.inf,
            "h999": hops[q] if len(hops) > q else math.inf,
            "h100": hops[-1] if complete else math.inf,
            "msgs": msgs / n, "bytes": byts / n, "wall": wall}


def detection(n: int, seed: int) -> dict[str, float]:
    sim = Simulator(SimConfig(n=n, seed=seed))
    victim = n // 2
    sim.watch.add(victim)
    stop = 30.0
    sim.stop(victim, stop)
    sim.run(stop + 120.0)
    dead = sorted(t - stop for t in sim.dead_seen.get(victim, {}).values())
    sus = min(sim.suspect_seen.get(victim, {stop: stop + math.inf}).values()) - stop
    return {"suspect": sus, "dead_min": dead[0], "dead_med": statistics.median(dead),
            "dead_max": dead[-1], "observers": len(dead), "low": suspicion_timeout(LAN, n),
            "high": LAN.suspicion_max_timeout_mult * suspicion_timeout(LAN, n)}


def idle(n: int, seed: int, membership: MembershipConfig, rumor: RumorConfig,
         span: float) -> dict[str, float]:
    sim = Simulator(SimConfig(n=n, seed=seed, membership=membership, rumor=rumor))
    sim.publish(0, 1, 0.0)  # everyone holds one manifest: digests are not empty
    warm = 2 * rumor.anti_entropy_interval + 60.0
    sim.run(warm)
    sent0 = sum(nd.sent_bytes for nd in sim.nodes)
    by0 = dict(sim.stats.bytes_by_type)
    sim.run(warm + span)
    scale = 3600.0 / span / n
    per_type = {k: (v - by0.get(k, 0)) * scale for k, v in sim.stats.bytes_by_type.items()}
    return {"total": (sum(nd.sent_bytes for nd in sim.nodes) - sent0) * scale, **per_type}


def idle_wan(n: int, lan_size: int, seed: int) -> dict[str, list[float]]:
    """Per LAN, WAN bytes per device per hour of METERED gossip, by scope."""
    return {scope: idle_wan_cost(SimConfig(
        n=n, lan_size=lan_size, seed=seed, rumor=METERED_RUMOR,
        membership=dataclasses.replace(METERED, idle_scope=scope))) for scope in ("fleet", "lan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="N = 100 and 1,000 only")
    args = ap.parse_args()
    print(f"== manifest delivery (round = {LAN_RUMOR.round_interval:.1f} s, fanout "
          f"{LAN_RUMOR.fanout}; bound = log3 N + ln ln N)")
    print(f"{'N':>6} {'mode':>11} {'t99.9%':>7} {'t100%':>7} {'rnd99.9':>7} "
          f"{'rnd100':>7} {'hops100':>7} {'bound':>6} {'ratio':>6} {'hops/b':>6} "
          f"{'msg/node':>8} {'B/node':>8} {'wall s':>6}")
    for n in ([100, 1000] if args.quick else [100, 1000, 10_000]):
        full = n <= 1000
        r = delivery(n, args.seed, full)
        bound = karp_bound(n)
        rnd999 = r["t999"] / LAN_RUMOR.round_interval
        rnd100 = r["t100"] / LAN_RUMOR.round_interval
        mode = "SWIM+rumor" if full else "rumor only"
        print(f"{n:>6} {mode:>11} {r['t999']:>7.2f} "
              f"{r['t100']:>7.2f} {rnd999:>7.1f} {rnd100:>7.1f} {r['h100']:>7.0f} "
              f"{bound:>6.2f} {rnd100 / bound:>6.2f} {r['h100'] / bound:>6.2f} "
              f"{r['msgs']:>8.1f} {r['bytes']:>8.0f} "
              f"{r['wall']:>6.1f}")
    d = detection(100, args.seed)
    print(f"\n== failure detection, N = 100, LAN config: first suspicion after "
          f"{d['suspect']:.2f} s;"
          f" dead at {d['observers']:.0f} members after {d['dead_min']:.2f} / {d['dead_med']:.2f}"
          f" / {d['dead_max']:.2f} s (min/median/max); suspicion timeout {d['low']:.1f} s"
          f" (confirmed) .. {d['high']:.1f} s (unconfirmed)")
    print("\n== idle cost per node per hour, N = 100, no release (WireGuard/UDP/IP included)")
    whole_fleet = dataclasses.replace(METERED, idle_scope="fleet")  # METERED before issue 14
    for name, mcfg, rcfg in (("LAN", LAN, LAN_RUMOR), ("METERED, whole fleet", whole_fleet,
                                                       METERED_RUMOR),
                             ("METERED, LAN-local", METERED, METERED_RUMOR)):
        r = idle(100, args.seed, mcfg, rcfg, 1800.0)
        parts = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sorted(r.items())
                          if k != "total" and v)
        print(f"{name:>20}: {r['total'] / 1024:8.0f} KiB/h = {r['total'] * 24 * 30 / 2**20:6.0f}"
              f" MiB/month ({parts})")
    print("\n== idle WAN cost of gossip per device per hour, METERED (in + out at its LAN's WAN"
          " link; no release, coordinator reachable)")
    for n, lan_size, shape in ((7, 3, "2 LANs x 3 + 1 alone"), (100, 10, "N = 100, LANs of 10")):
        wan = idle_wan(n, lan_size, args.seed)
        for scope, label in (("fleet", "whole fleet"), ("lan", "LAN-local")):
            per_lan = " / ".join(f"{x / 1024:.1f}" for x in wan[scope]) if n < 20 else (
                f"mean {statistics.mean(wan[scope]) / 1024:.1f}, "
                f"max {max(wan[scope]) / 1024:.1f}")
            print(f"{shape:>22}, {label:>11}: {per_lan} KiB/h per device")


if __name__ == "__main__":
    main()
