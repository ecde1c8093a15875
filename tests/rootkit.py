"""Root metadata for tests: fixed root keys (three holders) and roots signed by chosen ones."""

from __future__ import annotations

from nacl.signing import SigningKey

from mesh.release import RootMetadata, SignedRoot, encode_root_body, sign_root

ROOT_KEYS = [SigningKey(bytes([i]) * 32) for i in range(1, 4)]  # holders A, B, C


def root(fleet: str, version: int, release: SigningKey, *signers: SigningKey,
         keys: list[SigningKey] = ROOT_KEYS, threshold: int = 2) -> SignedRoot:
    """Root `version` of `fleet` naming `release`, signed by `signers` in order."""
    meta = RootMetadata(fleet, version, threshold, tuple(bytes(k.verify_key) for k in keys),
                        bytes(release.verify_key), 1_700_000_000 + version)
    signed = SignedRoot(encode_root_body(meta))
    for key in signers:
        signed = sign_root(signed, key)
    return signed
