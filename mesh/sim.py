"""A seeded discrete-event simulator of whole mesh nodes (`mesh.node.MeshNode`): membership,
manifest dissemination and blob exchange over a simulated network with explicit time.

N in-process nodes grouped in LANs of `lan_size`; a message inside a LAN takes `lan_latency`
(plus size / `lan_rate`, if set); between LANs it crosses the sender LAN's uplink, `wan_latency`,
then the receiver LAN's downlink, each a link of `wan_rate` bytes/s shared by all the LAN's
flows in fair shares (processor sharing: every message in transit on a link gets rate / n, as
TCP flows on one bottleneck converge to; a small control message is not stuck behind a 1 MiB
piece; no TCP ACKs, slow start or loss recovery are modelled). `shared_wan=False` gives every
message the whole rate instead, for blob-scheduling studies that leave contention out.
`jitter` scales each unshared transfer time by a random factor in [1 - jitter, 1 + jitter];
any message is lost with probability `loss`; a partition drops everything between LAN groups.
The coordinator's blob seed sits behind the WAN: a download from it sends SEED_REQUEST_BYTES on
the LAN's uplink and, after a round trip, streams the blob (from `StartDownload.offset`) over
the LAN's downlink in SEED_PART parts (`blob_part`); the seed's own link is not the
bottleneck. `wan_bytes(lan)` is what crossed a LAN's WAN link each way; `stats.wan_out_by_type`
what its members sent across it, by message type. One event queue keyed by
(time, sequence number); every random choice comes from `random.Random` instances derived from
the seed, so the same seed gives the same run, bit for bit.

Nodes run exactly what a device runs; the simulator is their driver: it delivers `Send`s,
answers `StartDownload` from the seed, stores blobs (`StoreBlob`: a blob's true bytes are its
size in zero bytes, so a rogue's bytes fail like a bad digest) and serves ranges. Releases
published with `release()` carry real layers and chunks; `publish()` publishes a manifest
without blobs (dissemination studies).

`membership=None` runs the dissemination core (`mesh.rumor`) alone, over a static full view
(every node knows every other, as seeded from the coordinator's peer map): that is how the
10,000-node case runs in seconds (a node's full peer map and per-release peer sets would take
N x N memory). Message sizes are the real encoded frame sizes (`mesh.wire.frame_size`) plus
`per_packet_overhead` (WireGuard data header and tag, UDP, IPv4).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, overload

from mesh.blobsched import COORDINATOR, SchedConfig
from mesh.membership import LAN, Membership, MembershipConfig
from mesh.node import (
    CancelDownload,
    MeshNode,
    Send,
    ServePolicy,
    ServeRange,
    StartDownload,
    StoreBlob,
)
from mesh.release import ChunkRef, Layer, ReleaseManifest, VerificationError, VerifiedRelease
from mesh.rumor import LAN_RUMOR, Dissemination, RumorConfig
from mesh.wire import BlobData, BlobError, BlobRequest, Message, Status, frame_size

WG_UDP_IP_OVERHEAD: Final = 60  # WireGuard data header 16 + Poly1305 tag 16 + UDP 8 + IPv4 20

_WAKE: Final = 0
_DELIVER: Final = 1
_CONTROL: Final = 2
_SEED: Final = 3  # a download from the coordinator's seed completes
_LINK: Final = 4  # a shared WAN link may have finished a flow
# A seed download's HTTP request and response headers (over TLS), bytes: what the coordinator's
# blob seed costs a LAN's uplink (the request) and downlink (beside the blob), besides the blob.
SEED_REQUEST_BYTES: Final = 400
SEED_RESPONSE_OVERHEAD: Final = 300
_DONE_EPS: Final = 1e-6  # bytes left that count as none (float rounding)
# A seed download arrives in parts of this size (blob_part), as a streamed HTTP body does
# (coarser than TCP's segments, to keep the simulation fast): a cut transfer keeps its parts.
SEED_PART: Final = 256 * 1024


class _Link:
    """One LAN's uplink or downlink: processor sharing, every flow on it gets an equal share of
    `rate` (what TCP flows on a bottleneck converge to, with no ACKs or slow start modelled).
    `carried` counts the bytes it moved."""

    __slots__ = ("carried", "flows", "last", "rate", "version")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.flows: dict[int, float] = {}  # flow id -> bytes left
        self.last = 0.0
        self.version = 0
        self.carried = 0.0

    def advance(self, now: float) -> None:
        if self.flows and now > self.last:
            share = (now - self.last) * self.rate / len(self.flows)
            for f, left in self.flows.items():
                self.carried += min(share, left)
                self.flows[f] = left - share
        self.last = max(self.last, now)

    def next_done(self) -> float | None:
        if not self.flows:
            return None
        return self.last + max(0.0, min(self.flows.values())) * len(self.flows) / self.rate


@dataclass(frozen=True, slots=True)
class NetConfig:
    lan_latency: float = 0.001  # one way, seconds
    wan_latency: float = 0.040  # one way between two LANs
    wan_rate: float | None = 125_000.0  # bytes/s per LAN uplink and downlink (1 Mbit/s)
    loss: float = 0.0
    per_packet_overhead: int = WG_UDP_IP_OVERHEAD
    lan_rate: float | None = None  # bytes/s per message inside a LAN; None: latency only
    shared_wan: bool = True  # False: every WAN message gets `wan_rate` to itself
    jitter: float = 0.0  # transfer times x uniform(1 - jitter, 1 + jitter)


@dataclass(frozen=True, slots=True)
class SimConfig:
    n: int
    seed: int = 1
    lan_size: int = 10
    net: NetConfig = NetConfig()
    membership: MembershipConfig | None = LAN  # None: dissemination over a static full view
    rumor: RumorConfig = LAN_RUMOR
    manifest_size: int = 2048  # bytes of a (fake) signed manifest
    sched: SchedConfig = SchedConfig()
    serve: ServePolicy = ServePolicy()  # what each node serves to other LANs (metered)
    rogues: frozenset[int] = frozenset()  # nodes that serve corrupt bytes
    start_spread: float = 0.0  # nodes start at uniform(0, start_spread)


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


def sim_blob_ids(n: int, seed: int = 1) -> list[bytes]:
    return [hashlib.sha256(b"blob-%d-%d" % (seed, i)).digest() for i in range(n)]


def sim_release(fleet: str, app: str, version: int, blobs: Mapping[bytes, int],
                size: int = 2048) -> VerifiedRelease:
    """A release whose chunks are `blobs` (id -> bytes), one layer per 16 chunks."""
    ids = list(blobs)
    layers = []
    for i in range(0, len(ids), 16):
        refs = tuple(ChunkRef(b, blobs[b], blobs[b]) for b in ids[i:i + 16])
        digest = hashlib.sha256(b"".join(r.id for r in refs)).hexdigest()
        layers.append(Layer("sha256:" + digest, sum(r.size for r in refs), refs))
    manifest = ReleaseManifest(fleet, app, version, 0, b"{}", tuple(layers))
    return VerifiedRelease(manifest, sim_manifest(fleet, app, version, size), "sim")


class SimStore:
    """A node's blob store: ids and sizes only; the true bytes of a blob are its size in zeros."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, int] = {}
        self.rejected = 0

    def has(self, blob_id: bytes) -> bool:
        return blob_id in self.blobs

    def size(self, blob_id: bytes) -> int | None:
        return self.blobs.get(blob_id)

    def complete_layers(self) -> frozenset[str]:
        return frozenset()

    def record_layers(self, layers: Mapping[str, Iterable[bytes]]) -> None:
        return None

    def put(self, blob_id: bytes, data: bytes, size: int) -> bool:
        """Verify, then keep: False (nothing kept) if `data` is not the blob. (Its ends stand
        for a digest: a rogue's bytes differ everywhere, and a scan of every byte would cost
        more than the rest of a blob simulation.)"""
        if len(data) != size or data[:64].count(0) + data[-64:].count(0) != min(size, 64) * 2:
            self.rejected += 1
            return False
        self.blobs[blob_id] = size
        return True


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
    node: MeshNode | None  # None: the dissemination core alone (static full view)
    rumor: Dissemination
    store: SimStore
    up: bool = True
    started: bool = False
    stored: int = 0  # manifests its rumor core stored, when last looked
    wake_at: float | None = None
    sent_msgs: int = 0
    sent_bytes: int = 0
    recv_msgs: int = 0
    recv_bytes: int = 0

    @property
    def membership(self) -> Membership | None:
        return self.node.membership if self.node is not None else None


@dataclass(slots=True)
class SimStats:
    delivered: int = 0
    dropped_loss: int = 0
    dropped_partition: int = 0
    dropped_down: int = 0
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    msgs_by_type: dict[str, int] = field(default_factory=dict)
    # bytes a LAN sent across the WAN, by message type ("SeedRequest": to the coordinator)
    wan_out_by_type: dict[int, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))


@dataclass(slots=True)
class BlobStats:
    """Blob exchange: every download a node started, by where it crossed."""

    fetches: list[tuple[float, int, str, bytes]] = field(default_factory=list)  # t, node, src
    wan_fetches: collections.Counter[int] = field(default_factory=collections.Counter)  # by LAN
    lan_fetches: collections.Counter[int] = field(default_factory=collections.Counter)
    coordinator_fetches: int = 0
    bad_deliveries: int = 0  # blobs that failed verification (a rogue's)
    finished_at: dict[int, float] = field(default_factory=dict)  # node -> all releases held


class Simulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.now = 0.0
        self.rng = random.Random(config.seed)  # the network's own randomness (loss, jitter)
        self.stats = SimStats()
        self.blob_stats = BlobStats()
        self.ids = [f"n{i:05d}" for i in range(config.n)]
        self.index = {nid: i for i, nid in enumerate(self.ids)}
        # Node ids stand for addresses (the simulator routes by id); empty addresses keep
        # membership messages at the sizes the published figures were measured with.
        self.addresses = dict.fromkeys(self.ids, "")
        self._restart_count: dict[int, int] = {}
        self._releases: dict[bytes, VerifiedRelease] = {}  # encoded -> release (release())
        self._apps: set[tuple[str, str]] = set()  # apps with blobs, for finished_at
        self.nodes = [self._make_node(i) for i in range(config.n)]
        self.stored_at: dict[int, dict[int, float]] = {}  # version -> node -> first stored
        self.hops: dict[int, dict[int, int]] = {}  # version -> node -> forwards from publisher
        self._src: int | None = None  # sender of the message being delivered
        self.dead_seen: dict[int, dict[int, float]] = {}  # watched subject -> observer -> time
        self.suspect_seen: dict[int, dict[int, float]] = {}
        self.watch: set[int] = set()
        self._queue: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        lans = config.n // config.lan_size + 1
        rate = config.net.wan_rate or float("inf")
        # uplinks of LANs 0..lans-1, then their downlinks (shared_wan)
        self._links = [_Link(rate) for _ in range(2 * lans)]
        self._lans = lans
        self._flow_done: dict[int, Callable[[], None]] = {}
        self._flow_seq = 0
        self._seed_flows: dict[tuple[int, int], tuple[int, int]] = {}  # -> link, flow
        self._wan_sent = [0] * lans  # bytes, without shared_wan (no links)
        self._seed_up = True
        self._wan_received = [0] * lans
        self._group: dict[int, int] | None = None  # lan -> partition group
        self._sizes: dict[int, tuple[Message, int]] = {}
        self._seed_pending: set[tuple[int, int]] = set()  # (node, download) from the seed
        for node in self.nodes:
            t = self.rng.uniform(0.0, config.start_spread) if config.start_spread else 0.0
            self._push(t, _WAKE, node.index, None)
            node.wake_at = t

    # ---- building -------------------------------------------------------------------------

    def lan_members(self, i: int) -> list[str]:
        size = self.config.lan_size
        first = i // size * size
        return [self.ids[j] for j in range(first, min(first + size, self.config.n)) if j != i]

    def _verify(self, data: bytes) -> VerifiedRelease:
        release = self._releases.get(data)
        return release if release is not None else sim_verify(data)

    def _make_node(self, i: int, join: bool = False, store: SimStore | None = None) -> SimNode:
        """Node i's process; `store`: the blob store it finds on disk (a restart)."""
        cfg = self.config
        nid = self.ids[i]
        node_rng = random.Random(f"{cfg.seed}/{i}/{self._restart_count.get(i, 0)}")
        store = store if store is not None else SimStore()
        if cfg.membership is None:
            others = _Others(self.ids, i)
            rumor = Dissemination(nid, node_rng, self._verify, lambda: others, cfg.rumor)
            return SimNode(i, nid, i // cfg.lan_size, None, rumor, store)
        node = MeshNode(nid, _address(i), peers=self.addresses, verify=self._verify,
                        store=store, rng=node_rng, sched_config=cfg.sched,
                        membership_config=cfg.membership, rumor_config=cfg.rumor, join=join,
                        serve=cfg.serve)
        node.set_lan(self.lan_members(i), 0.0)
        return SimNode(i, nid, i // cfg.lan_size, node, node.rumor, store)

    # ---- scenario -------------------------------------------------------------------------

    def at(self, t: float, action: Callable[[], None]) -> None:
        self._push(t, _CONTROL, -1, action)

    def _offer(self, node: int, data: bytes, t: float) -> None:
        def act() -> None:
            n = self.nodes[node]
            if n.up:
                self._src = None
                if n.node is not None:
                    n.node.offer_manifest(data, self.now)
                else:
                    n.rumor.publish(data, self.now)
                self._after(n)
        self.at(t, act)

    def publish(self, node: int, version: int, t: float, *, fleet: str = "fleet",
                app: str = "app", valid: bool = True) -> None:
        """A manifest without blobs, offered to `node` at `t`."""
        self._offer(node, sim_manifest(fleet, app, version, self.config.manifest_size,
                                       valid=valid), t)

    def release(self, blobs: Mapping[bytes, int], t: float, *, nodes: Iterable[int] | None = None,
                fleet: str = "fleet", app: str = "app", version: int = 1) -> VerifiedRelease:
        """A release of `blobs` (id -> size), offered at `t` to `nodes` (default: every node,
        as the coordinator's targets do); its blobs come from the seed and from peers."""
        release = sim_release(fleet, app, version, blobs, self.config.manifest_size)
        self._releases[release.encoded] = release
        self._apps.add((fleet, app))
        for i in range(self.config.n) if nodes is None else nodes:
            self._offer(i, release.encoded, t)
        return release

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
            fresh = self._make_node(node, join=True, store=old.store)
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

    def coordinator_down(self, t: float, up: bool = False) -> None:
        """From `t` the coordinator is unreachable (or reachable again, `up`): seed downloads
        are refused, and every node hears it as its agent's control calls fail."""
        def act() -> None:
            self._seed_up = up
            for n in self.nodes:
                if n.up and n.node is not None:
                    self._src = None
                    n.node.coordinator_reachable(up, self.now)
                    self._after(n)
        self.at(t, act)

    def heal(self, t: float) -> None:
        def act() -> None:
            self._group = None
        self.at(t, act)

    # ---- running --------------------------------------------------------------------------

    def run(self, until: float, *, stop: Callable[[], bool] | None = None) -> None:
        """Process events up to `until`, or until `stop()` is true after an event."""
        q = self._queue
        while q and q[0][0] <= until:
            t, _, kind, idx, payload = heapq.heappop(q)
            self.now = t
            if kind == _CONTROL:
                assert callable(payload)
                payload()
            elif kind == _LINK:
                assert isinstance(payload, int)
                self._link_event(idx, payload)
            else:
                self._event(t, kind, self.nodes[idx], payload)
            if stop is not None and stop():
                return
        self.now = max(self.now, until)

    def all_finished(self) -> bool:
        """Every node that is up holds every blob of every release()."""
        return all(n.index in self.blob_stats.finished_at for n in self.nodes if n.up)

    def _event(self, t: float, kind: int, node: SimNode, payload: object) -> None:
        if kind == _WAKE:
            if not node.up or node.wake_at != t:
                return  # superseded
            node.wake_at = None
            self._src = None
            if node.node is not None and not node.started:
                node.started = True
                node.node.start(t)  # the first wake: the process starts
            elif node.node is not None:
                node.node.tick(t)
            else:
                self._send_all(node, node.rumor.tick(t))
            self._after(node)
        elif kind == _SEED:
            assert isinstance(payload, tuple)
            self._seed_done(node.index, *payload)
        else:
            assert isinstance(payload, tuple)
            src, msg, size = payload
            if not node.up:
                self.stats.dropped_down += 1
                return
            self.stats.delivered += 1
            node.recv_msgs += 1
            node.recv_bytes += size
            sender = self.ids[src]
            self._src = src
            if node.node is not None:
                node.node.receive(msg, sender, t)
            else:
                self._send_all(node, node.rumor.receive(msg, sender, t))
            self._after(node)

    def _after(self, node: SimNode) -> None:
        """Carry out what the node asked for; note what it stored and who it suspects."""
        mesh = node.node
        if mesh is not None:
            while actions := mesh.drain():
                for a in actions:
                    self._carry_out(node, mesh, a)
            self._note_members(node, mesh.membership)
            for fleet, app in self._apps:
                if node.index not in self.blob_stats.finished_at and \
                        mesh.complete(fleet, app):
                    self.blob_stats.finished_at[node.index] = self.now
            if mesh.rumor.stats.stored != node.stored:  # a new manifest is in
                node.stored = mesh.rumor.stats.stored
                for v in mesh.rumor.versions().values():
                    if node.index not in self.stored_at.get(v, {}):
                        self._stored(node, v)
        else:
            for ev in node.rumor.drain_events():
                self._stored(node, ev.version)
        if not node.up:
            return
        d = node.rumor.next_deadline() if mesh is None else mesh.next_deadline()
        if d is not None:
            d = max(d, self.now)
            if node.wake_at is None or d < node.wake_at:
                node.wake_at = d
                self._push(d, _WAKE, node.index, None)

    def _carry_out(self, node: SimNode, mesh: MeshNode, a: object) -> None:
        bs = self.blob_stats
        if isinstance(a, Send):
            if isinstance(a.msg, BlobRequest) and a.msg.offset == 0:
                self._fetched(node, a.dest, a.msg.blob_id)
            self._send(node, a.dest, a.msg)
        elif isinstance(a, StartDownload):
            self._fetched(node, COORDINATOR, a.blob_id)
            self._seed_pending.add((node.index, a.download))
            self._seed_start(node, a)
        elif isinstance(a, CancelDownload):
            self._seed_pending.discard((node.index, a.download))
            flow = self._seed_flows.pop((node.index, a.download), None)
            if flow is not None:
                self._end_flow(*flow)
        elif isinstance(a, StoreBlob):
            ok = node.store.put(a.blob_id, a.data, a.size)
            if not ok:
                bs.bad_deliveries += 1
            mesh.blob_stored(a.download, ok, self.now)
        elif isinstance(a, ServeRange):
            size = node.store.size(a.blob_id)
            if size is None:
                self._send(node, a.peer, BlobError(a.req_id, "read failed"))
            else:
                length = max(0, min(a.length, size - a.offset))
                fill = 0x5A if node.index in self.config.rogues else 0
                self._send(node, a.peer, BlobData(a.req_id, a.blob_id, a.offset,
                                                  bytes([fill]) * length,
                                                  a.offset + length >= size))
            mesh.served(a.peer)

    # ---- the coordinator's seed and the shared WAN links -------------------------------------

    def _seed_start(self, node: SimNode, a: StartDownload) -> None:
        """The request crosses the LAN's uplink, the blob its downlink (the coordinator's own
        link is not the bottleneck); without shared_wan: its size at wan_rate."""
        net = self.config.net
        key = (node.index, a.download)
        rest = a.size - a.offset
        self.stats.wan_out_by_type[node.lan]["SeedRequest"] += SEED_REQUEST_BYTES
        if not (net.shared_wan and net.wan_rate):
            self._wan_sent[node.lan] += SEED_REQUEST_BYTES
            self._wan_received[node.lan] += rest + SEED_RESPONSE_OVERHEAD
            rate = net.wan_rate or float("inf")
            self._push(self.now + 2 * net.wan_latency + rest / rate * self._jitter(),
                       _SEED, node.index, (a.download, rest))
            return
        link = self._lans + node.lan
        if not self._seed_up:  # refused after a round trip
            def refused() -> None:
                mesh = node.node
                if key in self._seed_pending and mesh is not None and node.up:
                    self._seed_pending.discard(key)
                    self._src = None
                    mesh.download_failed(a.download, self.now)
                    self._after(node)
            self.at(self.now + 2 * net.wan_latency, refused)
            return

        def part(offset: int) -> None:
            """The response's next part crosses the downlink; its arrival is reported."""
            n = min(SEED_PART, a.size - offset)
            head = SEED_RESPONSE_OVERHEAD if offset == a.offset else 0

            def arrived() -> None:
                self._seed_flows.pop(key, None)
                mesh = node.node
                if key not in self._seed_pending or mesh is None or not node.up:
                    return
                if offset + n >= a.size:
                    self._seed_pending.discard(key)
                else:
                    part(offset + n)
                self._src = None
                mesh.blob_part(a.download, bytes(n), self.now)
                self._after(node)

            self._seed_flows[key] = (link, self._flow(link, n + head, arrived))

        def answered() -> None:
            if key in self._seed_pending:
                part(a.offset)

        def requested() -> None:
            self._seed_flows.pop(key, None)
            if key in self._seed_pending:
                self.at(self.now + 2 * net.wan_latency, answered)

        self._seed_flows[key] = (node.lan, self._flow(node.lan, SEED_REQUEST_BYTES, requested))

    def _seed_done(self, index: int, download: int, size: int) -> None:
        """Without shared_wan: the rest of the blob at once (`size` bytes)."""
        node = self.nodes[index]
        if (index, download) not in self._seed_pending or node.node is None:
            return  # cancelled
        self._seed_pending.discard((index, download))
        self._src = None
        if node.up:
            node.node.blob_received(download, bytes(size), self.now)
            self._after(node)

    def _flow(self, link: int, size: float, done: Callable[[], None]) -> int:
        """Put `size` bytes on shared link `link`; call `done` when they are through."""
        self._flow_seq += 1
        fid = self._flow_seq
        ln = self._links[link]
        ln.advance(self.now)
        ln.flows[fid] = float(size)
        self._flow_done[fid] = done
        self._reschedule(link)
        return fid

    def _end_flow(self, link: int, fid: int) -> None:
        """Abandon a flow (a cancelled download): the bytes it moved stay counted."""
        ln = self._links[link]
        ln.advance(self.now)
        if ln.flows.pop(fid, None) is not None:
            self._flow_done.pop(fid, None)
            self._reschedule(link)

    def _reschedule(self, link: int) -> None:
        ln = self._links[link]
        ln.version += 1
        t = ln.next_done()
        if t is not None:
            self._push(max(t, self.now), _LINK, link, ln.version)

    def _link_event(self, link: int, version: int) -> None:
        ln = self._links[link]
        if version != ln.version:
            return  # superseded by a later change of the link's flows
        ln.advance(self.now)
        done = [f for f, left in ln.flows.items() if left <= _DONE_EPS]
        for f in done:
            del ln.flows[f]
        self._reschedule(link)
        for f in done:
            self._flow_done.pop(f)()

    def wan_bytes(self, lan: int) -> tuple[int, int]:
        """(bytes in, bytes out) across LAN `lan`'s WAN link so far: every message, seed
        request and seed answer, with per-packet overhead; TCP's ACKs are not modelled."""
        if self.config.net.shared_wan and self.config.net.wan_rate:
            return (round(self._links[self._lans + lan].carried),
                    round(self._links[lan].carried))
        return self._wan_received[lan], self._wan_sent[lan]

    def _fetched(self, node: SimNode, source: str, blob_id: bytes) -> None:
        bs = self.blob_stats
        bs.fetches.append((self.now, node.index, source, blob_id))
        if source == COORDINATOR:
            bs.coordinator_fetches += 1
        if source == COORDINATOR or self.nodes[self.index[source]].lan != node.lan:
            bs.wan_fetches[node.lan] += 1
        else:
            bs.lan_fetches[node.lan] += 1

    def _stored(self, node: SimNode, version: int) -> None:
        self.stored_at.setdefault(version, {}).setdefault(node.index, self.now)
        hops = self.hops.setdefault(version, {})
        if node.index not in hops:
            hops[node.index] = 0 if self._src is None else hops.get(self._src, 0) + 1

    def _note_members(self, node: SimNode, membership: Membership) -> None:
        for subject in self.watch:
            state = membership.member(self.ids[subject])
            if state is None or subject == node.index:
                continue
            table = self.dead_seen if state.status == Status.DEAD else (
                self.suspect_seen if state.status == Status.SUSPECT else None)
            if table is not None:
                table.setdefault(subject, {}).setdefault(node.index, self.now)

    def _send_all(self, node: SimNode, out: list[tuple[str, Message]]) -> None:
        for dest, msg in out:
            self._send(node, dest, msg)

    def _size(self, msg: Message) -> int:
        if isinstance(msg, BlobData):  # without packing its bytes, and not cached: it is big
            n = len(msg.data)
            bin_header = 2 if n < 256 else (3 if n < 65536 else 5)
            return (frame_size(dataclasses.replace(msg, data=b"")) - 2 + bin_header + n
                    + self.config.net.per_packet_overhead)
        hit = self._sizes.get(id(msg))
        if hit is not None and hit[0] is msg:
            return hit[1]
        size = frame_size(msg) + self.config.net.per_packet_overhead
        if len(self._sizes) > 50_000:
            self._sizes.clear()
        self._sizes[id(msg)] = (msg, size)
        return size

    def _jitter(self) -> float:
        j = self.config.net.jitter
        return self.rng.uniform(1.0 - j, 1.0 + j) if j else 1.0

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
        if src_lan != dst_lan:
            self.stats.wan_out_by_type[src_lan][name] += size
        if src_lan == dst_lan:
            t += net.lan_latency
            if net.lan_rate:
                t += size / net.lan_rate * self._jitter()
        elif net.wan_rate and net.shared_wan:
            # the sender LAN's uplink, the WAN's latency, the receiver LAN's downlink: each
            # link shared fairly by all its flows, so a small control message is not stuck
            # behind a 1 MiB piece
            payload = (node.index, msg, size)

            def delivered() -> None:
                self._push(self.now, _DELIVER, dst, payload)

            def crossed() -> None:
                self._flow(self._lans + dst_lan, size, delivered)

            self._flow(src_lan, size, lambda: self.at(self.now + net.wan_latency, crossed))
            return
        else:
            self._wan_sent[src_lan] += size
            self._wan_received[dst_lan] += size
            t += net.wan_latency
            if net.wan_rate:
                t += size / net.wan_rate * self._jitter()
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


def idle_wan_cost(config: SimConfig, span: float = 3600.0) -> list[float]:
    """Bytes per device per hour that cross each LAN's WAN link (in + out, as its router's WAN
    interface counts them) while the fleet is idle: every node holds one manifest (offered
    by the coordinator) and nothing else happens. Measured over `span` seconds after a warm-up
    of two anti-entropy intervals and a minute (first push-pulls and digests are in)."""
    sim = Simulator(config)
    for i in range(config.n):
        sim.publish(i, 1, 0.0)
    warm = 2 * config.rumor.anti_entropy_interval + 60.0
    lans = range((config.n + config.lan_size - 1) // config.lan_size)
    sim.run(warm)
    before = [sum(sim.wan_bytes(lan)) for lan in lans]
    sim.run(warm + span)
    devices = [min(config.lan_size, config.n - lan * config.lan_size) for lan in lans]
    return [(sum(sim.wan_bytes(lan)) - b) * 3600.0 / span / d
            for lan, b, d in zip(lans, before, devices, strict=True)]


def _address(i: int) -> str:
    return f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
