"""An in-memory stream network for the gossip driver (agent._gossip.StreamNetwork): listeners
and connections are `trio.testing` memory streams, so driver tests run on the autojump clock."""

from __future__ import annotations

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


class MemoryNetwork:
    """connect(host, port, local) reaches the listener bound on (host, port); the accepted
    stream comes from `local`. Connections to an address nobody listens on are refused."""

    def __init__(self) -> None:
        self.listeners: dict[tuple[str, int], MemoryListener] = {}
        self.sources: dict[int, str] = {}  # id(accepted stream) -> the connecting address
        self.connects: list[tuple[float, str, str]] = []  # (time, from, to)
        self.lockstep: set[str] = set()  # hosts whose connections have no buffer at all

    async def connect(self, host: str, port: int, local_address: str) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        self.connects.append((trio.current_time(), local_address, host))
        listener = self.listeners.get((host, port))
        if listener is None:
            raise OSError(f"connection to {host}:{port} refused")
        pair = trio.testing.lockstep_stream_pair if host in self.lockstep else \
            trio.testing.memory_stream_pair
        client, server = pair()
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
