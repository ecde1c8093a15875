"""Release-key rotation at runtime: the device's trusted root and its moves to newer ones.

A device enrolled with a token that named a root (`fm1.….r<fingerprint>`) keeps the newest root
it verified in DATA/root.json. With every targets poll, ReleaseSync asks the coordinator for the
fleet's roots newer than that one and hands them to `RootWatch.advance`, which verifies them one
version at a time (mesh.release `verify_root`: k of the trusted root's keys and the new root's
own threshold). A newer root that names another release key is a rotation: the agent stops its
release subsystem, forgets every app's rollback floor (the floor was set under a key now revoked:
TUF's fast-forward recovery), persists the root and the new key, and starts the subsystem again
with it (agent/_agent.py). A root that does not verify is logged once, counted and ignored.
docs/security.md, "Release key rotation".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from mesh.release import RootError, RootMetadata, SignedRoot, decode_root_body, key_id, verify_root

from ._datadir import DataDir, DataDirError, Identity
from ._journal import JournalError, reset_high_waters
from ._link import Log


class RootWatch:
    """The newest root this device verified (None: its token named none, it follows no
    rotation) and how many roots it refused."""

    def __init__(self, data: DataDir, log: Log) -> None:
        self.data = data
        self.log = log
        self.refused = 0
        self._last_refusal: str | None = None
        self.trusted: RootMetadata | None = None
        try:
            signed = data.read_root()
        except DataDirError as exc:
            log(f"root metadata: {exc}; release key rotations are not followed")
            signed = None
        if signed is not None:
            self.trusted = decode_root_body(signed.body)

    def advance(self, chain: Sequence[SignedRoot]) -> tuple[SignedRoot, RootMetadata] | None:
        """The newest root of `chain` (oldest first) that verifies, one version at a time, from
        the trusted one; None if none does. The first that does not verify ends the walk: it
        is logged (once per distinct reason), counted and ignored, and the ones before it
        stand."""
        current, newest = self.trusted, None
        if current is None:
            return None
        for signed in chain:
            try:
                current = verify_root(signed, current)
            except RootError as exc:
                self.refused += 1
                message = f"root metadata refused ({self.refused} so far): {exc}"
                if str(exc) != self._last_refusal:
                    self.log(message)
                    self._last_refusal = str(exc)
                break
            newest = (signed, current)
        return newest

    def adopt(self, signed: SignedRoot, meta: RootMetadata) -> None:
        """Trust `meta` from now on and keep it (a root that leaves the release key as it
        is, or the second half of `rotate`)."""
        self.trusted = meta
        try:
            self.data.write_root(signed)
        except DataDirError as exc:  # trusted in memory; read again after a restart
            self.log(f"root metadata: {exc}")

    def rotate(self, identity: Identity, signed: SignedRoot, meta: RootMetadata) -> Identity:
        """Move the device to the release key `meta` names: forget the rollback floors, keep
        the root, then the new key in the enrollment; the identity to run with. Called with the
        release subsystem stopped. Crash-safe in this order: floors forgotten under the old
        key give its holder nothing they lacked (they could sign any newer version anyway),
        and until enrollment.json names the new key the agent rotates again at its next
        poll."""
        apps: list[str] = []
        try:
            apps = reset_high_waters(self.data.path / "apply")
        except (OSError, JournalError) as exc:
            self.log(f"root metadata: cannot reset the rollback floors: {exc}")
        self.adopt(signed, meta)
        new = replace(identity, enrollment=replace(identity.enrollment,
                                                   release_key=meta.release_key.hex()))
        try:
            self.data.write_identity(new)
        except DataDirError as exc:  # the new key is used anyway: the old one is revoked
            self.log(f"root metadata: {exc}")
        self.log(f"release key rotated to {key_id(meta.release_key)} by root version "
                 f"{meta.version}; rollback floors reset ({', '.join(apps) or 'none'})")
        return new


__all__ = ["RootWatch"]
