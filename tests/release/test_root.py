"""Root metadata: k-of-n offline root keys naming the release key (TUF's root rotation)."""

from __future__ import annotations

import dataclasses
import json

import msgpack
import pytest
from nacl.signing import SigningKey

from mesh.release import (
    MAX_ROOT_BODY,
    MAX_ROOT_CHAIN,
    MAX_ROOT_DOCUMENT,
    RootError,
    RootMetadata,
    SignedRoot,
    decode_root_body,
    decode_signed_root,
    encode_root_body,
    encode_signed_root,
    key_id,
    root_fingerprint,
    sign_manifest,
    sign_root,
    valid_signers,
    verify_root,
    verify_root_chain,
)
from mesh.release._model import Layer, ReleaseManifest

ROOT_KEYS = [SigningKey(bytes([i]) * 32) for i in range(1, 4)]  # holders A, B, C
NEW_ROOT_KEYS = [SigningKey(bytes([i]) * 32) for i in range(11, 14)]
RELEASE_1 = SigningKey(b"\x21" * 32)
RELEASE_2 = SigningKey(b"\x22" * 32)


def _meta(version: int = 1, *, keys: list[SigningKey] = ROOT_KEYS, threshold: int = 2,
          release: SigningKey = RELEASE_1, fleet: str = "fleet1") -> RootMetadata:
    return RootMetadata(fleet, version, threshold,
                        tuple(bytes(k.verify_key) for k in keys),
                        bytes(release.verify_key), 1_700_000_000 + version)


def _signed(meta: RootMetadata, *signers: SigningKey) -> SignedRoot:
    signed = SignedRoot(encode_root_body(meta))
    for key in signers:
        signed = sign_root(signed, key)
    return signed


V1 = _signed(_meta(1), ROOT_KEYS[0], ROOT_KEYS[1])
FP1 = root_fingerprint(V1)
TRUSTED_V1 = decode_root_body(V1.body)


def test_two_of_three_first_root_verifies_against_its_fingerprint() -> None:
    meta = verify_root(V1, None, FP1)
    assert meta == _meta(1)
    assert meta.release_key == bytes(RELEASE_1.verify_key)
    assert len(FP1) == 64
    # The signatures are not part of the fingerprint: a third one changes nothing.
    assert root_fingerprint(sign_root(V1, ROOT_KEYS[2])) == FP1


def test_one_of_three_is_refused() -> None:
    with pytest.raises(RootError, match="1 valid signatures of its own root keys, needs 2"):
        verify_root(_signed(_meta(1), ROOT_KEYS[0]), None, FP1)


def test_rotation_needs_the_old_and_the_new_threshold() -> None:
    # v2 names new root keys and a new release key: 2 of the old keys and 2 of the new sign.
    meta2 = _meta(2, keys=NEW_ROOT_KEYS, release=RELEASE_2)
    both = _signed(meta2, ROOT_KEYS[0], ROOT_KEYS[2], NEW_ROOT_KEYS[0], NEW_ROOT_KEYS[1])
    assert verify_root(both, TRUSTED_V1).release_key == bytes(RELEASE_2.verify_key)
    only_new = _signed(meta2, *NEW_ROOT_KEYS)
    with pytest.raises(RootError, match="0 valid signatures of root version 1's keys, needs 2"):
        verify_root(only_new, TRUSTED_V1)
    only_old = _signed(meta2, *ROOT_KEYS)
    with pytest.raises(RootError, match="0 valid signatures of its own root keys"):
        verify_root(only_old, TRUSTED_V1)


def test_unlisted_key_never_counts() -> None:
    stranger = SigningKey(b"\x55" * 32)
    signed = _signed(_meta(2), ROOT_KEYS[0], stranger)
    assert valid_signers(signed, _meta(2).root_keys) == {key_id(ROOT_KEYS[0].verify_key)}
    with pytest.raises(RootError, match="1 valid signatures"):
        verify_root(signed, TRUSTED_V1)


def test_duplicate_signature_counts_once() -> None:
    once = _signed(_meta(2), ROOT_KEYS[0])
    # sign_root refuses a second signature by the same key ...
    with pytest.raises(RootError, match="already signed"):
        sign_root(once, ROOT_KEYS[0])
    # ... and a file edited to carry it twice still has one signer.
    twice = SignedRoot(once.body, once.signatures * 2)
    assert len(valid_signers(twice, _meta(2).root_keys)) == 1
    with pytest.raises(RootError, match="1 valid signatures"):
        verify_root(twice, TRUSTED_V1)


def test_bad_signature_never_counts() -> None:
    good = _signed(_meta(2), ROOT_KEYS[0], ROOT_KEYS[1])
    kid, sig = good.signatures[1]
    forged = SignedRoot(good.body, (good.signatures[0], (kid, bytes([sig[0] ^ 1]) + sig[1:])))
    with pytest.raises(RootError, match="1 valid signatures"):
        verify_root(forged, TRUSTED_V1)
    # A manifest signature by a root key is no root signature (domain separation).
    manifest = sign_manifest(ReleaseManifest("fleet1", "web", 1, 0, b"{}",
                                             (Layer("sha256:" + "cd" * 32, 0, ()),)),
                             ROOT_KEYS[1])
    cross = SignedRoot(good.body, (good.signatures[0], (kid, manifest.signature)))
    with pytest.raises(RootError, match="1 valid signatures"):
        verify_root(cross, TRUSTED_V1)


def test_version_skip_and_replay_are_refused() -> None:
    v3 = _signed(_meta(3), ROOT_KEYS[0], ROOT_KEYS[1])
    with pytest.raises(RootError, match="root version 3 does not follow the trusted version 1"):
        verify_root(v3, TRUSTED_V1)
    v2 = _signed(_meta(2), ROOT_KEYS[0], ROOT_KEYS[1])
    trusted_v2 = verify_root(v2, TRUSTED_V1)
    with pytest.raises(RootError, match="root version 1 does not follow the trusted version 2"):
        verify_root(V1, trusted_v2)
    with pytest.raises(RootError, match="root version 2 does not follow the trusted version 2"):
        verify_root(v2, trusted_v2)


def test_wrong_fleet_is_refused() -> None:
    other = _signed(_meta(2, fleet="fleet2"), ROOT_KEYS[0], ROOT_KEYS[1])
    with pytest.raises(RootError, match="root is for fleet 'fleet2', not 'fleet1'"):
        verify_root(other, TRUSTED_V1)


def test_wrong_fingerprint_or_first_version_is_refused() -> None:
    with pytest.raises(RootError, match="not the pinned"):
        verify_root(V1, None, "00" * 32)
    with pytest.raises(RootError, match="no fingerprint"):
        verify_root(V1, None, None)
    v2 = _signed(_meta(2), ROOT_KEYS[0], ROOT_KEYS[1])
    with pytest.raises(RootError, match="the first root must be version 1"):
        verify_root(v2, None, root_fingerprint(v2))


def test_chain_walks_one_version_at_a_time() -> None:
    v2 = _signed(_meta(2, release=RELEASE_2), ROOT_KEYS[0], ROOT_KEYS[1])
    v3 = _signed(_meta(3, keys=NEW_ROOT_KEYS, release=RELEASE_1), ROOT_KEYS[1], ROOT_KEYS[2],
                 NEW_ROOT_KEYS[1], NEW_ROOT_KEYS[2])
    assert verify_root_chain(None, FP1, [V1, v2, v3]).version == 3
    assert verify_root_chain(TRUSTED_V1, None, [v2, v3]).root_keys == _meta(
        3, keys=NEW_ROOT_KEYS).root_keys
    assert verify_root_chain(TRUSTED_V1, None, []) == TRUSTED_V1
    with pytest.raises(RootError, match="does not follow"):
        verify_root_chain(None, FP1, [V1, v3])
    with pytest.raises(RootError, match="the chain is empty"):
        verify_root_chain(None, FP1, [])
    with pytest.raises(RootError, match=f"exceed the limit of {MAX_ROOT_CHAIN}"):
        verify_root_chain(TRUSTED_V1, None, [v2] * (MAX_ROOT_CHAIN + 1))


def test_threshold_and_keys_are_checked_at_build() -> None:
    with pytest.raises(RootError, match="threshold 4 is not between 1 and the 3 root keys"):
        _meta(1, threshold=4)
    with pytest.raises(RootError, match="threshold 0"):
        _meta(1, threshold=0)
    with pytest.raises(RootError, match="not distinct"):
        _meta(1, keys=[ROOT_KEYS[0], ROOT_KEYS[0]], threshold=1)
    with pytest.raises(RootError, match="1 to 16 root keys"):
        _meta(1, keys=[SigningKey(bytes([i]) * 32) for i in range(1, 18)], threshold=1)
    with pytest.raises(RootError, match="1 to 16 root keys"):
        _meta(1, keys=[], threshold=1)
    with pytest.raises(RootError, match="32-byte"):
        dataclasses.replace(_meta(1), release_key=b"short")
    with pytest.raises(RootError, match="below 1"):
        _meta(0)


def test_codec_round_trip_and_limits() -> None:
    assert decode_signed_root(encode_signed_root(V1)) == V1
    assert decode_root_body(V1.body) == _meta(1)
    # Truncated, oversized, non-canonical and foreign bodies are refused with one message.
    with pytest.raises(RootError, match="malformed root"):
        decode_root_body(V1.body[:-3])
    with pytest.raises(RootError, match=f"exceeds the limit of {MAX_ROOT_BODY}"):
        decode_root_body(V1.body + b"\x00" * MAX_ROOT_BODY)
    fields = msgpack.unpackb(V1.body)
    with pytest.raises(RootError, match="not a fleetmesh root"):
        decode_root_body(msgpack.packb(["fleetmesh.release/2", *fields[1:]]))
    with pytest.raises(RootError, match="canonical"):
        # The same array with a 16-bit length where msgpack's shortest form is one byte.
        assert V1.body[0] == 0x97
        decode_root_body(b"\xdc\x00\x07" + V1.body[1:])
    with pytest.raises(RootError, match=f"exceeds the limit of {MAX_ROOT_DOCUMENT}"):
        decode_signed_root(b" " * (MAX_ROOT_DOCUMENT + 1))
    doc = json.loads(encode_signed_root(V1))
    with pytest.raises(RootError, match="not JSON"):
        decode_signed_root(encode_signed_root(V1)[:-10])
    for broken, message in [
            ({**doc, "format": "x"}, "not a signed root document"),
            ({**doc, "extra": 1}, "expected the fields"),
            ({**doc, "body": "!!"}, "body is not base64"),
            ({**doc, "signatures": [{"key_id": "zz", "signature": ""}]}, "16 hex digits"),
            ({**doc, "signatures": [{**doc["signatures"][0], "signature": "AAAA"}]},
             "a signature is 64 bytes"),
            ({**doc, "signatures": doc["signatures"] * 9}, "at most 16")]:
        with pytest.raises(RootError, match=message):
            decode_signed_root(json.dumps(broken).encode())
