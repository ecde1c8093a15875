"""The device's content-addressed blob store: DATA/blobs/<64 hex digits>.

A blob is a release's chunk (one zstd frame, named by blake3 of its *uncompressed* bytes) or a
layer delta (named by blake3 of the patch bytes). `put` verifies before anything touches the
disk (mesh.blobs) and then writes atomically (`mesh.blobs.write_atomically`: temporary file,
fsync, rename, fsync of the directory), so a blob in the store is whole and verified, or
absent: corrupt bytes never enter it, and a crash leaves at most a `.tmp-*` file, removed at
the next start (docs/architecture.md, principle 5).

A small index (`layers.json`) remembers which chunk ids make up each layer (by diff id) of the
manifests seen, so the driver can tell which layers the store holds completely: those are the
delta bases it can use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from mesh.blobs import (
    BlobKind,
    BlobVerifyError,
    blob_hex,
    check_digest,
    inflate_frame,
    is_blob_hex,
    remove_temp_files,
    write_atomically,
)
from mesh.release import CHUNK_SIZE, ChunkError, ChunkRef, open_chunk

MAX_LAYER_INDEX: Final = 4096  # layers remembered in layers.json (oldest dropped first)


def verify_blob(blob_id: bytes, data: bytes, kind: BlobKind, ref: ChunkRef | None = None,
                size: int | None = None) -> None:
    """Raise BlobVerifyError (mesh.blobs) unless `data` is the blob `blob_id` names.

    chunk: a single zstd frame whose decompressed bytes (at most CHUNK_SIZE; with `ref`, exactly
    `ref.size` from exactly `ref.stored_size` bytes, via mesh.release.open_chunk) hash to the id.
    delta: blake3(data) == id (and len(data) == size when given).
    """
    if kind == BlobKind.DELTA:
        check_digest(blob_id, data, size=size, what="delta")
        return
    if kind != BlobKind.CHUNK:
        raise ValueError(f"unknown blob kind {kind!r}")
    if ref is None:
        inflate_frame(blob_id, data, CHUNK_SIZE)
        return
    if ref.id != blob_id:
        raise ValueError("ChunkRef does not name this blob")
    try:
        open_chunk(ref, data)
    except ChunkError as exc:
        raise BlobVerifyError(str(exc)) from None


class BlobStore:
    """Whole, verified blobs under `root` (DATA/blobs); synchronous (the driver calls it from a
    worker thread for anything large)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_temp_files(self.root)  # an interrupted put
        self.rejected = 0  # puts refused by verification
        self._ids: set[bytes] = set()
        self._ids.update(bytes.fromhex(p.name) for p in self.root.iterdir()
                         if is_blob_hex(p.name))
        self._layers: dict[str, tuple[bytes, ...]] = self._read_layers()

    def _path(self, blob_id: bytes | str) -> Path:
        return self.root / blob_hex(blob_id)

    def _key(self, blob_id: bytes | str) -> bytes:
        return bytes.fromhex(blob_hex(blob_id))

    def has(self, blob_id: bytes | str) -> bool:
        return self._key(blob_id) in self._ids

    def ids(self) -> frozenset[bytes]:
        return frozenset(self._ids)

    def size(self, blob_id: bytes | str) -> int | None:
        if not self.has(blob_id):
            return None
        return self._path(blob_id).stat().st_size

    def get(self, blob_id: bytes | str) -> bytes:
        """The whole blob; KeyError if absent."""
        if not self.has(blob_id):
            raise KeyError(blob_hex(blob_id))
        return self._path(blob_id).read_bytes()

    def read(self, blob_id: bytes | str, offset: int, length: int) -> bytes:
        """blob[offset:offset+length] (shorter at the end); KeyError if absent."""
        if not self.has(blob_id):
            raise KeyError(blob_hex(blob_id))
        if offset < 0 or length < 0:
            raise ValueError("negative range")
        with open(self._path(blob_id), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def put(self, blob_id: bytes | str, data: bytes, kind: BlobKind, *,
            ref: ChunkRef | None = None, size: int | None = None) -> bool:
        """Verify, then store atomically. True if stored, False if it was already there;
        BlobVerifyError (nothing written) if `data` is not that blob."""
        key = self._key(blob_id)
        try:
            verify_blob(key, data, kind, ref, size)
        except BlobVerifyError:
            self.rejected += 1
            raise
        if key in self._ids:
            return False
        write_atomically(self._path(key), data)
        self._ids.add(key)
        return True

    # -- the layer index: which chunk ids make up a layer -------------------------------------

    def _read_layers(self) -> dict[str, tuple[bytes, ...]]:
        path = self.root / "layers.json"
        try:
            obj = json.loads(path.read_text())
            return {str(k): tuple(bytes.fromhex(c) for c in v) for k, v in obj.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError, OSError):
            return {}  # a cache: rebuilt from the next manifests

    def record_layers(self, layers: Mapping[str, Iterable[bytes]]) -> None:
        """Remember the chunk ids of each layer (diff id -> chunk ids)."""
        changed = False
        for diff_id, chunks in layers.items():
            ids = tuple(chunks)
            if self._layers.get(diff_id) != ids:
                self._layers.pop(diff_id, None)
                self._layers[diff_id] = ids
                changed = True
        while len(self._layers) > MAX_LAYER_INDEX:
            del self._layers[next(iter(self._layers))]
        if changed:
            data = {k: [c.hex() for c in v] for k, v in self._layers.items()}
            write_atomically(self.root / "layers.json", json.dumps(data).encode())

    def layer_chunks(self, diff_id: str) -> tuple[bytes, ...] | None:
        """The chunk ids of a layer if every one is in the store, else None."""
        ids = self._layers.get(diff_id)
        return ids if ids is not None and all(c in self._ids for c in ids) else None

    def complete_layers(self) -> frozenset[str]:
        """Diff ids of the layers whose every chunk is in the store."""
        return frozenset(d for d, ids in self._layers.items()
                         if all(c in self._ids for c in ids))


__all__ = ["BlobStore", "verify_blob"]
