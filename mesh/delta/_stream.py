"""TAR_STREAM: a tar-aware delta whose apply streams, in memory bounded by constants.

The body is one raw LZMA2 stream (16 MiB dictionary) of records in target order; each record
yields the next bytes of the target:

    0 LITERAL  varint length, then the bytes
    1 COPY     varint source offset, varint length          (read from the source file)
    2 PATCH    varint source offset, varint source length, varint target length,
               varint sub-diff length, then an uncompressed HDiffPatch diff of the source
               slice into the target piece

The records end exactly where the target (the header's length) does, and so must the stream.
A changed tar member is diffed against its base (same path; else the one member whose path is
the same once version numbers and hashes are blanked: `numpy-1.26.3.dist-info/RECORD`,
`scipy.libs/libgfortran-040039e1.so.5.0.0`; else the one in the same directory whose name
starts with the same letters; else the one of the same basename) in
pieces of at most CHUNK_NEW target bytes, each against at most CHUNK_OLD bytes of the base at
the proportional position. So the apply holds, at any moment: the LZMA dictionary, one piece
of the decoded stream (at most PIECE bytes of a literal), and for a PATCH the source slice, the
sub-diff and HDiffPatch's output (and its copy): constants, whatever the layer's size. The
source is read with positioned reads (page cache, not the process's memory), the target goes
to a sink (_output.FileSink: a file, hashed while written).

Every length is checked before it is read or allocated: a record may not yield more than what
is left of the target, a PATCH's sizes are bounded by the constants below (and its sub-diff by
its target piece, as the encoder writes one only when it is smaller), copies must lie inside
the source, and HDiffPatch sees a sub-diff only after _hdiff has checked its declared sizes.
"""

from __future__ import annotations

import lzma
import mmap
import os
import re
from collections.abc import Callable
from typing import BinaryIO, Final, TypeAlias

from mesh.delta._container import DeltaError, varint
from mesh.delta._hdiff import hdiff_apply
from mesh.delta._output import Sink

_Bytes: TypeAlias = "bytes | bytearray | memoryview | mmap.mmap"

CHUNK_NEW: Final = 8 * 1024 * 1024
CHUNK_OLD: Final = 32 * 1024 * 1024
# Literals and copies move through memory in pieces of this size.
PIECE: Final = 1024 * 1024
_IN_PIECE: Final = 64 * 1024
_LZMA_FILTERS: Final = ({"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                         "dict_size": 1 << 24},)
_LITERAL: Final = 0
_COPY: Final = 1
_PATCH: Final = 2
_MAX_VARINT: Final = 10
# A digit run, or a hex run of 6+ characters holding a digit (wheel .libs hashes, versions).
_VOLATILE: Final = re.compile(r"(?=[0-9a-f]*[0-9])[0-9a-f]{6,}|[0-9]+")


_STEM: Final = re.compile(r"[A-Za-z]*")


def _normalized(name: str) -> str:
    return _VOLATILE.sub("#", name)


def _stem(name: str) -> str:
    """The normalized directory and the leading letters of the file name: a shared library
    renamed across a version and a suffix (`libopenblasp-r0-24bff013.3.26.dev.so` ->
    `libopenblasp-r0-01191904.3.27.so`) keeps it."""
    directory, _, base = name.rpartition("/")
    match = _STEM.match(base)
    return _normalized(directory) + "/" + (match.group(0) if match else "")


# -- encoder -------------------------------------------------------------------------------


class _Writer:
    """Records into one LZMA2 stream; literal ranges of the target are merged and streamed."""

    def __init__(self, new: _Bytes) -> None:
        self._new = new
        self._comp = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        self._out: list[bytes] = []
        self._lit: tuple[int, int] | None = None

    def _emit(self, data: bytes | memoryview) -> None:
        self._out.append(self._comp.compress(data))

    def literal(self, start: int, end: int) -> None:
        if end <= start:
            return
        if self._lit is not None and self._lit[1] == start:
            self._lit = (self._lit[0], end)
        else:
            self._flush()
            self._lit = (start, end)

    def _flush(self) -> None:
        if self._lit is None:
            return
        start, end = self._lit
        self._lit = None
        self._emit(bytes([_LITERAL]) + varint(end - start))
        with memoryview(self._new) as view:
            for pos in range(start, end, PIECE):
                with view[pos:min(end, pos + PIECE)] as piece:
                    self._emit(piece)

    def copy(self, offset: int, length: int) -> None:
        self._flush()
        self._emit(bytes([_COPY]) + varint(offset) + varint(length))

    def patch(self, offset: int, length: int, target: int, sub: bytes) -> None:
        self._flush()
        self._emit(b"".join([bytes([_PATCH]), varint(offset), varint(length), varint(target),
                             varint(len(sub))]))
        self._emit(sub)

    def finish(self) -> bytes:
        self._flush()
        self._out.append(self._comp.flush())
        return b"".join(self._out)


Members = Callable[[_Bytes], "list[tuple[str, int, int]] | None"]


def stream_encode(old: _Bytes, new: _Bytes, members: Members,
                  diff: Callable[[bytes, bytes], bytes]) -> bytes:
    """The body. `members(tar)` lists (name, data offset, size) of regular members (None: not
    a tar); `diff(old, new)` is an uncompressed HDiffPatch diff."""
    import hashlib  # the encoder's

    old_members = members(old)
    new_members = members(new)
    if old_members is None or new_members is None:
        raise DeltaError("tar-aware delta needs two tar archives")
    by_name: dict[str, tuple[int, int]] = {}
    by_norm: dict[str, list[tuple[int, int]]] = {}
    by_stem: dict[str, list[tuple[int, int]]] = {}
    by_base: dict[str, list[tuple[int, int]]] = {}
    by_digest: dict[bytes, int] = {}
    with memoryview(old) as src:
        for name, offset, size in old_members:
            if not size:
                continue
            by_name[name] = (offset, size)
            by_norm.setdefault(_normalized(name), []).append((offset, size))
            by_stem.setdefault(_stem(name), []).append((offset, size))
            by_base.setdefault(name.rsplit("/", 1)[-1], []).append((offset, size))
            with src[offset:offset + size] as data:
                by_digest.setdefault(hashlib.sha256(data).digest(), offset)

    def base_of(name: str) -> tuple[int, int] | None:
        if name in by_name:
            return by_name[name]
        for table, key in ((by_norm, _normalized(name)), (by_stem, _stem(name)),
                           (by_base, name.rsplit("/", 1)[-1])):
            found = table.get(key, [])
            if len(found) == 1:
                return found[0]
        return None

    out = _Writer(new)
    cursor = 0
    with memoryview(new) as target:
        for name, offset, size in new_members:
            if not size:
                continue
            out.literal(cursor, offset)
            cursor = offset + size
            with target[offset:offset + size] as data:
                same = by_digest.get(hashlib.sha256(data).digest())
            if same is not None:
                out.copy(same, size)
                continue
            base = base_of(name)
            if base is None:
                out.literal(offset, offset + size)
                continue
            _encode_member(out, old, base, new, offset, size, diff)
    out.literal(cursor, len(new))
    return out.finish()


def _encode_member(out: _Writer, old: _Bytes, base: tuple[int, int], new: _Bytes, offset: int,
                   size: int, diff: Callable[[bytes, bytes], bytes]) -> None:
    """A changed member, in pieces of CHUNK_NEW, each diffed against up to CHUNK_OLD bytes of
    its base around the proportional position; a piece whose diff is not smaller is a
    literal."""
    base_off, base_size = base
    for start in range(0, size, CHUNK_NEW):
        length = min(CHUNK_NEW, size - start)
        if base_size <= CHUNK_OLD:
            src_off, src_len = 0, base_size
        else:
            centre = start * base_size // size + length // 2
            src_off = max(0, min(centre - CHUNK_OLD // 2, base_size - CHUNK_OLD))
            src_len = CHUNK_OLD
        piece = bytes(new[offset + start:offset + start + length])
        sub = diff(bytes(old[base_off + src_off:base_off + src_off + src_len]), piece)
        if len(sub) < length:
            out.patch(base_off + src_off, src_len, length, sub)
        else:
            out.literal(offset + start, offset + start + length)


# -- decoder -------------------------------------------------------------------------------


class _Reader:
    """Exact reads from the LZMA2 stream, fed from a file in small pieces."""

    def __init__(self, body: BinaryIO) -> None:
        self._body = body
        self._dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        self._buf = bytearray()
        self._pos = 0

    def _more(self, want: int) -> bool:
        """Decode at least one more byte (up to about `want`); False at the stream's end."""
        while True:
            if self._dec.eof:
                return False
            data = b""
            if self._dec.needs_input:
                data = self._body.read(_IN_PIECE)
                if not data:
                    return False
            try:
                got = self._dec.decompress(data, max_length=max(want, _IN_PIECE))
            except lzma.LZMAError as exc:
                raise DeltaError(f"corrupt stream-delta body: {exc}") from None
            if got:
                del self._buf[:self._pos]
                self._pos = 0
                self._buf += got
                return True

    def read(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._more(n - (len(self._buf) - self._pos)):
                raise DeltaError("corrupt stream-delta body: truncated")
        data = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return data

    def varint(self) -> int:
        value = shift = 0
        for _ in range(_MAX_VARINT):
            byte = self.read(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value
        raise DeltaError("corrupt stream-delta body: malformed length")

    def finish(self) -> None:
        """The stream must end here: no decoded byte left, no compressed byte after it."""
        if self._pos != len(self._buf) or self._more(1):
            raise DeltaError("corrupt stream-delta body: data after the target")
        if not self._dec.eof or self._dec.unused_data or self._body.read(1):
            raise DeltaError("corrupt stream-delta body: bad end")


ReadAt = Callable[[int, int], bytes]
"""(offset, length) -> exactly those bytes of the source."""


def file_reader(fd: int) -> ReadAt:
    """Positioned reads: the source's pages stay in the page cache, not in the process."""
    def read_at(offset: int, length: int) -> bytes:
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise DeltaError(f"cannot read the source: {exc.strerror}") from None
        if len(data) != length:
            raise DeltaError("the source changed while it was read")
        return data
    return read_at


def stream_decode(read_at: ReadAt, old_size: int, body: BinaryIO, target_size: int,
                  sink: Sink) -> None:
    """Write the target into `sink`, reading the source through `read_at`."""
    reader = _Reader(body)
    while sink.written < target_size:
        left = target_size - sink.written
        kind = reader.read(1)[0]
        if kind == _LITERAL:
            length = reader.varint()
            if not 0 < length <= left:
                raise DeltaError("corrupt stream-delta body: literal out of bounds")
            for pos in range(0, length, PIECE):
                sink.write(reader.read(min(PIECE, length - pos)))
        elif kind == _COPY:
            offset, length = reader.varint(), reader.varint()
            if not 0 < length <= left or offset + length > old_size:
                raise DeltaError("corrupt stream-delta body: copy out of bounds")
            for pos in range(0, length, PIECE):
                sink.write(read_at(offset + pos, min(PIECE, length - pos)))
        elif kind == _PATCH:
            offset, src_len, length, sub_len = (reader.varint() for _ in range(4))
            if (not 0 < length <= min(left, CHUNK_NEW) or src_len > CHUNK_OLD
                    or offset + src_len > old_size or sub_len >= length):
                raise DeltaError("corrupt stream-delta body: patch out of bounds")
            sub = reader.read(sub_len)
            piece = hdiff_apply(read_at(offset, src_len), sub, length)
            del sub
            sink.write(piece)
            del piece
        else:
            raise DeltaError(f"corrupt stream-delta body: unknown record {kind}")
    reader.finish()
