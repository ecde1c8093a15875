"""Layers as content-addressed compressed chunks (verified through mesh.blobs)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final

import blake3
from backports import zstd

from mesh.blobs import BlobVerifyError, inflate_frame
from mesh.release._model import ChunkError, ChunkRef

# 4 MiB: large enough that per-chunk zstd frames lose little ratio against one frame for the
# whole layer, small enough to resume and to spread over several LAN peers (BitTorrent v2 uses
# 16 KiB blocks in up to 4 MiB+ pieces; casync and Docker's own blobs are whole-layer or 64 KiB).
CHUNK_SIZE: Final = 4 * 1024 * 1024
CHUNK_ZSTD_LEVEL: Final = 19


@dataclass(frozen=True, slots=True)
class Chunk:
    ref: ChunkRef
    data: bytes  # zstd frame


def chunk_id(uncompressed: bytes | memoryview) -> bytes:
    """A chunk's name: blake3 of its uncompressed bytes (32 bytes)."""
    return blake3.blake3(uncompressed).digest()


def diff_id(layer: bytes) -> str:
    return "sha256:" + hashlib.sha256(layer).hexdigest()


def chunk_layer(data: bytes, chunk_size: int = CHUNK_SIZE, *,
                pool: Executor | None = None) -> tuple[Chunk, ...]:
    """`data` cut into `chunk_size` pieces (the last may be shorter), each zstd-compressed.

    With `pool` (threads: zstd releases the GIL), the pieces are compressed at the same time;
    each frame is the same either way (one frame per piece, same level and parameters)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    with memoryview(data) as view:
        pieces = [view[start:start + chunk_size] for start in range(0, len(data), chunk_size)]
        if pool is None:
            return tuple(compress_chunk(p) for p in pieces)
        return tuple(pool.map(compress_chunk, pieces))


def compress_chunk(piece: bytes | memoryview) -> Chunk:
    """One chunk: `piece` as a zstd frame at CHUNK_ZSTD_LEVEL, named by its blake3."""
    frame = zstd.compress(piece, level=CHUNK_ZSTD_LEVEL)
    return Chunk(ChunkRef(chunk_id(piece), len(piece), len(frame)), frame)


def open_chunk(ref: ChunkRef, frame: bytes) -> bytes:
    """The uncompressed bytes of one chunk, checked against `ref`: exactly `ref.stored_size`
    bytes of frame inflating to exactly `ref.size` bytes whose blake3 is `ref.id`."""
    if len(frame) != ref.stored_size:
        raise ChunkError(f"chunk {ref.id.hex()[:16]}: wrong length: {len(frame)} bytes, "
                         f"expected {ref.stored_size}")
    piece = _inflate(ref.id, frame, ref.size)
    if len(piece) != ref.size:
        raise ChunkError(f"chunk {ref.id.hex()[:16]}: wrong length: {len(piece)} bytes "
                         f"uncompressed, expected {ref.size}")
    return piece


def open_stored_chunk(chunk_id_: bytes, frame: bytes) -> bytes:
    """The uncompressed bytes of a chunk known only by its id (a blob store's copy, whose
    manifest entry is gone): bounded by CHUNK_SIZE, checked against the id."""
    return _inflate(chunk_id_, frame, CHUNK_SIZE)


def _inflate(chunk_id_: bytes, frame: bytes, max_size: int) -> bytes:
    try:
        return inflate_frame(chunk_id_, frame, max_size)
    except BlobVerifyError as exc:
        raise ChunkError(str(exc)) from None


def assemble(chunks: Sequence[Chunk], expected_diff_id: str) -> bytes:
    """The layer tar from its chunks, checked chunk by chunk and as a whole."""
    layer = b"".join(open_chunk(c.ref, c.data) for c in chunks)
    if diff_id(layer) != expected_diff_id:
        raise ChunkError(f"assembled layer is {diff_id(layer)}, expected {expected_diff_id}")
    return layer
