"""Peer-map bytes per device per change: full maps vs incremental ones (issue 18 item 5).

    python -m bench.peermap [--sizes 1000,10000] [--rounds 4] [--sample 24]

One fleet of N devices in the coordinator's peer-map core (coordinator/_peermap.py, no HTTP:
the bytes are the JSON bodies the peer-map route sends, headers and TLS excluded), four devices
behind each public IP, each with a LAN candidate. Each change below is published alone, and
every device whose map it changes (its receivers) is sent either its full map (what every
answer was before deltas, and what an agent that does not ask `delta=1` still gets) or what
`delta=1` answers (`render_delta`, or the full map where the core falls back):
- endpoint: a device's NAT port changes (every other device's entry for it changes);
- lan: a device's LAN candidates change (its three same-NAT neighbours' maps change);
- join: a device enrolls; leave: one is revoked (everybody's map changes);
- move: a device moves behind another public IP (everybody's entry for it changes, and its
  own LAN-or-WAN choice for every peer may flip: it gets its full map).
Incremental answers are rendered for every receiver; full maps for a sample of receivers (their
sizes differ by a few bytes), and for that sample the delta-kept map is checked against the full
map after every change. "per device" divides the bytes sent for one change by its receivers.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field

from coordinator._peermap import Member, PeerMapCore
from mesh.control import HubInfo, PeerMap, PeerMapDelta
from vpn import generate_keypair

HUB = HubInfo(generate_keypair().public, "198.51.100.1:51820", "10.250.0.1",
              "fd7a:f1ee:7000::1", "https://10.250.0.1:8443")
PER_SITE = 4
KINDS = ("endpoint", "lan", "join", "leave", "move")


@dataclass
class Tally:
    receivers: int = 0
    full_bytes: float = 0.0  # estimated from the sample: mean full size x receivers
    incr_bytes: int = 0
    fallbacks: int = 0  # receivers sent a full map under delta=1
    changes: int = 0
    full_us: list[float] = field(default_factory=list)  # one full render
    incr_us: list[float] = field(default_factory=list)  # one delta render


def _member(i: int, keys: list[str]) -> Member:
    site = i // PER_SITE
    return Member(f"device-{i:05d}", "bench", keys[i % len(keys)],
                  f"10.250.{i // 250}.{i % 250 + 2}", f"fd7a:f1ee:7000::{i + 2:x}",
                  (f"192.168.{site % 250}.{i % PER_SITE + 10}:51820",),
                  f"203.0.{site // 250}.{site % 250 + 1}:{40000 + i % PER_SITE}",
                  f"203.0.{site // 250}.{site % 250 + 1}")


def _change(core: PeerMapCore, kind: str, rng: random.Random, next_id: list[int],
            keys: list[str]) -> None:
    names = [m.name for m in core.members()]
    victim = core.member(rng.choice(names))
    assert victim is not None
    if kind == "endpoint":
        assert victim.public_endpoint is not None and victim.public_ip is not None
        port = int(victim.public_endpoint.rpartition(":")[2])
        core.set_public(victim.name, f"{victim.public_ip}:{port % 60000 + 1}")
    elif kind == "lan":
        core.set_lan(victim.name, (f"192.168.250.{rng.randrange(1, 250)}:51820",))
    elif kind == "join":
        core.add(_member(next_id[0], keys))
        next_id[0] += 1
    elif kind == "leave":
        core.remove(victim.name)
    else:  # move: another site's public IP
        core.set_public(victim.name, f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}:4000")


def run_size(n: int, rounds: int, sample: int, seed: int = 7) -> dict[str, Tally]:
    rng = random.Random(seed)
    keys = [generate_keypair().public for _ in range(64)]
    core = PeerMapCore(HUB, first_version=1_000_000)
    for i in range(n):
        core.add(_member(i, keys))
    core.publish()
    next_id = [n]
    held: dict[str, PeerMap] = {}  # the sampled devices' maps, kept by deltas
    tallies = {k: Tally() for k in KINDS}
    for _ in range(rounds):
        for kind in KINDS:
            before = {m.name: core.version(m.name) for m in core.members()}
            _change(core, kind, rng, next_id, keys)
            receivers = [name for name in core.publish() if name in before]
            t = tallies[kind]
            t.changes += 1
            t.receivers += len(receivers)
            for name in receivers:
                t0 = time.perf_counter()
                body = core.render_delta(name, before[name])
                t.incr_us.append((time.perf_counter() - t0) * 1e6)
                if body is None:
                    t.fallbacks += 1
                    body = core.render(name)
                t.incr_bytes += len(body)
            chosen = rng.sample(receivers, min(sample, len(receivers)))
            full_sizes = []
            for name in chosen:
                t0 = time.perf_counter()
                full_sizes.append(len(core.render(name)))
                t.full_us.append((time.perf_counter() - t0) * 1e6)
                _keep(core, held, name, before[name])
            if full_sizes:
                t.full_bytes += sum(full_sizes) / len(full_sizes) * len(receivers)
    return tallies


def _keep(core: PeerMapCore, held: dict[str, PeerMap], name: str, base: int) -> None:
    """A sampled device keeps its map by deltas; it must be the full map, always."""
    have = held.get(name)
    delta: PeerMapDelta | None = None
    if have is not None and have.version == base:
        delta = core.build_delta(name, base)
    held[name] = delta.apply(have) if delta is not None and have is not None \
        else core.build(name)
    assert held[name] == core.build(name), name


def per_device(t: Tally) -> tuple[float, float]:
    if not t.receivers:
        return 0.0, 0.0
    return t.full_bytes / t.receivers, t.incr_bytes / t.receivers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peermap")
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--rounds", type=int, default=4, help="changes of each kind per size")
    parser.add_argument("--sample", type=int, default=24,
                        help="receivers per change whose full map is rendered and checked")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: comma-separated device counts")
    if any(s < 2 * PER_SITE for s in sizes) or args.rounds < 1 or args.sample < 1:
        parser.error(f"sizes must be >= {2 * PER_SITE}, --rounds and --sample >= 1")
    results: dict[int, dict[str, Tally]] = {}
    for n in sizes:
        print(f"... {n} devices, {args.rounds} changes of each kind", file=sys.stderr,
              flush=True)
        results[n] = run_size(n, args.rounds, args.sample)
    print(f"{'devices':>8} {'change':>9} {'recv/chg':>9} {'full B/dev':>11} {'delta B/dev':>12} "
          f"{'full/delta':>11} {'fallbacks':>10} {'full us':>8} {'delta us':>9}")
    for n, tallies in results.items():
        for kind, t in tallies.items():
            full, incr = per_device(t)
            print(f"{n:>8} {kind:>9} {t.receivers / t.changes:>9.0f} {full:>11.0f} "
                  f"{incr:>12.0f} {full / incr if incr else 0:>11.1f} {t.fallbacks:>10} "
                  f"{_median(t.full_us):>8.0f} {_median(t.incr_us):>9.0f}")
    if len(sizes) >= 2:
        a, b = results[sizes[0]], results[sizes[-1]]
        grow = sizes[-1] / sizes[0]
        print(f"growth {sizes[0]:,} -> {sizes[-1]:,} devices (x{grow:g}), bytes per device "
              "per change:")
        for kind in KINDS:
            fa, ia = per_device(a[kind])
            fb, ib = per_device(b[kind])
            print(f"  {kind:>9}: full x{fb / fa:.2f}, incremental x{ib / ia:.2f}"
                  if fa and ia else f"  {kind:>9}: no receivers")
    return 0


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else 0.0


if __name__ == "__main__":
    sys.exit(main())
