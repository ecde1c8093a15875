"""Blobs: the content-addressed bytes of a release, and the one place they are checked.

A blob is named by a blake3 digest (`BLOB_ID_LEN` bytes, or its 64 lowercase hex digits):
- a **chunk** is one zstd frame, named by blake3 of its *uncompressed* bytes; `inflate_frame`
  (and `check_frame`, which keeps no output) decompresses it with its output bounded as it is
  produced, so a decompression bomb costs at most `max_size + 1` bytes before it is refused;
- a **delta** is named by blake3 of its own bytes (`check_digest`).
Every failure raises `BlobVerifyError` with one line naming the blob and what is wrong
(docs/architecture.md, principle 5). mesh.release (`open_chunk`), the coordinator's blob seed
and the device's blob store all verify through here.

`write_atomically` is the stores' write: a temporary file (`TEMP_PREFIX`) in the same directory,
fsync, rename, directory fsync, so a file is whole or absent after a crash, and
`remove_temp_files` sweeps what a crash left.

This module imports nothing else of mesh: mesh.release, mesh.wire and mesh.blobsched build on it.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import blake3
from backports import zstd


class BlobKind(enum.StrEnum):
    """What a blob is: a zstd frame of one chunk of a layer, or a whole delta patch."""

    CHUNK = "chunk"
    DELTA = "delta"

BLOB_ID_LEN: Final = 32  # blake3 digest (mesh.release ChunkRef.id, LayerDelta.blob_id)
BLOB_HEX_RE: Final = re.compile(r"[0-9a-f]{64}\Z")
# Decoders accept windows up to 2**23 = 8 MiB (zstd's default maximum for level 19), which
# covers a whole 4 MiB chunk (mesh.release.CHUNK_SIZE); refusing larger windows bounds the
# decoder's memory whatever a frame header claims.
WINDOW_LOG_MAX: Final = 23
TEMP_PREFIX: Final = ".tmp-"
_ID_SHOWN: Final = 16  # hex digits of a blob id in error messages

Pieces = bytes | Iterable[bytes]  # a whole blob, or its bytes in order (a file read in pieces)


class BlobVerifyError(ValueError):
    """Bytes that are not the blob their id names; str() is one line."""


def is_blob_hex(text: object) -> bool:
    """True for a blob id spelled as 64 lowercase hex digits."""
    return isinstance(text, str) and BLOB_HEX_RE.match(text) is not None


def blob_hex(blob_id: bytes | str) -> str:
    """A blob id (`BLOB_ID_LEN` bytes, or 64 lowercase hex digits) as its hex name; ValueError
    for anything else."""
    if isinstance(blob_id, bytes):
        if len(blob_id) != BLOB_ID_LEN:
            raise ValueError(f"blob ids are {BLOB_ID_LEN} bytes")
        return blob_id.hex()
    if not is_blob_hex(blob_id):
        raise ValueError("blob ids are 64 lowercase hex digits")
    return blob_id


def frame_bound(max_size: int) -> int:
    """The largest zstd frame accepted for at most `max_size` uncompressed bytes: zstd's worst
    case (ZSTD_COMPRESSBOUND: size + size/256 + a little) with twice the margin. A larger frame
    is refused before it is decompressed: it cannot be the compressor's output."""
    return max_size + max_size // 128 + 1024


def _as_pieces(data: Pieces) -> Iterable[bytes]:
    # A bytes-like whole is one piece (iterating it would give ints); bytes(b) of a bytes
    # object is that object, not a copy.
    if isinstance(data, (bytes, bytearray, memoryview)):
        return (bytes(data),)
    return data


def _name(what: str, blob_id: bytes) -> str:
    return f"{what} {blob_id.hex()[:_ID_SHOWN]}"


def check_digest(blob_id: bytes, data: Pieces, *, size: int | None = None,
                 what: str = "delta") -> None:
    """BlobVerifyError unless blake3 of `data` is `blob_id` (and its length `size`, if given)."""
    h = blake3.blake3()
    length = 0
    for piece in _as_pieces(data):
        h.update(piece)
        length += len(piece)
    if size is not None and length != size:
        raise BlobVerifyError(f"{_name(what, blob_id)}: wrong length: {length} bytes, "
                              f"expected {size}")
    if h.digest() != blob_id:
        raise BlobVerifyError(f"{_name(what, blob_id)}: does not hash to its id (blake3 of its "
                              "bytes)")


def inflate_frame(blob_id: bytes, frame: Pieces, max_size: int, *, what: str = "chunk") -> bytes:
    """The uncompressed bytes of one zstd frame: at most `max_size` of them, and their blake3
    must be `blob_id`; else BlobVerifyError."""
    out: list[bytes] = []
    _inflate(blob_id, frame, max_size, what, out.append)
    return b"".join(out)


def check_frame(blob_id: bytes, frame: Pieces, max_size: int, *, what: str = "chunk") -> None:
    """As `inflate_frame`, keeping none of the output (a store checking an upload)."""
    _inflate(blob_id, frame, max_size, what, None)


def _inflate(blob_id: bytes, frame: Pieces, max_size: int, what: str,
             keep: Callable[[bytes], None] | None) -> None:
    name = _name(what, blob_id)
    bound = frame_bound(max_size)
    h = blake3.blake3()
    in_len = out_len = 0
    dec = zstd.ZstdDecompressor(options={zstd.DecompressionParameter.window_log_max:
                                         WINDOW_LOG_MAX})
    for piece in _as_pieces(frame):
        in_len += len(piece)
        if in_len > bound:
            raise BlobVerifyError(f"{name}: wrong length: a frame of more than {bound} bytes "
                                  f"(zstd's bound for {max_size})")
        if dec.eof and piece:
            raise BlobVerifyError(f"{name}: wrong length: data after the end of its zstd frame")
        data = piece
        while not dec.eof:
            try:
                # The hard bound: never more than one byte past what is allowed.
                out = dec.decompress(data, max_length=max_size + 1 - out_len)
            except (zstd.ZstdError, ValueError, EOFError) as exc:
                raise BlobVerifyError(f"{name}: not a valid zstd frame: {exc}") from None
            data = b""
            out_len += len(out)
            if out_len > max_size:
                raise BlobVerifyError(f"{name}: wrong length: decompresses to more than "
                                      f"{max_size} bytes")
            h.update(out)
            if keep is not None:
                keep(out)
            if dec.needs_input:
                break
    if not dec.eof:
        raise BlobVerifyError(f"{name}: wrong length: truncated zstd frame")
    if dec.unused_data:
        raise BlobVerifyError(f"{name}: wrong length: data after the end of its zstd frame")
    if h.digest() != blob_id:
        raise BlobVerifyError(f"{name}: does not hash to its id (blake3 of its uncompressed "
                              "bytes)")


# --------------------------------------------------------------------------- files


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all: a temporary file beside it, fsync, rename over
    `path`, directory fsync."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_temp_files(directory: Path) -> None:
    """Remove the temporary files an interrupted write left in `directory`: never renamed,
    never needed."""
    for leftover in directory.glob(TEMP_PREFIX + "*"):
        leftover.unlink(missing_ok=True)


__all__ = [
    "BLOB_HEX_RE", "BLOB_ID_LEN", "TEMP_PREFIX", "WINDOW_LOG_MAX", "BlobKind", "BlobVerifyError",
    "Pieces",
    "blob_hex", "check_digest", "check_frame", "fsync_dir", "frame_bound", "inflate_frame",
    "is_blob_hex", "remove_temp_files", "write_atomically",
]
