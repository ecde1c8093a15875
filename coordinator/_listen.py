"""The coordinator's HTTPS listener: hypercorn's connection handling behind a gate that bounds
how many connections each source address may hold before one of them presents a credential,
and the deadlines that free connections held by slow or silent clients.

Hypercorn (0.18) offers `ssl_handshake_timeout` (the TLS handshake), `keep_alive_timeout` (a
connection with no request in flight: before the first request, between requests, and while
a request's headers trickle in) and `h11_max_incomplete_size` (the size of those headers). Its
`read_timeout` bounds every read of the socket, including while a long poll or a blob download
is in flight and the client rightly sends nothing, so it stays off; body reads get their own
deadlines in the app (coordinator._http, `HttpLimits.body_timeout`, `body_piece_timeout`).
Hypercorn has no per-source connection limit and builds its listeners itself, so this module
serves its connection handler (`TCPServer`) from listeners of its own.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from starlette.applications import Starlette

log = logging.getLogger("fleetmesh.coordinator.http")

# Whole body of a request the app reads into memory (JSON, manifests: at most a few MiB): 60 s
# is 1 MiB at ~140 kbit/s, slower than any link a device is expected to report over.
BODY_TIMEOUT: Final = 60.0
# The next piece of any body, blob uploads included (those may rightly take longer than
# BODY_TIMEOUT as a whole): a client silent this long mid-body has stalled.
BODY_PIECE_TIMEOUT: Final = 30.0
# A connection with no request in flight (hypercorn's keep_alive_timeout). Agents open a new
# long poll as soon as one ends, and the long polls themselves (peer map up to 30 minutes, logs
# up to 30 s) are requests in flight, which this deadline never cuts (nor anything else here:
# hypercorn's read_timeout is off, see the module's doc).
IDLE_TIMEOUT: Final = 20.0
# The TLS handshake (hypercorn's default is 60 s); a handshake is two round trips.
TLS_HANDSHAKE_TIMEOUT: Final = 10.0
# Connections from one source address that have not (yet) presented a valid credential. A
# site of devices behind one NAT shares an address; each of their connections counts only
# until its first authenticated request, so this bounds a burst of simultaneous (re)connects.
MAX_UNAUTHENTICATED_PER_SOURCE: Final = 64
MAX_HEADER_BYTES: Final = 16 * 1024  # hypercorn's h11_max_incomplete_size: headers of a request

Peer = tuple[str, int]  # (address, port) as the ASGI scope's "client" names it


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The deadlines and connection bounds of the HTTP listener (tests pass small ones)."""

    body_timeout: float = BODY_TIMEOUT
    body_piece_timeout: float = BODY_PIECE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    max_unauthenticated_per_source: int = MAX_UNAUTHENTICATED_PER_SOURCE

    def problems(self) -> Iterable[str]:
        for name in ("body_timeout", "body_piece_timeout", "idle_timeout",
                     "tls_handshake_timeout"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                yield f"{name}: must be a positive number of seconds, got {value}"
        if self.max_unauthenticated_per_source < 1:
            yield "max_unauthenticated_per_source: must be at least 1"


def peer_of(address: object) -> Peer | None:
    """(host, port) of a socket address or an ASGI client; None for anything else."""
    if isinstance(address, (tuple, list)) and len(address) >= 2 and \
            isinstance(address[0], str) and isinstance(address[1], int):
        return address[0], address[1]
    return None


class SourceGate:
    """Open connections per source address that have not authenticated. The listener admits a
    connection (or refuses it), the credential guards mark it authenticated, its end releases
    it. Plain bookkeeping, no I/O: all of it runs on the one trio thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._unauthenticated: Counter[str] = Counter()
        self._pending: set[Peer] = set()  # connections not yet authenticated

    def admit(self, peer: Peer) -> bool:
        host = peer[0]
        if self._unauthenticated[host] >= self.limit:
            return False
        self._unauthenticated[host] += 1
        self._pending.add(peer)
        return True

    def authenticated(self, peer: Peer | None) -> None:
        if peer is not None and peer in self._pending:
            self._pending.discard(peer)
            self._forget(peer[0])

    def release(self, peer: Peer) -> None:
        if peer in self._pending:
            self._pending.discard(peer)
            self._forget(peer[0])

    def unauthenticated(self, host: str) -> int:
        return self._unauthenticated[host]

    def _forget(self, host: str) -> None:
        self._unauthenticated[host] -= 1
        if self._unauthenticated[host] <= 0:
            del self._unauthenticated[host]


class GatedListener(trio.abc.Listener[trio.SSLStream[trio.SocketStream]]):
    """TLS connections from `sock`, each admitted by the gate; a refused one is closed before
    its handshake (no TLS work for it)."""

    def __init__(self, sock: socket.socket, ssl_context: object, gate: SourceGate) -> None:
        self._tcp = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._ssl_context = ssl_context
        self._gate = gate
        self.peers: dict[trio.SSLStream[trio.SocketStream], Peer] = {}

    async def accept(self) -> trio.SSLStream[trio.SocketStream]:
        while True:
            tcp = await self._tcp.accept()
            try:
                peer = peer_of(tcp.socket.getpeername())
            except OSError:  # gone already
                peer = None
            if peer is None or not self._gate.admit(peer):
                if peer is not None:
                    log.info("refused a connection from %s: %d unauthenticated connections "
                             "from it already", peer[0], self._gate.limit)
                await trio.aclose_forcefully(tcp)
                continue
            stream = trio.SSLStream(tcp, self._ssl_context,  # type: ignore[arg-type]
                                    server_side=True, https_compatible=True)
            self.peers[stream] = peer
            return stream

    async def aclose(self) -> None:
        await self._tcp.aclose()


def hypercorn_config(limits: HttpLimits, cert: str, key: str) -> HypercornConfig:
    hc = HypercornConfig()
    hc.certfile, hc.keyfile = cert, key
    hc.accesslog = None
    hc.errorlog = log
    hc.graceful_timeout = 1.0
    hc.include_server_header = False
    hc.keep_alive_timeout = limits.idle_timeout
    hc.ssl_handshake_timeout = limits.tls_handshake_timeout
    hc.h11_max_incomplete_size = MAX_HEADER_BYTES
    hc.read_timeout = None  # would cut long polls and slow downloads: see the module's doc
    return hc


class _TCPServer(TCPServer):
    """Hypercorn's trio connection handler, ended as soon as its client has closed the
    connection. Hypercorn 0.18 stops reading at the client's EOF but leaves its keep-alive
    timer running in the connection's task group, so a connection its client closed between
    two requests lingered (CLOSE-WAIT) for IDLE_TIMEOUT and kept counting against its
    source's unauthenticated connections: 64 short requests in 20 s from one address (a
    browser's sign-ins, a burst of enrollments) and the next connection was refused."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


async def serve(app: Starlette, hc: HypercornConfig, socks: list[socket.socket],
                gate: SourceGate, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Serve `app` on the listening sockets `socks` until cancelled."""
    ssl_context = hc.create_ssl_context()
    # Starlette's __call__ is typed with its own ASGI aliases, not hypercorn's
    asgi = wrap_app(app, hc.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    context = WorkerContext(None)
    listeners = []
    for sock in socks:
        sock.listen(hc.backlog)
        listeners.append(GatedListener(sock, ssl_context, gate))

    async def handle(listener: GatedListener, stream: trio.SSLStream[trio.SocketStream]
                     ) -> None:
        peer = listener.peers.pop(stream)
        try:
            await _TCPServer(asgi, hc, context, ConnectionState({}), stream)
        finally:
            gate.release(peer)

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(partial(trio.serve_listeners, partial(handle, listener),
                                           [listener]))
            task_status.started()
    finally:  # the port is free again once the coordinator stops (a restart binds it anew)
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
