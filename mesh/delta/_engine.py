"""create_delta / apply_delta: choose a method, wrap its body in the container, verify on apply."""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, TypeAlias

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

Source: TypeAlias = "bytes | bytearray | memoryview | str | os.PathLike[str]"
"""Data in memory, or the path of a file (str or PathLike)."""

# HDiffPatch builds a suffix array over the source: ~5-9 bytes of RAM per source byte while
# diffing (DESIGN.md: numpy's 57 MB tar diffs in 3.8 s). Above this total input size we switch
# to zstd windows, whose memory is bounded by the window constants below.
HDIFF_MAX_INPUT: Final = 512 * 1024 * 1024

# zstd level 19 is the highest "normal" level; 20-22 ("ultra") cost far more memory for a few
# percent (zstd's own manual, "--ultra").
HDIFF_ZSTD_LEVEL: Final = 19
# 2**27 = 128 MiB is the largest window ZStdConfig accepts (hdiffpatch's ZStdConfig validator).
HDIFF_ZSTD_WINDOW_LOG: Final = 27
# LZMA dictionary of 2**24 = 16 MiB: the decoder allocates this much, whatever the patch size.
HDIFF_LZMA_WINDOW_LOG: Final = 24

# Windowed zstd: each frame encodes WINDOW_NEW target bytes with up to WINDOW_PREFIX source bytes,
# taken around the proportionally aligned position, as raw prefix (zstd --patch-from does the
# same with the whole source). Encoder RAM is roughly prefix + window + level-19 tables.
WINDOW_NEW: Final = 32 * 1024 * 1024
WINDOW_PREFIX: Final = 96 * 1024 * 1024
WINDOW_ZSTD_LEVEL: Final = 19
# log2(WINDOW_NEW + WINDOW_PREFIX) = 27; decoders refuse frames that ask for more.
WINDOW_LOG: Final = 27

FULL_ZSTD_LEVEL: Final = 19
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
                 hdiff_max_input: int = HDIFF_MAX_INPUT) -> bytes:
    """A patch that turns `old` into `new`.

    `method=None` picks HDiffPatch when old + new fit under `hdiff_max_input`, else zstd windows.
    """
    if method is None:
        total = sum(_size(x) for x in (old, new))
        method = Method.HDIFF if total <= hdiff_max_input else Method.ZSTD_WINDOWS
    mapped = method is Method.ZSTD_WINDOWS
    with _view(old, mapped=mapped) as o, _view(new, mapped=mapped) as n:
        body = _encode_body(method, o, n)
        header = DeltaHeader(method, len(n), _sha256(n), len(o), _sha256(o)[:SHORT_DIGEST],
                             blake3.blake3(body).digest()[:SHORT_DIGEST])
        return pack_header(header) + body


def _encode_body(method: Method, o: bytes | bytearray | memoryview | mmap.mmap,
                 n: bytes | bytearray | memoryview | mmap.mmap) -> bytes:
    if method is Method.HDIFF:
        return hdiff_encode(bytes(o), bytes(n))
    if method is Method.ZSTD_WINDOWS:
        return _windows_encode(o, n)
    if method is Method.FULL:
        return zstd.compress(bytes(n), level=FULL_ZSTD_LEVEL)
    if method is Method.TAR_MEMBERS:
        from mesh.delta._tar import tar_encode  # import cycle: _tar uses hdiff_encode
        return tar_encode(bytes(o), bytes(n))
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


def hdiff_decode(old: bytes, body: bytes) -> bytes:
    try:
        return hdiffpatch.apply(old, body)
    # A crafted body can declare a huge output: hdiffpatch then fails to allocate it. (Its
    # declared size is not checked against ours beforehand; see docs/delta.md.)
    except (hdiffpatch.HDiffPatchError, ValueError, TypeError, MemoryError) as exc:
        raise DeltaError(f"corrupt HDiffPatch body: {exc}") from None


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
            zstd.CompressionParameter.content_size_flag: 0}  # the frame table has the size
        # A prefix applies to the next frame only, hence one compressor per window.
        comp = zstd.ZstdCompressor(
            options=options,
            zstd_dict=zstd.ZstdDict(prefix, is_raw=True).as_prefix if prefix else None)
        frame = comp.compress(piece, mode=zstd.ZstdCompressor.FLUSH_FRAME)
        frames.append(b"".join([varint(src_off), varint(len(prefix)), varint(len(piece)),
                                varint(len(frame)), frame]))
    return varint(len(frames)) + b"".join(frames)


def _windows_decode(old: bytes | bytearray | memoryview | mmap.mmap, body: bytes,
                    target_size: int) -> bytes:
    count, pos = read_varint(body, 0)
    if count > target_size // WINDOW_NEW + 1:
        raise DeltaError("corrupt window body: too many frames")
    pieces: list[bytes] = []
    produced = 0
    for _ in range(count):
        src_off, pos = read_varint(body, pos)
        src_len, pos = read_varint(body, pos)
        new_len, pos = read_varint(body, pos)
        frame_len, pos = read_varint(body, pos)
        if (src_len > WINDOW_PREFIX or new_len > WINDOW_NEW or src_off + src_len > len(old)
                or pos + frame_len > len(body) or produced + new_len > target_size):
            raise DeltaError("corrupt window body: frame out of bounds")
        frame = body[pos:pos + frame_len]
        pos += frame_len
        options: dict[int, int] = {zstd.DecompressionParameter.window_log_max: WINDOW_LOG}
        prefix = bytes(old[src_off:src_off + src_len])
        try:
            dec = zstd.ZstdDecompressor(
                zstd_dict=zstd.ZstdDict(prefix, is_raw=True).as_prefix if prefix else None,
                options=options)
            piece = dec.decompress(frame, max_length=new_len + 1)
        except (zstd.ZstdError, ValueError) as exc:
            raise DeltaError(f"corrupt window frame: {exc}") from None
        del prefix  # the ZstdDict keeps its own copy; peak RSS is old + new + ~2 windows
        if len(piece) != new_len or not dec.eof or dec.unused_data:
            raise DeltaError("corrupt window frame: wrong length")
        pieces.append(piece)
        produced += new_len
    if pos != len(body):
        raise DeltaError("corrupt window body: trailing bytes")
    return b"".join(pieces)


def full_decode(body: bytes, target_size: int) -> bytes:
    try:
        dec = zstd.ZstdDecompressor(options={zstd.DecompressionParameter.window_log_max: 27})
        data = dec.decompress(body, max_length=target_size + 1)
    except (zstd.ZstdError, ValueError) as exc:
        raise DeltaError(f"corrupt zstd body: {exc}") from None
    if len(data) != target_size or not dec.eof or dec.unused_data:
        raise DeltaError("corrupt zstd body: wrong length")
    return data


def read_header(patch: bytes | memoryview) -> DeltaHeader:
    """The patch's header, checked for shape only (no digests)."""
    return parse_header(patch)


def apply_delta(old: Source, patch: bytes, expected_diff_id: str | None = None, *,
                max_target: int = DEFAULT_MAX_TARGET) -> bytes:
    """The target bytes, verified against the patch header and `expected_diff_id`."""
    header = parse_header(patch)
    if expected_diff_id is not None and header.target_diff_id != expected_diff_id:
        raise DeltaError(f"patch produces {header.target_diff_id}, manifest wants "
                         f"{expected_diff_id}")
    if header.target_size > max_target:
        raise DeltaError(f"patch target of {header.target_size} bytes exceeds the limit "
                         f"of {max_target}")
    body = bytes(patch[header.header_size:])
    if blake3.blake3(body).digest()[:SHORT_DIGEST] != header.body_blake3_prefix:
        raise DeltaError("patch body is corrupted or truncated (digest mismatch)")
    # Whole-input methods need the source as bytes: read it once rather than map and copy it.
    with _view(old, mapped=header.method is Method.ZSTD_WINDOWS) as o:
        if (len(o) != header.source_size
                or _sha256(o)[:SHORT_DIGEST] != header.source_sha256_prefix):
            raise DeltaError("patch was made against a different base "
                             f"(sha256:{header.source_sha256_prefix.hex()}...)")
        if header.method is Method.HDIFF:
            out = hdiff_decode(bytes(o), body)
        elif header.method is Method.ZSTD_WINDOWS:
            out = _windows_decode(o, body, header.target_size)
        elif header.method is Method.FULL:
            out = full_decode(body, header.target_size)
        else:
            from mesh.delta._tar import tar_decode
            out = tar_decode(bytes(o), body, header.target_size)
    if len(out) != header.target_size or _sha256(out) != header.target_sha256:
        raise DeltaError("patched output does not match the patch's target digest")
    return out
