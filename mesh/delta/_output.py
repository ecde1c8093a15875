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

import io
import mmap

from mesh.delta._container import DeltaError

Piece = bytes | bytearray | memoryview | mmap.mmap


class Output:
    """Exactly `size` bytes, written in order; more or fewer is a DeltaError."""

    __slots__ = ("_buf", "_size", "written")

    def __init__(self, size: int) -> None:
        try:
            self._buf = io.BytesIO(bytes(size))  # calloc: pages become resident when written
        except (MemoryError, OverflowError):
            raise DeltaError(f"cannot allocate the {size}-byte target") from None
        self._size = size
        self.written = 0

    @property
    def remaining(self) -> int:
        return self._size - self.written

    def write(self, piece: Piece) -> None:
        n = len(piece) if not isinstance(piece, memoryview) else piece.nbytes
        if n > self._size - self.written:
            raise DeltaError("patched output is longer than the patch's target length")
        self._buf.write(piece)
        self.written += n

    def result(self) -> bytes:
        if self.written != self._size:
            raise DeltaError("patched output has the wrong length")
        return self._buf.getvalue()
