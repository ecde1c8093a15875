"""Compile time of a fleet reachability policy (mesh/policy.py, docs/policy.md) at 1,000 and
10,000 devices, against the goal of issue 18 item 6 (< 100 ms at 10,000).

    python -m bench.policy [--sizes 1000,10000] [--repeat 5] [--seed 1] [--store] [--maps]

The fleet: each device has a role (cam, nvr, gateway, sensor, display), one of 50 sites, a
firmware channel and a serial tag (unique, named by no rule), and shares its public address with
up to 3 others (its LAN). The policy: 7 rules over role and site, `<->` among them. One line per
size: the best and median compile time over --repeat runs, the number of tag groups, and the
time to answer one device's reach; with --store, the whole of what the API's
`policy/compiled?device=` does (read the fleet's tags from a SQLite store, compile, explain one
device); with --maps, the partial peer maps of that fleet (coordinator/_peermap.py): peers per
map, full-map bytes, and for one re-tag and one join what the next publish costs (ms), how many
devices it marks and the delta bytes each marked device gets; then the growth ratio of the
median compile time from the smallest to the largest size.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from coordinator._model import EnrollmentToken, EnrollParams
from coordinator._peermap import Member, PeerMapCore
from coordinator._policy import PolicyService
from coordinator._secrets import new_secret, secret_hash
from coordinator._store_sqlite import SqliteStore
from mesh.control import HubInfo
from mesh.policy import FleetDevice, compile_policy, parse_policy
from mesh.rollout import MAX_TAGS
from vpn import generate_keypair

ROLES = ("cam", "nvr", "gateway", "sensor", "display")
POLICY = """\
# bench/policy.py: a camera fleet
role=cam -> role=nvr tcp/554,udp/5000-5100
role=nvr <-> role=nvr tcp/7000
role=sensor -> role=gateway udp/1883,tcp/8883
role=display -> role=nvr tcp/443
site=site-0 <-> site=site-0 any
role=gateway,channel=beta -> role=gateway,channel=beta tcp/22
* -> role=gateway icmp
"""
GOAL_MS = 100.0


def fleet(size: int, rng: random.Random) -> list[FleetDevice]:
    devices = []
    lan = 0
    for i in range(size):
        if rng.random() < 0.3:
            lan += 1
        devices.append(FleetDevice(
            f"dev-{i:05d}",
            {"role": rng.choice(ROLES), "site": f"site-{rng.randrange(50)}",
             "channel": rng.choice(("stable", "beta")), "serial": f"SN{i:08d}"},
            f"198.51.{lan // 256 % 256}.{lan % 256}"))
    return devices


def measure(size: int, repeat: int, seed: int) -> tuple[float, float, int, float]:
    """(best ms, median ms, groups, ms for one device's reach) at `size` devices."""
    policy = parse_policy(POLICY)
    devices = fleet(size, random.Random(seed))
    times = []
    compiled = None
    for _ in range(repeat):
        start = time.perf_counter()
        compiled = compile_policy(policy, devices)
        times.append((time.perf_counter() - start) * 1000)
    assert compiled is not None
    start = time.perf_counter()
    compiled.reach(devices[0].name)
    reach_ms = (time.perf_counter() - start) * 1000
    return min(times), statistics.median(times), compiled.groups, reach_ms


def measure_store(size: int, repeat: int, seed: int) -> tuple[float, float]:
    """(median ms of the API's compiled view of one device, median ms of its store read) with
    `size` devices enrolled and tagged in a fresh SQLite store (coordinator._policy)."""
    devices = fleet(size, random.Random(seed))
    lan = {d.name: d.lan for d in devices}
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "bench.sqlite", "10.0.0.0/8", "fd00::/64")
        try:
            secret = new_secret()
            store.create_token(EnrollmentToken(secret_hash(secret), "bench", size, now + 3600,
                                               now))
            for i, d in enumerate(devices):
                store.enroll(EnrollParams(
                    secret_hash=secret_hash(secret), public_key=generate_keypair().public,
                    credential_hash=secret_hash(new_secret()), device_id=f"d{i}",
                    generated_name=f"g{i}", now=now, name=d.name))
                store.update_tags(d.name, dict(d.tags), (), MAX_TAGS)
            service = PolicyService(store, time.time, lan.get)
            service.set("bench", POLICY)
            views, reads = [], []
            for i in range(repeat):
                start = time.perf_counter()
                service.compiled("bench", devices[i % size].name)
                views.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                store.active_tags("bench")
                reads.append((time.perf_counter() - start) * 1000)
        finally:
            store.close()
    return statistics.median(views), statistics.median(reads)


def measure_maps(size: int, seed: int) -> list[str]:
    """Lines about the partial maps of the bench fleet under POLICY at `size` devices."""
    devices = fleet(size, random.Random(seed))
    key = generate_keypair().public
    core = PeerMapCore(HubInfo(key, "198.51.100.1:51820", "10.0.0.1", "fd00::1",
                               "https://10.0.0.1:8443"), first_version=1000)
    core.set_policy("bench", parse_policy(POLICY))

    def member(i: int, d: FleetDevice) -> Member:
        return Member(d.name, "bench", key, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                      f"fd00::{i + 2:x}", public_endpoint=f"{d.lan}:4000", public_ip=d.lan,
                      tags=tuple(sorted(d.tags.items())))

    for i, d in enumerate(devices):
        core.add(member(i, d))
    core.publish()
    names = [d.name for d in devices]
    peers = sorted(len(core.build(n).peers) for n in names[:: max(1, size // 500)])
    full = statistics.median(len(core.render(n)) for n in names[:200])
    lines = [f"{'':>16} partial maps: peers per map median {statistics.median(peers):.0f}, "
             f"max {peers[-1]} (of {size - 1:,} others); full map median {full / 1024:.1f} KiB"]
    cam = next(d for d in devices if d.tags["role"] == "cam")
    def retag() -> None:
        core.set_tags(cam.name, {**cam.tags, "role": "display"}.items())

    def join() -> None:
        core.add(member(size, FleetDevice("dev-new", {"role": "sensor", "site": "site-7",
                                                      "channel": "stable", "serial": "SNnew"},
                                          "203.0.113.99")))

    changes: list[tuple[str, Callable[[], None]]] = [("re-tag cam -> display", retag),
                                                     ("join of a sensor", join)]
    for what, change in changes:
        held = {m.name: core.version(m.name) for m in core.members()}
        change()
        start = time.perf_counter()
        marked = core.publish()
        publish_ms = (time.perf_counter() - start) * 1000
        sizes = [len(delta) for n in marked if n in held
                 if (delta := core.render_delta(n, held[n])) is not None]
        per = f"{statistics.median(sizes):.0f} B median" if sizes else "none"
        lines.append(f"{'':>16} {what}: publish {publish_ms:6.2f} ms, {len(marked)} devices "
                     f"marked, delta {per} ({len(marked) - len(sizes)} full maps)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--store", action="store_true",
                    help="also time the API's compiled view of one device with the devices in "
                         "a SQLite store (enrolls each size first: ~1 s per 1,000)")
    ap.add_argument("--maps", action="store_true",
                    help="also the partial peer maps: peers per map, bytes, what one change "
                         "costs and marks")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        print("bench.policy: --sizes must be a comma list of integers", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 1 or args.repeat < 1:
        print("bench.policy: --sizes must be positive and --repeat at least 1", file=sys.stderr)
        return 2
    medians = []
    for size in sizes:
        best, median, groups, reach_ms = measure(size, args.repeat, args.seed)
        medians.append(median)
        print(f"{size:>7,} devices: compile best {best:7.2f} ms, median {median:7.2f} ms "
              f"({groups} tag groups); one device's reach {reach_ms:7.2f} ms")
        if args.store:
            view, read = measure_store(size, args.repeat, args.seed)
            print(f"{'':>16} API view (policy/compiled?device=, SQLite): median {view:7.2f} ms, "
                  f"of it the store read {read:7.2f} ms")
        if args.maps:
            print("\n".join(measure_maps(size, args.seed)))
    if len(sizes) > 1:
        print(f"growth {sizes[0]:,} -> {sizes[-1]:,} devices: x{medians[-1] / medians[0]:.1f} "
              f"compile time for x{sizes[-1] / sizes[0]:.0f} devices")
    largest = sizes[-1]
    verdict = "meets" if medians[-1] < GOAL_MS else "MISSES"
    print(f"goal: < {GOAL_MS:.0f} ms at 10,000 devices; {largest:,} devices: "
          f"{medians[-1]:.2f} ms ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
