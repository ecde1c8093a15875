from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from mesh.release import (
    CHUNK_SIZE,
    Chunk,
    ChunkError,
    ChunkRef,
    Layer,
    ManifestError,
    ReleaseError,
    ReleaseManifest,
    SignedManifest,
    SignedPin,
    VerificationError,
    admit_release,
    assemble,
    chunk_layer,
    decode_signed_manifest,
    encode_signed_manifest,
    new_pin,
    read_signing_key,
    sign_manifest,
    sign_pin,
    verify_manifest,
    verify_release,
    write_signing_key,
)

KEY = SigningKey(b"\x07" * 32)
OTHER = SigningKey(b"\x08" * 32)


def _manifest(version: int = 5) -> ReleaseManifest:
    return ReleaseManifest("fleet1", "web", version, 1_700_000_000, b"{}",
                           (Layer("sha256:" + "cd" * 32, 0, ()),))


def test_sign_and_verify() -> None:
    signed = sign_manifest(_manifest(), KEY)
    wire = encode_signed_manifest(signed)
    assert verify_manifest(decode_signed_manifest(wire), KEY.verify_key, 4) == _manifest()
    assert verify_manifest(signed, bytes(KEY.verify_key), None) == _manifest()


def test_tampered_manifest_rejected() -> None:
    signed = sign_manifest(_manifest(), KEY)
    tampered = signed.manifest.replace(b"web", b"wex")
    with pytest.raises(VerificationError, match="bad signature"):
        verify_manifest(dataclasses.replace(signed, manifest=tampered), KEY.verify_key, None)
    bad_sig = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    with pytest.raises(VerificationError):
        verify_manifest(dataclasses.replace(signed, signature=bad_sig), KEY.verify_key, None)


def test_wrong_key_rejected() -> None:
    signed = sign_manifest(_manifest(), OTHER)
    with pytest.raises(VerificationError, match="signed by key"):
        verify_manifest(signed, KEY.verify_key, None)
    # A forged key id does not help either.
    forged = SignedManifest(signed.manifest, signed.signature, sign_manifest(_manifest(),
                                                                             KEY).key_id)
    with pytest.raises(VerificationError, match="bad signature"):
        verify_manifest(forged, KEY.verify_key, None)


@pytest.mark.parametrize("running", [5, 6, 100])
def test_replayed_or_older_version_rejected(running: int) -> None:
    with pytest.raises(VerificationError, match="not newer"):
        verify_manifest(sign_manifest(_manifest(5), KEY), KEY.verify_key, running)


def _pin(fleet: str, app: str, version: int, device: str | None = None,
         key: SigningKey = KEY) -> SignedPin:
    """A pin signed now, good for the default week (the wall clock checks it)."""
    return sign_pin(new_pin(fleet, app, version, device, now=time.time()), key)


def test_pin_allows_older_version() -> None:
    signed = sign_manifest(_manifest(5), KEY)
    pin = _pin("fleet1", "web", 5)
    assert verify_manifest(signed, KEY.verify_key, 7, pins=[pin]).version == 5
    device_pin = _pin("fleet1", "web", 5, device="dev-3")
    assert verify_manifest(signed, KEY.verify_key, 7, pins=[device_pin], device="dev-3")
    for wrong in [_pin("fleet1", "web", 4),
                  _pin("fleet2", "web", 5),
                  _pin("fleet1", "web", 5, key=OTHER),
                  device_pin]:
        with pytest.raises(VerificationError):
            verify_manifest(signed, KEY.verify_key, 7, pins=[wrong], device="dev-4")


def test_verified_release_is_the_manifest_and_the_bytes_it_came_from() -> None:
    signed = sign_manifest(_manifest(5), KEY)
    encoded = encode_signed_manifest(signed)
    release = verify_release(encoded, KEY.verify_key, fleet="fleet1", app="web")
    assert release.manifest == _manifest(5)
    assert release.encoded == encoded
    with pytest.raises(VerificationError, match="bad signature"):
        bad = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
        verify_release(encode_signed_manifest(dataclasses.replace(signed, signature=bad)),
                       KEY.verify_key)
    with pytest.raises(VerificationError, match="not newer"):
        verify_release(encoded, KEY.verify_key, 5)


def test_admission_of_a_verified_release_needs_a_newer_version_or_a_pin() -> None:
    release = verify_release(encode_signed_manifest(sign_manifest(_manifest(5), KEY)),
                             KEY.verify_key)
    admit_release(release.manifest, KEY.verify_key, None)
    admit_release(release.manifest, KEY.verify_key, 4)
    with pytest.raises(VerificationError, match="not newer than running version 5"):
        admit_release(release.manifest, KEY.verify_key, 5)
    pin = _pin("fleet1", "web", 5, device="dev-3")
    admit_release(release.manifest, KEY.verify_key, 7, pins=[pin], device="dev-3")
    with pytest.raises(VerificationError):
        admit_release(release.manifest, KEY.verify_key, 7, pins=[pin], device="dev-4")
    forged = dataclasses.replace(_pin("fleet1", "web", 5, key=OTHER),
                                 key_id=_pin("fleet1", "web", 5).key_id)
    with pytest.raises(VerificationError):
        admit_release(release.manifest, KEY.verify_key, 7, pins=[forged])


def test_fleet_and_app_checked_when_given() -> None:
    signed = sign_manifest(_manifest(), KEY)
    with pytest.raises(VerificationError):
        verify_manifest(signed, KEY.verify_key, None, fleet="other")
    with pytest.raises(VerificationError):
        verify_manifest(signed, KEY.verify_key, None, app="other")


def test_signed_envelope_rejects_garbage() -> None:
    with pytest.raises(ManifestError):
        decode_signed_manifest(b"\x94\xa1x\xc4\x00\xc4\x00\xa0")


def test_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "release.key"
    key = write_signing_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert bytes(read_signing_key(path)) == bytes(key)
    with pytest.raises(FileExistsError):
        write_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(ReleaseError, match="accessible by others"):
        read_signing_key(path)
    junk = tmp_path / "junk.key"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(ReleaseError, match="not a fleetmesh"):
        read_signing_key(junk)


def _layer() -> bytes:
    return os.urandom(1000) + b"\0" * (CHUNK_SIZE + 5000)


def test_chunks_round_trip() -> None:
    data = _layer()
    chunks = chunk_layer(data)
    assert [c.ref.size for c in chunks] == [CHUNK_SIZE, 6000]
    assert assemble(chunks, "sha256:" + hashlib.sha256(data).hexdigest()) == data
    assert assemble((), "sha256:" + hashlib.sha256(b"").hexdigest()) == b""


def test_truncated_or_corrupted_chunk_raises() -> None:
    data = _layer()
    did = "sha256:" + hashlib.sha256(data).hexdigest()
    chunks = chunk_layer(data)
    first = chunks[0]
    truncated = Chunk(first.ref, first.data[:-3])
    with pytest.raises(ChunkError):
        assemble((truncated, chunks[1]), did)
    truncated_ref = Chunk(ChunkRef(first.ref.id, first.ref.size, len(first.data) - 3),
                          first.data[:-3])
    with pytest.raises(ChunkError):
        assemble((truncated_ref, chunks[1]), did)
    flipped = bytearray(first.data)
    flipped[len(flipped) // 2] ^= 0x40
    with pytest.raises(ChunkError):
        assemble((Chunk(first.ref, bytes(flipped)), chunks[1]), did)
    with pytest.raises(ChunkError):
        assemble((chunks[1], chunks[0]), did)  # reordered: every chunk fine, layer wrong
    with pytest.raises(ChunkError):
        assemble(chunks, "sha256:" + "00" * 32)


def test_a_stored_chunk_opens_by_its_id_alone() -> None:
    from mesh.release import CHUNK_SIZE, ChunkError, chunk_layer, open_stored_chunk

    data = os.urandom(3000)
    (c,) = chunk_layer(data)
    assert open_stored_chunk(c.ref.id, c.data) == data
    with pytest.raises(ChunkError, match="does not hash to its id"):
        open_stored_chunk(bytes(32), c.data)
    with pytest.raises(ChunkError, match="wrong length"):  # a cut frame never ends
        open_stored_chunk(c.ref.id, c.data[:-3])
    from backports import zstd  # the same zstd the chunks use

    bomb = zstd.compress(bytes(CHUNK_SIZE + 1))  # a frame that inflates past one chunk
    with pytest.raises(ChunkError, match="wrong length"):
        open_stored_chunk(bytes(32), bomb)
