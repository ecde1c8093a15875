"""The self-describing patch container: a small header in front of a method-specific body.

Layout (varints are unsigned LEB128, at most 10 bytes):

    magic "FMD" | format u8 | method u8
    target length varint | target sha256 (32)
    source length varint | source sha256, first 8 bytes
    body blake3, first 8 bytes | body (the rest)

The target digest is the layer's diff ID, so an applied patch is checked against the manifest
without any other metadata. The short source digest names the base the patch was made against,
so a wrong base is reported as such instead of as garbage output (a mix-up, not an attacker: the
full target digest is what is trusted). The short body digest rejects corrupted or truncated
bodies before they reach a C decoder; blobs from peers are in any case checked against their
blake3 id in the signed manifest first. The header is ~60 bytes because patches of small layers
are a few hundred bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"FMD"
FORMAT_VERSION: Final = 1
SHORT_DIGEST: Final = 8
HEADER_MIN: Final = len(MAGIC) + 2 + 1 + 32 + 1 + 2 * SHORT_DIGEST
_MAX_VARINT: Final = 10


class DeltaError(Exception):
    """A patch is malformed, corrupted, made against another base, or yields the wrong bytes."""


class Method(enum.IntEnum):
    """How the body turns the source into the target."""

    HDIFF = 1  # HDiffPatch over the whole input (zstd-compressed diff); best ratio, RAM-hungry
    ZSTD_WINDOWS = 2  # zstd frames, each with an aligned slice of the source as raw prefix
    TAR_MEMBERS = 3  # tar-aware: copy unchanged members, per-member deltas, literals
    FULL = 4  # no use of the source: the target zstd-compressed (used inside TAR_MEMBERS too)


@dataclass(frozen=True, slots=True)
class DeltaHeader:
    method: Method
    target_size: int
    target_sha256: bytes
    source_size: int
    source_sha256_prefix: bytes  # SHORT_DIGEST bytes
    body_blake3_prefix: bytes  # SHORT_DIGEST bytes
    header_size: int = 0  # filled in by parse_header

    @property
    def target_diff_id(self) -> str:
        return "sha256:" + self.target_sha256.hex()


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
    return b"".join([MAGIC, bytes([FORMAT_VERSION, int(header.method)]),
                     varint(header.target_size), header.target_sha256,
                     varint(header.source_size), header.source_sha256_prefix,
                     header.body_blake3_prefix])


def parse_header(patch: bytes | memoryview) -> DeltaHeader:
    if len(patch) < HEADER_MIN:
        raise DeltaError(f"patch truncated: {len(patch)} bytes, a header needs {HEADER_MIN}")
    if bytes(patch[:3]) != MAGIC:
        raise DeltaError("not a fleetmesh patch (bad magic)")
    if patch[3] != FORMAT_VERSION:
        raise DeltaError(f"unsupported patch format version {patch[3]}")
    try:
        kind = Method(patch[4])
    except ValueError:
        raise DeltaError(f"unknown patch method {patch[4]}") from None
    target_size, pos = read_varint(patch, 5)
    target_sha = bytes(patch[pos:pos + 32])
    source_size, pos = read_varint(patch, pos + 32)
    end = pos + 2 * SHORT_DIGEST
    if end > len(patch) or len(target_sha) != 32:
        raise DeltaError("patch truncated in its header")
    return DeltaHeader(kind, target_size, target_sha, source_size,
                       bytes(patch[pos:pos + SHORT_DIGEST]), bytes(patch[pos + SHORT_DIGEST:end]),
                       end)
