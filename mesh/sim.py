"""A seeded discrete-event simulator for the mesh protocol cores (membership + dissemination).

N in-process nodes grouped in LANs; a message inside a LAN takes `lan_latency`; between LANs it
is serialised on the sender LAN's uplink and the receiver LAN's downlink at `wan_rate` bytes/s
(one shared WAN link per LAN, as behind a home router) and takes `wan_latency`; any message is
lost with probability `loss`; a partition drops everything between LAN groups. One event queue
keyed by (time, sequence number); every random choice comes from `random.Random` instances
derived from the seed, so the same seed gives the same run, bit for bit.

`membership=None` runs dissemination only, over a static full view (every node knows every
other, as seeded from the coordinator's peer map): that is how the 10,000-node case runs in
seconds. Message sizes are the real encoded frame sizes (`mesh.wire.frame_size`) plus
`per_packet_overhead` (WireGuard data header and tag, UDP, IPv4).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, overload

from mesh.membership import LAN, Membership, MembershipConfig
from mesh.release import ReleaseManifest, VerificationError, VerifiedRelease
from mesh.rumor import LAN_RUMOR, Dissemination, RumorConfig
from mesh.wire import Ack, Gossip, Message, Ping, PingReq, PushPull, frame_size

WG_UDP_IP_OVERHEAD: Final = 60  # WireGuard data header 16 + Poly1305 tag 16 + UDP 8 + IPv4 20

_WAKE: Final = 0
_DELIVER: Final = 1
_CONTROL: Final = 2
_MEMBERSHIP_TYPES: Final = (Ping, PingReq, Ack, Gossip, PushPull)


@dataclass(frozen=True, slots=True)
class NetConfig:
    lan_latency: float = 0.001  # one way, seconds
    wan_latency: float = 0.040  # one way between two LANs
    wan_rate: float | None = 125_000.0  # bytes/s per LAN uplink and downlink (1 Mbit/s)
    loss: float = 0.0
    per_packet_overhead: int = WG_UDP_IP_OVERHEAD


@dataclass(frozen=True, slots=True)
class SimConfig:
    n: int
    seed: int = 1
    lan_size: int = 10
    net: NetConfig = NetConfig()
    membership: MembershipConfig | None = LAN  # None: dissemination over a static full view
    rumor: RumorConfig = LAN_RUMOR
    manifest_size: int = 2048  # bytes of a (fake) signed manifest


def sim_manifest(fleet: str, app: str, version: int, size: int = 2048, *,
                 valid: bool = True) -> bytes:
    """A stand-in for an encoded SignedManifest that `sim_verify` accepts (or refuses)."""
    head = f"{fleet}/{app}/{version}/{'ok' if valid else 'forged'}".encode()
    return head + b"\0" * max(0, size - len(head))


def sim_verify(data: bytes) -> VerifiedRelease:
    """The simulator's verifier: cheap, but it refuses forged manifests like the real one."""
    head = data.split(b"\0", 1)[0].decode("ascii", "replace").split("/")
    if len(head) != 4 or head[3] != "ok" or not head[2].isdigit():
        raise VerificationError("bad signature")
    return VerifiedRelease(ReleaseManifest(head[0], head[1], int(head[2]), 0, b"", ()), data,
                           "sim")


class _Others(Sequence[str]):
    """All node ids but one, without a per-node copy (10,000 x 10,000 would not fit)."""

    __slots__ = ("_ids", "_skip")

    def __init__(self, ids: list[str], skip: int) -> None:
        self._ids = ids
        self._skip = skip

    def __len__(self) -> int:
        return len(self._ids) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        return self._ids[i if i < self._skip else i + 1]

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


@dataclass(slots=True)
class SimNode:
    index: int
    node_id: str
    lan: int
    membership: Membership | None
    rumor: Dissemination
    up: bool = True
    wake_at: float | None = None
    sent_msgs: int = 0
    sent_bytes: int = 0
    recv_msgs: int = 0
    recv_bytes: int = 0


@dataclass(slots=True)
class SimStats:
    delivered: int = 0
    dropped_loss: int = 0
    dropped_partition: int = 0
    dropped_down: int = 0
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    msgs_by_type: dict[str, int] = field(default_factory=dict)


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.now = 0.0
        self.rng = random.Random(config.seed)  # the network's own randomness (loss)
        self.stats = SimStats()
        self.ids = [f"n{i:05d}" for i in range(config.n)]
        self.index = {nid: i for i, nid in enumerate(self.ids)}
        self._restart_count: dict[int, int] = {}
        self.nodes = [self._make_node(i) for i in range(config.n)]
        self.stored_at: dict[int, dict[int, float]] = {}  # version -> node -> first stored
        self.hops: dict[int, dict[int, int]] = {}  # version -> node -> forwards from publisher
        self._src: int | None = None  # sender of the message being delivered
        self.dead_seen: dict[int, dict[int, float]] = {}  # watched subject -> observer -> time
        self.suspect_seen: dict[int, dict[int, float]] = {}
        self.watch: set[int] = set()
        self._queue: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        self._uplink_free = [0.0] * (config.n // config.lan_size + 1)
        self._downlink_free = [0.0] * (config.n // config.lan_size + 1)
        self._group: dict[int, int] | None = None  # lan -> partition group
        self._sizes: dict[int, tuple[Message, int]] = {}
        for node in self.nodes:
            self._push(0.0, _WAKE, node.index, None)
            node.wake_at = 0.0

    # ---- building -------------------------------------------------------------------------

    def _make_node(self, i: int, join: bool = False) -> SimNode:
        cfg = self.config
        nid = self.ids[i]
        node_rng = random.Random(f"{cfg.seed}/{i}/{self._restart_count.get(i, 0)}")
        membership: Membership | None = None
        peers: Callable[[], Sequence[str]]
        if cfg.membership is not None:
            membership = Membership(nid, f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", node_rng,
                                    cfg.membership)
            membership.seed(((self.ids[j], "") for j in range(cfg.n) if j != i), join=join)
            peers = membership.live_members
        else:
            others = _Others(self.ids, i)
            peers = lambda: others  # noqa: E731
        rumor = Dissemination(nid, node_rng, sim_verify, peers, cfg.rumor)
        return SimNode(i, nid, i // cfg.lan_size, membership, rumor)

    # ---- scenario -------------------------------------------------------------------------

    def at(self, t: float, action: Callable[[], None]) -> None:
        self._push(t, _CONTROL, -1, action)

    def publish(self, node: int, version: int, t: float, *, fleet: str = "fleet",
                app: str = "app", valid: bool = True) -> None:
        data = sim_manifest(fleet, app, version, self.config.manifest_size, valid=valid)

        def act() -> None:
            n = self.nodes[node]
            if n.up:
                self._src = None
                n.rumor.publish(data, self.now)
                self._after(n)
        self.at(t, act)

    def stop(self, node: int, t: float) -> None:
        def act() -> None:
            self.nodes[node].up = False
            self.nodes[node].wake_at = None
        self.at(t, act)

    def restart(self, node: int, t: float) -> None:
        """A fresh process with an empty state (seeded again from the peer map)."""
        def act() -> None:
            self._restart_count[node] = self._restart_count.get(node, 0) + 1
            old = self.nodes[node]
            fresh = self._make_node(node, join=True)
            fresh.sent_msgs, fresh.sent_bytes = old.sent_msgs, old.sent_bytes
            fresh.recv_msgs, fresh.recv_bytes = old.recv_msgs, old.recv_bytes
            self.nodes[node] = fresh
            fresh.wake_at = self.now
            self._push(self.now, _WAKE, node, None)
        self.at(t, act)

    def partition(self, groups: Sequence[Sequence[int]], t: float) -> None:
        """From `t`, LANs in different groups cannot reach each other (unlisted LANs: group 0)."""
        mapping = {lan: g for g, lans in enumerate(groups) for lan in lans}

        def act() -> None:
            self._group = mapping
        self.at(t, act)

    def heal(self, t: float) -> None:
        def act() -> None:
            self._group = None
        self.at(t, act)

    # ---- running --------------------------------------------------------------------------

    def run(self, until: float) -> None:
        q = self._queue
        while q and q[0][0] <= until:
            t, _, kind, idx, payload = heapq.heappop(q)
            self.now = t
            if kind == _CONTROL:
                assert callable(payload)
                payload()
                continue
            node = self.nodes[idx]
            if kind == _WAKE:
                if not node.up or node.wake_at != t:
                    continue  # superseded
                node.wake_at = None
                self._src = None
                out = node.rumor.tick(t)
                if node.membership is not None:
                    out += node.membership.tick(t)
                self._send_all(node, out)
                self._after(node)
            else:
                assert isinstance(payload, tuple)
                src, msg, size = payload
                if not node.up:
                    self.stats.dropped_down += 1
                    continue
                self.stats.delivered += 1
                node.recv_msgs += 1
                node.recv_bytes += size
                sender = self.ids[src]
                self._src = src
                if isinstance(msg, _MEMBERSHIP_TYPES):
                    out = node.membership.receive(msg, sender, t) if node.membership else []
                else:
                    out = node.rumor.receive(msg, sender, t)
                self._send_all(node, out)
                self._after(node)
        self.now = max(self.now, until)

    def _after(self, node: SimNode) -> None:
        for ev in node.rumor.drain_events():
            self.stored_at.setdefault(ev.version, {}).setdefault(node.index, self.now)
            hops = self.hops.setdefault(ev.version, {})
            if node.index not in hops:
                hops[node.index] = 0 if self._src is None else hops.get(self._src, 0) + 1
        if node.membership is not None:
            for mev in node.membership.drain_events():
                subject = self.index.get(mev.node_id)
                if subject in self.watch and subject is not None:
                    table = self.dead_seen if mev.kind == "dead" else (
                        self.suspect_seen if mev.kind == "suspect" else None)
                    if table is not None:
                        table.setdefault(subject, {}).setdefault(node.index, self.now)
        if not node.up:
            return
        d = node.rumor.next_deadline()
        if node.membership is not None:
            m = node.membership.next_deadline()
            d = m if d is None else (d if m is None else min(d, m))
        if d is not None:
            d = max(d, self.now)
            if node.wake_at is None or d < node.wake_at:
                node.wake_at = d
                self._push(d, _WAKE, node.index, None)

    def _send_all(self, node: SimNode, out: list[tuple[str, Message]]) -> None:
        for dest, msg in out:
            self._send(node, dest, msg)

    def _size(self, msg: Message) -> int:
        hit = self._sizes.get(id(msg))
        if hit is not None and hit[0] is msg:
            return hit[1]
        size = frame_size(msg) + self.config.net.per_packet_overhead
        if len(self._sizes) > 50_000:
            self._sizes.clear()
        self._sizes[id(msg)] = (msg, size)
        return size

    def _send(self, node: SimNode, dest: str, msg: Message) -> None:
        dst = self.index.get(dest)
        if dst is None:
            return
        net = self.config.net
        size = self._size(msg)
        node.sent_msgs += 1
        node.sent_bytes += size
        name = type(msg).__name__
        self.stats.msgs_by_type[name] = self.stats.msgs_by_type.get(name, 0) + 1
        self.stats.bytes_by_type[name] = self.stats.bytes_by_type.get(name, 0) + size
        if net.loss and self.rng.random() < net.loss:
            self.stats.dropped_loss += 1
            return
        src_lan, dst_lan = node.lan, self.nodes[dst].lan
        if self._group is not None and \
                self._group.get(src_lan, 0) != self._group.get(dst_lan, 0):
            self.stats.dropped_partition += 1
            return
        t = self.now
        if src_lan == dst_lan:
            t += net.lan_latency
        else:
            if net.wan_rate:
                t = max(t, self._uplink_free[src_lan]) + size / net.wan_rate
                self._uplink_free[src_lan] = t
            t += net.wan_latency
            if net.wan_rate:
                t = max(t, self._downlink_free[dst_lan]) + size / net.wan_rate
                self._downlink_free[dst_lan] = t
        self._push(t, _DELIVER, dst, (node.index, msg, size))

    def _push(self, t: float, kind: int, idx: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, kind, idx, payload))

    # ---- results --------------------------------------------------------------------------

    def delivery_times(self, version: int) -> list[float]:
        return sorted(self.stored_at.get(version, {}).values())

    def fingerprint(self) -> tuple[object, ...]:
        """Everything observable about a run, for determinism checks."""
        return (self.now, self.stats.delivered, self.stats.dropped_loss,
                tuple(sorted((v, tuple(sorted(d.items()))) for v, d in self.stored_at.items())),
                tuple((n.sent_msgs, n.sent_bytes, n.recv_msgs) for n in self.nodes),
                tuple(sorted(self.stats.bytes_by_type.items())))
