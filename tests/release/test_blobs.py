"""mesh.blobs: every path through the one blob check (chunks and deltas), whole or in pieces."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest
from backports import zstd

from mesh.blobs import (
    BLOB_ID_LEN,
    TEMP_PREFIX,
    BlobVerifyError,
    Pieces,
    blob_hex,
    check_digest,
    check_frame,
    frame_bound,
    inflate_frame,
    is_blob_hex,
    remove_temp_files,
    write_atomically,
)

MAX = 64 * 1024  # the bound these tests inflate under (chunks use CHUNK_SIZE)
DATA = os.urandom(3000) + b"\0" * 20_000
FRAME = zstd.compress(DATA, level=19)
ID = blake3.blake3(DATA).digest()


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _inflate(blob_id: bytes, frame: Pieces, max_size: int) -> None:
    assert inflate_frame(blob_id, frame, max_size) == DATA


Opener = Callable[[bytes, Pieces, int], None]
OPENERS: list[Opener] = [_inflate, check_frame]
# The same frame whole, in 1 KiB pieces as a store reads a file, and byte by byte.
SPLITS: list[Callable[[bytes], Pieces]] = [
    lambda b: b, lambda b: _pieces(b, 1024), lambda b: _pieces(b, 1)]


@pytest.mark.parametrize("opener", OPENERS, ids=["inflate", "check"])
@pytest.mark.parametrize("split", SPLITS, ids=["whole", "pieces", "bytes"])
def test_a_good_frame_opens_whole_or_in_pieces(opener: Opener,
                                               split: Callable[[bytes], Pieces]) -> None:
    opener(ID, split(FRAME), MAX)
    opener(ID, split(FRAME), len(DATA))  # exactly the bound is fine


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x40
    return bytes(b)


BIG = bytes(MAX + 1)
# A valid frame of nothing but empty raw blocks (3-byte headers): zstd accepts it, and it can be
# as long as a sender likes without producing a byte.
PADDED = (b"\x28\xb5\x2f\xfd\x00\x00" + b"\x00\x00\x00" * (frame_bound(MAX) // 3 + 1)
          + b"\x01\x00\x00")
BAD_FRAMES: list[tuple[str, bytes, bytes, str]] = [
    ("not zstd", ID, b"not a zstd frame at all", "not a valid zstd frame"),
    ("corrupted header", ID, _flip(FRAME, 0), "not a valid zstd frame"),
    ("truncated", ID, FRAME[:-3], "wrong length: truncated zstd frame"),
    ("empty", ID, b"", "wrong length: truncated zstd frame"),
    ("trailing bytes", ID, FRAME + b"\0", "wrong length: data after the end of its zstd frame"),
    ("two frames", ID, FRAME + FRAME, "wrong length: data after the end of its zstd frame"),
    ("oversize inflating", blake3.blake3(BIG).digest(), zstd.compress(BIG, level=3),
     f"wrong length: decompresses to more than {MAX} bytes"),
    ("oversize frame", blake3.blake3(b"").digest(), PADDED,
     f"wrong length: a frame of more than {frame_bound(MAX)} bytes"),
    ("wrong id", blake3.blake3(b"other").digest(), FRAME,
     "does not hash to its id \\(blake3 of its uncompressed bytes\\)"),
]


@pytest.mark.parametrize("opener", OPENERS, ids=["inflate", "check"])
@pytest.mark.parametrize("split", SPLITS[:2], ids=["whole", "pieces"])
@pytest.mark.parametrize(("case", "blob_id", "frame", "message"), BAD_FRAMES,
                         ids=[c[0] for c in BAD_FRAMES])
def test_each_bad_frame_is_refused_with_one_clear_error(
        opener: Opener, split: Callable[[bytes], Pieces], case: str, blob_id: bytes,
        frame: bytes, message: str) -> None:
    with pytest.raises(BlobVerifyError, match=message) as caught:
        opener(blob_id, split(frame), MAX)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"chunk {blob_id.hex()[:16]}: ")


def test_a_corrupted_body_never_passes() -> None:
    """A flipped byte anywhere past the header: zstd refuses it or the content's hash does."""
    for at in range(4, len(FRAME), max(1, len(FRAME) // 50)):
        with pytest.raises(BlobVerifyError, match="not a valid zstd frame|does not hash"):
            inflate_frame(ID, _flip(FRAME, at), MAX)


def test_inflating_stops_one_byte_past_the_bound() -> None:
    """A bomb costs at most max_size + 1 bytes of output, whatever it would inflate to."""
    bomb = zstd.compress(bytes(1 << 26), level=3)  # 64 MiB of zeros in a few KiB
    seen: list[int] = []

    def reading() -> Iterator[bytes]:
        for piece in _pieces(bomb, 256):
            seen.append(len(piece))
            yield piece

    with pytest.raises(BlobVerifyError, match="more than"):
        check_frame(blake3.blake3(b"").digest(), reading(), MAX)
    assert sum(seen) < len(bomb)  # refused before the whole frame was even read


def test_deltas_are_checked_by_digest_and_length() -> None:
    patch = os.urandom(5000)
    pid = blake3.blake3(patch).digest()
    check_digest(pid, patch)
    check_digest(pid, _pieces(patch, 700), size=len(patch))
    cases = [("corrupted", _flip(patch, 100), None, "does not hash to its id \\(blake3 of its "
              "bytes\\)"),
             ("truncated", patch[:-1], len(patch), f"wrong length: {len(patch) - 1} bytes, "
              f"expected {len(patch)}"),
             ("wrong id", b"another patch", None, "does not hash to its id")]
    for _, data, size, message in cases:
        with pytest.raises(BlobVerifyError, match=message) as caught:
            check_digest(pid, data, size=size)
        assert str(caught.value).startswith(f"delta {pid.hex()[:16]}: ")


def test_blob_ids() -> None:
    raw = bytes(range(BLOB_ID_LEN))
    assert blob_hex(raw) == raw.hex() and blob_hex(raw.hex()) == raw.hex()
    assert is_blob_hex(raw.hex()) and not is_blob_hex(raw.hex().upper())
    for bad in (raw[:-1], raw.hex()[:-1], raw.hex() + "\n", "g" * 64, raw.hex().upper()):
        assert not is_blob_hex(bad)
        with pytest.raises(ValueError):
            blob_hex(bad)
    assert not is_blob_hex(None) and not is_blob_hex(raw)


def test_atomic_writes_and_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]
    (tmp_path / f"{TEMP_PREFIX}blob-crashed").write_bytes(b"half")
    remove_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]
    with pytest.raises(FileNotFoundError):  # a failed write leaves nothing behind
        write_atomically(tmp_path / "missing-dir" / "blob", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob"]
