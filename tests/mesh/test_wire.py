"""mesh.wire: round trips, limits, and fuzzing (only WireError ever escapes)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.wire import (
    MAX_BODY,
    Ack,
    BlobData,
    BlobError,
    BlobRequest,
    Digest,
    FrameDecoder,
    Gossip,
    Have,
    ManifestRequest,
    MemberState,
    Ping,
    PingReq,
    PushPull,
    ReleaseKey,
    Rumor,
    Status,
    WireError,
    decode,
    decode_frame,
    encode,
)

M = MemberState("dev-1", 7, Status.SUSPECT, "100.64.0.7")
K = ReleaseKey("fleet", "app", 3)
BID = bytes(range(32))
SAMPLES = [
    Ping(1, "a", (M,)), PingReq(2, "a", "b", ()), Ack(3, "b", (M, M)), Gossip("c", (M,)),
    PushPull("a", (M,), False), PushPull("a", (), True), Rumor((b"x" * 100, b"")),
    Digest((K,)), ManifestRequest((K, K)), Have(K, (BID, BID)),
    BlobRequest(9, BID, 0, 1 << 20), BlobData(9, BID, 4096, b"d" * 1000, True),
    BlobError(9, "no such blob"),
]
FRAMES = [encode(m) for m in SAMPLES]
FUZZ = settings(max_examples=2500, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: wire.Message) -> None:
    frame = encode(msg)
    assert decode_frame(frame) == msg
    assert FrameDecoder().feed(frame) == [msg]
    assert wire.frame_size(msg) == len(frame)


def test_stream_split_anywhere_and_batched() -> None:
    stream = b"".join(FRAMES)
    for cut in range(0, len(stream), 37):
        d = FrameDecoder()
        assert d.feed(stream[:cut]) + d.feed(stream[cut:]) == SAMPLES
    d = FrameDecoder()
    out = []
    for b in stream:
        out += d.feed(bytes([b]))
    assert out == SAMPLES and d.buffered == 0


@pytest.mark.parametrize("obj", [
    [99, 1],  # unknown type
    [1, 1, "a"],  # wrong arity
    [1, -1, "a", []],  # negative seq
    [1, True, "a", []],  # bool for int
    [1, 1.0, "a", []],  # float for int
    [1, 1, "a" * 64, []],  # node id too long
    [1, 1, "", []],  # empty node id
    [1, 1, "a", [["b", 0, 3, "x"]]],  # unknown status
    [1, 1, "a", [["b", 0, 0, "x"]] * 65],  # too many updates
    [9, ["f", "a", 1], [b"short"]],  # blob id not 32 bytes
    [10, 1, BID, 0, (1 << 20) + 1],  # piece too long
    [7, [["f", "a", -1]]],  # negative version
    [6, ["not bytes"]],
    [11, 1, BID, 0, b"", 1],  # int for bool
    "not an array",
])
def test_malformed_refused(obj: object) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(WireError):
        decode(body)


def test_non_canonical_and_trailing_garbage() -> None:
    good = wire.encode_body(Ping(1, "a"))
    with pytest.raises(WireError):
        decode(good + b"\x00")  # trailing bytes
    # seq 1 as uint32 instead of a positive fixint
    with pytest.raises(WireError):
        decode(b"\x94\x01\xce\x00\x00\x00\x01\xa1a\x90")
    # "a" as str8 instead of fixstr
    with pytest.raises(WireError):
        decode(b"\x94\x01\x01\xd9\x01a\x90")
    assert decode(b"\x94\x01\x01\xa1a\x90") == Ping(1, "a")


def test_oversized_prefix_refused_before_buffering() -> None:
    d = FrameDecoder()
    with pytest.raises(WireError):
        d.feed(struct.pack(">I", MAX_BODY + 1) + b"\x00" * 65536)
    assert d.buffered == 0 and d.closed
    with pytest.raises(WireError):
        d.feed(b"")
    d = FrameDecoder()
    with pytest.raises(WireError):
        d.feed(b"\xff\xff\xff\xff")  # 4 GiB announced: refused on the prefix alone
    assert d.buffered == 0


def test_bad_frame_keeps_stream_in_step() -> None:
    bad_body = msgpack.packb([99], use_bin_type=True)
    bad = struct.pack(">I", len(bad_body)) + bad_body
    d = FrameDecoder()
    with pytest.raises(WireError):
        d.feed(FRAMES[0] + bad + FRAMES[1])
    assert d.feed(FRAMES[2]) == [SAMPLES[0], SAMPLES[1], SAMPLES[2]]


def test_encode_refuses_what_a_peer_would_refuse() -> None:
    with pytest.raises(WireError):
        encode(Ping(1, "x" * 100))
    with pytest.raises(WireError):
        encode(BlobData(1, BID, 0, b"x" * (MAX_BODY + 1), True))


def _feed_only_wire_error(data: bytes) -> None:
    d = FrameDecoder()
    try:
        d.feed(data)
    except WireError:
        pass
    try:
        decode(data)
    except WireError:
        pass
    try:
        decode_frame(data)
    except WireError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _feed_only_wire_error(data)


@FUZZ
@given(st.sampled_from(FRAMES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                          min_size=1, max_size=6))
def test_fuzz_mutated_frames(frame: bytes, edits: list[tuple[int, int]]) -> None:
    buf = bytearray(frame)
    for pos, val in edits:
        buf[pos % len(buf)] = val
    _feed_only_wire_error(bytes(buf))


@FUZZ
@given(st.sampled_from(FRAMES), st.integers(0, 2000), st.integers(0, 2000), st.binary(max_size=20))
def test_fuzz_truncated_and_spliced(frame: bytes, cut: int, at: int, junk: bytes) -> None:
    body = frame[4:]
    cut %= len(body) + 1
    at %= len(body) + 1
    for b in (body[:cut], body[:at] + junk + body[at:], body[cut:]):
        _feed_only_wire_error(struct.pack(">I", len(b)) + b)


_leaf = (st.integers(-(1 << 63), (1 << 64) - 1) | st.booleans() | st.none() | st.text(max_size=70)
         | st.binary(max_size=40) | st.floats(allow_nan=False))
_tree = st.recursive(_leaf, lambda c: st.lists(c, max_size=6), max_leaves=20)


@FUZZ
@given(st.integers(0, 14), st.lists(_tree, max_size=6))
def test_fuzz_structured(tag: int, fields: list[object]) -> None:
    body = msgpack.packb([tag, *fields], use_bin_type=True)
    _feed_only_wire_error(struct.pack(">I", len(body)) + body)
