"""create_delta / apply_delta: choose a method, wrap its body in the container, verify on apply."""

from __future__ import annotations

import hashlib
import io
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, Final, TypeAlias

import blake3
import hdiffpatch
from backports import zstd

from mesh.delta._container import (
    SHORT_DIGEST,
    DeltaError,
    DeltaHeader,
    Method,
    pack_header,
    parse_header,
    read_varint,
    varint,
)
from mesh.delta._hdiff import HDIFF_LZMA_WINDOW_LOG, HDIFF_ZSTD_WINDOW_LOG, hdiff_apply
from mesh.delta._output import FileSink, Output, Sink
from mesh.delta._stream import file_reader, stream_decode, stream_encode
from mesh.delta._tar import regular_members, tar_decode, tar_encode

Source: TypeAlias = "bytes | bytearray | memoryview | str | os.PathLike[str]"
"""Data in memory, or the path of a file (str or PathLike)."""
_Buffer: TypeAlias = "bytes | bytearray | memoryview | mmap.mmap"

# HDiffPatch builds a suffix array over the source: ~5-9 bytes of RAM per source byte while
# diffing (docs/delta.md: numpy's 57 MB tar diffs in 3.8 s). Above this total input size we switch
# to zstd windows, whose memory is bounded by the window constants below.
HDIFF_MAX_INPUT: Final = 512 * 1024 * 1024

# zstd level 19 is the highest "normal" level; 20-22 ("ultra") cost far more memory for a few
# percent (zstd's own manual, "--ultra"). Window sizes: see _hdiff, whose decoder enforces them.
HDIFF_ZSTD_LEVEL: Final = 19

# Windowed zstd: each frame encodes WINDOW_NEW target bytes with up to WINDOW_PREFIX source bytes,
# taken around the proportionally aligned position, as raw prefix (zstd --patch-from does the
# same with the whole source). Encoder RAM is roughly prefix + window + level-19 tables.
WINDOW_NEW: Final = 32 * 1024 * 1024
WINDOW_PREFIX: Final = 96 * 1024 * 1024
WINDOW_ZSTD_LEVEL: Final = 19
# log2(WINDOW_NEW + WINDOW_PREFIX) = 27; decoders refuse frames that ask for more.
WINDOW_LOG: Final = 27

FULL_ZSTD_LEVEL: Final = 19

# ZSTD_PREFIX: the whole source as raw prefix of one frame, like `zstd --patch-from`; its window
# must span source + target, and decoders refuse windows above 2**27.
PREFIX_MAX_INPUT: Final = 1 << WINDOW_LOG
# Below this total input, also try the "ultra" levels: for a ~100 KB layer level 22 saves ~3 %
# (bench/delta.py, MarkupSafe), and its tables, sized by zstd to the input, stay small.
ULTRA_MAX_INPUT: Final = 2 * 1024 * 1024
PREFIX_ZSTD_LEVELS: Final = (19, 22)
# Our frames carry no checksum, no content size and no dictionary ID (the container has the
# length; its header or the manifest has the digests), so their first 5 bytes are always this:
# magic + a zero frame header descriptor (RFC 8878 3.1.1). Bodies store frames without them.
_FRAME_START: Final = b"\x28\xb5\x2f\xfd\x00"
# Apply refuses targets above this unless told otherwise: the in-memory API holds old + new.
DEFAULT_MAX_TARGET: Final = 8 * 1024 * 1024 * 1024

_MIN_PREFIX: Final = 8  # zstd refuses shorter raw dictionaries


@contextmanager
def _view(src: Source, *, mapped: bool = True
          ) -> Iterator[bytes | bytearray | memoryview | mmap.mmap]:
    """Bytes stay as they are; a path is memory-mapped (read-only) so that windows page in
    lazily, or read whole when `mapped` is false."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        yield src
        return
    try:
        with open(src, "rb") as f:
            if not mapped:
                yield f.read()
                return
            if os.fstat(f.fileno()).st_size == 0:
                yield b""
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                yield m
    except OSError as exc:
        raise DeltaError(f"cannot read {os.fspath(src)!s}: {exc.strerror}") from None


def _size(src: Source) -> int:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return len(src)
    try:
        return os.stat(src).st_size
    except OSError as exc:
        raise DeltaError(f"cannot read {os.fspath(src)!s}: {exc.strerror}") from None


def _sha256(data: bytes | bytearray | memoryview | mmap.mmap) -> bytes:
    return hashlib.sha256(data).digest()


def create_delta(old: Source, new: Source, *, method: Method | None = None,
                 hdiff_max_input: int = HDIFF_MAX_INPUT, self_check: bool = True) -> bytes:
    """A patch that turns `old` into `new`.

    `method=None` picks HDiffPatch when old + new fit under `hdiff_max_input`, else the
    streaming tar method when both are tars (its apply needs constant memory), else zstd windows.
    `self_check=False` writes a bare patch (no digests in its header, ~27 bytes less): only for
    a patch that a signed manifest names by blob id, with its source and target diff IDs;
    applying it requires the target's diff ID (see _container).
    """
    if method is None:
        total = sum(_size(x) for x in (old, new))
        method = (Method.HDIFF if total <= hdiff_max_input
                  else Method.TAR_STREAM if _both_tars(old, new) else Method.ZSTD_WINDOWS)
    mapped = method in (Method.ZSTD_WINDOWS, Method.TAR_STREAM)
    with _view(old, mapped=mapped) as o, _view(new, mapped=mapped) as n:
        body = _encode_body(method, o, n)
        if not self_check:
            return pack_header(DeltaHeader(method, len(n), None, None, None, None)) + body
        header = DeltaHeader(method, len(n), _sha256(n)[:SHORT_DIGEST], len(o),
                             _sha256(o)[:SHORT_DIGEST],
                             blake3.blake3(body).digest()[:SHORT_DIGEST])
        return pack_header(header) + body


def _both_tars(old: Source, new: Source) -> bool:
    with _view(old) as o, _view(new) as n:
        return regular_members(o) is not None and regular_members(n) is not None


def _stream_diff(old: bytes, new: bytes) -> bytes:
    return hdiffpatch.diff(old, new, compression="none", validate=False)


def _encode_body(method: Method, o: bytes | bytearray | memoryview | mmap.mmap,
                 n: bytes | bytearray | memoryview | mmap.mmap) -> bytes:
    if method is Method.HDIFF:
        return hdiff_encode(bytes(o), bytes(n))
    if method is Method.ZSTD_WINDOWS:
        return _windows_encode(o, n)
    if method is Method.ZSTD_PREFIX:
        return _prefix_encode(o, n)
    if method is Method.FULL:
        return zstd.compress(bytes(n), level=FULL_ZSTD_LEVEL)
    if method is Method.TAR_MEMBERS:
        return tar_encode(bytes(o), bytes(n))
    if method is Method.TAR_STREAM:
        return stream_encode(o, n, regular_members, _stream_diff)
    raise DeltaError(f"unsupported method {method!r}")


def hdiff_encode(old: bytes, new: bytes) -> bytes:
    """Diff once uncompressed, then keep the smaller of the zstd and LZMA encodings.

    Measured on the bench corpus (bench/delta.py): LZMA is 6-8 % smaller than zstd -19 on
    HDiffPatch's output, for a slower but still sub-second decode of these small bodies.
    hdiffpatch.apply detects the codec from the body's own header.
    """
    raw = hdiffpatch.diff(old, new, compression="none", validate=False)
    zstd_body = hdiffpatch.recompress(
        raw, hdiffpatch.ZStdConfig(level=HDIFF_ZSTD_LEVEL, window=HDIFF_ZSTD_WINDOW_LOG))
    lzma_body = hdiffpatch.recompress(
        raw, hdiffpatch.LzmaConfig(level=9, window=HDIFF_LZMA_WINDOW_LOG))
    return min(zstd_body, lzma_body, key=len)




# The frame table and the container have sizes and digests: no per-frame size, checksum, dict ID.
_TRIMMED: Final[dict[int, int]] = {zstd.CompressionParameter.content_size_flag: 0,
                                   zstd.CompressionParameter.checksum_flag: 0,
                                   zstd.CompressionParameter.dict_id_flag: 0}


def _compress_frame(data: bytes | bytearray | memoryview | mmap.mmap,
                    prefix: bytes | bytearray | memoryview | mmap.mmap,
                    options: dict[int, int]) -> bytes:
    """One zstd frame of `data` with `prefix` as raw prefix, minus its constant first bytes."""
    # A prefix applies to the next frame only, hence one compressor per frame.
    comp = zstd.ZstdCompressor(
        options=options,
        zstd_dict=zstd.ZstdDict(prefix, is_raw=True).as_prefix if len(prefix) else None)
    frame = comp.compress(data, mode=zstd.ZstdCompressor.FLUSH_FRAME)
    if not frame.startswith(_FRAME_START):
        raise DeltaError("unexpected zstd frame header")  # only if libzstd changed its defaults
    return frame[len(_FRAME_START):]


# Decoded zstd output is taken in pieces of this size and written straight into the target,
# and compressed input fed in pieces of this size: what the decompressor returns per call
# (CPython's output blocks, joined) and what it keeps of unconsumed input stay this small.
_OUT_PIECE: Final = 256 * 1024
_IN_PIECE: Final = 64 * 1024


def _zstd_into(out: Sink, dec: zstd.ZstdDecompressor, frame: bytes | memoryview,
               size: int) -> None:
    """Decode the rest of `frame` into `out`: exactly `size` bytes, then the frame's end."""
    start = out.written
    pos = 0
    with memoryview(frame) as view:
        while not dec.eof:
            if dec.needs_input:
                if pos >= len(view):
                    break  # truncated
                data: bytes | memoryview = view[pos:pos + _IN_PIECE]
                pos += len(data)
            else:
                data = b""
            piece = dec.decompress(data, max_length=min(_OUT_PIECE,
                                                        size - (out.written - start) + 1))
            if len(piece) > size - (out.written - start):
                raise DeltaError("corrupt zstd frame: wrong length")
            out.write(piece)
            del piece
    if out.written - start != size or not dec.eof or dec.unused_data or pos != len(frame):
        raise DeltaError("corrupt zstd frame: wrong length")


def _decompress_frame(out: Sink, frame: bytes | memoryview, source: _Buffer, src_off: int,
                      src_len: int, size: int, window_log: int) -> None:
    """Exactly `size` bytes, written to `out`, from a frame stored without its constant first
    bytes, decoded with `source[src_off:src_off + src_len]` as raw prefix.

    Peak memory is the apply's: ZstdDict takes its own copy of the prefix, so a mapped source's
    pages are dropped before decoding, and the frame is fed in pieces rather than re-joined with
    its first bytes. What remains is the prefix copy, zstd's window buffer (as much of it as the
    output touches) and the target itself, written in place piece by piece (see _output).
    """
    try:
        zdict = None
        if src_len >= _MIN_PREFIX:
            with memoryview(source) as view, view[src_off:src_off + src_len] as prefix:
                zdict = zstd.ZstdDict(prefix, is_raw=True)
        _drop_pages(source)
        dec = zstd.ZstdDecompressor(
            zstd_dict=zdict.as_prefix if zdict is not None else None,
            options={zstd.DecompressionParameter.window_log_max: window_log})
        if dec.decompress(_FRAME_START, max_length=size + 1):
            raise DeltaError("corrupt zstd frame: wrong length")
        _zstd_into(out, dec, frame, size)
    except (zstd.ZstdError, ValueError, EOFError) as exc:
        raise DeltaError(f"corrupt zstd frame: {exc}") from None


def _window_log(total: int) -> int:
    return max(10, (max(total, 1) - 1).bit_length())


def _prefix_encode(o: bytes | bytearray | memoryview | mmap.mmap,
                   n: bytes | bytearray | memoryview | mmap.mmap) -> bytes:
    """`zstd --patch-from`: one frame, the whole source as prefix; the smallest of the levels
    worth trying at this size."""
    if len(o) + len(n) > PREFIX_MAX_INPUT:
        raise DeltaError("source + target too large for a single zstd frame")
    prefix = o if len(o) >= _MIN_PREFIX else b""
    levels = PREFIX_ZSTD_LEVELS if len(o) + len(n) <= ULTRA_MAX_INPUT else PREFIX_ZSTD_LEVELS[:1]
    bodies = []
    for level in levels:
        options: dict[int, int] = {
            zstd.CompressionParameter.compression_level: level,
            zstd.CompressionParameter.window_log: _window_log(len(o) + len(n)),
            zstd.CompressionParameter.enable_long_distance_matching: 1, **_TRIMMED}
        bodies.append(_compress_frame(n, prefix, options))
    return min(bodies, key=len)


def _windows_encode(o: bytes | bytearray | memoryview | mmap.mmap,
                    n: bytes | bytearray | memoryview | mmap.mmap) -> bytes:
    frames = []
    for start in range(0, len(n), WINDOW_NEW):
        piece = bytes(n[start:start + WINDOW_NEW])
        # Align proportionally: layers grow or shrink roughly evenly.
        centre = (start * len(o)) // max(len(n), 1) + len(piece) // 2
        src_off = max(0, min(centre - WINDOW_PREFIX // 2, len(o) - WINDOW_PREFIX))
        prefix = bytes(o[src_off:src_off + WINDOW_PREFIX])
        if len(prefix) < _MIN_PREFIX:
            src_off, prefix = 0, b""
        options: dict[int, int] = {
            zstd.CompressionParameter.compression_level: WINDOW_ZSTD_LEVEL,
            zstd.CompressionParameter.window_log: WINDOW_LOG,
            zstd.CompressionParameter.enable_long_distance_matching: 1,
            **_TRIMMED}
        frame = _compress_frame(piece, prefix, options)
        frames.append(b"".join([varint(src_off), varint(len(prefix)), varint(len(piece)),
                                varint(len(frame)), frame]))
    return varint(len(frames)) + b"".join(frames)


NewSink = Callable[[int], Sink]
"""Called once the body has confirmed the target's length: where the target goes."""


def _windows_decode(old: _Buffer, body: bytes | memoryview, target_size: int,
                    new_sink: NewSink) -> Sink:
    count, pos = read_varint(body, 0)
    if count > target_size // WINDOW_NEW + 1:
        raise DeltaError("corrupt window body: too many frames")
    # The frame table first: its sizes must add up to the target before anything is allocated.
    frames: list[tuple[int, int, int, int, int]] = []
    produced = 0
    for _ in range(count):
        src_off, pos = read_varint(body, pos)
        src_len, pos = read_varint(body, pos)
        new_len, pos = read_varint(body, pos)
        frame_len, pos = read_varint(body, pos)
        if (src_len > WINDOW_PREFIX or new_len > WINDOW_NEW or src_off + src_len > len(old)
                or pos + frame_len > len(body) or produced + new_len > target_size):
            raise DeltaError("corrupt window body: frame out of bounds")
        frames.append((src_off, src_len, new_len, pos, frame_len))
        pos += frame_len
        produced += new_len
    if pos != len(body):
        raise DeltaError("corrupt window body: trailing bytes")
    if produced != target_size:
        raise DeltaError("corrupt window body: frames do not add up to the target")
    out = new_sink(target_size)
    with memoryview(body) as view:
        for src_off, src_len, new_len, start, frame_len in frames:
            with view[start:start + frame_len] as frame:
                _decompress_frame(out, frame, old, src_off, src_len, new_len, WINDOW_LOG)
    return out


def _drop_pages(old: _Buffer) -> None:
    """A mapped source's pages, once copied into a ZstdDict, need not stay resident: they are
    clean file pages, so dropping them only lowers the apply's peak RSS."""
    if isinstance(old, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") and len(old):
        old.madvise(mmap.MADV_DONTNEED)


def _prefix_decode(old: _Buffer, body: bytes | memoryview, target_size: int,
                   new_sink: NewSink) -> Sink:
    if len(old) + target_size > PREFIX_MAX_INPUT:
        raise DeltaError("corrupt patch: source + target too large for one zstd frame")
    out = new_sink(target_size)  # at most 128 MiB, by the check above
    _decompress_frame(out, body, old, 0, len(old), target_size,
                      _window_log(len(old) + target_size))
    return out


def full_decode(body: bytes | memoryview, target_size: int, new_sink: NewSink) -> Sink:
    # Our FULL frames carry their content size (zstd.compress writes it): it must agree with
    # the header before the target is allocated.
    try:
        declared = zstd.get_frame_info(body).decompressed_size
        dec = zstd.ZstdDecompressor(options={zstd.DecompressionParameter.window_log_max: 27})
        if declared != target_size:
            raise DeltaError("corrupt zstd body: wrong length")
        out = new_sink(target_size)
        _zstd_into(out, dec, body, target_size)
    except (zstd.ZstdError, ValueError, EOFError) as exc:
        raise DeltaError(f"corrupt zstd body: {exc}") from None
    return out


def read_header(patch: bytes | memoryview) -> DeltaHeader:
    """The patch's header, checked for shape only (no digests)."""
    return parse_header(patch)


BARE_NEEDS_DIFF_ID: Final = ("a bare patch needs the expected diff ID (it carries no digest "
                             "of its own)")


def _check_header(header: DeltaHeader, expected_diff_id: str | None,
                  max_target: int) -> bytes | None:
    """The checks before any body byte is decoded; the expected full sha256, if given."""
    expected: bytes | None = None
    if expected_diff_id is not None:
        expected = _parse_diff_id(expected_diff_id)
    if header.bare:
        if expected is None:
            raise DeltaError(BARE_NEEDS_DIFF_ID)
    elif expected is not None and expected[:SHORT_DIGEST] != header.target_sha256_prefix:
        raise DeltaError(f"patch produces {header.target_short_id}, manifest wants "
                         f"{expected_diff_id}")
    # Every decoder is bounded by target_size: bound it before anything is decoded.
    if header.target_size > max_target:
        raise DeltaError(f"patch target of {header.target_size} bytes exceeds the limit "
                         f"of {max_target}")
    return expected


def _check_output(header: DeltaHeader, digest: bytes, expected: bytes | None,
                  expected_diff_id: str | None) -> None:
    if (header.target_sha256_prefix is not None
            and digest[:SHORT_DIGEST] != header.target_sha256_prefix):
        raise DeltaError("patched output does not match the patch's target digest")
    # The manifest path (and the only check of a bare patch's output): the full sha256.
    if expected is not None and digest != expected:
        raise DeltaError(f"patched output is sha256:{digest.hex()}, manifest wants "
                         f"{expected_diff_id}"
                         + (" (wrong base, or a corrupted patch)" if header.bare else ""))


def _wrong_base(header: DeltaHeader) -> DeltaError:
    return DeltaError("patch was made against a different base "
                      f"(sha256:{(header.source_sha256_prefix or b'').hex()}...)")


def apply_delta(old: Source, patch: bytes, expected_diff_id: str | None = None, *,
                max_target: int = DEFAULT_MAX_TARGET) -> bytes:
    """The target bytes, verified against `expected_diff_id` (the manifest's diff ID: full
    sha256) when given. A self-checking patch can be applied without it (the output is then
    checked only against the header's 8-byte prefix of its sha256); a bare patch cannot.

    This holds the target in memory; `apply_delta_file` writes it to a file instead, and
    applies `TAR_STREAM` patches in bounded memory."""
    header = parse_header(patch)
    expected = _check_header(header, expected_diff_id, max_target)
    body = memoryview(patch)[header.header_size:]  # no copy: zstd bodies are decoded from it
    if (header.body_blake3_prefix is not None
            and blake3.blake3(body).digest()[:SHORT_DIGEST] != header.body_blake3_prefix):
        raise DeltaError("patch body is corrupted or truncated (digest mismatch)")
    # HDiffPatch takes the source as bytes: read it once. The other methods map it: the zstd
    # ones copy it into a ZstdDict and drop its pages, the tar one reads only the members it
    # copies or patches, and drops the pages before each HDiffPatch call (see _tar).
    with _view(old, mapped=header.method is not Method.HDIFF) as o:
        # A bare patch's source was checked against the manifest's source diff ID by the caller.
        if header.source_sha256_prefix is not None:
            if (len(o) != header.source_size
                    or _sha256(o)[:SHORT_DIGEST] != header.source_sha256_prefix):
                raise _wrong_base(header)
            _drop_pages(o)
        if header.method is Method.HDIFF:
            out = hdiff_apply(bytes(o), bytes(body), header.target_size)
        elif header.method is Method.TAR_MEMBERS:
            out = tar_decode(o, body, header.target_size)
        else:
            sink = _decode_into(header, o, body, lambda size: Output(
                size, grow=header.method is Method.TAR_STREAM))
            if not isinstance(sink, Output):
                raise DeltaError("internal: not an in-memory sink")  # pragma: no cover
            out = sink.result()
    if len(out) != header.target_size:
        raise DeltaError("patched output has the wrong length")
    _check_output(header, _sha256(out), expected, expected_diff_id)
    return out


def _decode_into(header: DeltaHeader, o: _Buffer, body: bytes | memoryview,
                 new_sink: NewSink) -> Sink:
    """Decode a zstd or TAR_STREAM body into a sink made by `new_sink` once the body has
    confirmed the target's length."""
    if header.method is Method.ZSTD_WINDOWS:
        return _windows_decode(o, body, header.target_size, new_sink)
    if header.method is Method.ZSTD_PREFIX:
        return _prefix_decode(o, body, header.target_size, new_sink)
    if header.method is Method.FULL:
        return full_decode(body, header.target_size, new_sink)
    if header.method is Method.TAR_STREAM:
        out = new_sink(header.target_size)
        with memoryview(o) as src:
            def read_at(offset: int, length: int) -> bytes:
                return bytes(src[offset:offset + length])
            with memoryview(body) as view:
                stream_decode(read_at, len(o), io.BytesIO(view), header.target_size, out)
        return out
    raise DeltaError(f"unsupported method {header.method!r}")  # pragma: no cover


# Hashing a file (the source's self-check, a body's digest) reads it in pieces of this size.
_HASH_PIECE: Final = 1024 * 1024


def apply_delta_file(old: str | os.PathLike[str], patch: bytes | str | os.PathLike[str],
                     out: str | os.PathLike[str], expected_diff_id: str | None = None, *,
                     max_target: int = DEFAULT_MAX_TARGET) -> str:
    """Apply `patch` (bytes, or the path of a patch file) to the file `old`, writing the target
    to the file `out`; returns its diff ID ("sha256:<hex>"), checked as `apply_delta` checks it.

    The target is written piece by piece to a temporary file beside `out` and hashed as it is
    written; it replaces `out` only once verified (on any error no file is left). For
    `TAR_STREAM` the whole apply streams: the source is read with positioned reads, the patch
    from its file, and memory stays bounded by constants (the LZMA dictionary, one piece, one
    HDiffPatch piece: docs/delta.md, "Apply memory"). The zstd methods stream their output but
    hold their source window (at most 128 MiB), the patch body and zstd's window buffer; `HDIFF`
    and `TAR_MEMBERS`, whose decoders take bytes, are applied in memory and then written.
    """
    with _patch_reader(patch) as body_file:
        head = body_file.read(64)
        header = parse_header(head)
        expected = _check_header(header, expected_diff_id, max_target)
        if header.body_blake3_prefix is not None:
            digest = blake3.blake3()
            body_file.seek(header.header_size)
            while piece := body_file.read(_HASH_PIECE):
                digest.update(piece)
            if digest.digest()[:SHORT_DIGEST] != header.body_blake3_prefix:
                raise DeltaError("patch body is corrupted or truncated (digest mismatch)")
        body_file.seek(header.header_size)
        try:
            src = open(old, "rb")  # noqa: SIM115 - closed below, after the decode
        except OSError as exc:
            raise DeltaError(f"cannot read {os.fspath(old)!s}: {exc.strerror}") from None
        with src:
            old_size = os.fstat(src.fileno()).st_size
            if header.source_sha256_prefix is not None:
                if old_size != header.source_size or _file_sha256(src)[:SHORT_DIGEST] != (
                        header.source_sha256_prefix):
                    raise _wrong_base(header)
            sink = FileSink(out, header.target_size)
            try:
                _decode_file(header, src, old_size, body_file, sink)
                _check_output(header, sink.digest(), expected, expected_diff_id)
                sink.commit()
            except BaseException:
                sink.discard()
                raise
    return "sha256:" + sink.digest().hex()


@contextmanager
def _patch_reader(patch: bytes | str | os.PathLike[str]) -> Iterator[BinaryIO]:
    if isinstance(patch, bytes):
        yield io.BytesIO(patch)  # shares the bytes: no copy
        return
    try:
        f = open(patch, "rb")  # noqa: SIM115 - a context manager's own resource
    except OSError as exc:
        raise DeltaError(f"cannot read {os.fspath(patch)!s}: {exc.strerror}") from None
    with f:
        yield f


def _file_sha256(f: BinaryIO) -> bytes:
    h = hashlib.sha256()
    f.seek(0)
    while piece := f.read(_HASH_PIECE):
        h.update(piece)
    return h.digest()


def _decode_file(header: DeltaHeader, src: BinaryIO, old_size: int, body: BinaryIO,
                 sink: FileSink) -> None:
    def same_sink(size: int) -> Sink:
        if size != header.target_size:
            raise DeltaError("patched output has the wrong length")  # pragma: no cover
        return sink

    if header.method is Method.TAR_STREAM:
        stream_decode(file_reader(src.fileno()), old_size, body, header.target_size, sink)
        return
    data = body.read()  # the other methods decode from a buffer
    with _view(src.name, mapped=header.method is not Method.HDIFF) as o:
        if len(o) != old_size:
            raise DeltaError("the source changed while it was read")
        if header.method is Method.HDIFF:
            sink.write(hdiff_apply(bytes(o), data, header.target_size))
        elif header.method is Method.TAR_MEMBERS:
            sink.write(tar_decode(o, data, header.target_size))
        else:
            _decode_into(header, o, data, same_sink)


def _parse_diff_id(diff_id: str) -> bytes:
    algo, _, hexdigest = diff_id.partition(":")
    try:
        digest = bytes.fromhex(hexdigest)
    except ValueError:
        digest = b""
    if algo != "sha256" or len(digest) != 32:
        raise DeltaError(f"not a sha256 diff ID: {diff_id!r}")
    return digest
