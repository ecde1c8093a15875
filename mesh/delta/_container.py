"""The self-describing patch container: a small header in front of a method-specific body.

Layout (varints are unsigned LEB128, at most 10 bytes), format 2, in one of two forms chosen by
the high bit of the method byte:

    self-checking (bit clear, the default):
    magic "FMD" | format u8 (2) | method u8
    target length varint | target sha256, first 8 bytes
    source length varint | source sha256, first 8 bytes
    body blake3, first 8 bytes | body (the rest)

    bare (FLAG_BARE, 0x80, set in the method byte: what a release manifest names):
    magic "FMD" | format u8 (2) | method u8 | target length varint | body (the rest)

A self-checking patch stands alone (CLI use, patches passed around by hand): the short body
digest rejects corrupted or truncated bodies before they reach a C decoder, the short source
digest reports a wrong base as such instead of as garbage output (a mix-up, not an attacker),
and the target prefix lets an apply without the diff ID still check its output, at 64 bits.
The full target digest is the layer's diff ID, which `apply_delta(..., expected_diff_id=...)`
checks whenever it is given. The header is ~35 bytes (format 1, with the full target sha256,
was ~60).

A bare patch drops all three digests (~8 bytes of header): in a release, the signed manifest
names the delta by its blake3 blob id (checked before the blob is stored or used), names its
source by diff ID (the base layer is checked against it) and gives the target's diff ID (the
output's full sha256 is checked against it), so the header's copies of them are redundant on
the only path that uses this form. `apply_delta` refuses a bare patch without the expected diff
ID. The target length stays: every decoder is bounded by it (and it by `max_target`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"FMD"
FORMAT_VERSION: Final = 2  # 1: full target sha256 in the header (refused since)
SHORT_DIGEST: Final = 8
# The high bit of the method byte: a bare patch (no digests in the header). Methods are < 0x80.
FLAG_BARE: Final = 0x80
HEADER_MIN: Final = len(MAGIC) + 2 + 1 + SHORT_DIGEST + 1 + 2 * SHORT_DIGEST  # self-checking
BARE_HEADER_MIN: Final = len(MAGIC) + 2 + 1
_MAX_VARINT: Final = 10


class DeltaError(Exception):
    """A patch is malformed, corrupted, made against another base, or yields the wrong bytes."""


class Method(enum.IntEnum):
    """How the body turns the source into the target."""

    HDIFF = 1  # HDiffPatch over the whole input (zstd-compressed diff); best ratio, RAM-hungry
    ZSTD_WINDOWS = 2  # zstd frames, each with an aligned slice of the source as raw prefix
    TAR_MEMBERS = 3  # tar-aware: copy unchanged members, per-member deltas, literals
    FULL = 4  # no use of the source: the target zstd-compressed (used inside TAR_MEMBERS too)
    ZSTD_PREFIX = 5  # one zstd frame with the whole source as raw prefix (zstd --patch-from)
    TAR_STREAM = 6  # tar-aware records in target order: applies in bounded memory (_stream)


@dataclass(frozen=True, slots=True)
class DeltaHeader:
    """A parsed header. In a bare patch (`bare`), the size of the source and the three digest
    prefixes are None: the signed manifest carries them in full."""

    method: Method
    target_size: int
    target_sha256_prefix: bytes | None  # SHORT_DIGEST bytes; the full digest is the diff ID
    source_size: int | None
    source_sha256_prefix: bytes | None  # SHORT_DIGEST bytes
    body_blake3_prefix: bytes | None  # SHORT_DIGEST bytes
    header_size: int = 0  # filled in by parse_header

    @property
    def bare(self) -> bool:
        return self.body_blake3_prefix is None

    @property
    def target_short_id(self) -> str | None:
        """The target's diff ID abbreviated to the header's prefix ("sha256:<16 hex>..."), for
        display; None for a bare patch. Not a diff ID: the manifest has the full one."""
        if self.target_sha256_prefix is None:
            return None
        return "sha256:" + self.target_sha256_prefix.hex() + "..."

    def matches_diff_id(self, diff_id: str) -> bool:
        """False when the header's digest prefix rules `diff_id` out (a bare header, carrying
        no digest, rules nothing out)."""
        if self.target_sha256_prefix is None:
            return True
        return diff_id.lower().startswith("sha256:" + self.target_sha256_prefix.hex())


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(_MAX_VARINT):
        if pos + i >= len(data):
            raise DeltaError("patch truncated in its header")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos + i + 1
    raise DeltaError("malformed patch header (varint too long)")


def pack_header(header: DeltaHeader) -> bytes:
    digests = (header.target_sha256_prefix, header.source_sha256_prefix,
               header.body_blake3_prefix)
    if header.bare:
        if any(d is not None for d in digests) or header.source_size is not None:
            raise ValueError("a bare header carries no source size or digests")
        return b"".join([MAGIC, bytes([FORMAT_VERSION, int(header.method) | FLAG_BARE]),
                         varint(header.target_size)])
    if (header.target_sha256_prefix is None or header.source_sha256_prefix is None
            or header.body_blake3_prefix is None or header.source_size is None):
        raise ValueError("a self-checking header needs the source size and all three digests")
    return b"".join([MAGIC, bytes([FORMAT_VERSION, int(header.method)]),
                     varint(header.target_size), header.target_sha256_prefix,
                     varint(header.source_size), header.source_sha256_prefix,
                     header.body_blake3_prefix])


def parse_header(patch: bytes | memoryview) -> DeltaHeader:
    if len(patch) < BARE_HEADER_MIN:
        raise DeltaError(f"patch truncated: {len(patch)} bytes, a header needs "
                         f"{BARE_HEADER_MIN} or more")
    if bytes(patch[:3]) != MAGIC:
        raise DeltaError("not a fleetmesh patch (bad magic)")
    if patch[3] != FORMAT_VERSION:
        raise DeltaError(f"unsupported patch format version {patch[3]} (this fleetmesh reads "
                         f"version {FORMAT_VERSION}; re-create the patch)")
    bare = bool(patch[4] & FLAG_BARE)
    try:
        kind = Method(patch[4] & ~FLAG_BARE)
    except ValueError:
        raise DeltaError(f"unknown patch method {patch[4] & ~FLAG_BARE}") from None
    if bare:
        target_size, pos = read_varint(patch, 5)
        return DeltaHeader(kind, target_size, None, None, None, None, pos)
    if len(patch) < HEADER_MIN:
        raise DeltaError(f"patch truncated: {len(patch)} bytes, a header needs {HEADER_MIN}")
    target_size, pos = read_varint(patch, 5)
    target_sha = bytes(patch[pos:pos + SHORT_DIGEST])
    source_size, pos = read_varint(patch, pos + SHORT_DIGEST)
    end = pos + 2 * SHORT_DIGEST
    if end > len(patch) or len(target_sha) != SHORT_DIGEST:
        raise DeltaError("patch truncated in its header")
    return DeltaHeader(kind, target_size, target_sha, source_size,
                       bytes(patch[pos:pos + SHORT_DIGEST]), bytes(patch[pos + SHORT_DIGEST:end]),
                       end)
