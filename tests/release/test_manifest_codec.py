from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.release import (
    ChunkRef,
    ContainerSettings,
    HealthCheck,
    Layer,
    LayerDelta,
    ManifestError,
    ReleaseManifest,
    RestartPolicy,
    UpdateStrategy,
    Volume,
    decode_manifest,
    decode_signed_manifest,
    encode_manifest,
)

_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
_text = st.text(max_size=30)
_digest = st.binary(min_size=32, max_size=32)
_diff_ids = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
_sizes = st.integers(0, 10**9)


@st.composite
def _layers(draw: st.DrawFn) -> Layer:
    chunks = tuple(draw(st.lists(st.builds(ChunkRef, _digest, _sizes, _sizes), max_size=4)))
    deltas = tuple(draw(st.lists(st.builds(LayerDelta, _diff_ids, _digest, _sizes,
                                           st.sampled_from(["HDIFF", "TAR_MEMBERS"])),
                                 max_size=3)))
    return Layer(draw(_diff_ids), sum(c.size for c in chunks), chunks, deltas)


_floats = st.floats(0, 1e6, allow_nan=False)
_containers = st.builds(
    ContainerSettings,
    command=st.lists(_text, max_size=4).map(tuple),
    environment=st.lists(st.tuples(_text, _text), max_size=4).map(tuple),
    restart_policy=st.sampled_from(list(RestartPolicy)),
    health_check=st.none() | st.builds(HealthCheck, st.lists(_text, max_size=3).map(tuple),
                                       _floats, _floats, st.integers(0, 10), _floats),
    update_strategy=st.sampled_from(list(UpdateStrategy)),
    volumes=st.lists(st.builds(Volume, _text, _text, st.booleans()), max_size=3).map(tuple),
)
manifests = st.builds(
    ReleaseManifest, fleet=_names, app=_names, version=st.integers(1, 2**62),
    created_at=st.integers(0, 2**40), image_config=st.binary(max_size=200),
    layers=st.lists(_layers(), max_size=3).map(tuple), container=_containers)


@settings(max_examples=60, deadline=None)
@given(manifests)
def test_round_trip(manifest: ReleaseManifest) -> None:
    data = encode_manifest(manifest)
    assert decode_manifest(data) == manifest
    assert encode_manifest(decode_manifest(data)) == data


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_leak_msgpack_errors(data: bytes) -> None:
    try:
        decode_manifest(data)
    except ManifestError:
        pass
    try:
        decode_signed_manifest(data)
    except ManifestError:
        pass


@settings(max_examples=100, deadline=None)
@given(manifests, st.data())
def test_mutated_encodings_decode_or_raise_manifest_error(manifest: ReleaseManifest,
                                                          data: st.DataObject) -> None:
    raw = bytearray(encode_manifest(manifest))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decoded = decode_manifest(bytes(raw[:cut]))
    except ManifestError:
        return
    assert encode_manifest(decoded) == bytes(raw[:cut])  # only canonical input is accepted


def _sample() -> ReleaseManifest:
    return ReleaseManifest("fleet1", "app", 3, 1_700_000_000, b'{"a":1}',
                           (Layer("sha256:" + "ab" * 32, 5, (ChunkRef(b"\1" * 32, 5, 9),)),))


@pytest.mark.parametrize("obj", [
    [], {"fleet": "x"}, ["fleetmesh.release/1"], "string", 17,
    ["fleetmesh.release/1", "f", "a", 0, 0, b"", [], [[], [], "no", None, "stop-then-start", []]],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], [[], [], "no", None, "stop-then-start", []]],
    ["fleetmesh.release/1", "f", "a", 1, 0, b"", [["sha256:xyz", 0, [], []]],
     [[], [], "no", None, "stop-then-start", []]],
    ["fleetmesh.release/1", "f", "a", 1, 0, b"", [], [[], [], "maybe", None, "stop-then-start",
                                                    []]],
    ["fleetmesh.release/1", "../f", "a", 1, 0, b"", [], [[], [], "no", None, "stop-then-start",
                                                       []]],
])
def test_rejects_malformed(obj: object) -> None:
    with pytest.raises(ManifestError):
        decode_manifest(msgpack.packb(obj, use_bin_type=True))


def test_rejects_non_canonical_and_trailing_bytes() -> None:
    data = encode_manifest(_sample())
    with pytest.raises(ManifestError):
        decode_manifest(data + b"\x00")
    obj = msgpack.unpackb(data)
    obj[3] = 3.0  # a float where an integer belongs
    with pytest.raises(ManifestError):
        decode_manifest(msgpack.packb(obj, use_bin_type=True))


def test_rejects_oversized_and_inconsistent() -> None:
    with pytest.raises(ManifestError):
        decode_manifest(b"\x00" * (9 * 1024 * 1024))
    bad = ReleaseManifest("f", "a", 1, 0, b"",
                          (Layer("sha256:" + "00" * 32, 6, (ChunkRef(b"\1" * 32, 5, 9),)),))
    with pytest.raises(ManifestError, match="add up"):
        encode_manifest(bad)
    too_many = ReleaseManifest("f", "a", 1, 0, b"", tuple(
        Layer("sha256:" + "00" * 32, 0, ()) for _ in range(129)))
    with pytest.raises(ManifestError):
        encode_manifest(too_many)
