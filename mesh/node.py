"""One mesh node's protocol, without I/O: membership, manifests and blob exchange composed.

`MeshNode` is the state machine a device runs (docs/architecture.md, principle 1). It composes
the three cores: `mesh.membership` (SWIM), `mesh.rumor` (manifest dissemination) and one
`mesh.blobsched.BlobScheduler` per (fleet, app) release it fetches, and owns everything between
them: the release lifecycle, which blobs a release needs on this device (`wanted_blobs`: nothing
for a layer the engine has, else a delta or the chunks), the settle gate after start, Haves that
arrive before their manifest, piece assembly and validation, and the download timeouts. Time is
passed in, randomness comes from the injected `random.Random`; no sockets, no clock, no trio.
The same object runs in the trio driver (agent/_gossip.py) and in the simulator (mesh/sim.py).

Inputs (each returns None; the actions it caused are collected for `drain()`):

    start(now)                        the driver is up: the first tick, the settle gate opens
                                      STARTUP_SETTLE later
    receive(msg, sender, now)         a decoded frame from a peer
    offer_manifest(encoded, now)      signed manifest bytes from outside the mesh -> bool
    set_peers(peers, now)             the peer map (name -> mesh address)
    set_lan(names, now)               LAN neighbours from LAN discovery
    connected(peer)                   a peer opened its first connection to us: it gets our Haves
    peer_down(peer, now)              the connection to or from a peer broke
    send_failed(dest, msg, now)       a `Send` could not be queued
    blob_part(download, data, now)    the next bytes of a `StartDownload`, as they arrive
    blob_received(download, data, now) / download_failed(download, now)
                                      the end of a `StartDownload` (the coordinator's seed)
    coordinator_reachable(ok, now)    the agent's control calls reach the coordinator, or not
    blob_stored(download, ok, now)    the result of a `StoreBlob` (ok None: not stored here)
    served(peer)                      a `ServeRange` is finished
    tick(now)                         at `next_deadline()` (or earlier)

Outputs (`drain()`): `Send` a message; `StartDownload` / `CancelDownload` a blob (from an
offset: a resumed download) from the coordinator's seed; `StoreBlob` verify-and-store whole
blob bytes; `ServeRange` read a range of a held blob and answer a peer's `BlobRequest` with it.
`generation` grows whenever what `newest`, `progress` or `complete` report may have changed.

Blob bytes and the store: the node reads the store's index through a small injected interface
(`BlobIndex`: `has`, `size`, `complete_layers`, `record_layers`, as agent/_blobstore.py's
`BlobStore` offers) and asks the driver, by action, for the work that touches blob contents:
`StoreBlob` (hash check against the signed manifest's id and sizes, then an atomic write: the
driver runs it in a worker thread and reports `blob_stored`) and `ServeRange`. Piece validation
happens here before that: a `BlobData` must answer a request we made to that peer with exactly
the requested blob, offset and length, and the joined blob must have the size the signed
manifest gives; anything else is counted (`bad_pieces`, `bad_blobs`), never stored, and reported
to the scheduler as a bad delivery, which bans the source for the release (docs/architecture.md,
principle 5).

Cross-LAN serving is a policy (`ServePolicy`, metered by default: serve and announce only to the
LAN, except during a coordinator outage), and a download that stops leaves its received prefix
for the next download of the blob, from any source (docs/blob-exchange.md). So is the gossip
scope (`MembershipConfig.idle_scope`): with "lan" (METERED), membership and rumors go to the
LAN neighbours only while the coordinator answers, to the whole fleet during an outage
(docs/gossip.md, "Scope").
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from mesh.blobs import BlobKind
from mesh.blobsched import (
    COORDINATOR,
    Announce,
    BlobScheduler,
    Cancel,
    Fetch,
    LinkRates,
    SchedConfig,
)
from mesh.blobsched import Action as SchedAction
from mesh.control import MAX_COUNT, MISBEHAVIOURS
from mesh.membership import LAN, Membership, MembershipConfig
from mesh.release import ChunkRef, LayerDelta, ReleaseManifest, VerificationError, VerifiedRelease
from mesh.rumor import LAN_RUMOR, Dissemination, RumorConfig, Verifier
from mesh.wire import (
    MAX_BLOB_IDS,
    MAX_PIECE,
    Ack,
    BlobData,
    BlobError,
    BlobRequest,
    Digest,
    Gossip,
    Have,
    ManifestRequest,
    Message,
    Ping,
    PingReq,
    PushPull,
    ReleaseKey,
    Rumor,
    Status,
)

MAX_PENDING_RELEASES: Final = 16  # Haves buffered for releases whose manifest has not arrived
MAX_PENDING_IDS: Final = 65_536  # per peer and release (= blobsched.MAX_HAVE_IDS_PER_PEER)
# After (re)start the node waits this long before it schedules a release's first fetches, so
# LAN discovery (mDNS answers within a second or two) and the LAN neighbours' Haves (each
# answers our first connection with its own) are in: without them every blob looks like ours
# to fetch across the WAN. A device back from an outage then takes what its LAN already holds.
STARTUP_SETTLE: Final = 6.0
PIECES_IN_FLIGHT: Final = 4  # BlobRequests outstanding per download (4 MiB chunk = 4 pieces)
# ... from a peer on another LAN. Its uplink is slow and shared by every LAN that fetches from
# it: with 4 pieces per download each of them gets a sliver, none arrives within a stall
# timeout, and the pieces on the wire when a download is given up are sent for nothing. One
# piece at a time keeps each transfer's progress steady; a request round trip per MiB costs
# little next to a MiB's seconds on such a link, and several downloads keep it full.
WAN_PIECES_IN_FLIGHT: Final = 1
MAX_SERVING_PER_PEER: Final = 32  # BlobRequests we serve at once for one peer
# A download from a peer or the seed is abandoned after this many times the scheduler's own
# timeout for it (`blobsched.fetch_timeout`): the scheduler's timer acts first, this one frees
# the node's state if the scheduler's Cancel never came.
DOWNLOAD_TIMEOUT_FACTOR: Final = 2.0
# The coordinator counts as unreachable after this many seed downloads in a row failed with an
# error from the driver (a refused connection, a 5xx, a cut stream; not our own timer): the
# scheduler then rests it with backoff, and a metered node opens its uplink to other LANs so
# that the fleet's peers carry the release through the outage (ServePolicy, "outage").
OUTAGE_SEED_FAILURES: Final = 3
# What a node answers a WAN BlobRequest it will not serve (metered, or its allowance spent);
# the requester then forgets what that peer offered for the release.
REFUSED_WAN: Final = "not serving other LANs"
# Received prefixes of blobs whose download stopped (cancelled, timed out, connection lost)
# are kept for the next download of that blob, from any source, which starts where they end:
# no byte crosses a link twice. Bounded in total (least recently kept dropped first): 16
# chunks of 4 MiB; what downloads in flight hold comes on top (at most max_total blobs).
MAX_PARTIAL_BYTES: Final = 64 * 1024 * 1024

AppKey = tuple[str, str]
Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ServePolicy:
    """What this device's uplink carries for peers outside its LAN (docs/blob-exchange.md,
    "Cross-LAN serving").

    Default (metered): nothing but control traffic. It sends no Haves to other LANs' peers and
    answers their `BlobRequest`s with `BlobError(REFUSED_WAN)`. `seed_ratio` R > 0: serve other
    LANs at most R x the bytes it holds of a release, counted per release, then refuse.
    `unmetered`: serve other LANs without bound. Whatever the policy, during a coordinator
    outage (OUTAGE_SEED_FAILURES seed downloads in a row failed, or the driver says the
    coordinator is unreachable) the node announces to and serves other LANs, so that peers
    carry a release the seed cannot.
    """

    seed_ratio: float = 0.0
    unmetered: bool = False

    def __post_init__(self) -> None:
        r = self.seed_ratio
        if isinstance(r, bool) or not isinstance(r, int | float) or not r >= 0 \
                or r == float("inf"):
            raise ValueError("seed ratio must be a finite number >= 0")


class BlobIndex(Protocol):
    """What the node reads of the blob store (agent/_blobstore.py `BlobStore`)."""

    def has(self, blob_id: bytes) -> bool: ...

    def size(self, blob_id: bytes) -> int | None: ...

    def complete_layers(self) -> frozenset[str]: ...

    def record_layers(self, layers: Mapping[str, Iterable[bytes]]) -> None: ...


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Queue `msg` for peer `dest`; if it cannot be queued, report `send_failed`."""

    dest: str
    msg: Message


@dataclass(frozen=True, slots=True)
class StartDownload:
    """Fetch blob `blob_id` (`size` bytes in all) from the coordinator's seed, from `offset`
    on (the bytes before it are held from an earlier download: an HTTP Range request).
    Report the bytes in order as they arrive, `blob_part(download, data, now)` (a cut
    transfer keeps what came), or the rest at once, `blob_received(download, data, now)`;
    `download_failed(download, now)` if the transfer breaks."""

    download: int
    blob_id: bytes
    size: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class CancelDownload:
    """Abandon `StartDownload` `download`: its result is no longer wanted."""

    download: int


@dataclass(frozen=True, slots=True)
class StoreBlob:
    """Verify `data` against `blob_id` (and `ref`, `size`: from the signed manifest) and store
    it; report `blob_stored(download, ok, now)`: ok is False if it is not that blob, None if
    it could not be stored (a full disk)."""

    download: int
    blob_id: bytes
    data: bytes
    kind: BlobKind
    ref: ChunkRef | None
    size: int
    source: str


@dataclass(frozen=True, slots=True)
class ServeRange:
    """Answer `peer`'s request `req_id` with `BlobData` of blob[offset:offset + length] (`last`
    when it reaches `size`), or `BlobError` if it cannot be read; then report `served(peer)`."""

    peer: str
    req_id: int
    blob_id: bytes
    offset: int
    length: int
    size: int


Action = Send | StartDownload | CancelDownload | StoreBlob | ServeRange


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class GossipStats:
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_lan: int = 0  # blob bytes received from LAN peers
    bytes_wan: int = 0  # ... from other mesh peers
    bytes_coordinator: int = 0  # ... from the coordinator's blob seed
    bytes_served_wan: int = 0  # blob bytes we agreed to serve to peers outside our LAN
    blobs_done: int = 0  # wanted blobs of the current releases held in the store
    blobs_total: int = 0  # wanted blobs of the current releases


@dataclass(frozen=True, slots=True)
class WantedBlob:
    size: int  # bytes on the wire and in the store
    kind: BlobKind
    ref: ChunkRef | None = None  # for chunks


def wanted_blobs(manifest: ReleaseManifest, complete_layers: Iterable[str],
                 held: Callable[[bytes], bool]) -> dict[bytes, WantedBlob]:
    """The blobs this device fetches for `manifest`.

    Per layer: nothing more if all its chunks are held; nothing at all if the layer itself is
    complete locally (an image of the Docker engine has it: the agent exports it from there,
    e.g. the running agent's own layers under an agent release built on it); else its delta if
    the store holds a complete layer that one of its deltas names as source; else all its
    chunks. (The store and the layers of the Docker engine's images, both given as
    `complete_layers`.)
    """
    bases = frozenset(complete_layers)
    out: dict[bytes, WantedBlob] = {}
    for layer in manifest.layers:
        if all(held(c.id) for c in layer.chunks):
            for c in layer.chunks:
                out[c.id] = WantedBlob(c.stored_size, BlobKind.CHUNK, c)
            continue
        if layer.diff_id in bases:
            continue
        delta: LayerDelta | None = min(
            (d for d in layer.deltas if d.source_diff_id in bases), key=lambda d: d.size,
            default=None)  # the smallest, as materialize_release picks among local bases
        if delta is not None:
            out[delta.blob_id] = WantedBlob(delta.size, BlobKind.DELTA)
        else:
            for c in layer.chunks:
                out[c.id] = WantedBlob(c.stored_size, BlobKind.CHUNK, c)
    return out


@dataclass(slots=True)
class _Release:
    release: VerifiedRelease
    key: ReleaseKey
    sched: BlobScheduler
    wanted: dict[bytes, WantedBlob]
    wanting: bool = False  # `want` has been given to the scheduler (see STARTUP_SETTLE)
    # blobs whose first fetch across the WAN was logged, with its reason
    wan_logged: set[bytes] = field(default_factory=set)
    # blob bytes received for this release, by source (the agent reports them per release)
    received: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(slots=True)
class _Download:
    id: int
    release: _Release
    blob_id: bytes
    source: str
    size: int
    deadline: float  # abandoned at this time while still fetching
    lan: bool  # from a LAN neighbour (bytes counted as bytes_lan)
    # fetching -> storing (the driver verifies and stores the whole blob) -> done; only a
    # fetch times out, breaks with its connection or is cancelled at the seed
    state: Literal["fetching", "storing", "done"] = "fetching"
    requests: dict[int, tuple[int, int]] = field(default_factory=dict)  # req id -> offset, len
    buf: bytearray = field(default_factory=bytearray)  # the contiguous prefix received
    pieces: dict[int, bytes] = field(default_factory=dict)  # offset -> bytes beyond `buf`
    next_offset: int = 0
    # who sent the prefix it resumed from (empty: it started at 0); a blob joined from
    # several sources that fails verification bans none of them
    prior: frozenset[str] = frozenset()
    start: int = 0  # bytes it resumed from

    @property
    def app(self) -> AppKey:
        return (self.release.key.fleet, self.release.key.app)


class MeshNode:
    def __init__(self, name: str, mesh_ip: str, *, peers: Mapping[str, str],
                 verify: Verifier | None, store: BlobIndex, rng: random.Random,
                 fleet: str | None = None,
                 sched_config: SchedConfig | None = None,
                 membership_config: MembershipConfig = LAN,
                 rumor_config: RumorConfig = LAN_RUMOR,
                 pieces_in_flight: int = PIECES_IN_FLIGHT,
                 max_serving_per_peer: int = MAX_SERVING_PER_PEER,
                 local_layers: Callable[[], frozenset[str]] | None = None,
                 log: Log | None = None, join: bool = False,
                 serve: ServePolicy | None = None) -> None:
        """`join`: a restarted node push-pulls with a seed at once (`Membership.seed`);
        `serve`: what we serve to other LANs (default: metered, nothing)."""
        self.name = name
        self.fleet = fleet
        self.store = store
        self.rng = rng
        self.sched_config = sched_config if sched_config is not None else SchedConfig()
        self.rates = LinkRates(self.sched_config)  # measured, shared by the releases' schedulers
        self.pieces_in_flight = pieces_in_flight
        self.max_serving_per_peer = max_serving_per_peer
        self.serve = serve if serve is not None else ServePolicy()
        # diff IDs the device's Docker engine holds (agent/_apply_driver.py): delta bases beside the
        # complete layers of the blob store
        self.local_layers = local_layers if local_layers is not None else frozenset
        self.log: Log = log if log is not None else (lambda _m: None)
        self.stats = GossipStats()
        self.generation = 0  # grows when newest/progress/complete may have changed
        # grows when a peer is first counted for a reason (misbehaving_peers): worth a report
        self.misbehaviour_generation = 0
        self._verify_fn = verify
        self._warned_no_key = False
        # peer -> reason -> count (mesh.control.MISBEHAVIOURS): peer-map members only
        self._misbehaving: dict[str, collections.Counter[str]] = {}
        self.membership = Membership(name, mesh_ip, rng, membership_config,
                                     counters=self.stats.counters, misbehaved=self._misbehaved)
        # rumors go where membership gossips: the LAN only while the coordinator answers, if
        # the config says so (MembershipConfig.idle_scope, `_rescope`)
        self.rumor = Dissemination(name, rng, self._verify, self.membership.gossip_peers,
                                   rumor_config, misbehaved=self._misbehaved)
        self._peers: dict[str, str] = {}
        self._lan_names: frozenset[str] = frozenset()
        self._releases: dict[AppKey, _Release] = {}
        self._targets: dict[AppKey, int] = {}  # app -> the version the device is targeted at
        self._downloads: dict[tuple[AppKey, bytes], _Download] = {}
        self._by_id: dict[int, _Download] = {}
        self._requests: dict[int, _Download] = {}
        self._serving: collections.Counter[str] = collections.Counter()
        self._served_wan: collections.Counter[ReleaseKey] = collections.Counter()
        # blob id -> (received prefix, who sent it), least recently kept first
        self._partials: collections.OrderedDict[bytes, tuple[bytes, frozenset[str]]] = \
            collections.OrderedDict()
        self._partial_bytes = 0
        self._seed_failures = 0  # seed downloads in a row the driver reported failed
        self._coordinator_unreachable = False  # the driver's word (its control calls fail)
        self._pending_haves: dict[ReleaseKey, dict[str, set[bytes]]] = {}
        self._req_seq = 0
        self._dl_seq = 0
        self._settled_at = float("inf")  # set by start(): start + STARTUP_SETTLE
        self._out: list[Action] = []
        self._set_peer_map(peers, join=join)
        self._rescope(0.0)  # LAN-local: nobody until LAN discovery names the neighbours

    # ------------------------------------------------------------------ queries

    def drain(self) -> list[Action]:
        """The actions the inputs since the last call caused, in order."""
        out, self._out = self._out, []
        return out

    @property
    def peers(self) -> Mapping[str, str]:
        return self._peers

    @property
    def lan(self) -> frozenset[str]:
        """LAN neighbours that are in the peer map and live members."""
        live = set(self.membership.live_members())
        return frozenset(n for n in self._lan_names if n in live and n in self._peers)

    def releases(self) -> dict[AppKey, ReleaseKey]:
        return {k: r.key for k, r in self._releases.items()}

    def newest(self, fleet: str, app: str) -> VerifiedRelease | None:
        """The newest verified release of (fleet, app) the node holds."""
        return self.rumor.release(fleet, app)

    def progress(self, fleet: str, app: str) -> tuple[int, int, int, dict[str, int]] | None:
        """(version, bytes held, bytes wanted, bytes received by source: lan, wan_peer,
        coordinator) of the newest release of an app, None if no release is known."""
        r = self._releases.get((fleet, app))
        if r is None:
            return None
        total = sum(w.size for w in r.wanted.values())
        have = r.sched.have  # a copy per access: once
        done = sum(w.size for b, w in r.wanted.items() if b in have)
        return r.key.version, done, total, {k: r.received[k] for k in
                                            ("lan", "wan_peer", "coordinator")}

    def complete(self, fleet: str, app: str) -> bool:
        r = self._releases.get((fleet, app))
        return r is not None and r.wanting and r.sched.complete

    def banned(self, fleet: str, app: str) -> frozenset[str]:
        """The peers banned for the current release of (fleet, app): they served bad bytes."""
        r = self._releases.get((fleet, app))
        return r.sched.banned if r is not None else frozenset()

    def misbehaving_peers(self) -> dict[str, dict[str, int]]:
        """Peer -> reason -> count of what each peer-map member did wrong since start
        (reasons from mesh.control.MISBEHAVIOURS; only peers with a count). What the agent
        reports to the coordinator; the defences (bans, drops) act on their own."""
        return {peer: dict(counts) for peer, counts in sorted(self._misbehaving.items())}

    def next_deadline(self) -> float | None:
        ds = [self.membership.next_deadline(), self.rumor.next_deadline()]
        if any(not r.wanting for r in self._releases.values()):
            ds.append(self._settled_at)
        ds.extend(r.sched.next_deadline() for r in self._releases.values())
        ds.extend(d.deadline for d in self._by_id.values() if d.state == "fetching")
        return min((d for d in ds if d is not None), default=None)

    def have_messages(self, peer: str) -> list[Have]:
        """Everything we hold of the current releases that we offer `peer` (all of it to a LAN
        neighbour; to another LAN's peer only what `ServePolicy` lets us serve it). The driver
        opens every new outbound connection with these: whatever we send a peer later (a
        manifest above all) arrives after what we hold, so its first schedule for a release
        already sees us as a holder, even if earlier frames were lost with an earlier
        connection."""
        out: list[Have] = []
        for r in self._releases.values():
            if self._offers(peer, r):
                have = r.sched.have
                held = sorted(b for b in r.wanted if b in have)
                out.extend(_haves(r.key, held))
        return out

    @property
    def outage(self) -> bool:
        """The coordinator looks unreachable: its seed failed OUTAGE_SEED_FAILURES times in a
        row, or the driver said so (`coordinator_reachable(False)`)."""
        return self._coordinator_unreachable or self._seed_failures >= OUTAGE_SEED_FAILURES

    def serves_wan(self, release: ReleaseKey | None = None) -> bool:
        """Whether we offer other LANs' peers blobs (of `release`, or of any release)."""
        rs = [r for r in self._releases.values() if release is None or r.key == release]
        return any(self._offers_wan(r) for r in rs)

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> None:
        self._settled_at = now + STARTUP_SETTLE
        self.tick(now)

    def tick(self, now: float) -> None:
        self._send_all(self.membership.tick(now))
        self._send_all(self.rumor.tick(now))
        for dl in [d for d in self._by_id.values()
                   if d.state == "fetching" and d.deadline <= now]:
            if dl.source == COORDINATOR:
                self._out.append(CancelDownload(dl.id))
            self._report(dl, None, now)
        for r in list(self._releases.values()):
            if not r.wanting and now >= self._settled_at:
                self._want(r, now)
            self._do(r, r.sched.tick(now), now)
        self._after_cores(now)

    def receive(self, msg: Message, sender: str, now: float) -> None:
        """One frame from `sender`. Whatever its handler raises drops that frame, counted
        (`frame_errors`) and logged: no frame takes the node down (docs/architecture.md,
        principle 5)."""
        try:
            self._receive(msg, sender, now)
        except Exception as exc:  # noqa: BLE001 - any handler's failure: drop the frame
            self.stats.counters["frame_errors"] += 1
            self.log(f"dropped a {type(msg).__name__} from {sender}: "
                     f"{type(exc).__name__}: {exc}")

    def _receive(self, msg: Message, sender: str, now: float) -> None:
        if isinstance(msg, Ping | PingReq | Ack | Gossip | PushPull):
            self._send_all(self.membership.receive(msg, sender, now))
        elif isinstance(msg, Rumor | Digest | ManifestRequest):
            self._send_all(self.rumor.receive(msg, sender, now))
        elif isinstance(msg, Have):
            self._on_have(sender, msg, now)
        elif isinstance(msg, BlobRequest):
            self._on_blob_request(sender, msg)
        else:
            self._on_blob_answer(sender, msg, now)
            return
        self._after_cores(now)

    def offer_manifest(self, encoded: bytes, now: float) -> bool:
        """A signed manifest from outside the mesh (the coordinator's targets). True if it was
        verified and newer than what we hold; it is then gossiped and its blobs fetched."""
        new = self.rumor.publish(encoded, now)
        self._after_cores(now)
        return new

    def set_target(self, fleet: str, app: str, target: VerifiedRelease | None,
                   now: float) -> None:
        """The release this device is targeted at for (fleet, app), verified by the caller,
        or None (no target: the newest release seen is fetched, as before any target).
        While a target is set, its release is the one fetched, older or newer than any
        manifest circulating in the mesh (docs/gossip.md, "Targets")."""
        key = (fleet, app)
        if target is None:
            self._targets.pop(key, None)
            newest = self.rumor.release(fleet, app)
            current = self._releases.get(key)
            if newest is not None and (current is None
                                       or current.key.version < newest.manifest.version):
                self._fetch_release(newest, now)
            return
        m = target.manifest
        if (m.fleet, m.app) != key:
            raise ValueError(f"target release is {m.fleet}/{m.app}, not {fleet}/{app}")
        if self.fleet is not None and fleet != self.fleet:
            return
        self._targets[key] = m.version
        current = self._releases.get(key)
        if current is None or current.key.version != m.version:
            self._fetch_release(target, now)
        self._update_progress()

    def set_peers(self, peers: Mapping[str, str], now: float) -> None:
        """The peer map (name -> mesh address): who may connect, membership seeds."""
        for gone in self._set_peer_map(peers):
            self.peer_down(gone, now)
        self._rescope(now)
        self._refresh_peers(now)

    def set_lan(self, names: Iterable[str], now: float) -> None:
        """The LAN neighbours (names from LAN discovery; only peer-map names count). A
        neighbour found after its connection opened learns now what we hold: the snapshot on
        that connection offered it only what another LAN's peer gets. Live or not in our
        membership: being found on the LAN shows it is up, and a device back from a stop is
        dead to us until it hears so and refutes, which can take a push-pull period."""
        new = frozenset(names)
        added, self._lan_names = new - self._lan_names, new
        for peer in sorted(added):
            if peer in self._peers:
                self._send_haves(peer)
        self._rescope(now)
        self._refresh_peers(now)

    def held_alive(self, peer: str) -> bool:
        """Whether membership holds `peer` alive (not suspect, dead or unknown). A peer we
        do not hold alive that connects to us is back from an outage: the driver reopens its
        connection to it, which sat on a dead socket meanwhile."""
        m = self.membership.member(peer)
        return m is not None and m.status == Status.ALIVE

    def connected(self, peer: str) -> None:
        """`peer` (re)connected to us: it learns at once what we hold, as it may have just
        started and be about to decide where to fetch from (STARTUP_SETTLE). One we hold dead
        also gets our member list, so that it refutes now (Membership.connected)."""
        for have in self.have_messages(peer):
            self._out.append(Send(peer, have))
        self._send_all(self.membership.connected(peer))

    def coordinator_reachable(self, ok: bool, now: float) -> None:
        """The driver's view of the coordinator (its control calls answer or fail): False
        opens the metered uplink to other LANs like failing seed downloads do."""
        was = self.outage
        self._coordinator_unreachable = not ok
        self._outage_changed(was, now)

    def peer_down(self, peer: str, now: float) -> None:
        """The connection to or from `peer` broke: its downloads failed."""
        for dl in [d for d in self._by_id.values()
                   if d.source == peer and d.state == "fetching"]:
            self._report(dl, None, now)

    def send_failed(self, dest: str, msg: Message, now: float) -> None:
        if isinstance(msg, BlobRequest):
            dl = self._requests.get(msg.req_id)
            if dl is not None and dl.source == dest:
                self._report(dl, None, now)

    def blob_received(self, download: int, data: bytes, now: float) -> None:
        """The rest of the blob from the coordinator's seed (a `StartDownload`), from where
        it started or the last `blob_part` on: the download is over."""
        dl = self._seed_bytes(download, data, now)
        if dl is not None and dl.state == "fetching":
            self._store(dl, bytes(dl.buf), now)

    def blob_part(self, download: int, data: bytes, now: float) -> None:
        """The next bytes of a seed download, in order, as they arrive; the last of them
        completes it."""
        dl = self._seed_bytes(download, data, now)
        if dl is not None and dl.state == "fetching" and len(dl.buf) >= dl.size:
            self._store(dl, bytes(dl.buf), now)

    def _seed_bytes(self, download: int, data: bytes, now: float) -> _Download | None:
        dl = self._by_id.get(download)
        if dl is None or dl.source != COORDINATOR or dl.state != "fetching":
            return None
        self._seed_answered(now)
        if not data:
            return dl
        self.stats.bytes_coordinator += len(data)
        dl.release.received["coordinator"] += len(data)
        self.generation += 1
        dl.buf += data
        return dl if self._progressed(dl, len(data), now) else None

    def download_failed(self, download: int, now: float) -> None:
        dl = self._by_id.get(download)
        if dl is not None and dl.state == "fetching":
            if dl.source == COORDINATOR:
                was = self.outage
                self._seed_failures += 1
                self._outage_changed(was, now)
            self._report(dl, None, now)

    def blob_stored(self, download: int, ok: bool | None, now: float) -> None:
        """The result of a `StoreBlob`: True if verified and in the store, False if the bytes
        are not that blob (the source is banned for the release), None if they could not be
        stored here (a full disk: nobody's fault but ours, so the download failed and is
        retried like a lost connection, and no one is banned)."""
        dl = self._by_id.get(download)
        if dl is not None and dl.state == "storing":
            if ok is False and dl.prior - {dl.source}:
                # joined from a resumed prefix and this source's rest: which one sent the bad
                # bytes cannot be told, so nobody is banned; nothing of it is kept, so the next
                # download is whole from one source, and if that fails it names its sender
                self.stats.counters["bad_joined_blobs"] += 1
                ok = None
            self._report(dl, ok, now)

    def misbehaved(self, peer: str, reason: str) -> None:
        """`peer` did something wrong that only the driver sees (`bad_frame`: an undecodable
        frame on its connection); counted like the cores' findings."""
        if reason not in MISBEHAVIOURS:
            raise ValueError(f"not a misbehaviour: {reason!r}")
        self._misbehaved(peer, reason)

    def _misbehaved(self, peer: str, reason: str) -> None:
        """Count `reason` against `peer` if it is a peer-map member: at most the peer map's
        names times the fixed reasons, each saturating at MAX_COUNT."""
        if peer not in self._peers:
            return
        if reason == "forged_manifest" and self._verify_fn is None:
            return  # we pinned no release key: we refuse every manifest, nobody's fault
        counts = self._misbehaving.setdefault(peer, collections.Counter())
        if not counts[reason]:
            self.misbehaviour_generation += 1
        counts[reason] = min(counts[reason] + 1, MAX_COUNT)

    def served(self, peer: str) -> None:
        self._serving[peer] -= 1
        if self._serving[peer] <= 0:
            del self._serving[peer]

    # ------------------------------------------------------------------ cores

    def _verify(self, data: bytes) -> VerifiedRelease:
        if self._verify_fn is None:
            if not self._warned_no_key:
                self._warned_no_key = True
                self.log("no release key pinned for this fleet: manifests are not accepted")
            raise VerificationError("no pinned release key")
        return self._verify_fn(data)

    def _set_peer_map(self, peers: Mapping[str, str], *, join: bool = False) -> list[str]:
        """Take the new peer map; the names whose entry went away or changed address."""
        peers = {n: a for n, a in peers.items() if n != self.name}
        gone = [n for n, a in self._peers.items() if peers.get(n) != a]
        self._peers = peers
        for name in [n for n in self._misbehaving if n not in peers]:
            del self._misbehaving[name]  # bounded by the peer map
        self.membership.seed(peers.items(), join=join)
        return gone

    def _send_all(self, out: list[tuple[str, Message]]) -> None:
        self._out.extend(Send(dest, msg) for dest, msg in out)

    def _after_cores(self, now: float) -> None:
        """Handle the cores' events: membership changes and newly stored manifests."""
        changed = False
        for ev in self.membership.drain_events():
            changed = True
            if ev.kind in ("joined", "alive"):
                self._send_haves(ev.node_id)
            if ev.kind in ("dead", "alive") and ev.node_id in self._lan_names:
                # A LAN neighbour's liveness moves blobs between it and us, and the WAN:
                # what an operator asks when a LAN pulled a release twice.
                self.log(f"LAN neighbour {ev.node_id} {ev.kind} at incarnation "
                         f"{ev.incarnation}")
        if changed:
            self._refresh_peers(now)
        for m in self.rumor.drain_events():
            self.generation += 1
            self._on_release(m.release, now)

    def _refresh_peers(self, now: float) -> None:
        if not self._releases:
            return
        lan = self.lan
        wan = frozenset(self.membership.live_members()) - lan
        for r in list(self._releases.values()):
            self._do(r, r.sched.set_peers(lan, wan, now), now)

    # ------------------------------------------------------------------ releases and haves

    def _on_release(self, verified: VerifiedRelease, now: float) -> None:
        """A newly verified manifest from the mesh or an offer: fetched if it is the newest
        and no target names another version of its app (a target holds what is fetched:
        a withdrawn newer release that keeps circulating must not displace it)."""
        manifest = verified.manifest
        if self.fleet is not None and manifest.fleet != self.fleet:
            return
        app = (manifest.fleet, manifest.app)
        target = self._targets.get(app)
        if target is not None and target != manifest.version:
            return
        old = self._releases.get(app)
        if old is not None and old.key.version >= manifest.version:
            return
        self._fetch_release(verified, now)

    def _fetch_release(self, verified: VerifiedRelease, now: float) -> None:
        """Make `verified` the release fetched for its app, replacing any other version."""
        manifest = verified.manifest
        app = (manifest.fleet, manifest.app)
        old = self._releases.get(app)
        try:
            self.store.record_layers({layer.diff_id: [c.id for c in layer.chunks]
                                      for layer in manifest.layers})
        except OSError as exc:
            self.log(f"cannot record the layer index: {exc}")
        wanted = wanted_blobs(manifest, self.store.complete_layers() | self.local_layers(),
                              self.store.has)
        key = ReleaseKey(manifest.fleet, manifest.app, manifest.version)
        if old is not None:
            for dl in [d for d in self._by_id.values() if d.app == app]:
                self._forget(dl)
        held = [b for b in wanted if self.store.has(b)]
        sched = BlobScheduler(self.name, have=held, config=self.sched_config, rates=self.rates)
        release = _Release(verified, key, sched, wanted)
        self._releases[app] = release
        self.log(f"release {manifest.fleet}/{manifest.app} v{manifest.version}: "
                 f"{len(wanted)} blobs, {len(held)} held")
        lan = self.lan
        self._do(release, sched.set_peers(lan, frozenset(self.membership.live_members()) - lan,
                                          now), now)
        # What peers announced before the manifest reached us goes in before `want`, so the
        # first schedule already sees the LAN's holders.
        for rk in [rk for rk in self._pending_haves if (rk.fleet, rk.app) == app
                   and rk.version <= manifest.version]:
            haves = self._pending_haves.pop(rk)
            if rk.version == manifest.version:
                for peer, ids in haves.items():
                    self._do(release, sched.on_have(peer, ids, False, now), now)
        if now >= self._settled_at:
            self._want(release, now)
        self._update_progress()

    def _want(self, release: _Release, now: float) -> None:
        release.wanting = True
        self.generation += 1
        actions = release.sched.want({b: w.size for b, w in release.wanted.items()}, now)
        held = sorted(b for b in release.wanted if self.store.has(b))
        if held and not any(isinstance(a, Announce) for a in actions):
            actions.append(Announce(tuple(held), complete=True))
        self._do(release, actions, now)

    def _on_have(self, sender: str, msg: Have, now: float) -> None:
        k = msg.release_key
        r = self._releases.get((k.fleet, k.app))
        if r is not None and r.key == k:
            self._do(r, r.sched.on_have(sender, msg.blob_ids, False, now), now)
            return
        if r is not None and k.version < r.key.version:
            return
        if self.fleet is not None and k.fleet != self.fleet:
            return
        # A release whose manifest has not reached us yet: keep what the peer holds (bounded)
        # until it does.
        if k not in self._pending_haves and len(self._pending_haves) >= MAX_PENDING_RELEASES:
            del self._pending_haves[next(iter(self._pending_haves))]
            self.stats.counters["pending_haves_dropped"] += 1
        ids = self._pending_haves.setdefault(k, {}).setdefault(sender, set())
        for b in msg.blob_ids:
            if len(ids) >= MAX_PENDING_IDS:
                break
            ids.add(b)

    def _send_haves(self, peer: str) -> None:
        """Everything we hold of the current releases and offer `peer`, to that (new) peer."""
        self._out.extend(Send(peer, h) for h in self.have_messages(peer))

    # ------------------------------------------------------------------ cross-LAN policy

    def _offers_wan(self, r: _Release) -> bool:
        """Do we offer other LANs the blobs of `r`? (ServePolicy)"""
        p = self.serve
        if p.unmetered or self.outage:
            return True
        # while at least one more byte fits the allowance
        return p.seed_ratio > 0 and self._served_wan[r.key] + 1 <= p.seed_ratio * _held_bytes(r)

    def _offers(self, peer: str, r: _Release) -> bool:
        return peer in self._lan_names or self._offers_wan(r)

    def _may_serve_wan(self, blob_id: bytes, length: int) -> bool:
        """A request from another LAN's peer for `length` bytes of `blob_id`: within our
        policy? If so, its bytes are counted against the release's allowance."""
        p = self.serve
        for r in self._releases.values():
            if blob_id not in r.wanted:
                continue
            if not (p.unmetered or self.outage
                    or self._served_wan[r.key] + length <= p.seed_ratio * _held_bytes(r)):
                return False
            self._served_wan[r.key] += length
            self.stats.bytes_served_wan += length
            return True
        return False  # a blob of no current release: never served across the WAN

    def _seed_answered(self, now: float) -> None:
        if self._seed_failures:
            was = self.outage
            self._seed_failures = 0
            self._outage_changed(was, now)

    def _outage_changed(self, was: bool, now: float) -> None:
        if self.outage == was:
            return
        if not was:
            self.stats.counters["coordinator_outages"] += 1
            self.log("the coordinator looks unreachable: serving and announcing to other LANs")
            lan = self._lan_names
            for peer in self.membership.live_members():
                if peer not in lan:
                    self._send_haves(peer)
        else:
            self.log("the coordinator answers again: back to the serving policy")
        self._rescope(now)
        self._after_cores(now)

    def _rescope(self, now: float) -> None:
        """Whom membership and rumors gossip with (MembershipConfig.idle_scope): with "lan",
        our LAN neighbours in the peer map while the coordinator answers (releases reach every
        device from it, so the WAN carries no gossip: issue 14), the whole fleet during an
        outage, when peers on other LANs carry releases and must know who is alive."""
        if self.membership.config.idle_scope == "fleet" or self.outage:
            self.membership.set_scope(None, now)
        else:
            self.membership.set_scope(self._lan_names & self._peers.keys(), now)

    def _update_progress(self) -> None:
        total = done = 0
        for r in self._releases.values():
            total += len(r.wanted)
            have = r.sched.have
            done += sum(1 for b in r.wanted if b in have)
        self.stats.blobs_total, self.stats.blobs_done = total, done
        self.generation += 1

    # ------------------------------------------------------------------ scheduler actions

    def _do(self, release: _Release, actions: list[SchedAction], now: float) -> None:
        for a in actions:
            if isinstance(a, Fetch):
                self._start_fetch(release, a, now)
            elif isinstance(a, Cancel):
                dl = self._downloads.get(((release.key.fleet, release.key.app), a.blob_id))
                if dl is not None and dl.source == a.source:
                    self._forget(dl)
            else:
                ids = list(a.blob_ids)
                wan = self._offers_wan(release)
                lan = self._lan_names
                for peer in list(self.membership.live_members()):
                    if wan or peer in lan:
                        self._out.extend(Send(peer, h) for h in _haves(release.key, ids))

    def _start_fetch(self, release: _Release, f: Fetch, now: float) -> None:
        app = (release.key.fleet, release.key.app)
        old = self._downloads.get((app, f.blob_id))
        if old is not None:
            self._forget(old)
        lan = f.source != COORDINATOR and f.source in self.lan
        if not lan and f.blob_id not in release.wan_logged:
            # Once per blob and release: why its bytes cross the WAN (what an operator of a
            # metered fleet asks first).
            release.wan_logged.add(f.blob_id)
            holders = release.sched.holders(f.blob_id) & self.lan
            self.log(f"release v{release.key.version}: blob {f.blob_id.hex()[:16]} ({f.size} B)"
                     f" across the WAN from {f.source}: "
                     f"{release.sched.wan_reason(f.blob_id, now)}; LAN neighbours "
                     f"{len(self.lan)}, of them holding it {len(holders)}")
        limit = DOWNLOAD_TIMEOUT_FACTOR * release.sched.fetch_limit(f.size, not lan)
        self._dl_seq += 1
        dl = _Download(self._dl_seq, release, f.blob_id, f.source, f.size, now + limit, lan)
        partial = self._partials.pop(f.blob_id, None)
        if partial is not None:
            self._partial_bytes -= len(partial[0])
            if len(partial[0]) < f.size:
                dl.buf += partial[0]
                dl.prior = partial[1]
                dl.next_offset = dl.start = len(dl.buf)
                self.stats.counters["resumed_downloads"] += 1
                self.stats.counters["resumed_bytes"] += len(dl.buf)
        self._downloads[(app, f.blob_id)] = dl
        self._by_id[dl.id] = dl
        if f.source == COORDINATOR:
            self._out.append(StartDownload(dl.id, f.blob_id, f.size, len(dl.buf)))
        elif dl.size == 0:
            self._store(dl, b"", now)
        else:
            self._request_pieces(dl)

    def _request_pieces(self, dl: _Download) -> None:
        limit = self.pieces_in_flight if dl.lan else min(self.pieces_in_flight,
                                                         WAN_PIECES_IN_FLIGHT)
        while len(dl.requests) < limit and dl.next_offset < dl.size:
            self._req_seq += 1
            req = self._req_seq
            length = min(MAX_PIECE, dl.size - dl.next_offset)
            dl.requests[req] = (dl.next_offset, length)
            self._requests[req] = dl
            self._out.append(Send(dl.source, BlobRequest(req, dl.blob_id, dl.next_offset,
                                                         length)))
            dl.next_offset += length

    def _on_blob_answer(self, sender: str, msg: BlobData | BlobError, now: float) -> None:
        dl = self._requests.get(msg.req_id)
        if dl is None or dl.source != sender:
            self.stats.counters["unsolicited_blob_answers"] += 1
            return
        del self._requests[msg.req_id]
        offset, length = dl.requests.pop(msg.req_id)
        if isinstance(msg, BlobError):
            self.stats.counters["blob_errors_received"] += 1
            r = dl.release
            if msg.reason == REFUSED_WAN and self._releases.get(dl.app) is r:
                # it withdrew its offer (metered, or its allowance is spent): forget what it
                # holds of this release until it announces again
                self.stats.counters["refused_by_wan_peer"] += 1
                self._do(r, r.sched.on_have(sender, (), True, now), now)
            self._report(dl, None, now)
            return
        end = offset + len(msg.data)
        if (msg.blob_id != dl.blob_id or msg.offset != offset or len(msg.data) != length
                or msg.last != (end == dl.size)):
            # not what we asked for: refused before anything is kept, and counted like a blob
            # that fails verification (the source is banned for the release)
            self.stats.counters["bad_pieces"] += 1
            self.stats.counters["bad_blobs"] += 1
            self._report(dl, False, now)
            return
        if dl.lan:
            self.stats.bytes_lan += len(msg.data)
            dl.release.received["lan"] += len(msg.data)
        else:
            self.stats.bytes_wan += len(msg.data)
            dl.release.received["wan_peer"] += len(msg.data)
        self.generation += 1
        dl.pieces[offset] = msg.data
        while len(dl.buf) in dl.pieces:  # pieces answer in any order; the prefix grows
            dl.buf += dl.pieces.pop(len(dl.buf))
        if not self._progressed(dl, len(msg.data), now):
            return
        if len(dl.buf) >= dl.size:
            self._store(dl, bytes(dl.buf), now)
        else:
            self._request_pieces(dl)

    def _progressed(self, dl: _Download, nbytes: int, now: float) -> bool:
        """Bytes of `dl` arrived: the scheduler hears of it (not stalled; a rate sample) and
        the node's own deadline moves on with the scheduler's. False if `dl` is gone (its
        scheduler timer ran out at this very moment)."""
        r = dl.release
        if self._releases.get(dl.app) is r:
            self._do(r, r.sched.on_progress(dl.source, dl.blob_id, nbytes, now), now)
            if self.sched_config.follow_rates:
                dl.deadline = now + DOWNLOAD_TIMEOUT_FACTOR * r.sched.fetch_limit(
                    dl.size, not dl.lan)
        return self._by_id.get(dl.id) is dl

    def _store(self, dl: _Download, data: bytes, now: float) -> None:
        """Whole blob bytes: checked against the signed manifest's size here, then handed to
        the driver to verify their digest and store them."""
        dl.pieces.clear()
        dl.buf = bytearray()
        w = dl.release.wanted.get(dl.blob_id)
        if w is None or len(data) != w.size:
            self.stats.counters["bad_blobs"] += 1
            self._report(dl, False, now)
            return
        dl.state = "storing"  # not timed: a worker thread of the driver's
        if self._releases.get(dl.app) is dl.release:
            dl.release.sched.on_fetched(dl.source, dl.blob_id)
        self._out.append(StoreBlob(dl.id, dl.blob_id, data, w.kind, w.ref, w.size, dl.source))

    def _keep_prefix(self, dl: _Download) -> None:
        """A download that stops while fetching leaves its prefix for the next one."""
        n = len(dl.buf)
        if dl.state != "fetching" or n == 0 or n >= dl.size or self.store.has(dl.blob_id):
            return
        old = self._partials.pop(dl.blob_id, None)
        if old is not None:
            self._partial_bytes -= len(old[0])
        sources = dl.prior | {dl.source} if n > dl.start else dl.prior
        self._partials[dl.blob_id] = (bytes(dl.buf), sources)
        self._partial_bytes += n
        while self._partial_bytes > MAX_PARTIAL_BYTES:
            _, (dropped, _) = self._partials.popitem(last=False)
            self._partial_bytes -= len(dropped)
            self.stats.counters["partials_dropped"] += 1

    def _forget(self, dl: _Download) -> None:
        self._keep_prefix(dl)
        if self._downloads.get((dl.app, dl.blob_id)) is dl:
            del self._downloads[(dl.app, dl.blob_id)]
        if self._by_id.pop(dl.id, None) is not None and dl.source == COORDINATOR \
                and dl.state == "fetching":
            self._out.append(CancelDownload(dl.id))
        for req in dl.requests:
            self._requests.pop(req, None)
        dl.requests.clear()
        dl.pieces.clear()
        dl.buf = bytearray()

    def _report(self, dl: _Download, ok: bool | None, now: float) -> None:
        """ok: verified and stored (True), bad bytes (False), failed/timed out (None)."""
        if ok is False:  # bad bytes from one source (the coordinator is no peer: not counted)
            self._misbehaved(dl.source, "corrupt_blob")
        if self._by_id.get(dl.id) is not dl:
            return  # cancelled by the scheduler or replaced: it knows already
        if ok is None:
            self._keep_prefix(dl)  # failed or timed out: the next download resumes
        dl.state = "done"  # its result is in: no CancelDownload from _forget
        self._forget(dl)
        r = dl.release
        if self._releases.get(dl.app) is not r:
            return
        if ok is None:
            self._do(r, r.sched.on_failed(dl.source, dl.blob_id, now), now)
        else:
            self._do(r, r.sched.on_received(dl.source, dl.blob_id, ok, now), now)
            if ok:  # other releases (apps) that want the same blob have it now too
                for other in list(self._releases.values()):
                    if other is not r and dl.blob_id in other.wanted \
                            and dl.blob_id not in other.sched.have:
                        self._do(other, other.sched.on_received(dl.source, dl.blob_id, True,
                                                                now), now)
        self._update_progress()
        self._after_cores(now)

    # ------------------------------------------------------------------ serving

    def _on_blob_request(self, sender: str, msg: BlobRequest) -> None:
        if sender not in self._peers:
            return
        if self._serving[sender] >= self.max_serving_per_peer:
            self.stats.counters["serve_busy"] += 1
            self._out.append(Send(sender, BlobError(msg.req_id, "busy")))
            return
        size = self.store.size(msg.blob_id) if self.store.has(msg.blob_id) else None
        if size is None:
            self._out.append(Send(sender, BlobError(msg.req_id, "not held")))
            return
        if msg.offset > size:
            self._out.append(Send(sender, BlobError(msg.req_id, "range")))
            return
        if sender not in self._lan_names and not self._may_serve_wan(
                msg.blob_id, min(msg.length, size - msg.offset)):
            # our uplink is metered (ServePolicy): the requester's config cannot spend it
            self.stats.counters["serve_refused_wan"] += 1
            self._out.append(Send(sender, BlobError(msg.req_id, REFUSED_WAN)))
            return
        self._serving[sender] += 1
        self._out.append(ServeRange(sender, msg.req_id, msg.blob_id, msg.offset, msg.length,
                                    size))


def _held_bytes(r: _Release) -> int:
    have = r.sched.have
    return sum(w.size for b, w in r.wanted.items() if b in have)


def _haves(key: ReleaseKey, ids: list[bytes]) -> list[Have]:
    return [Have(key, tuple(ids[i:i + MAX_BLOB_IDS])) for i in range(0, len(ids), MAX_BLOB_IDS)]


__all__ = ["DOWNLOAD_TIMEOUT_FACTOR", "MAX_PENDING_IDS", "MAX_PENDING_RELEASES",
           "MAX_SERVING_PER_PEER", "OUTAGE_SEED_FAILURES", "PIECES_IN_FLIGHT", "REFUSED_WAN",
           "STARTUP_SETTLE", "Action", "BlobIndex", "CancelDownload", "GossipStats", "MeshNode",
           "Send", "ServePolicy", "ServeRange", "StartDownload", "StoreBlob", "WantedBlob",
           "wanted_blobs"]
