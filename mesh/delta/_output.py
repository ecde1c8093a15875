"""The target of an apply, written front to back into one buffer that becomes the result.

Decoders used to return pieces (CPython's output blocks, member outputs, windows) that were then
joined: the target existed twice at the end of every apply. `Output` preallocates the target
once, as a `bytes` object from calloc (its pages are only made resident as they are written),
writes each piece in place as soon as it is decoded (the piece is then dropped), and hands the
same object back as the result: no join, no final copy, and at any moment only the part of the
target written so far is resident.

The buffer is a `BytesIO` over a `bytes` object it alone references: CPython writes into such a
buffer in place and `getvalue()` returns it, without a copy, once it is full (Modules/_io/
bytesio.c: a buffer is copied only while shared, or when `getvalue()` must shrink it). Were
that ever not so, the result would be the same bytes at the cost of a copy.

Callers allocate one only for a length they have checked against what the body itself declares
(tar ops, window table, frame header, or the ZSTD_PREFIX bound): the header's target length
alone, which a corrupt bare patch can set to anything up to `max_target`, never allocates.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import tempfile

from mesh.delta._container import DeltaError

Piece = bytes | bytearray | memoryview | mmap.mmap


class _Target:
    """Exactly `size` bytes, written in order; more or fewer is a DeltaError."""

    __slots__ = ("_size", "written")

    def __init__(self, size: int) -> None:
        self._size = size
        self.written = 0

    @property
    def remaining(self) -> int:
        return self._size - self.written

    def _admit(self, piece: Piece) -> int:
        """The piece's length, once it is known to fit."""
        n = len(piece) if not isinstance(piece, memoryview) else piece.nbytes
        if n > self._size - self.written:
            raise DeltaError("patched output is longer than the patch's target length")
        return n

    def _check_complete(self) -> None:
        if self.written != self._size:
            raise DeltaError("patched output has the wrong length")


class Output(_Target):
    """The target in memory (see the module's docstring)."""

    __slots__ = ("_buf",)

    def __init__(self, size: int, *, grow: bool = False) -> None:
        """`grow`: start empty and grow as written, for a decoder (TAR_STREAM) whose body
        never states the target's length before the records that yield it: then only what
        the body has actually produced is allocated (with a copy at the end)."""
        try:
            # calloc: pages become resident when written
            self._buf = io.BytesIO() if grow else io.BytesIO(bytes(size))
        except (MemoryError, OverflowError):
            raise DeltaError(f"cannot allocate the {size}-byte target") from None
        super().__init__(size)

    def write(self, piece: Piece) -> None:
        n = self._admit(piece)
        self._buf.write(piece)
        self.written += n

    def result(self) -> bytes:
        self._check_complete()
        return self._buf.getvalue()


class FileSink(_Target):
    """The target of a streaming apply: exactly `size` bytes, written in order to a temporary
    file next to `path` and hashed (sha256) as they are written; `commit` renames it into place,
    `discard` removes it. Nothing of the target is held in memory."""

    __slots__ = ("_file", "_hash", "_path", "_tmp")

    def __init__(self, path: str | os.PathLike[str], size: int) -> None:
        self._path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self._path))
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=".delta-", suffix=".part", dir=directory)
        except OSError as exc:
            raise DeltaError(f"cannot write {self._path}: {exc.strerror}") from None
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        super().__init__(size)

    def write(self, piece: Piece) -> None:
        n = self._admit(piece)
        self._hash.update(piece)
        try:
            self._file.write(piece)
        except OSError as exc:
            raise DeltaError(f"cannot write {self._path}: {exc.strerror}") from None
        self.written += n

    def digest(self) -> bytes:
        """The sha256 of the complete target; a DeltaError if it is not complete."""
        self._check_complete()
        return self._hash.digest()

    def commit(self) -> None:
        try:
            self._file.close()
            os.chmod(self._tmp, 0o644)  # mkstemp's 0600 is for the partial file only
            os.replace(self._tmp, self._path)
        except OSError as exc:
            self.discard()
            raise DeltaError(f"cannot write {self._path}: {exc.strerror}") from None

    def discard(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


Sink = Output | FileSink
"""Where a decoder writes the target: a buffer that becomes the result, or a file."""
