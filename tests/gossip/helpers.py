"""A small fleet of GossipNodes on loopback (each on its own 127.0.0.N), a fake coordinator
blob seed that counts bytes, and signed test releases."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from backports import zstd
from nacl.signing import SigningKey

from agent._blobstore import BlobStore
from agent._gossip import GossipNode, TransportConfig
from mesh.blobsched import SchedConfig
from mesh.membership import MembershipConfig
from mesh.release import (
    ChunkRef,
    Layer,
    ReleaseManifest,
    chunk_id,
    diff_id,
    encode_signed_manifest,
    sign_manifest,
)
from mesh.rumor import RumorConfig, make_verifier


async def inline(fn: Callable[[], Any]) -> Any:
    """GossipNode's `run_blocking` for tests on trio's autojump clock: the blob store's work
    runs on the trio thread, so it takes no virtual time. With worker threads, virtual time
    jumps while a thread works once the run loop has been idle for the clock's threshold of
    real time, and a loaded machine makes any threshold too short (a CI failure)."""
    return fn()


KEY = SigningKey(b"\x11" * 32)
OTHER_KEY = SigningKey(b"\x22" * 32)
FLEET, APP = "cams", "cam"

FAST_MEMBERSHIP = MembershipConfig(
    probe_interval=0.2, probe_timeout=0.1, suspicion_mult=2, suspicion_max_timeout_mult=3,
    push_pull_interval=2.0, gossip_interval=0.05, reconnect_interval=1.0)
FAST_RUMOR = RumorConfig(round_interval=0.1, anti_entropy_interval=1.0)
FAST_TRANSPORT = TransportConfig(connect_timeout=1.0, send_timeout=5.0, idle_timeout=10.0,
                                 backoff_initial=0.05, backoff_max=0.5)


@dataclass
class Blob:
    ref: ChunkRef
    frame: bytes
    piece: bytes


def make_blobs(n: int, seed: int = 1, large: int = 2) -> list[Blob]:
    """n chunks: `large` of them span several MAX_PIECE pieces, the rest are small."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = rng.randrange(1_200_000, 2_600_000) if i < large else rng.randrange(8_000, 40_000)
        piece = rng.randbytes(size)
        frame = zstd.compress(piece, level=1)
        out.append(Blob(ChunkRef(chunk_id(piece), len(piece), len(frame)), frame, piece))
    return out


def make_manifest(blobs: Sequence[Blob], version: int = 1, key: SigningKey = KEY,
                  per_layer: int = 10) -> bytes:
    layers = []
    for i in range(0, len(blobs), per_layer):
        group = blobs[i:i + per_layer]
        tar = b"".join(b.piece for b in group)
        layers.append(Layer(diff_id(tar), len(tar), tuple(b.ref for b in group)))
    m = ReleaseManifest(FLEET, APP, version, 1_700_000_000, b'{"rootfs":{}}', tuple(layers))
    return encode_signed_manifest(sign_manifest(m, key))


class Seed:
    """The coordinator's blob seed: serves from a dict, counts bytes per device."""

    def __init__(self, blobs: Sequence[Blob]) -> None:
        self.blobs = {b.ref.id.hex(): b.frame for b in blobs}
        self.bytes: Counter[str] = Counter()

    def client(self, name: str) -> _SeedClient:
        return _SeedClient(self, name)


@dataclass
class _SeedClient:
    seed: Seed
    name: str

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        await trio.sleep(0.001)
        data = self.seed.blobs[blob_id][start:end]
        self.seed.bytes[self.name] += len(data)
        return data


def ip_of(i: int) -> str:
    return f"127.0.0.{10 + i}"


@dataclass
class Fleet:
    nursery: trio.Nursery
    tmp: Path
    seed: Seed
    port: int
    names: list[str]
    peer_sharing: bool = True
    nodes: dict[str, GossipNode] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    extra_peers: Mapping[str, str] = field(default_factory=dict)

    def peers(self) -> dict[str, str]:
        return {n: ip_of(i) for i, n in enumerate(self.names)} | dict(self.extra_peers)

    def make(self, name: str, cls: type[GossipNode] = GossipNode,
             key: SigningKey = KEY) -> GossipNode:
        i = self.names.index(name)
        store = BlobStore(self.tmp / name / "blobs")
        return cls(name, ip_of(i), peers=self.peers(),
                   verify=make_verifier(bytes(key.verify_key), fleet=FLEET), store=store,
                   client=self.seed.client(name), fleet=FLEET, port=self.port,
                   sched_config=SchedConfig(peer_sharing=self.peer_sharing),
                   membership_config=FAST_MEMBERSHIP, rumor_config=FAST_RUMOR,
                   transport=FAST_TRANSPORT, rng=random.Random(i))

    async def start(self, node: GossipNode) -> GossipNode:
        scope = trio.CancelScope()

        async def runner(task_status: trio.TaskStatus[GossipNode]) -> None:
            with scope:
                await node.run(task_status=task_status)

        await self.nursery.start(runner)
        self.nodes[node.name] = node
        self.scopes[node.name] = scope
        return node

    def stop(self, name: str) -> None:
        self.scopes[name].cancel()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(pred: object, interval: float = 0.02) -> None:
    assert callable(pred)
    while not pred():
        await trio.sleep(interval)
