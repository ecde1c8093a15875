"""The coordinator's blob seed: content-addressed blobs (docs/api.md "Releases and blobs"),
which devices fetch over the WAN when no peer has a blob. `BlobBackend` is what the registry
needs of a place to keep them; `BlobSeed` keeps them as files under DATA/blobs/ab/cdef… (the
default), coordinator._blobs_s3 in an S3-compatible bucket (docs/scale.md).

A blob's ID is blake3 (hex) of the uncompressed bytes for a layer chunk (the blob is one zstd
frame) and of the blob's own bytes for a delta; mesh.blobs checks both. Every blob is verified
before it gets its name, and gets it atomically: a temp file in the same directory, fsync,
verify, `os.replace`, so a crash never leaves a partial or unverified file under a blob's name.

The methods here block (disk, hashing, decompression): call them through trio.to_thread.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Final, Protocol

from mesh.blobs import (
    TEMP_PREFIX,
    BlobKind,
    BlobVerifyError,
    check_digest,
    check_frame,
    fsync_dir,
    is_blob_hex,
    remove_temp_files,
)
from mesh.release import CHUNK_SIZE

from ._model import CoordinatorError

MAX_BLOB_BYTES: Final = 64 * 1024 * 1024  # one upload (docs/api.md); deltas of big layers fit
READ_PIECE: Final = 1024 * 1024


class BadBlob(CoordinatorError):
    status = 400


def check_blob_id(blob_id: str, where: str = "blob id") -> str:
    if not is_blob_hex(blob_id):
        raise BadBlob(f"{where}: must be 64 lowercase hex digits (blake3)")
    return blob_id


class BlobStoreUnavailable(CoordinatorError):
    """The blob store did not answer as it should (down, refusing, timing out): str() is one
    line for the client and the log, and the request gets a 503."""

    status = 503


class BlobReader(Protocol):
    """A stored blob open for reading: pieces of a byte range, then close."""

    def pieces(self, start: int, length: int, piece: int) -> Generator[bytes]:
        """`length` bytes from `start`, at most `piece` bytes at a time (bounded memory)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class OpenBlob:
    reader: BlobReader
    size: int


class BlobBackend(Protocol):
    """Where the coordinator keeps blobs. Every method blocks (disk, network, hashing): call
    them through trio.to_thread. A store that cannot answer raises BlobStoreUnavailable.

    Uploads go to a local temp file (`new_temp`), are verified by `commit`, and only then get
    the blob's name, so a blob's name never holds partial or unverified bytes."""

    def prepare(self) -> None: ...

    def sizes(self, ids: list[str]) -> list[int | None]:
        """The stored size of each blob (None: not stored), in the order of `ids`."""
        ...

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The IDs (first occurrence, in order) that have no stored blob."""
        ...

    def open(self, blob_id: str) -> OpenBlob | None: ...

    def new_temp(self, blob_id: str) -> tuple[BinaryIO, Path]: ...

    def commit(self, blob_id: str, kind: BlobKind, f: BinaryIO, tmp: Path) -> bool:
        """Verify, then name → new? (BadBlob if the bytes are not the blob)."""
        ...

    def discard(self, f: BinaryIO, tmp: Path) -> None: ...

    def delete(self, blob_ids: Iterable[str]) -> int: ...

    def close(self) -> None: ...


def first_occurrences(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


class FileReader:
    """A blob file open for reading (stays readable even if it is deleted meanwhile)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    def pieces(self, start: int, length: int, piece: int) -> Generator[bytes]:
        self.file.seek(start)
        left = length
        while left > 0:
            data = self.file.read(min(piece, left))
            if not data:
                return
            left -= len(data)
            yield data

    def close(self) -> None:
        self.file.close()


class BlobSeed:
    """Blob files under `root`, one directory per first two hex digits of the id."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def close(self) -> None:
        pass

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Temp files of uploads cut short by a crash: never named, never needed.
        for sub in self.root.iterdir():
            if sub.is_dir():
                remove_temp_files(sub)

    def path(self, blob_id: str) -> Path:
        check_blob_id(blob_id)
        return self.root / blob_id[:2] / blob_id[2:]

    def exists(self, blob_id: str) -> bool:
        return self.path(blob_id).is_file()

    def size(self, blob_id: str) -> int | None:
        try:
            return self.path(blob_id).stat().st_size
        except FileNotFoundError:
            return None

    def sizes(self, ids: list[str]) -> list[int | None]:
        return [self.size(i) for i in ids]

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The IDs (first occurrence, in order) that have no stored blob."""
        return [i for i in first_occurrences(ids) if not self.exists(i)]

    def open(self, blob_id: str) -> OpenBlob | None:
        """The blob opened for reading (stays readable even if it is deleted meanwhile)."""
        try:
            f = open(self.path(blob_id), "rb")  # noqa: SIM115  # handed to the caller
        except FileNotFoundError:
            return None
        return OpenBlob(FileReader(f), os.fstat(f.fileno()).st_size)

    # -- writing -----------------------------------------------------------------------------

    def new_temp(self, blob_id: str) -> tuple[BinaryIO, Path]:
        """A fresh temp file next to where the blob will live (same filesystem: atomic rename)."""
        final = self.path(blob_id)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=final.parent)
        return os.fdopen(fd, "w+b"), Path(name)

    def commit(self, blob_id: str, kind: BlobKind, f: BinaryIO, tmp: Path) -> bool:
        """Verify the temp file against `blob_id`, then give it the blob's name.

        Returns True if the blob is new, False if it was already there (the temp file is
        dropped). Raises BadBlob (400) if the bytes do not match; the temp file is always gone
        afterwards, one way or the other.
        """
        final = self.path(blob_id)
        try:
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            verify(blob_id, kind, f)
            f.close()
            if final.exists():
                return False
            os.replace(tmp, final)
            fsync_dir(final.parent)
            return True
        finally:
            f.close()
            tmp.unlink(missing_ok=True)

    def discard(self, f: BinaryIO, tmp: Path) -> None:
        f.close()
        tmp.unlink(missing_ok=True)

    def delete(self, blob_ids: Iterable[str]) -> int:
        removed = 0
        for blob_id in blob_ids:
            try:
                self.path(blob_id).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed


def verify(blob_id: str, kind: BlobKind, f: BinaryIO) -> None:
    """Raise BadBlob unless the bytes read from `f` are the blob `blob_id` of `kind`: a delta
    hashes to it; a chunk is one zstd frame of at most CHUNK_SIZE bytes (bounded as it is
    inflated) that hashes to it."""
    pieces = iter(partial(f.read, READ_PIECE), b"")
    try:
        if kind is BlobKind.DELTA:
            check_digest(bytes.fromhex(check_blob_id(blob_id)), pieces, what="delta")
        else:
            check_frame(bytes.fromhex(check_blob_id(blob_id)), pieces, CHUNK_SIZE)
    except BlobVerifyError as exc:
        raise BadBlob(str(exc)) from None
