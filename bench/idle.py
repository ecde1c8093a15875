"""What an idle device costs on its WAN link (issue 14), and what those bytes are.

    scripts/bench idle [--settle 120] [--seconds 900] [--no-behaviours]

The lab of the issue: two `firewall` LANs of three devices and one `symmetric` LAN of one device
(relayed: no direct path through that NAT), the operator on the WAN, the whole fleet running
(coordinator, agents with wireguard-go, gossip, LAN discovery). After `--settle` seconds (the
start-up exchanges: first reports, targets, push-pulls, path punching) nothing is done for
`--seconds`, and the bench prints:

- per LAN, from its router's WAN interface counters: bytes received and sent per device per hour
  (kB = 1000 bytes), their sum against the bar (20 kB/h per device, in + out; goal 10 kB/h) and
  the month (30 days) it makes;
- for the first device of each LAN, counting rules in its own namespace (both directions): its
  LAN link split by the other end — the hub (WireGuard keepalives and handshakes with the hub,
  the coordinator API and relayed traffic inside), LAN neighbours (free: never on the WAN), other
  WAN addresses (direct peers on other LANs, relay probes) — and inside the tunnel, the
  coordinator API and gossip.

- for the same devices, their own byte account (agent/_account.py: WireGuard framing, keepalives
  and handshakes; control API; gossip; blobs; logs), read from the account file each agent
  saves in its data directory (at most every 5 minutes), between the saves nearest the window's
  ends.

Then (unless `--no-behaviours`) what the issue asks of the same lab after its idle time, each
against its bound: the operator's first ping to a device over the mesh, a device's first ping
to one on another LAN (a lazy path), a release published (its target known and its blobs held
on every device), a device revoked (its last reply from any peer, as `scripts/bench
revocation`), and a LAN neighbour's link cut (seen dead by a neighbour, from its log).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agent._account import WanAccount
from agent._datadir import WAN_ACCOUNT
from agent._device import DEFAULT_IFNAME
from agent._gossip import GOSSIP_PORT
from bench.revocation import revoke_and_time
from lab import (
    API_PORT,
    FLEET,
    LOG_DIR,
    Lab,
    LabError,
    blobs_held,
    devices,
    join_operator_to_mesh,
    parse_topology,
    publish_synthetic,
    teardown_all,
    wait_online,
)
from lab.fleet import AGENTS_DIR
from lab.network import LabNetwork, Node
from lab.rollout import outer_routers
from mesh.control import WAN_PURPOSES
from mesh.membership import METERED, suspicion_timeout

CHAIN: Final = "FM-BENCH-IDLE"  # lab-prefixed; only ever created inside a lab namespace
BAR: Final = 20_000  # bytes per device per hour, in + out (issue 14)
GOAL: Final = 10_000
ACCOUNT_POLL: Final = 5.0  # s: how often the window looks for an account saved the first time
# The behaviours' bounds after the idle window (issue 14's acceptance): a reply within 5 s of
# the first ping, the release target known 5 s after publishing, a revoked device cut off in 2 s.
REACH_BOUND: Final = 5.0
KNOWN_BOUND: Final = 5.0
REVOKE_BOUND: Final = 2.0
PING_INTERVAL: Final = 0.2  # s between echo requests until the first reply
PING_TIMEOUT: Final = 30  # s: ping gives up then (bounded: at most 150 requests)
REPLY: Final = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from")
RELEASE_SIZE: Final = 200_000  # bytes: a small synthetic release
KNOWN_TIMEOUT: Final = 60.0
LOG_POLL: Final = 0.05
IDLE_TOPOLOGY: Final[dict[str, Any]] = {"operator": {"on": "wan"}, "lan": [
    {"name": "lana", "nat": "firewall", "devices": 3},
    {"name": "lanb", "nat": "firewall", "devices": 3},
    {"name": "lanc", "nat": "symmetric", "devices": 1}]}


def _rules(lab: LabNetwork, node: Node) -> list[tuple[str, list[str]]]:
    """(part, iptables match) for INPUT and OUTPUT, each direction counted."""
    assert node.lan is not None
    subnet = lab.router(node.lan).lan_subnet
    hub = next(n for n in lab.nodes if n.role == "coordinator").underlay_ipv4
    api, gossip = str(API_PORT), str(GOSSIP_PORT)
    out: list[tuple[str, list[str]]] = []
    for way, other, port in (("-i", "-s", "--sport"), ("-o", "-d", "--dport")):
        out += [
            ("link", [way, node.iface]),
            ("lan", [way, node.iface, other, subnet]),
            ("hub", [way, node.iface, other, hub]),
            ("api", [way, DEFAULT_IFNAME, "-p", "tcp", port, api]),
            ("gossip", [way, DEFAULT_IFNAME, "-p", "tcp", "--sport", gossip]),
            ("gossip", [way, DEFAULT_IFNAME, "-p", "tcp", "--dport", gossip]),
        ]
    return out


class Counting:
    """Counting rules (no target: each only counts, every packet meets all of them) in one
    chain of a lab node, hooked into INPUT and OUTPUT; `close` removes them."""

    def __init__(self, lab: LabNetwork, node: Node, rules: Sequence[tuple[str, list[str]]]):
        self.lab, self.node, self.rules = lab, node, list(rules)
        self._ipt("-N", CHAIN)
        try:
            for hook in ("INPUT", "OUTPUT"):
                self._ipt("-I", hook, "-j", CHAIN)
            for _, match in self.rules:
                self._ipt("-A", CHAIN, *match)
        except BaseException:
            self.close()
            raise

    def _ipt(self, *argv: str) -> str:
        r = self.lab.run(self.node, ["iptables", "-w", *argv], capture_output=True, text=True,
                         timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(argv)} in {self.node.name}: "
                               f"{r.stderr.strip()}")
        return str(r.stdout)

    def zero(self) -> None:
        self._ipt("-Z", CHAIN)

    def read(self) -> dict[str, int]:
        """Bytes per part since the last `zero`."""
        counted: list[int] = []
        for line in self._ipt("-L", CHAIN, "-v", "-x", "-n").splitlines()[2:]:
            fields = line.split()
            if fields and fields[0].isdigit():
                counted.append(int(fields[1]))
        if len(counted) != len(self.rules):
            raise RuntimeError(f"expected {len(self.rules)} counting rules, read {len(counted)}")
        total: dict[str, int] = {}
        for (part, _), n in zip(self.rules, counted, strict=True):
            total[part] = total.get(part, 0) + n
        return total

    def close(self) -> None:
        for hook in ("INPUT", "OUTPUT"):
            self.lab.run(self.node, ["iptables", "-w", "-D", hook, "-j", CHAIN],
                         capture_output=True)
        self.lab.run(self.node, ["iptables", "-w", "-F", CHAIN], capture_output=True)
        self.lab.run(self.node, ["iptables", "-w", "-X", CHAIN], capture_output=True)


@dataclass(frozen=True, slots=True)
class IdleCost:
    seconds: float
    devices: dict[str, int]  # LAN -> devices on it
    wan: dict[str, tuple[int, int]]  # LAN -> (received, sent) on its router's WAN interface
    sampled: dict[str, tuple[str, dict[str, int]]]  # LAN -> (device, bytes per part)
    # device -> (seconds between its two account saves, bytes per purpose between them)
    accounts: dict[str, tuple[float, dict[str, int]]]

    def hourly(self, n: int) -> float:
        return n * 3600 / self.seconds

    def per_device(self, lan: str) -> tuple[float, float]:
        rx, tx = self.wan[lan]
        n = max(1, self.devices[lan])
        return self.hourly(rx) / n, self.hourly(tx) / n

    def worst(self) -> float:
        return max(sum(self.per_device(lan)) for lan in self.wan)

    def lines(self) -> list[str]:
        out = [f"idle over {self.seconds:.0f} s (routers' WAN counters, kB = 1000 B):"]
        for lan in self.wan:
            rx, tx = self.per_device(lan)
            out.append(
                f"  {lan} ({self.devices[lan]} device{'s' * (self.devices[lan] != 1)}): "
                f"{(rx + tx) / 1000:7.1f} kB/h per device = in {rx / 1000:.1f} + out "
                f"{tx / 1000:.1f}; {(rx + tx) * 24 * 30 / 1e6:.1f} MB per month; "
                f"x{(rx + tx) / BAR:.2f} of the bar ({BAR // 1000} kB/h)")
        for device, parts in self.sampled.values():
            h = {k: self.hourly(v) / 1000 for k, v in parts.items()}
            other = h["link"] - h["lan"] - h["hub"]
            out.append(
                f"  {device} (both ways on its LAN link, kB/h): {h['link']:.1f} = hub "
                f"{h['hub']:.1f} + LAN neighbours {h['lan']:.1f} (free) + other WAN "
                f"{other:.1f}; inside the tunnel: coordinator API {h['api']:.1f}, gossip "
                f"{h['gossip']:.1f}")
        for device, (seconds, purposes) in self.accounts.items():
            if seconds <= 0:
                out.append(f"  {device}'s own account: not saved twice in the window")
                continue
            rate = {k: v * 3600 / seconds / 1000 for k, v in purposes.items()}
            split = ", ".join(f"{k} {rate.get(k, 0.0):.1f}" for k in WAN_PURPOSES)
            out.append(f"  {device}'s own account (kB/h over {seconds:.0f} s): "
                       f"{sum(rate.values()):.1f} = {split}")
        verdict = "met" if self.worst() <= BAR else "missed"
        out.append(f"issue 14 idle bar: {verdict} (worst LAN {self.worst() / 1000:.1f} kB/h per "
                   f"device; goal {GOAL // 1000} kB/h)")
        return out


def own_account(device: str) -> tuple[float, dict[str, int]] | None:
    """(when the agent last saved its account, bytes per purpose summed over its days); None
    before its first save (ACCOUNT_SAVE_INTERVAL after the agent started)."""
    path = AGENTS_DIR / device / WAN_ACCOUNT
    try:
        saved = path.stat().st_mtime
    except FileNotFoundError:
        return None
    account = WanAccount.from_json(json.loads(path.read_text()))
    total = dict.fromkeys(WAN_PURPOSES, 0)
    for day in account.days(saved, 8).values():
        for purpose, n in day.items():
            total[purpose] += n
    return saved, total


def measure(lab: LabNetwork, seconds: float) -> IdleCost:
    routers = outer_routers(lab)
    devices = {lan: sum(1 for d in lab.devices if d.lan == lan) for lan in routers}
    first: dict[str, Node] = {}
    for d in lab.devices:
        if d.lan is not None:
            first.setdefault(d.lan, d)
    counters: dict[str, Counting] = {}
    try:
        for lan, node in first.items():
            counters[lan] = Counting(lab, node, _rules(lab, node))
        for c in counters.values():
            c.zero()
        own_before = {n.name: own_account(n.name) for n in first.values()}
        before, t0 = {lan: lab.wan_counters(r) for lan, r in routers.items()}, time.monotonic()
        while (left := t0 + seconds - time.monotonic()) > 0:
            # an account not saved yet is taken from its first save in the window
            time.sleep(min(left, ACCOUNT_POLL))
            for name, got in own_before.items():
                if got is None:
                    own_before[name] = own_account(name)
        after, t1 = {lan: lab.wan_counters(r) for lan, r in routers.items()}, time.monotonic()
        sampled = {lan: (first[lan].name, c.read()) for lan, c in counters.items()}
        accounts = {}
        for name, got in own_before.items():
            now = own_account(name)
            if got is None or now is None:
                accounts[name] = (0.0, dict.fromkeys(WAN_PURPOSES, 0))
                continue
            (saved0, bytes0), (saved1, bytes1) = got, now
            accounts[name] = (saved1 - saved0,
                              {k: max(0, bytes1[k] - bytes0[k]) for k in WAN_PURPOSES})
    finally:
        for c in counters.values():
            c.close()
    wan = {lan: (after[lan][0] - before[lan][0], after[lan][1] - before[lan][1])
           for lan in routers}
    return IdleCost(t1 - t0, devices, wan, sampled, accounts)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """One of issue 14's behaviours after the idle window: how long it took (None: not within
    its timeout, or it failed: `detail` says why) against its bound."""

    what: str
    seconds: float | None
    bound: float
    detail: str = ""

    def line(self) -> str:
        took = "not seen" if self.seconds is None else f"{self.seconds:.2f} s"
        ok = self.seconds is not None and self.seconds <= self.bound
        more = f"; {self.detail}" if self.detail else ""
        return (f"  {self.what}: {took} (bound {self.bound:g} s): "
                f"{'met' if ok else 'MISSED'}{more}")


def first_reply(lab: LabNetwork, node: str, address: str, timeout: int = PING_TIMEOUT
                ) -> float | None:
    """Seconds from the first echo request (one every PING_INTERVAL, for at most `timeout`)
    to the first reply, from ping's own timestamp; None: no reply."""
    started = time.time()
    r = lab.run(node, ["ping", "-D", "-n", "-c1", f"-w{timeout}", f"-i{PING_INTERVAL}",
                       address], capture_output=True, text=True, timeout=timeout + 10)
    for line in r.stdout.splitlines():
        m = REPLY.match(line)
        if m:
            return max(0.0, float(m.group(1)) - started)
    return None


def log_offsets(names: Sequence[str]) -> dict[str, int]:
    return {n: (LOG_DIR / f"{n}.log").stat().st_size for n in names}


def until_each(names: Sequence[str], done: Callable[[str], bool], since: float,
               timeout: float) -> dict[str, float | None]:
    """Per name: seconds from `since` (time.time()) until `done(name)` held (polled every
    LOG_POLL), None if not within `timeout`."""
    seen: dict[str, float | None] = dict.fromkeys(names)
    deadline = since + timeout
    while any(v is None for v in seen.values()) and time.time() < deadline:
        for name in names:
            if seen[name] is None and done(name):
                seen[name] = time.time() - since
        time.sleep(LOG_POLL)
    return seen


def seen_in_logs(offsets: dict[str, int], needle: str, since: float, timeout: float
                 ) -> dict[str, float | None]:
    """Per device log: seconds from `since` until a line with `needle` appeared past its
    offset, None if not within `timeout`."""
    def logged(name: str) -> bool:
        with (LOG_DIR / f"{name}.log").open("rb") as f:
            f.seek(offsets[name])
            return needle.encode() in f.read()

    return until_each(list(offsets), logged, since, timeout)


def path_lines(device: str, peer: str, n: int = 4) -> str:
    """The last `n` lines of `device`'s log about `peer` (its path, punches), for a miss."""
    try:
        text = (LOG_DIR / f"{device}.log").read_text(errors="replace")
    except OSError as exc:
        return f"{device}: no log ({exc.strerror})"
    lines = [x.removeprefix("fleetmesh-agent: ") for x in text.splitlines() if peer in x]
    return f"{device}: " + " / ".join(lines[-n:] or ["nothing"])


def _slowest(seen: dict[str, float | None]) -> tuple[float | None, str]:
    missing = [n for n, t in seen.items() if t is None]
    if missing:
        return None, f"not seen on {', '.join(missing)}"
    worst = max(seen, key=lambda n: seen[n] or 0.0)
    return seen[worst], f"slowest {worst} of {len(seen)}"


def behaviours(lab: LabNetwork) -> list[Behaviour]:
    """After the idle window, in this order: the operator pings a device over the mesh (it
    joins the mesh now, as a workstation would); a device pings one on another LAN (a lazy
    path); a release is published (target known and blobs held on every device); a device is
    revoked (its last reply from any peer); a LAN neighbour's link goes down (seen dead)."""
    listed = devices(lab)
    names = sorted(listed)
    out: list[Behaviour] = []
    try:
        join_operator_to_mesh(lab)
    except LabError as exc:
        out.append(Behaviour("operator ping to lanb-2 over the mesh", None, REACH_BOUND, str(exc)))
    else:
        out.append(Behaviour("operator ping to lanb-2 over the mesh",
                             first_reply(lab, "operator", listed["lanb-2"]["mesh_ipv4"]),
                             REACH_BOUND, "first reply after the first echo request"))
    took = first_reply(lab, "lana-2", listed["lanb-2"]["mesh_ipv4"])
    out.append(Behaviour("lana-2 ping to lanb-2 (a lazy direct path)", took, REACH_BOUND,
                         "first reply after the first echo request" if took is not None else
                         "what each side last logged of the other: "
                         f"{path_lines('lana-2', 'lanb-2')} | {path_lines('lanb-2', 'lana-2')}"))
    offsets = log_offsets(names)
    started = time.time()
    published = publish_synthetic(lab, 1, RELEASE_SIZE)
    done = time.time()
    known = seen_in_logs(offsets, f"release {FLEET}/{published['app']} v1", done, KNOWN_TIMEOUT)
    took, detail = _slowest(known)
    out.append(Behaviour("release target known on every device after publish", took,
                         KNOWN_BOUND, f"{detail}; the publish command took {done - started:.1f} s"))
    blobs = set(published["blobs"])
    held = until_each(names, lambda n: blobs <= blobs_held(n), done, KNOWN_TIMEOUT)
    took, detail = _slowest(held)
    out.append(Behaviour("release blobs held on every device after publish", took,
                         KNOWN_TIMEOUT, f"{detail} ({RELEASE_SIZE // 1000} kB)"))
    try:
        out.append(Behaviour("lanb-3 revoked: its last reply from any peer",
                             revoke_and_time(lab, "lanb-3"), REVOKE_BOUND))
    except LabError as exc:
        out.append(Behaviour("lanb-3 revoked: its last reply from any peer", None,
                             REVOKE_BOUND, str(exc)))
    members = len(names) - 1  # lanb-3 is gone
    bound = (2 * METERED.probe_interval + METERED.probe_timeout
             + METERED.suspicion_max_timeout_mult * suspicion_timeout(METERED, members))
    offsets = log_offsets(["lana-1"])
    node = next(n for n in lab.devices if n.name == "lana-3")
    cut = time.time()
    lab.run(node, ["ip", "link", "set", node.iface, "down"], check=True, timeout=30)
    took = seen_in_logs(offsets, "LAN neighbour lana-3 dead", cut, bound + 30)["lana-1"]
    out.append(Behaviour("lana-3's link down: lana-1 sees it dead", took, bound,
                         "the bound: two probe periods, a probe timeout and the metered "
                         "profile's longest suspicion"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench idle", description=__doc__.split("\n")[0])
    p.add_argument("--settle", type=float, default=120.0,
                   help="seconds after every device is online before counting (default 120)")
    p.add_argument("--seconds", type=float, default=900.0,
                   help="seconds of idle counted (default 900)")
    p.add_argument("--no-behaviours", action="store_true",
                   help="only the byte count: skip the behaviours after the window")
    args = p.parse_args(argv)
    if args.settle < 0 or args.seconds < 10:
        print("bench.idle: --settle must be >= 0 and --seconds >= 10", file=sys.stderr)
        return 2
    if Lab.is_up():
        print("bench.idle: a lab is up; run `fleetmesh-lab down` first", file=sys.stderr)
        return 2
    lab = Lab.up(parse_topology(IDLE_TOPOLOGY, source="bench/idle.py"), network_only=False)
    try:
        wait_online(lab, [d.name for d in lab.devices], 120)
        time.sleep(args.settle)
        cost = measure(lab, args.seconds)
        for line in cost.lines():
            print(line, flush=True)
        if not args.no_behaviours:
            print("after the idle window:", flush=True)
            for b in behaviours(lab):
                print(b.line(), flush=True)
    finally:
        teardown_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
