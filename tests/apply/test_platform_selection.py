"""A device's platform picks what it fetches: the engine says which (else this host), every
release is verified narrowed to it, and the blobs wanted are that platform's image's alone
(docs/releases.md, "Several platforms")."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from agent import ApplySettings, CoordinatorLink, GossipSettings, ReleaseSync, release_verifier
from agent._release_sync import host_platform
from mesh.node import wanted_blobs
from mesh.release import (
    PlatformImage,
    decode_manifest,
    decode_signed_manifest,
    encode_signed_manifest,
    sign_manifest,
)
from tests.agent.fakes import KEYS

from ._fake import Clock, FakeEngine, Releases
from .test_agent_apply import AppCoordinator, device


def _two_platforms(releases: Releases, version: int) -> bytes:
    """A release of amd64 and arm64 images with different layers, signed."""
    amd = decode_manifest(decode_signed_manifest(releases.make(version)).manifest)
    arm = decode_manifest(decode_signed_manifest(
        releases.make(version, arch="arm64", payload=3000)).manifest)
    both = dataclasses.replace(amd, platform="linux/amd64", more_images=(
        PlatformImage("linux/arm64", arm.image_config, arm.layers),))
    return encode_signed_manifest(sign_manifest(both, releases.key))


def _sync(tmp: Path, releases: Releases, engine: FakeEngine, logs: list[str]) -> ReleaseSync:
    data = device(tmp, releases.key_hex)
    identity = data.read_identity()
    link = CoordinatorLink(identity, AppCoordinator().factory, hub_up=lambda: False,
                           log=logs.append)
    settings = GossipSettings(apply=ApplySettings(engine_factory=lambda: engine))
    return ReleaseSync(data.path, identity.enrollment, KEYS[0].public, 51820, link, settings,
                       peers=dict, log=logs.append, rng=random.Random(1))


def test_the_engine_names_the_platform_else_this_host(tmp_path: Path) -> None:
    releases = Releases(tmp_path / "dev")
    engine = FakeEngine(Clock(), platform_="linux/arm/v7")
    logs: list[str] = []
    sync = _sync(tmp_path, releases, engine, logs)
    assert sync.platform == host_platform()
    settings = sync.settings.apply
    assert settings is not None
    assert sync._engine_platform(settings) == "linux/arm/v7"
    engine.down = True
    assert sync._engine_platform(settings) == host_platform()
    assert any("platform: the Docker engine did not say" in m for m in logs)


def test_blobs_wanted_are_the_device_platform_s_only(tmp_path: Path) -> None:
    releases = Releases(tmp_path / "dev")
    signed = _two_platforms(releases, 2)
    whole = decode_manifest(decode_signed_manifest(signed).manifest)
    by_platform = {image.platform: {c.id for layer in image.layers for c in layer.chunks}
                   for image in (PlatformImage("linux/amd64", whole.image_config, whole.layers),
                                 *whole.more_images)}
    assert not by_platform["linux/amd64"] & by_platform["linux/arm64"]
    for platform, ids in by_platform.items():
        verify = release_verifier(releases.key_hex, "cams", platform)
        assert verify is not None
        release = verify(signed)
        wanted = wanted_blobs(release.manifest, frozenset(), lambda _: False)
        assert set(wanted) == ids, platform
        assert release.encoded == signed  # gossiped whole: other platforms' devices need it
    verify = release_verifier(releases.key_hex, "cams", "linux/arm/v7")
    assert verify is not None
    none = verify(signed)
    assert wanted_blobs(none.manifest, frozenset(), lambda _: False) == {}
    assert none.platform_error == ("release 2 has no image for linux/arm/v7 "
                                   "(has linux/amd64, linux/arm64)")


def test_an_older_target_is_verified_for_the_platform_too(tmp_path: Path) -> None:
    from mesh.control import DeviceTarget
    releases = Releases(tmp_path / "dev")
    sync = _sync(tmp_path, releases, FakeEngine(Clock()), [])
    sync.platform = "linux/arm64"
    release = sync._verify(DeviceTarget("web", 2), _two_platforms(releases, 2))
    assert release is not None and release.platform_error == ""
    assert release.manifest.image_config == decode_manifest(decode_signed_manifest(
        releases.make(2, arch="arm64", payload=3000)).manifest).image_config
