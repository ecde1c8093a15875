"""An in-memory stream network for the gossip driver (agent._gossip.StreamNetwork): listeners
and connections are `trio.testing` memory streams, so driver tests run on the autojump clock."""

from __future__ import annotations

import collections
from collections.abc import Callable

import trio
import trio.testing


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, network: MemoryNetwork, key: tuple[str, int]) -> None:
        self.network = network
        self.key = key
        self.send, self.receive = trio.open_memory_channel[trio.abc.Stream](16)

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self.receive.receive()
        except trio.EndOfChannel:
            raise trio.ClosedResourceError from None

    async def aclose(self) -> None:
        self.network.listeners.pop(self.key, None)
        await self.send.aclose()
        await self.receive.aclose()
        await trio.lowlevel.checkpoint()


class _Cuttable(trio.abc.Stream):
    """One end of a connection that `MemoryNetwork.cut` can kill without a word: afterwards
    its sends succeed and go nowhere and it receives nothing, ever, as a TCP connection whose
    peer vanished with its tunnel looks until the retransmission timer gives up."""

    def __init__(self, inner: trio.abc.Stream,
                 count: Callable[[int], None] = lambda _n: None) -> None:
        self.inner = inner
        self.dead = False
        self.count = count  # told the size of every write that goes out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.dead:
            await trio.lowlevel.checkpoint()
            return
        self.count(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.dead:
            await trio.sleep_forever()
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self.dead:  # cut while waiting: the peer's close never reaches us
                await trio.sleep_forever()
            raise
        if self.dead:  # cut while waiting: neither its last bytes nor its EOF arrive
            await trio.sleep_forever()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class MemoryNetwork:
    """connect(host, port, local) reaches the listener bound on (host, port); the accepted
    stream comes from `local`. Connections to an address nobody listens on are refused."""

    def __init__(self) -> None:
        self.listeners: dict[tuple[str, int], MemoryListener] = {}
        self.sources: dict[int, str] = {}  # id(accepted stream) -> the connecting address
        self.connects: list[tuple[float, str, str]] = []  # (time, from, to)
        self.lockstep: set[str] = set()  # hosts whose connections have no buffer at all
        self.open: list[tuple[str, str, _Cuttable, _Cuttable]] = []  # from, to, client, server
        # bytes written on connections, by (from, to) address: what crossed which link
        self.sent: collections.Counter[tuple[str, str]] = collections.Counter()

    def cut(self, host: str) -> None:
        """`host` vanishes: every connection to or from it open now goes silent at the other
        end (nothing arrives, no close is seen), as when its tunnel went down."""
        for src, dst, client, server in self.open:
            if src == host:
                server.dead = True
            if dst == host:
                client.dead = True

    async def connect(self, host: str, port: int, local_address: str) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        self.connects.append((trio.current_time(), local_address, host))
        listener = self.listeners.get((host, port))
        if listener is None:
            raise OSError(f"connection to {host}:{port} refused")
        pair = trio.testing.lockstep_stream_pair if host in self.lockstep else \
            trio.testing.memory_stream_pair
        inner_client, inner_server = pair()
        link = (local_address, host)

        def count(n: int) -> None:
            self.sent[link] += n
        client, server = _Cuttable(inner_client, count), _Cuttable(inner_server)
        self.open.append((local_address, host, client, server))
        self.sources[id(server)] = local_address
        await listener.send.send(server)
        return client

    async def listen(self, host: str, port: int) -> list[trio.abc.Listener[trio.abc.Stream]]:
        await trio.lowlevel.checkpoint()
        if (host, port) in self.listeners:
            raise OSError(f"{host}:{port} is in use")
        listener = self.listeners[(host, port)] = MemoryListener(self, (host, port))
        return [listener]

    def peer_address(self, stream: trio.abc.Stream) -> str | None:
        return self.sources.pop(id(stream), None)
