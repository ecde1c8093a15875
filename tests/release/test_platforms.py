"""Several platforms per release: platform strings, the /3 manifest format and its limits, and
the narrowing a device does (docs/releases.md, "Several platforms")."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from mesh.release import (
    MAX_PLATFORMS,
    ChunkRef,
    Layer,
    ManifestError,
    PlatformImage,
    ReleaseManifest,
    all_layers,
    decode_manifest,
    encode_manifest,
    encode_signed_manifest,
    for_platform,
    image_platform,
    machine_platform,
    parse_platform,
    release_platforms,
    sign_manifest,
    verify_release,
)

from .test_manifest_codec import _containers, _layers, _names

KEY = SigningKey(b"\x09" * 32)

_PLATFORMS = ["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6", "linux/386",
              "linux/ppc64le", "linux/s390x", "linux/riscv64", "windows/amd64"]


def _config(platform: str) -> bytes:
    os, arch, *variant = platform.split("/")
    body: dict[str, object] = {"os": os, "architecture": arch, "rootfs": {"diff_ids": []}}
    if variant:
        body["variant"] = variant[0]
    return json.dumps(body, sort_keys=True).encode()


def _layer(n: int) -> Layer:
    return Layer("sha256:" + f"{n:02x}" * 32, 5, (ChunkRef(bytes([n]) * 32, 5, 9),))


def _multi(*platforms: str) -> ReleaseManifest:
    first, *rest = platforms
    return ReleaseManifest(
        "fleet1", "app", 3, 1_700_000_000, _config(first), (_layer(1),), platform=first,
        more_images=tuple(PlatformImage(p, _config(p), (_layer(10 + i),))
                          for i, p in enumerate(rest)))


@pytest.mark.parametrize(("text", "canonical"), [
    ("linux/amd64", "linux/amd64"), ("linux/x86_64", "linux/amd64"),
    ("linux/aarch64", "linux/arm64"), ("linux/arm64/v8", "linux/arm64"),
    ("linux/arm", "linux/arm/v7"), ("linux/armv7l", "linux/arm/v7"),
    ("linux/arm/7", "linux/arm/v7"), ("Linux/ARM64", "linux/arm64"),
    ("linux/arm/v6", "linux/arm/v6"),
])
def test_platform_strings_are_normalised(text: str, canonical: str) -> None:
    assert parse_platform(text) == canonical


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "linux/amd64/v1/x", "a b/c",
                                  "linux/" + "x" * 70])
def test_malformed_platform_strings_are_refused(text: str) -> None:
    with pytest.raises(ManifestError):
        parse_platform(text)


def test_machine_names() -> None:
    assert machine_platform("x86_64") == "linux/amd64"
    assert machine_platform("aarch64") == "linux/arm64"
    assert machine_platform("armv7l") == "linux/arm/v7"
    assert machine_platform("armv6l") == "linux/arm/v6"


def test_image_platform_reads_the_config() -> None:
    assert image_platform(_config("linux/arm/v7")) == "linux/arm/v7"
    assert image_platform(b'{"os":"linux","architecture":"arm64","variant":"v8"}') == \
        "linux/arm64"
    assert image_platform(b'{"a":1}') is None
    assert image_platform(b"not json") is None
    assert image_platform(b"[1]") is None


@st.composite
def _multi_manifests(draw: st.DrawFn) -> ReleaseManifest:
    platforms = draw(st.lists(st.sampled_from(_PLATFORMS), min_size=2, max_size=MAX_PLATFORMS,
                              unique=True))
    images = [PlatformImage(p, _config(p), tuple(draw(st.lists(_layers(), max_size=2))))
              for p in platforms]
    return ReleaseManifest(
        draw(_names), draw(_names), draw(st.integers(1, 2**62)), draw(st.integers(0, 2**40)),
        images[0].image_config, images[0].layers, draw(_containers),
        platform=images[0].platform, more_images=tuple(images[1:]))


@settings(max_examples=60, deadline=None)
@given(_multi_manifests())
def test_multi_platform_round_trip(manifest: ReleaseManifest) -> None:
    data = encode_manifest(manifest)
    assert decode_manifest(data) == manifest
    assert msgpack.unpackb(data)[0] == "fleetmesh.release/3"
    assert release_platforms(manifest)[0] == manifest.platform
    for platform in release_platforms(manifest):
        narrowed = for_platform(manifest, platform)
        assert narrowed is not None
        assert narrowed.image_config == _config(platform)


@settings(max_examples=60, deadline=None)
@given(_multi_manifests(), st.data())
def test_mutated_multi_platform_encodings_decode_or_raise(manifest: ReleaseManifest,
                                                          data: st.DataObject) -> None:
    raw = bytearray(encode_manifest(manifest))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_manifest(bytes(raw))
    except ManifestError:
        return
    assert encode_manifest(decoded) == bytes(raw)


def test_one_image_is_still_format_2_and_its_platform_comes_from_its_config() -> None:
    single = ReleaseManifest("fleet1", "app", 1, 0, _config("linux/arm64"), (_layer(1),))
    data = encode_manifest(single)
    assert msgpack.unpackb(data)[0] == "fleetmesh.release/2"
    assert decode_manifest(data) == single
    assert release_platforms(single) == ("linux/arm64",)
    assert for_platform(single, "linux/amd64") is None
    assert for_platform(single, "linux/arm64") == single
    # an image whose config states no platform is taken for any (the format before platforms)
    anywhere = ReleaseManifest("fleet1", "app", 1, 0, b'{"a":1}', (_layer(1),))
    assert release_platforms(anywhere) == ("",)
    assert for_platform(anywhere, "linux/arm/v7") == anywhere


def _raw(manifest: ReleaseManifest) -> list[object]:
    obj: list[object] = msgpack.unpackb(encode_manifest(manifest))
    return obj


def _refused(obj: object, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        decode_manifest(msgpack.packb(obj, use_bin_type=True))


def test_limits_and_consistency() -> None:
    good = _raw(_multi("linux/amd64", "linux/arm64"))
    more = good[9]
    assert isinstance(more, list)
    # the same platform twice
    _refused(good[:9] + [[more[0], ["linux/amd64", _config("linux/amd64"), []]]],
             "more than one image")
    # a platform whose config says otherwise
    _refused(good[:9] + [[["linux/arm/v7", _config("linux/arm64"), []]]],
             "has a config for linux/arm64")
    _refused(good[:8] + ["linux/arm64"] + good[9:], "has a config for linux/amd64")
    # a non-canonical platform string
    _refused(good[:9] + [[["linux/aarch64", _config("linux/arm64"), []]]], "canonical")
    # /3 with a single image
    _refused(good[:9] + [[]], "more than one image")
    # more platforms than the limit
    extra = [[p, _config(p), []] for p in _PLATFORMS[1:]]
    assert len(extra) + 1 > MAX_PLATFORMS
    _refused(good[:9] + [extra], "more than")
    with pytest.raises(ManifestError):
        encode_manifest(_multi(*_PLATFORMS))


def test_all_layers_and_narrowing() -> None:
    m = _multi("linux/amd64", "linux/arm64", "linux/arm/v7")
    assert [layer.diff_id for layer in all_layers(m)] == [
        _layer(1).diff_id, _layer(10).diff_id, _layer(11).diff_id]
    arm = for_platform(m, "linux/arm64")
    assert arm is not None
    assert arm.layers == (_layer(10),) and arm.more_images == () and arm.platform == ""
    assert for_platform(m, "linux/riscv64") is None


def test_verify_release_narrows_to_the_device_platform() -> None:
    m = _multi("linux/amd64", "linux/arm64")
    encoded = encode_signed_manifest(sign_manifest(m, KEY))
    whole = verify_release(encoded, KEY.verify_key)
    assert whole.manifest == m and whole.platform_error == ""
    arm = verify_release(encoded, KEY.verify_key, platform="linux/arm64")
    assert arm.manifest.layers == (_layer(10),)
    assert arm.encoded == encoded  # what is gossiped is the whole signed manifest
    missing = verify_release(encoded, KEY.verify_key, platform="linux/arm/v7")
    assert missing.manifest.layers == () and missing.manifest.image_config == b""
    assert missing.platform_error == ("release 3 has no image for linux/arm/v7 "
                                      "(has linux/amd64, linux/arm64)")
