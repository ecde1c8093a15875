"""Per-app apply journals and the manifests they refer to, on disk.

    DATA/apply/<app>/journal.json           the Journal (agent/_apply_core.py), JSON
    DATA/apply/<app>/releases/<version>     the signed manifest of each release the journal
                                            names (current, previous, the one being applied)
    DATA/apply/<app>/high_water.json        the newest version ever accepted as the app's
                                            target: older ones need an operator-signed pin
                                            (docs/security.md, "No replay of an old release")
    DATA/apply/<app>/pin.json               the serial of the newest pin acted on, and whether
                                            the device has moved past it (docs/security.md, "A
                                            rollback pin expires and is spent")

Every write goes to a temporary file that is fsynced, renamed over the old one, and the
directory fsynced: after a crash the file is the old or the new version, never a mix
(the same discipline as agent/_blobstore.py). Signed manifests are verified again whenever
they are read back, so a damaged or planted file is never trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

from nacl.signing import VerifyKey

from mesh.blobs import fsync_dir, write_atomically
from mesh.release import (
    MAX_ENVELOPE_BYTES,
    ReleaseError,
    VerifiedRelease,
    decode_signed_manifest,
    verify_release,
)

from ._apply_core import Journal

JOURNAL: Final = "journal.json"
HIGH_WATER: Final = "high_water.json"
PIN_STATE: Final = "pin.json"
RELEASES: Final = "releases"
MAX_JOURNAL_BYTES: Final = 64 * 1024  # a journal is a few hundred bytes
_TMP: Final = ".tmp-"


class JournalError(Exception):
    """A journal file that cannot be read or written; str() is one line naming it."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (the blob store's temporary file, fsync,
    rename, directory fsync), creating the directory first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, data)


class AppJournal:
    """One app's journal directory."""

    def __init__(self, root: str | os.PathLike[str], app: str) -> None:
        self.app = app
        self.dir = Path(root) / app
        self.path = self.dir / JOURNAL

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> Journal | None:
        """The journal, None if there is none; JournalError if it is corrupt."""
        obj = _read_json(self.path)
        if obj is None:
            return None
        try:
            return Journal.from_json(obj)
        except ValueError as exc:
            raise JournalError(f"{self.path}: corrupt ({exc})") from None

    def save(self, journal: Journal) -> None:
        try:
            atomic_write(self.path, journal.dumps())
        except OSError as exc:
            raise JournalError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    # -- the high-water mark ------------------------------------------------------------------

    def high_water(self) -> int | None:
        """The newest version ever accepted for the app, None if none was recorded;
        JournalError if the file is unreadable or corrupt."""
        path = self.dir / HIGH_WATER
        obj = _read_json(path)
        if obj is None:
            return None
        version = obj.get("version") if isinstance(obj, dict) else None
        if (not isinstance(obj, dict) or obj.get("format") != 1 or obj.get("app") != self.app
                or isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise JournalError(f"{path}: corrupt (not a format-1 high-water mark of {self.app})")
        return version

    def reset_high_water(self) -> None:
        """Forget the mark (fast-forward recovery after a release-key rotation: the mark was
        set under a key now revoked, docs/security.md "Release key rotation")."""
        path = self.dir / HIGH_WATER
        try:
            path.unlink(missing_ok=True)
            if self.dir.is_dir():
                fsync_dir(self.dir)
        except OSError as exc:
            raise JournalError(f"cannot remove {path}: {exc.strerror or exc}") from None

    def save_high_water(self, version: int) -> None:
        """Record `version` as the newest accepted (atomic: the old mark or the new one)."""
        path = self.dir / HIGH_WATER
        data = json.dumps({"format": 1, "app": self.app, "version": int(version)},
                          sort_keys=True).encode()
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise JournalError(f"cannot write {path}: {exc.strerror or exc}") from None

    def pin_state(self) -> tuple[int, bool]:
        """(serial of the newest pin acted on, spent?), (0, False) if none was recorded;
        JournalError if the file is unreadable or corrupt."""
        path = self.dir / PIN_STATE
        obj = _read_json(path)
        if obj is None:
            return 0, False
        serial = obj.get("serial") if isinstance(obj, dict) else None
        spent = obj.get("spent") if isinstance(obj, dict) else None
        if (not isinstance(obj, dict) or obj.get("format") != 1 or obj.get("app") != self.app
                or isinstance(serial, bool) or not isinstance(serial, int) or serial < 0
                or not isinstance(spent, bool)):
            raise JournalError(f"{path}: corrupt (not a format-1 pin state of {self.app})")
        return serial, spent

    def save_pin_state(self, serial: int, spent: bool) -> None:
        """Record the newest pin acted on (atomic: the old state or the new one)."""
        path = self.dir / PIN_STATE
        data = json.dumps({"format": 1, "app": self.app, "serial": int(serial),
                           "spent": bool(spent)}, sort_keys=True).encode()
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise JournalError(f"cannot write {path}: {exc.strerror or exc}") from None

    # -- signed manifests ------------------------------------------------------------------

    def _release_path(self, version: int) -> Path:
        return self.dir / RELEASES / str(int(version))

    def save_release(self, release: VerifiedRelease) -> None:
        """Store the release's signed manifest as received (`encoded`), under its version."""
        path = self._release_path(release.manifest.version)
        try:
            if path.exists() and path.read_bytes() == release.encoded:
                return
            atomic_write(path, release.encoded)
        except OSError as exc:
            raise JournalError(f"cannot write {path}: {exc.strerror or exc}") from None

    def release(self, version: int, key: VerifyKey | bytes, fleet: str | None,
                platform: str | None = None) -> VerifiedRelease | None:
        """The stored release `version`, verified again (it comes back from disk) and narrowed
        to `platform` if given; None if absent or not valid."""
        try:
            encoded = self._release_path(version).read_bytes()
        except OSError:
            return None
        try:
            release = verify_release(encoded, key, fleet=fleet, app=self.app, platform=platform)
        except ReleaseError:
            return None
        return release if release.manifest.version == version else None

    def signed_by_other_key(self, version: int, key_id: str) -> bool:
        """Whether the stored manifest of `version` names a key other than `key_id`: a release
        accepted under a key since revoked, which sets no rollback floor under the new one. A
        missing or unreadable manifest is no proof of that (False: the floor holds)."""
        try:
            with open(self._release_path(version), "rb") as f:
                encoded = f.read(MAX_ENVELOPE_BYTES + 1)
            return decode_signed_manifest(encoded).key_id != key_id
        except (OSError, ReleaseError):
            return False

    def prune_releases(self, keep: set[int]) -> None:
        d = self.dir / RELEASES
        if not d.is_dir():
            return
        for p in d.iterdir():
            if p.name.isascii() and p.name.isdigit() and int(p.name) not in keep:
                p.unlink(missing_ok=True)
            elif p.name.startswith(_TMP):
                p.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    """The JSON value in `path` (at most MAX_JOURNAL_BYTES), None if there is no such file;
    JournalError if it cannot be read or is not JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JOURNAL_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if len(raw) > MAX_JOURNAL_BYTES:
            raise ValueError("too large")
        return json.loads(raw)
    except ValueError as exc:
        raise JournalError(f"{path}: corrupt ({exc})") from None


def journal_apps(root: str | os.PathLike[str]) -> list[str]:
    """The apps that have a journal under `root`."""
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / JOURNAL).is_file())


def reset_high_waters(root: str | os.PathLike[str]) -> list[str]:
    """Forget every app's high-water mark under `root` (AppJournal.reset_high_water); the apps
    that had one."""
    base = Path(root)
    if not base.is_dir():
        return []
    apps = sorted(p.parent.name for p in base.glob(f"*/{HIGH_WATER}"))
    for app in apps:
        AppJournal(base, app).reset_high_water()
    return apps


__all__ = ["AppJournal", "JournalError", "atomic_write", "journal_apps", "reset_high_waters"]
