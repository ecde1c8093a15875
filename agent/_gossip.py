"""The mesh node's trio driver: runs `mesh.node.MeshNode` over TCP (or any stream network).

`MeshNode` (mesh/node.py) holds the whole protocol without I/O: membership, manifest
dissemination, the release lifecycle and blob exchange (docs/architecture.md, principle 1). This
driver does the I/O it asks for: it owns the connections, frame encoding and decoding, the
bounded send queues, one timer (from `next_deadline()`), and the work that touches blob
contents (the coordinator's seed, verify-and-store, serving ranges), and feeds every result back
in. One `GossipNode` per device:

    node = GossipNode("cam-1", "10.250.0.2", peers={"cam-2": "10.250.0.3"}, verify=verify,
                      store=BlobStore(data / "blobs"), client=device_client, fleet="cams")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)        # listening; the first tick has run
        node.offer_manifest(signed_bytes)    # from the coordinator's targets
        node.set_lan({"cam-2"})              # from LAN discovery (mDNS)
        release = node.newest("cams", "cam") # a mesh.release.VerifiedRelease, or None
        await node.changed().wait()          # newest/progress/complete may have changed

Transport (`StreamNetwork`; `TcpNetwork` by default, tests inject `trio.testing` memory
streams): a listener on (mesh address, GOSSIP_PORT); the mesh address is only reachable
through WireGuard, so a connection's source address names the peer that opened it, and only
connections from a current peer's mesh address are accepted. Each peer gets one outbound
connection, opened lazily and used for everything we send it; what a peer sends us arrives on
its own outbound connection (our inbound one). Frames are `mesh.wire` frames; a `WireError`
closes that connection and is counted; every connect, send and idle read has a deadline, and
each peer's send queue is bounded (frames and bytes): a control frame that does not fit is
dropped and counted, a blob piece waits at most `send_timeout` for room.

Blob bytes: the node asks for a blob's pieces with `BlobRequest`s and checks every `BlobData`
against its request and the joined blob against the signed manifest's size; the driver then
verifies its digest and stores it in one step (`BlobStore.put`, in a worker thread) and reports
the result (`blob_stored`); a blob that fails is never stored and bans its source for the
release. We serve only whole, verified blobs from the store.
"""

from __future__ import annotations

import collections
import errno
import functools
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from mesh.blobs import BlobVerifyError
from mesh.blobsched import SchedConfig
from mesh.membership import LAN, MembershipConfig
from mesh.node import (
    CancelDownload,
    GossipStats,
    MeshNode,
    Send,
    ServePolicy,
    ServeRange,
    StartDownload,
    StoreBlob,
    wanted_blobs,
)
from mesh.release import VerifiedRelease
from mesh.rumor import LAN_RUMOR, RumorConfig, Verifier, make_verifier
from mesh.wire import (
    MAX_PIECE,
    BlobData,
    BlobError,
    FrameDecoder,
    Message,
    ReleaseKey,
    WireError,
    encode,
)

from ._blobstore import BlobStore
from ._crashpoints import crash_point

# memberlist's DefaultLANConfig BindPort (Serf and Consul's LAN gossip port): 7946.
GOSSIP_PORT: Final = 7946
READ_SIZE: Final = 65536
MAX_TIMER_SLEEP: Final = 1.0  # re-read the deadlines at least this often (clock skew, bugs)
# A seed download is fetched in HTTP Range requests of this size (a peer's piece,
# mesh.wire.MAX_PIECE), each reported as it arrives: a cut transfer loses at most one range.
SEED_RANGE: Final = MAX_PIECE

AppKey = tuple[str, str]
Log = Callable[[str], None]
BAD_FRAME_LOG_EVERY: Final = 60.0  # s: at most one "closing the connection" line per peer
# How blocking work is run: `await run(fn)` returns fn()'s value or raises what it raised.
RunBlocking = Callable[[Callable[[], Any]], Awaitable[Any]]


class BlobSource(Protocol):
    """The part of `ops.client.DeviceClient` the node uses (the WAN seed)."""

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes: ...


class StreamNetwork(Protocol):
    """Where the driver's byte streams come from: TCP on the mesh addresses in production,
    `trio.testing` memory streams in tests."""

    async def connect(self, host: str, port: int, local_address: str) -> trio.abc.Stream: ...

    async def listen(self, host: str, port: int) -> list[trio.abc.Listener[trio.abc.Stream]]:
        """Bound listeners (OSError if the address cannot be bound)."""
        ...

    def peer_address(self, stream: trio.abc.Stream) -> str | None:
        """The address an accepted stream comes from (None if it is gone)."""
        ...


class TcpNetwork:
    async def connect(self, host: str, port: int, local_address: str) -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port, local_address=local_address)

    async def listen(self, host: str, port: int) -> list[trio.abc.Listener[trio.abc.Stream]]:
        return list(await trio.open_tcp_listeners(port, host=host))

    def peer_address(self, stream: trio.abc.Stream) -> str | None:
        if not isinstance(stream, trio.SocketStream):
            return None
        try:
            return str(stream.socket.getpeername()[0])
        except OSError:
            return None


@dataclass(frozen=True, slots=True)
class TransportConfig:
    connect_timeout: float = 5.0  # a TCP connect through the tunnel (or the relay)
    # One full MAX_PIECE frame at 1 Mbit/s takes ~8.4 s: a send that takes longer has stalled.
    send_timeout: float = 15.0
    idle_timeout: float = 90.0  # outbound closed when idle this long; inbound after twice that
    backoff_initial: float = 0.5  # reconnect backoff, doubling per failure...
    backoff_max: float = 10.0  # ...bounded; an inbound connection from the peer cuts it short
    queue_frames: int = 256  # per peer
    queue_bytes: int = 8 * MAX_PIECE  # per peer: at most 8 MiB waiting to be sent
    max_inbound_per_peer: int = 4
    pieces_in_flight: int = 4  # BlobRequests outstanding per download (4 MiB chunk = 4 pieces)
    max_serving_per_peer: int = 32  # BlobRequests we serve at once for one peer


def release_verifier(release_key_hex: str | None, fleet: str | None,
                     platform: str | None = None) -> Verifier | None:
    """The rumor core's verify for the fleet's pinned release key (`Enrollment.release_key`);
    None without a key (then no manifest is accepted). With the device's `platform`, every
    release is narrowed to that platform's image: the node wants, stores and offers only its
    blobs (mesh.release.verify_release)."""
    if release_key_hex is None:
        return None
    return make_verifier(bytes.fromhex(release_key_hex), fleet=fleet, platform=platform)


class _SendQueue:
    """A peer's outgoing frames, bounded in frames and bytes."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.frames: collections.deque[bytes] = collections.deque()
        self.bytes = 0
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._readable = trio.Event()
        self._writable = trio.Event()

    def fits(self, n: int) -> bool:
        return (len(self.frames) < self.max_frames
                and (self.bytes + n <= self.max_bytes or not self.frames))

    def try_put(self, frame: bytes) -> bool:
        if not self.fits(len(frame)):
            return False
        self.frames.append(frame)
        self.bytes += len(frame)
        self._readable.set()
        return True

    async def put(self, frame: bytes) -> None:
        while not self.try_put(frame):
            await self._writable.wait()
            self._writable = trio.Event()

    async def get(self) -> bytes:
        while not self.frames:
            await self._readable.wait()
            self._readable = trio.Event()
        frame = self.frames.popleft()
        self.bytes -= len(frame)
        self._writable.set()
        return frame

    def clear(self) -> int:
        n = len(self.frames)
        self.frames.clear()
        self.bytes = 0
        self._writable.set()
        return n


@dataclass(slots=True)
class _Peer:
    name: str
    address: str
    queue: _SendQueue
    wake: trio.Event = field(default_factory=trio.Event)  # inbound seen: retry now
    task: trio.CancelScope | None = None
    conn: trio.CancelScope | None = None  # the open outbound connection (reopen: cancel it)
    inbound: int = 0


class GossipNode:
    def __init__(self, name: str, mesh_ip: str, *, peers: Mapping[str, str],
                 verify: Verifier | None, store: BlobStore, client: BlobSource | None,
                 fleet: str | None = None, port: int = GOSSIP_PORT,
                 sched_config: SchedConfig | None = None,
                 membership_config: MembershipConfig = LAN,
                 rumor_config: RumorConfig = LAN_RUMOR,
                 transport: TransportConfig | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = trio.current_time,
                 log: Log | None = None,
                 local_layers: Callable[[], frozenset[str]] | None = None,
                 network: StreamNetwork | None = None,
                 serve: ServePolicy | None = None,
                 run_blocking: RunBlocking | None = None,
                 on_misbehaviour: Callable[[], None] | None = None,
                 wan_bytes: Callable[[int], None] | None = None) -> None:
        """`on_misbehaviour`: called when a peer is first counted for a reason
        (`misbehaving_peers`), so the agent reports it without waiting for its heartbeat.
        `wan_bytes`: hears of the frame bytes sent to and received from peers that are not
        LAN neighbours (`set_lan`): they cross the WAN (the agent's byte account,
        agent/_account.py)."""
        self.name = name
        # Blob store reads and writes (disk, blake3/zstd verification) run here: worker threads
        # by default. Tests on trio's autojump clock pass an inline runner: a thread's real
        # time would otherwise let virtual time jump through every timer while it works.
        self.run_blocking: RunBlocking = (run_blocking if run_blocking is not None
                                          else trio.to_thread.run_sync)
        self.mesh_ip = mesh_ip
        self.port = port
        self.fleet = fleet
        self.store = store
        self.client = client
        self.transport = transport if transport is not None else TransportConfig()
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.log: Log = log if log is not None else (lambda _m: None)
        self.network: StreamNetwork = network if network is not None else TcpNetwork()
        self.core = MeshNode(name, mesh_ip, peers=peers, verify=verify, store=store,
                             rng=self.rng, fleet=fleet, sched_config=sched_config,
                             membership_config=membership_config, rumor_config=rumor_config,
                             pieces_in_flight=self.transport.pieces_in_flight,
                             max_serving_per_peer=self.transport.max_serving_per_peer,
                             local_layers=local_layers, log=self.log, serve=serve)
        # the cores, for inspection (their stats, what the rumor core holds)
        self.membership = self.core.membership
        self.rumor = self.core.rumor
        self.stats: GossipStats = self.core.stats
        self._peers: dict[str, _Peer] = {}
        self._wan_bytes = wan_bytes
        self._lan_names: frozenset[str] = frozenset()
        self._by_addr: dict[str, str] = {}
        self._seed_downloads: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._generation = self.core.generation
        self.on_misbehaviour = on_misbehaviour if on_misbehaviour is not None else (lambda: None)
        self._misbehaviour_generation = self.core.misbehaviour_generation
        self._last_now = float("-inf")
        # per peer-map name: when a bad frame was last logged, and how many since (bounded by
        # the peer map: only a known peer's connection is read)
        self._bad_frames: dict[str, tuple[float, int]] = {}
        self._sync_peers()

    # ------------------------------------------------------------------ public API

    @property
    def lan(self) -> frozenset[str]:
        """LAN neighbours that are in the peer map and live members."""
        return self.core.lan

    def releases(self) -> dict[AppKey, ReleaseKey]:
        return self.core.releases()

    def newest(self, fleet: str, app: str) -> VerifiedRelease | None:
        """The newest verified release of (fleet, app) the node holds."""
        return self.core.newest(fleet, app)

    def progress(self, fleet: str, app: str) -> tuple[int, int, int, dict[str, int]] | None:
        """(version, bytes held, bytes wanted, bytes received by source: lan, wan_peer,
        coordinator) of the newest release of an app, None if no release is known."""
        return self.core.progress(fleet, app)

    def complete(self, fleet: str, app: str) -> bool:
        return self.core.complete(fleet, app)

    def misbehaving_peers(self) -> dict[str, dict[str, int]]:
        """Peer -> reason -> count since start (mesh.node.MeshNode.misbehaving_peers)."""
        return self.core.misbehaving_peers()

    def changed(self) -> trio.Event:
        """Set at the next change of what `newest`, `progress` or `complete` report; once it
        fired, the next call returns a fresh event."""
        return self._changed

    def update_peers(self, peers: Mapping[str, str]) -> None:
        """The peer map (name -> mesh IPv4): who may connect, where to send, membership seeds."""
        self.core.set_peers(peers, self._now())
        self._sync_peers()
        self._run_actions()

    def offer_manifest(self, signed: bytes) -> bool:
        """A signed manifest from outside the mesh (the coordinator's targets). True if it was
        verified and newer than what we hold; it is then gossiped and its blobs fetched."""
        new = self.core.offer_manifest(signed, self._now())
        self._run_actions()
        return new

    def set_target(self, fleet: str, app: str, target: VerifiedRelease | None) -> None:
        """The release the device is targeted at (None: no target): the one the node
        fetches, whatever newer manifest circulates (mesh.node.MeshNode.set_target)."""
        self.core.set_target(fleet, app, target, self._now())
        self._run_actions()

    def coordinator_reachable(self, ok: bool) -> None:
        """The agent's control calls reach the coordinator (True) or no longer do (False):
        during an outage peers on other LANs help (mesh.node.ServePolicy)."""
        self.core.coordinator_reachable(ok, self._now())
        self._run_actions()

    def set_lan(self, names: Iterable[str]) -> None:
        """The LAN neighbours (names from LAN discovery; only peer-map names count)."""
        names = frozenset(names)
        self._lan_names = names
        self.core.set_lan(names, self._now())
        self._run_actions()

    async def run(self, *, task_status: trio.TaskStatus[GossipNode] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await self.network.listen(self.mesh_ip, self.port)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(trio.serve_listeners, self._accept, listeners)
                for p in self._peers.values():
                    nursery.start_soon(self._outbound, p)
                self.core.start(self._now())
                self._run_actions()
                nursery.start_soon(self._timer_loop)
                task_status.started(self)
        finally:
            self._nursery = None
            for ln in listeners:
                with trio.CancelScope(shield=True):
                    await ln.aclose()

    # ------------------------------------------------------------------ the core

    def _now(self) -> float:
        now = max(self.clock(), self._last_now)  # the cores refuse time going backwards
        self._last_now = now
        return now

    def _sync_peers(self) -> None:
        """Connections follow the core's peer map: a peer gone or moved loses its task."""
        peers = self.core.peers
        for gone in [n for n, p in self._peers.items() if peers.get(n) != p.address]:
            p = self._peers.pop(gone)
            if p.task is not None:
                p.task.cancel()
        for n, addr in peers.items():
            if n not in self._peers:
                t = self.transport
                self._peers[n] = _Peer(n, addr, _SendQueue(t.queue_frames, t.queue_bytes))
                if self._nursery is not None:
                    self._nursery.start_soon(self._outbound, self._peers[n])
        self._by_addr = {p.address: n for n, p in self._peers.items()}

    def _run_actions(self) -> None:
        """Carry out what the core asked for, until it asks for nothing more."""
        while actions := self.core.drain():
            for a in actions:
                if isinstance(a, Send):
                    if not self._send(a.dest, a.msg):
                        self.core.send_failed(a.dest, a.msg, self._now())
                elif isinstance(a, StartDownload):
                    if self._nursery is None:
                        self.core.download_failed(a.download, self._now())
                    else:
                        scope = self._seed_downloads[a.download] = trio.CancelScope()
                        self._nursery.start_soon(self._download_seed, a, scope)
                elif isinstance(a, CancelDownload):
                    cancelled = self._seed_downloads.pop(a.download, None)
                    if cancelled is not None:
                        cancelled.cancel()
                elif isinstance(a, StoreBlob):
                    if self._nursery is None:
                        self.core.blob_stored(a.download, False, self._now())
                    else:
                        self._nursery.start_soon(self._store, a)
                elif self._nursery is None or a.peer not in self._peers:
                    self.core.served(a.peer)
                else:
                    self._nursery.start_soon(self._serve, self._peers[a.peer], a)
        if self.core.generation != self._generation:
            self._generation = self.core.generation
            self._changed.set()
            self._changed = trio.Event()
        if self.core.misbehaviour_generation != self._misbehaviour_generation:
            self._misbehaviour_generation = self.core.misbehaviour_generation
            self.on_misbehaviour()
        self._wake.set()  # the core's next deadline may be earlier now

    async def _timer_loop(self) -> None:
        while True:
            d = self.core.next_deadline()
            delay = MAX_TIMER_SLEEP if d is None else min(MAX_TIMER_SLEEP, d - self.clock())
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
            self.core.tick(self._now())
            self._run_actions()
            # the deadline is read again at the top: what the tick did is in it
            self._wake = trio.Event()
            await trio.sleep(0)

    # ------------------------------------------------------------------ blob contents

    async def _download_seed(self, a: StartDownload, scope: trio.CancelScope) -> None:
        """Blob bytes [a.offset, a.size) from the coordinator's seed, in SEED_RANGE HTTP Range
        requests, each handed to the core as it arrives (`blob_part`): a transfer cut or
        cancelled (`CancelDownload`) keeps every range that came, and the next download of the
        blob resumes there (mesh.node, MAX_PARTIAL_BYTES)."""
        failed = self.client is None
        offset = a.offset
        with scope:
            while self.client is not None and offset < a.size:
                end = min(a.size, offset + SEED_RANGE)
                try:
                    data = await self.client.blob(a.blob_id.hex(), offset, end)
                except trio.Cancelled:
                    raise
                except Exception as exc:  # noqa: BLE001 - the SDK's errors, whatever their class
                    self.stats.counters["coordinator_errors"] += 1
                    self.log(f"blob {a.blob_id.hex()[:16]} from the coordinator: {exc}")
                    failed = True
                    break
                if len(data) != end - offset:  # the SDK checks ranges; a short body is a cut
                    self.stats.counters["coordinator_errors"] += 1
                    failed = True
                    break
                offset = end
                if offset < a.size:
                    self.core.blob_part(a.download, data, self._now())
                    self._run_actions()
                    if a.download not in self._seed_downloads:
                        return  # the core let it go (its timer, or a replaced release)
                else:
                    self._seed_downloads.pop(a.download, None)
                    self.core.blob_received(a.download, data, self._now())
                    self._run_actions()
                    return
            if not failed:  # an empty blob, or one resumed at its end
                self._seed_downloads.pop(a.download, None)
                self.core.blob_received(a.download, b"", self._now())
                self._run_actions()
                return
        if scope.cancel_called:
            return
        self._seed_downloads.pop(a.download, None)
        self.core.download_failed(a.download, self._now())
        self._run_actions()

    async def _store(self, a: StoreBlob) -> None:
        ok: bool | None = False
        try:
            stored = await self.run_blocking(functools.partial(
                self.store.put, a.blob_id, a.data, a.kind, ref=a.ref, size=a.size))
        except BlobVerifyError as exc:
            self.stats.counters["bad_blobs"] += 1
            self.log(f"blob from {a.source} failed verification: {exc}")
        except OSError as exc:
            # Our disk, not the source's bytes (they were verified before the write): nobody
            # is banned; the download failed and the scheduler retries after its backoff, so
            # fetching resumes by itself once there is room again.
            ok = None
            self.stats.counters["store_errors"] += 1
            if exc.errno == errno.ENOSPC:
                self.stats.counters["disk_full"] += 1
                self.log(f"disk full: cannot store blob {a.blob_id.hex()[:16]} "
                         f"({len(a.data)} B) from {a.source}; retrying later")
            else:
                self.log(f"cannot store blob {a.blob_id.hex()[:16]}: {exc}")
        else:
            # one line per verified download: what the lab's crash test counts (a blob fetched
            # twice would show twice)
            self.log(f"blob {a.blob_id.hex()[:16]} ({len(a.data)} B) from {a.source}: "
                     f"{'stored' if stored else 'already held'}")
            crash_point("after-blob-stored")
            ok = True
        self.core.blob_stored(a.download, ok, self._now())
        self._run_actions()

    def _serve_bytes(self, blob_id: bytes, offset: int, data: bytes) -> bytes:
        """What we send for a range (a seam for tests that play a rogue peer)."""
        return data

    async def _serve(self, p: _Peer, a: ServeRange) -> None:
        try:
            data = await self.run_blocking(functools.partial(self.store.read, a.blob_id,
                                                             a.offset, a.length))
            data = self._serve_bytes(a.blob_id, a.offset, data)
            frame = encode(BlobData(a.req_id, a.blob_id, a.offset, data,
                                    a.offset + len(data) >= a.size))
            with trio.move_on_after(self.transport.send_timeout) as cs:
                await p.queue.put(frame)
            if cs.cancelled_caught:
                self.stats.counters["dropped_queue_full"] += 1
            else:
                self.stats.counters["pieces_served"] += 1
        except (OSError, KeyError):
            self._send(p.name, BlobError(a.req_id, "read failed"))
        finally:
            self.core.served(p.name)

    # ------------------------------------------------------------------ transport

    def _send(self, dest: str, msg: Message) -> bool:
        p = self._peers.get(dest)
        if p is None:
            self.stats.counters["dropped_unknown_peer"] += 1
            return False
        try:
            frame = encode(msg)
        except WireError as exc:  # the cores stay within the codec's limits: a bug, not fatal
            self.stats.counters["dropped_unencodable"] += 1
            self.log(f"not sending a {type(msg).__name__} to {dest}: {exc}")
            return False
        if not p.queue.try_put(frame):
            self.stats.counters["dropped_queue_full"] += 1
            return False
        self.stats.counters["frames_queued"] += 1
        return True

    def _peer_down(self, name: str) -> None:
        """The connection to or from `name` broke: its downloads failed."""
        self.core.peer_down(name, self._now())
        self._run_actions()

    async def _outbound(self, p: _Peer) -> None:
        cfg = self.transport
        backoff = cfg.backoff_initial
        with trio.CancelScope() as scope:
            p.task = scope
            carry: bytes | None = None  # a frame a reopened connection did not finish
            while True:
                # connect lazily: only with something to send
                frame = carry if carry is not None else await p.queue.get()
                carry = None
                try:
                    with trio.fail_after(cfg.connect_timeout):
                        stream = await self.network.connect(p.address, self.port, self.mesh_ip)
                except (OSError, trio.TooSlowError):
                    self.stats.counters["connect_failures"] += 1
                    self.stats.counters["dropped_unreachable"] += 1 + p.queue.clear()
                    self._peer_down(p.name)
                    with trio.move_on_after(backoff * (0.5 + self.rng.random() / 2)):
                        await p.wake.wait()
                    p.wake = trio.Event()
                    backoff = min(cfg.backoff_max, backoff * 2)
                    continue
                backoff = cfg.backoff_initial
                unsent: bytes | None = frame  # not yet sent whole on this connection
                try:
                    with trio.CancelScope() as conn:
                        p.conn = conn
                        async with stream:
                            for have in self.core.have_messages(p.name):
                                have_frame = encode(have)
                                with trio.fail_after(cfg.send_timeout):
                                    await stream.send_all(have_frame)
                                self._count_wan(p.name, len(have_frame))
                            while True:
                                with trio.fail_after(cfg.send_timeout):
                                    await stream.send_all(frame)
                                unsent = None
                                self._count_wan(p.name, len(frame))
                                with trio.move_on_after(cfg.idle_timeout) as idle:
                                    frame = unsent = await p.queue.get()
                                if idle.cancelled_caught:
                                    break
                    if conn.cancelled_caught:  # reopened by `_inbound`: at once, no backoff
                        self.stats.counters["reopened_connections"] += 1
                        carry = unsent
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                        trio.TooSlowError):
                    self.stats.counters["send_failures"] += 1
                    self._peer_down(p.name)
                    # Like a failed connect: pace the reconnect unless the peer shows up.
                    with trio.move_on_after(backoff * (0.5 + self.rng.random() / 2)):
                        await p.wake.wait()
                    p.wake = trio.Event()
                finally:
                    p.conn = None

    def _count_wan(self, peer: str, n: int) -> None:
        """Frame bytes to or from `peer`: WAN bytes unless it is a LAN neighbour."""
        if self._wan_bytes is not None and peer not in self._lan_names:
            self._wan_bytes(n)

    def _log_bad_frame(self, peer: str, exc: WireError) -> None:
        """One line per peer per BAD_FRAME_LOG_EVERY: a peer that sends garbage on every
        connection would otherwise write a line each time (the operator sees the count,
        `bad_frame`, in `devices show`)."""
        now = self._now()
        last, since = self._bad_frames.get(peer, (float("-inf"), 0))
        if now - last < BAD_FRAME_LOG_EVERY:
            self._bad_frames[peer] = (last, since + 1)
            return
        more = f" ({since} more since the last such line)" if since else ""
        self.log(f"closing the connection from {peer}: {exc}{more}")
        self._bad_frames[peer] = (now, 0)

    async def _accept(self, stream: trio.abc.Stream) -> None:
        async with stream:
            host = self.network.peer_address(stream)
            if host is None:
                return
            await self._inbound(stream, host)

    async def _inbound(self, stream: trio.abc.Stream, host: str) -> None:
        name = self._by_addr.get(host)
        p = self._peers.get(name) if name is not None else None
        if p is None or p.inbound >= self.transport.max_inbound_per_peer:
            self.stats.counters["refused_connections"] += 1
            return
        p.inbound += 1
        self.stats.counters["accepted_connections"] += 1
        p.wake.set()  # the peer is (back) up: our outbound need not wait out its backoff
        back = not self.core.held_alive(p.name)
        if back and p.conn is not None:
            # A peer we hold suspect or dead connects: it is back from an outage (a restart,
            # a broken path). Our connection to it went dead with its tunnel, unknown to us:
            # what we send sits in that socket until TCP's retransmission timer, backed off
            # to tens of seconds by the outage, reaches the new peer and is reset, and until
            # then the peer hears nothing from us (not even what its LAN holds: it crossed
            # the WAN for a release its neighbours had, tests/lab/test_rollout.py). Reopen.
            p.conn.cancel()
        if p.inbound == 1 or back:
            # A (re)connecting peer learns at once what we hold: it may have just started and
            # be about to decide where to fetch from (mesh.node.STARTUP_SETTLE).
            self.core.connected(p.name)
            self._run_actions()
        decoder = FrameDecoder()
        try:
            while self._peers.get(p.name) is p:
                data: bytes | bytearray = b""
                with trio.move_on_after(2 * self.transport.idle_timeout):
                    data = await stream.receive_some(READ_SIZE)
                if not data:  # EOF, or idle for too long
                    break
                self._count_wan(p.name, len(data))
                try:
                    msgs = decoder.feed(data)
                except WireError as exc:
                    self.stats.counters["wire_errors"] += 1
                    self.core.misbehaved(p.name, "bad_frame")
                    self._run_actions()
                    self._log_bad_frame(p.name, exc)
                    break
                for m in msgs:
                    self.core.receive(m, p.name, self._now())
                    self._run_actions()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.stats.counters["receive_failures"] += 1
        finally:
            p.inbound -= 1
            self._peer_down(p.name)


__all__ = ["GOSSIP_PORT", "BlobSource", "GossipNode", "GossipStats", "StreamNetwork",
           "TcpNetwork", "TransportConfig", "release_verifier", "wanted_blobs"]
