"""Ed25519 release signatures (the operator's key; the coordinator never holds it)."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import blake3
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from mesh.release._codec import (
    decode_manifest,
    decode_pin,
    decode_signed_manifest,
    encode_manifest,
    encode_pin,
)
from mesh.release._model import (
    ReleaseError,
    ReleaseManifest,
    ReleasePin,
    SignedManifest,
    SignedPin,
    VerificationError,
)
from mesh.release._platform import for_platform, missing_platform
from vpn import write_private_file

# Domain separation: a signature over a manifest can never pass as one over a pin, or over
# anything else signed with the same key.
_MANIFEST_CONTEXT: Final = b"fleetmesh release manifest v1\x00"
_PIN_CONTEXT: Final = b"fleetmesh release pin v1\x00"
_KEY_FILE_HEADER: Final = "fleetmesh-release-signing-key-v1"
# How long a rollback pin is good for by default: long enough for devices that are offline a
# few days to take it, short enough that a coordinator cannot keep it for a later replay.
DEFAULT_PIN_LIFETIME: Final = 7 * 86400


def key_id(public_key: VerifyKey | bytes) -> str:
    """A short name for a public key: the first 8 bytes of its blake3 hash, in hex."""
    raw = bytes(public_key)
    return blake3.blake3(raw).digest()[:8].hex()


def key_fingerprint(public_key: VerifyKey | bytes) -> str:
    """What an enrollment token carries to name the fleet's release key: the whole blake3 hash
    of the public key, in hex (64 digits). Unlike `key_id` (8 bytes, a label), it is long
    enough that no one can make another key with the same fingerprint."""
    return blake3.blake3(bytes(public_key)).hexdigest()


def sign_manifest(manifest: ReleaseManifest, signing_key: SigningKey) -> SignedManifest:
    data = encode_manifest(manifest)
    signature = signing_key.sign(_MANIFEST_CONTEXT + data).signature
    return SignedManifest(data, signature, key_id(signing_key.verify_key))


def new_pin(fleet: str, app: str, version: int, device: str | None = None, *, now: float,
            lifetime: int = DEFAULT_PIN_LIFETIME) -> ReleasePin:
    """A pin signed at `now` (Unix seconds): its serial is `now` in microseconds (so a pin
    signed later has a larger one), it expires `lifetime` seconds later."""
    if lifetime < 1:
        raise ValueError("a pin's lifetime is at least 1 s")
    return ReleasePin(fleet, app, version, device, serial=int(now * 1_000_000),
                      expires_at=int(now) + lifetime)


def sign_pin(pin: ReleasePin, signing_key: SigningKey) -> SignedPin:
    data = encode_pin(pin)
    signature = signing_key.sign(_PIN_CONTEXT + data).signature
    return SignedPin(data, signature, key_id(signing_key.verify_key))


def _check(context: bytes, data: bytes, signature: bytes, kid: str,
           public_key: VerifyKey) -> None:
    if kid != key_id(public_key):
        raise VerificationError(f"signed by key {kid}, expected {key_id(public_key)}")
    try:
        public_key.verify(context + data, signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        raise VerificationError("bad signature") from None


def verify_pin(signed: SignedPin, public_key: VerifyKey | bytes) -> ReleasePin:
    key = _verify_key(public_key)
    _check(_PIN_CONTEXT, signed.pin, signed.signature, signed.key_id, key)
    return decode_pin(signed.pin)


def verify_manifest(signed: SignedManifest, pinned_public_key: VerifyKey | bytes,
                    running_version: int | None, *, pins: Sequence[SignedPin] = (),
                    device: str | None = None, fleet: str | None = None,
                    app: str | None = None) -> ReleaseManifest:
    """The manifest, if the pinned key signed it and it may replace `running_version`.

    A version not newer than the running one is a replay or a rollback and is refused, unless
    one of `pins`, signed by the same key, names exactly this fleet, app and version (and this
    `device`, or no device). `fleet`/`app`, when given, must match the manifest's.
    """
    key = _verify_key(pinned_public_key)
    _check(_MANIFEST_CONTEXT, signed.manifest, signed.signature, signed.key_id, key)
    manifest = decode_manifest(signed.manifest)
    if fleet is not None and manifest.fleet != fleet:
        raise VerificationError(f"release is for fleet {manifest.fleet!r}, not {fleet!r}")
    if app is not None and manifest.app != app:
        raise VerificationError(f"release is for app {manifest.app!r}, not {app!r}")
    admit_release(manifest, key, running_version, pins=pins, device=device)
    return manifest


@dataclass(frozen=True, slots=True)
class VerifiedRelease:
    """A signed manifest whose signature the fleet's pinned key has checked, and its contents.

    What a process passes on instead of manifest bytes, so that bytes are decoded and verified
    once where they arrive (gossip, the coordinator, the journal read back from disk) and every
    later consumer (blob exchange, the applier, the image rebuild) trusts the object. Only
    `verify_release` makes one. `encoded` is the signed manifest as received: what is stored,
    forwarded to peers and verified again when read back from disk.

    Verified for a device's platform (`verify_release(platform=...)`), `manifest` is the
    release as that device sees it: its platform's image only (`for_platform`), so the blob
    exchange, the applier and the rebuild never see another platform's layers. A release
    without that platform keeps no image (`image_config` empty, no layers) and says why in
    `platform_error`; it is still gossiped (`encoded` is the whole signed manifest).
    """

    manifest: ReleaseManifest
    encoded: bytes
    key_id: str
    platform_error: str = ""


def verify_release(encoded: bytes, pinned_public_key: VerifyKey | bytes,
                   running_version: int | None = None, *, pins: Sequence[SignedPin] = (),
                   device: str | None = None, fleet: str | None = None,
                   app: str | None = None, platform: str | None = None) -> VerifiedRelease:
    """Decode and verify an encoded signed manifest (as `verify_manifest`), once; with
    `platform`, narrowed to that platform's image (VerifiedRelease)."""
    signed = decode_signed_manifest(encoded)
    manifest = verify_manifest(signed, pinned_public_key, running_version, pins=pins,
                               device=device, fleet=fleet, app=app)
    if platform is None:
        return VerifiedRelease(manifest, encoded, signed.key_id)
    narrowed = for_platform(manifest, platform)
    if narrowed is None:
        return VerifiedRelease(
            replace(manifest, image_config=b"", layers=(), platform="", more_images=()),
            encoded, signed.key_id, missing_platform(manifest, platform))
    return VerifiedRelease(narrowed, encoded, signed.key_id)


def admit_release(manifest: ReleaseManifest, pinned_public_key: VerifyKey | bytes,
                  running_version: int | None, *, pins: Sequence[SignedPin] = (),
                  device: str | None = None, newest_accepted: int | None = None,
                  now: float | None = None, min_pin_serial: int = 0) -> ReleasePin | None:
    """Refuse (VerificationError) a verified manifest that may not replace `running_version`;
    return the pin that admitted it, None if it needed none.

    A version not newer than the running one, or older than `newest_accepted` (the newest
    version the device ever accepted for the app: its high-water mark, which holds also while
    nothing runs), is a replay or a rollback, allowed only when one of `pins`, signed by the
    same key, names exactly this fleet, app and version (and `device`, or no device), has not
    expired at `now` (Unix seconds; the wall clock if None) and has a serial of at least
    `min_pin_serial` (what the device derives from the newest pin it acted on: an older pin,
    or a spent one, is a replay). Cheap: the manifest's own signature is not checked again.
    """
    newer = running_version is None or manifest.version > running_version
    if newer and (newest_accepted is None or manifest.version >= newest_accepted):
        return None
    key = _verify_key(pinned_public_key)
    at = time.time() if now is None else now
    why = "no pin names it"
    for signed_pin in pins:
        try:
            pin = verify_pin(signed_pin, key)
        except ReleaseError:
            continue
        if ((pin.fleet, pin.app, pin.version) != (manifest.fleet, manifest.app,
                                                   manifest.version)
                or pin.device not in (None, device)):
            continue
        if pin.expires_at <= at:
            why = f"its pin expired at {pin.expires_at} (Unix time)"
        elif pin.serial < min_pin_serial:
            why = (f"its pin (serial {pin.serial}) is spent or older than the newest pin this "
                   f"device acted on")
        else:
            return pin
    if not newer:
        raise VerificationError(
            f"version {manifest.version} is not newer than running version {running_version}"
            f" and {why}")
    raise VerificationError(
        f"version {manifest.version} is older than version {newest_accepted}, the newest this"
        f" device accepted, and {why}")


def _verify_key(key: VerifyKey | bytes) -> VerifyKey:
    return key if isinstance(key, VerifyKey) else VerifyKey(key)


def write_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Generate a release key and write it to a new file readable by its owner only (0600)."""
    key = SigningKey.generate()
    text = f"{_KEY_FILE_HEADER}\n{bytes(key).hex()}\n".encode()
    # Never overwrite an existing key (FileExistsError); whole or absent after a crash, and
    # durable (file and directory fsynced): losing it means re-keying the fleet.
    write_private_file(path, text, exclusive=True)
    return key


def read_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """The key in `path`; refuses files that others can read (like ssh does)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"cannot read key file {p}: {getattr(exc, 'strerror', exc)}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ReleaseError(f"key file {p} is accessible by others (mode "
                           f"{stat.S_IMODE(mode):o}); chmod 600 it")
    lines = text.split()
    if len(lines) != 2 or lines[0] != _KEY_FILE_HEADER:
        raise ReleaseError(f"{p} is not a fleetmesh release key file")
    try:
        seed = bytes.fromhex(lines[1])
        if len(seed) != 32:
            raise ValueError
        return SigningKey(seed)
    except ValueError:
        raise ReleaseError(f"{p} holds a malformed key") from None
