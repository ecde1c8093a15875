"""OCI platform strings (`os/arch[/variant]`): parsing, normalising, and an image's own.

A release may carry one image per platform (docs/releases.md, "Several platforms"); a device
runs the image whose platform equals its own after normalisation. Normalisation follows
containerd's `platforms.Normalize`: kernel machine names become Go's GOARCH names (x86_64 ->
amd64, aarch64 -> arm64, armv7l -> arm/v7), arm64's default variant v8 is dropped, and arm
without a variant is arm/v7.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Final

from mesh.release._model import Layer, ManifestError, PlatformImage, ReleaseManifest

MAX_PLATFORM: Final = 64  # "linux/arm64/v8" is 14 characters
_PART: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,19}\Z")

# `uname -m` (and some engines' Arch) -> (GOARCH, variant)
_MACHINES: Final[dict[str, tuple[str, str]]] = {
    "x86_64": ("amd64", ""), "x86-64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""), "arm64": ("arm64", ""), "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"), "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"), "armv6": ("arm", "v6"), "armel": ("arm", "v6"),
    "armv5tel": ("arm", "v5"), "i386": ("386", ""), "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
}


def normalize_platform(os: str, arch: str, variant: str = "") -> str:
    """The canonical `os/arch[/variant]` for these parts; ManifestError if one is malformed."""
    os, arch, variant = os.lower(), arch.lower(), variant.lower()
    if arch in _MACHINES:
        arch, implied = _MACHINES[arch]
        variant = variant or implied
    if arch == "arm64" and variant in ("v8", "8"):
        variant = ""
    if arch == "arm" and not variant:
        variant = "v7"
    if variant.isdigit():
        variant = "v" + variant
    for what, part in (("os", os), ("architecture", arch)):
        if not _PART.match(part):
            raise ManifestError(f"platform {what} {part!r} is not a valid name")
    if variant and not _PART.match(variant):
        raise ManifestError(f"platform variant {variant!r} is not a valid name")
    return f"{os}/{arch}/{variant}" if variant else f"{os}/{arch}"


def parse_platform(text: str) -> str:
    """`text` (`os/arch[/variant]`) in its canonical form; ManifestError if malformed."""
    if not isinstance(text, str) or len(text) > MAX_PLATFORM:
        raise ManifestError(f"a platform is a string of at most {MAX_PLATFORM} characters")
    parts = text.split("/")
    if len(parts) not in (2, 3):
        raise ManifestError(f"platform {text!r} is not os/arch[/variant] "
                            "(e.g. linux/arm64, linux/arm/v7)")
    return normalize_platform(*parts)


def image_platform(image_config: bytes) -> str | None:
    """The platform an image config states (its os, architecture and variant), normalised;
    None if it states none (os or architecture missing)."""
    try:
        config = json.loads(image_config)
    except (ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    os, arch, variant = (config.get(k) for k in ("os", "architecture", "variant"))
    if not isinstance(os, str) or not isinstance(arch, str) or not os or not arch:
        return None
    return normalize_platform(os, arch, variant if isinstance(variant, str) else "")


def machine_platform(machine: str, os: str = "linux") -> str:
    """The platform of a kernel machine name (`uname -m`, e.g. aarch64 -> linux/arm64)."""
    return normalize_platform(os, machine)


def release_images(manifest: ReleaseManifest) -> tuple[PlatformImage, ...]:
    """Every image of a release, the first one first. A one-image manifest's platform is the
    one its config states ("" if it states none: such an image is taken for any platform)."""
    first = manifest.platform or image_platform(manifest.image_config) or ""
    return (PlatformImage(first, manifest.image_config, manifest.layers),
            *manifest.more_images)


def release_platforms(manifest: ReleaseManifest) -> tuple[str, ...]:
    """The platforms a release has an image for ("" for an image stating none)."""
    return tuple(image.platform for image in release_images(manifest))


def all_layers(manifest: ReleaseManifest) -> Iterator[Layer]:
    """The layers of every image of a release (a layer shared by two images comes twice)."""
    for image in release_images(manifest):
        yield from image.layers


def for_platform(manifest: ReleaseManifest, platform: str) -> ReleaseManifest | None:
    """The release as a device of `platform` sees it: one image, that platform's, in
    `image_config` and `layers`; None if the release has none for it. An image stating no
    platform serves every platform."""
    for image in release_images(manifest):
        if image.platform in (platform, ""):
            return dataclasses.replace(manifest, image_config=image.image_config,
                                       layers=image.layers, platform="", more_images=())
    return None


def missing_platform(manifest: ReleaseManifest, platform: str) -> str:
    """The one line a device of `platform` reports for a release without its image."""
    has = ", ".join(p or "any" for p in release_platforms(manifest))
    return (f"release {manifest.version} has no image for {platform} (has {has})")
