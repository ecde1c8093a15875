"""HDiffPatch bodies: apply one only once what it declares agrees with what we expect.

hdiffpatch.apply allocates what the body's own header declares: the output size, and for each
compressed stream the decoder's window (an LZMA dictionary of up to 4 GiB, a zstd window). A
bare patch's body reaches it without a digest check (the manifest's blob id guards the release
path, not a locally supplied patch), and even a digest-valid body may be hostile. So before the
C decoder sees a body, its declared new and old sizes must equal the container's target length
(itself bounded by `max_target`) and the source's actual length, its streams must tile the body
exactly, and each stream's window must be no larger than the encoder below ever uses.
"""

from __future__ import annotations

from typing import Final

import hdiffpatch

from mesh.delta._container import DeltaError

# zstd level 19's window here is 2**27 = 128 MiB, the largest ZStdConfig accepts (hdiffpatch's
# ZStdConfig validator) and the decoders' limit elsewhere in mesh.delta.
HDIFF_ZSTD_WINDOW_LOG: Final = 27
# LZMA dictionary of 2**24 = 16 MiB: the decoder allocates this much, whatever the patch size.
HDIFF_LZMA_WINDOW_LOG: Final = 24

# HDiffPatch's compressed-diff format: "HDIFF13&" + compressor name + NUL, then 11 hpatch
# packUInts: new size, old size, cover count, and (size, compressed size or 0 when stored raw)
# for its four streams, which follow in that order and end the body (HDiffPatch
# libHDiffPatch/HPatch/patch.c, read_diffz_head).
_MAGIC: Final = b"HDIFF13&"
_HEAD_UINTS: Final = 11
# hpatch's lzma plugin prefixes each stream with its props size (5) and LZMA props: lc/lp/pb,
# then the dictionary size (u32 little-endian), which LzmaDec_Allocate allocates.
_LZMA_PROPS: Final = b"\x05"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
# A zstd frame header is at most 18 bytes (RFC 8878 3.1.1), LZMA's props prefix 6.
_STREAM_HEAD: Final = 18
_MAX_NAME: Final = 16  # compressor names are short ("zstd", "lzma", "" for none)
_MAX_UINT_BYTES: Final = 10  # a u64 in 7-bit groups


def _unpack_uint(data: bytes, pos: int) -> tuple[int, int]:
    """hpatch_unpackUInt: big-endian 7-bit groups, high bit set on all but the last byte."""
    value = 0
    for i in range(_MAX_UINT_BYTES):
        if pos + i >= len(data):
            raise DeltaError("corrupt HDiffPatch body: truncated header")
        byte = data[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos + i + 1
    raise DeltaError("corrupt HDiffPatch body: malformed size")


def _head(body: bytes) -> tuple[bytes, list[int], int]:
    """(compressor name, the 11 head fields, offset of the first stream)."""
    if not body.startswith(_MAGIC):
        raise DeltaError("corrupt HDiffPatch body: bad magic")
    end = body.find(b"\0", len(_MAGIC), len(_MAGIC) + _MAX_NAME + 1)
    if end < 0:
        raise DeltaError("corrupt HDiffPatch body: bad compressor name")
    fields = []
    pos = end + 1
    for _ in range(_HEAD_UINTS):
        value, pos = _unpack_uint(body, pos)
        fields.append(value)
    return body[len(_MAGIC):end], fields, pos


def declared_sizes(body: bytes) -> tuple[int, int]:
    """(new size, old size) as the body's header declares them."""
    _, fields, _ = _head(body)
    return fields[0], fields[1]


def _zstd_window(frame: bytes) -> int:
    """The window a zstd frame asks its decoder for (RFC 8878 3.1.1.1)."""
    if len(frame) < 6 or not frame.startswith(_ZSTD_MAGIC):
        raise DeltaError("corrupt HDiffPatch body: bad zstd stream")
    descriptor = frame[4]
    if not descriptor & 0x20:  # not single-segment: a window descriptor byte follows
        exponent, mantissa = 10 + (frame[5] >> 3), frame[5] & 7
        return (1 << exponent) + ((1 << exponent) >> 3) * mantissa
    # single segment: the window is the frame content size
    size_bytes = (1, 2, 4, 8)[descriptor >> 6]
    start = 5 + (0 if descriptor & 0x3 == 0 else (1, 2, 4)[(descriptor & 3) - 1])
    if len(frame) < start + size_bytes:
        raise DeltaError("corrupt HDiffPatch body: bad zstd stream")
    size = int.from_bytes(frame[start:start + size_bytes], "little")
    return size + 256 if size_bytes == 2 else size


def _check_streams(codec: bytes, fields: list[int], body: bytes, pos: int) -> None:
    for raw_size, packed_size in zip(fields[3::2], fields[4::2], strict=True):
        size = packed_size or raw_size
        if size > len(body) - pos:
            raise DeltaError("corrupt HDiffPatch body: truncated stream")
        stream = body[pos:pos + min(size, _STREAM_HEAD)]  # only its head is read: no copy
        pos += size
        if not packed_size:
            continue
        if codec == b"lzma":
            if len(stream) < 6 or stream[:1] != _LZMA_PROPS:
                raise DeltaError("corrupt HDiffPatch body: bad lzma stream")
            if int.from_bytes(stream[2:6], "little") > 1 << HDIFF_LZMA_WINDOW_LOG:
                raise DeltaError("corrupt HDiffPatch body: lzma dictionary too large")
        elif codec == b"zstd":
            if _zstd_window(stream) > 1 << HDIFF_ZSTD_WINDOW_LOG:
                raise DeltaError("corrupt HDiffPatch body: zstd window too large")
        else:  # mesh.delta writes "zstd", "lzma" and, inside tar deltas, uncompressed ("")
            raise DeltaError(f"unsupported HDiffPatch compressor {codec!r}")
    if pos != len(body):
        raise DeltaError("corrupt HDiffPatch body: trailing bytes")


def hdiff_apply(old: bytes, body: bytes, new_size: int) -> bytes:
    """`old` patched by an HDiffPatch body that must declare exactly `new_size` bytes of output
    from exactly len(old) bytes of input; any failure is a DeltaError."""
    codec, fields, pos = _head(body)
    if (fields[0], fields[1]) != (new_size, len(old)):
        raise DeltaError("corrupt HDiffPatch body: declared sizes disagree with the patch")
    _check_streams(codec, fields, body, pos)
    try:
        out = hdiffpatch.apply(old, body)
    except (hdiffpatch.HDiffPatchError, ValueError, TypeError, MemoryError) as exc:
        raise DeltaError(f"corrupt HDiffPatch body: {exc}") from None
    if len(out) != new_size:
        raise DeltaError("corrupt HDiffPatch body: wrong length")
    return out
