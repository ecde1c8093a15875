"""Freeze detection on the device: the newest signed timestamp of the fleet, and whether it
has expired (docs/security.md, "A frozen coordinator is detected").

Pure: the release sync hands it what the coordinator answered and the wall-clock time; it
verifies (grant by the pinned release key, timestamp by the granted key, this fleet), keeps
the newest valid timestamp and says "stale" once that one has expired. A missing or invalid
answer never replaces a valid timestamp, so a coordinator that stops answering, answers with
an old timestamp or with garbage goes stale at the last good one's expiry. Before the first
valid timestamp there is nothing to say (the operator may not have granted a key).
"""

from __future__ import annotations

from collections.abc import Callable

from mesh.release import ReleaseError, Timestamp, verify_timestamp


class FreshnessWatch:
    def __init__(self, release_key_hex: str, fleet: str, log: Callable[[str], None]) -> None:
        self._key = bytes.fromhex(release_key_hex)
        self._fleet = fleet
        self._log = log
        self.newest: Timestamp | None = None
        self._said: str | None = None  # the last thing logged, so each is logged once

    def update(self, encoded: bytes | None, now: float) -> None:
        """What the coordinator answered (None: no timestamp) at wall-clock `now`."""
        if encoded is None:
            return
        try:
            fresh = verify_timestamp(encoded, self._key, self._fleet, now)
        except ReleaseError as exc:
            self._say(f"timestamp refused: {exc}")
            return
        if self.newest is None or fresh.timestamp.issued_at > self.newest.issued_at:
            self.newest = fresh.timestamp

    def unanswered(self, reason: str) -> None:
        """The coordinator gave no timestamp answer (logged once per reason)."""
        self._say(f"no timestamp: {reason}")

    def stale(self, now: float) -> bool:
        """True once the newest valid timestamp has expired (logged once per expiry)."""
        if self.newest is None or self.newest.expires_at > now:
            return False
        self._say(f"releases stale: the fleet's newest timestamp expired at "
                  f"{self.newest.expires_at} (Unix time) and no newer one came; the "
                  "coordinator may be frozen")
        return True

    def _say(self, message: str) -> None:
        if message != self._said:
            self._said = message
            self._log(message)
