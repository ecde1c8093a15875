from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.release import (
    ChunkRef,
    ContainerSettings,
    HealthCheck,
    HealthKind,
    Layer,
    LayerDelta,
    ManifestError,
    NetworkMode,
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


_intervals = st.floats(0.1, 3600, allow_nan=False)
_health_checks = (
    st.builds(HealthCheck, st.just(HealthKind.CMD), st.lists(_text, min_size=1, max_size=3)
              .map(tuple), interval_s=_intervals)
    | st.builds(HealthCheck, st.just(HealthKind.TCP), port=st.integers(1, 65535),
                interval_s=_intervals)
    | st.builds(HealthCheck, st.just(HealthKind.HTTP), port=st.integers(1, 65535),
                path=st.from_regex(r"/[a-z0-9/?=&.-]{0,30}", fullmatch=True),
                interval_s=_intervals)
    | st.builds(HealthCheck, st.just(HealthKind.RUNNING), seconds=st.floats(0.01, 86400),
                interval_s=_intervals))
_containers = st.builds(
    ContainerSettings,
    command=st.lists(_text, max_size=4).map(tuple),
    environment=st.lists(st.tuples(_text, _text), max_size=4).map(tuple),
    restart_policy=st.sampled_from(list(RestartPolicy)),
    health_check=st.none() | _health_checks,
    update_strategy=st.sampled_from(list(UpdateStrategy)),
    volumes=st.lists(st.builds(Volume, _text, _text, st.booleans()), max_size=3).map(tuple),
    health_timeout_s=st.floats(1, 86400),
    hand_over_timeout_s=st.floats(0, 86400),
    network=st.just(NetworkMode.HOST),
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


_C = [[], [], "no", None, "download-then-kill", [], 60.0, 60.0, "host"]


def _with(index: int, value: object) -> list[object]:
    return [value if i == index else v for i, v in enumerate(_C)]


@pytest.mark.parametrize("obj", [
    [], {"fleet": "x"}, ["fleetmesh.release/2"], "string", 17,
    ["fleetmesh.release/2", "f", "a", 0, 0, b"", [], _C],
    ["fleetmesh.release/3", "f", "a", 1, 0, b"", [], _C],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [["sha256:xyz", 0, [], []]], _C],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], _with(2, "maybe")],
    ["fleetmesh.release/2", "../f", "a", 1, 0, b"", [], _C],
    # the settings of format 1 (six fields, the old strategy names)
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], [[], [], "no", None, "stop-then-start", []]],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], _with(4, "stop-then-start")],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], _with(8, "bridge")],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], _with(6, 0.0)],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], _with(6, 60)],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], _with(7, 1e6)],
    # health checks: unknown kind, missing or stray fields, bad bounds
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [],
     _with(3, ["exec", [], 0, "/", 0.0, 2.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], _with(3, ["cmd", [], 0, "/", 0.0, 2.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [],
     _with(3, ["cmd", ["true"], 80, "/", 0.0, 2.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [], _with(3, ["tcp", [], 0, "/", 0.0, 2.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [],
     _with(3, ["tcp", [], 70000, "/", 0.0, 2.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [],
     _with(3, ["http", [], 80, "no-slash", 0.0, 2.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [],
     _with(3, ["http", [], 80, "/a b", 0.0, 2.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [],
     _with(3, ["running", [], 0, "/", 0.0, 2.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [],
     _with(3, ["running", [], 0, "/", 5.0, 0.0])],
    ["fleetmesh.release/2", "f", "a", 1, 0, b"", [],
     [[], [], "no", ["tcp", [], 80, "/", 0.0, 2.0], "hand-over", [], 60.0, 60.0, "none"]],
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


def test_format_1_is_refused_with_a_clear_message() -> None:
    old = ["fleetmesh.release/1", "f", "a", 1, 0, b"", [],
           [[], [], "no", None, "stop-then-start", []]]
    with pytest.raises(ManifestError, match="publish the release again"):
        decode_manifest(msgpack.packb(old, use_bin_type=True))


def test_valid_settings_round_trip() -> None:
    settings_ = ContainerSettings(
        health_check=HealthCheck(HealthKind.HTTP, port=8080, path="/health?x=1"),
        update_strategy=UpdateStrategy.HAND_OVER, health_timeout_s=30.0,
        hand_over_timeout_s=5.0, network=NetworkMode.HOST)
    m = ReleaseManifest("f", "a", 1, 0, b"", (), settings_)
    assert decode_manifest(encode_manifest(m)).container == settings_
    none_net = ContainerSettings(health_check=HealthCheck(HealthKind.CMD, ("true",)),
                                 network=NetworkMode.NONE)
    m = ReleaseManifest("f", "a", 1, 0, b"", (), none_net)
    assert decode_manifest(encode_manifest(m)).container == none_net
