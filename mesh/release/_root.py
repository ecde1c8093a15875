"""Root metadata: the fleet's release key, named by k of n offline root keys (TUF's root role).

The release key signs every manifest, pin and timestamp; if it is stolen, only a statement
signed by keys the thief does not hold can tell devices to trust another. A root says "fleet F,
version N, these n root keys with threshold k, this release key". A device pins root version 1
by its fingerprint (in its enrollment token) and then moves only to version N+1 signed by k of
version N's root keys AND by the new root's own threshold of its keys, one version at a time,
so a coordinator (or anyone without k root keys) can neither forge, skip nor replay a root.

No I/O: bytes in, verified values out (docs/architecture.md, principle 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from mesh.release._codec import decode_root_body, encode_root_body
from mesh.release._model import RootError, RootMetadata, SignedRoot
from mesh.release._signing import key_id

# Domain separation: a root signature never passes as one over a manifest, pin or timestamp,
# even when an operator (wrongly) uses one key for both roles.
_ROOT_CONTEXT: Final = b"fleetmesh-root-v1\x00"
# How many roots one answer (the coordinator's, a device's walk) may hold: a fleet that rotates
# its release key monthly takes five years to reach it, and the walk stays cheap.
MAX_ROOT_CHAIN: Final = 64


def root_fingerprint(signed: SignedRoot) -> str:
    """SHA-256 of the root's body, in hex: what an enrollment token carries (`r` + these 64
    digits) to name the fleet's first root. Signatures are not part of it, so holders may sign
    in any order and later."""
    return hashlib.sha256(signed.body).hexdigest()


def sign_root(root: SignedRoot | RootMetadata, signing_key: SigningKey) -> SignedRoot:
    """`root` with one more signature, by `signing_key` (one root-key holder, offline).

    Any key may sign (a rotation needs the previous root's keys, which the new one may no
    longer list); verification decides which signatures count. Signing twice with one key is
    refused, so a file never carries a duplicate that a reader might count twice.
    """
    signed = SignedRoot(encode_root_body(root)) if isinstance(root, RootMetadata) else root
    decode_root_body(signed.body)
    kid = key_id(signing_key.verify_key)
    if any(existing == kid for existing, _ in signed.signatures):
        raise RootError(f"the root is already signed by key {kid}")
    signature = signing_key.sign(_ROOT_CONTEXT + signed.body).signature
    return SignedRoot(signed.body, (*signed.signatures, (kid, signature)))


def valid_signers(signed: SignedRoot, keys: Sequence[bytes]) -> frozenset[str]:
    """The key ids of `keys` whose signature on the root is present and valid. A signature by
    an unlisted key, a bad one, or a second one by the same key never counts."""
    by_id = {key_id(k): k for k in keys}
    signers: set[str] = set()
    for kid, signature in signed.signatures:
        key = by_id.get(kid)
        if key is None or kid in signers:
            continue
        try:
            VerifyKey(key).verify(_ROOT_CONTEXT + signed.body, signature)
        except (BadSignatureError, CryptoError, ValueError, TypeError):
            continue
        signers.add(kid)
    return frozenset(signers)


def verify_root(signed: SignedRoot, trusted: RootMetadata | None,
                expected_fingerprint: str | None = None) -> RootMetadata:
    """The root in `signed`, if a device that trusts `trusted` may move to it.

    With no trusted root, `signed` must be version 1, have `expected_fingerprint` and carry its
    own threshold of valid signatures by its own root keys. Otherwise it must name the same
    fleet, be exactly `trusted.version + 1`, and carry `trusted.threshold` valid signatures by
    `trusted.root_keys` and its own threshold by its own root keys. RootError otherwise.
    """
    meta = decode_root_body(signed.body)
    if trusted is None:
        if expected_fingerprint is None:
            raise RootError("no trusted root and no fingerprint to check the first one against")
        if meta.version != 1:
            raise RootError(f"the first root must be version 1, not {meta.version}")
        if root_fingerprint(signed) != expected_fingerprint.lower():
            raise RootError(f"root version 1 has fingerprint {root_fingerprint(signed)}, not "
                            f"the pinned {expected_fingerprint}")
    else:
        if meta.fleet != trusted.fleet:
            raise RootError(f"root is for fleet {meta.fleet!r}, not {trusted.fleet!r}")
        if meta.version != trusted.version + 1:
            raise RootError(f"root version {meta.version} does not follow the trusted version "
                            f"{trusted.version} (only {trusted.version + 1} may)")
        old = len(valid_signers(signed, trusted.root_keys))
        if old < trusted.threshold:
            raise RootError(f"root version {meta.version} has {old} valid signatures of root "
                            f"version {trusted.version}'s keys, needs {trusted.threshold}")
    own = len(valid_signers(signed, meta.root_keys))
    if own < meta.threshold:
        raise RootError(f"root version {meta.version} has {own} valid signatures of its own "
                        f"root keys, needs {meta.threshold}")
    return meta


def verify_root_chain(trusted: RootMetadata | None, expected_fingerprint: str | None,
                      chain: Sequence[SignedRoot]) -> RootMetadata:
    """Walk `chain` (oldest first) from `trusted` (or from version 1, pinned by
    `expected_fingerprint`) and return the newest root; `trusted` if the chain is empty.
    RootError at the first root that does not verify, or for a chain of more than
    MAX_ROOT_CHAIN roots."""
    if len(chain) > MAX_ROOT_CHAIN:
        raise RootError(f"{len(chain)} roots exceed the limit of {MAX_ROOT_CHAIN} per answer")
    current = trusted
    for signed in chain:
        current = verify_root(signed, current, expected_fingerprint)
    if current is None:
        raise RootError("no root to trust: the chain is empty")
    return current
