"""The hub keepalive at the NAT's real binding lifetime (issue 14): a pure core, time passed in.

A device behind a NAT stays reachable from the hub only while its NAT keeps the UDP binding,
which every packet we send refreshes. WireGuard's customary 25 s keepalive is safe under the
30 s of the strictest NATs and costs ~20 kB/h (a keepalive every 25 s and, as keepalives are
traffic, a handshake every 120 s). Most NATs keep an active binding for minutes (Linux
conntrack 120 s, RFC 4787 REQ-5 asks for at least 2), so the tuner measures it:

- A *trial* of T seconds is one peer-map long poll through the hub with `wait = T` while our
  keepalive to the hub is off: the coordinator answers 304 after T seconds, and the answer gets
  through only if the binding outlived our silence. The silence is measured from the last time
  our hub entry's tx counter grew (the request itself, WireGuard's passive keepalive ~10 s
  after the server's ACK) to the answer.
- An answer within T + ARRIVAL_SLACK proves the binding survives that silence: the keepalive
  becomes MARGIN x the longest proven silence (at least FLOOR), and the next trial doubles T,
  up to CEILING. No answer in time: the binding died within that silence, so no trial that
  long again until RETUNE_AFTER (the NAT may change); the keepalive stays where it was proven.
  A trial our own traffic disturbed (tx grew later than QUIET_START into the wait) proves
  nothing and is retried later.
- In steady state every ordinary 304 checks the choice for free: it is sent exactly `wait`
  after our request; one later than that by LATE waited at the NAT for our next packet, i.e. the
  binding died between two keepalives. The keepalive falls back to FLOOR at once and the tuner
  climbs again, below the keepalive that failed, after TRIAL_SPACING.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

FLOOR: Final = 25  # WireGuard's customary keepalive; every NAT keeps a binding that long
CEILING: Final = 300  # "a few minutes": RFC 4787 REQ-5 recommends 5 minutes for NAT bindings
MARGIN: Final = 0.8  # keepalive = MARGIN x the longest silence the binding survived
FIRST_TRIAL: Final = 2 * FLOOR
ARRIVAL_SLACK: Final = 3.0  # s: a round trip on a slow link, and the reconcile's 1 s reading
LATE: Final = 3.0  # s: an ordinary 304 this late waited for our next packet at the NAT
# s: the request, the server's ACK and WireGuard's passive keepalive (10 s after data came in
# with nothing sent back) come first; silence starts after them
QUIET_START: Final = 15.0
TRIAL_SPACING: Final = 10.0  # s between trials while climbing (the first one too)
RETRY_AFTER: Final = 300.0  # s: after a trial our own traffic disturbed
RETUNE_AFTER: Final = 6 * 3600.0  # s: after a failed trial, try that long again (NAT changes)


@dataclass(frozen=True, slots=True)
class Trial:
    wait: int  # the long poll's wait: the coordinator answers after exactly this long
    started: float


class KeepaliveTuner:
    def __init__(self, now: float) -> None:
        self.keepalive = FLOOR
        self.proven = 0.0  # the longest silence an answer got through after
        self.failed: float | None = None  # the shortest silence one did not
        self.trial: Trial | None = None
        self._next_trial = now + TRIAL_SPACING
        self._retune_at: float | None = None

    def hub_keepalive(self) -> int:
        """What the hub peer's persistent keepalive should be now: 0 during a trial."""
        return 0 if self.trial is not None else self.keepalive

    def _next_wait(self) -> int | None:
        wait = FIRST_TRIAL if self.proven == 0 else min(CEILING, int(self.proven * 2))
        if wait <= self.proven + QUIET_START:
            return None  # the ceiling is proven (a silence is always QUIET_START short of it)
        if self.failed is not None and wait >= self.failed:
            # between what got through and what did not: halfway, if that still helps
            wait = int((self.proven + self.failed) / 2)
            if wait * MARGIN <= self.keepalive or self.failed - self.proven < FLOOR:
                return None
        return wait

    def next_trial_at(self) -> float:
        """When the next trial may start: an ordinary poll should not wait past it."""
        return self._next_trial

    def start_trial(self, now: float) -> Trial | None:
        """A trial if one is due (the caller's next long poll through the hub waits
        `trial.wait` with the keepalive off), else None."""
        if self.trial is not None:
            return None
        if self._retune_at is not None and now >= self._retune_at:
            self.failed, self._retune_at = None, None
        if now < self._next_trial:
            return None
        wait = self._next_wait()
        if wait is None:
            if self.failed is not None and self._retune_at is None:
                self._retune_at = now + RETUNE_AFTER
            self._next_trial = self._retune_at if self._retune_at is not None \
                else now + RETUNE_AFTER
            return None
        self.trial = Trial(wait, now)
        return self.trial

    def trial_done(self, answered_at: float | None, silent_since: float, now: float) -> None:
        """The trial's poll ended: answered at `answered_at` (None: not at all, or not within
        wait + ARRIVAL_SLACK); our hub entry's tx last grew at `silent_since`."""
        trial, self.trial = self.trial, None
        if trial is None:
            return
        if not trial.started - 2.0 <= silent_since <= trial.started + QUIET_START:
            # our own traffic went up late (or the request never went through the tunnel,
            # so nothing of ours was seen): it proves nothing
            self._next_trial = now + RETRY_AFTER
            return
        if answered_at is not None and answered_at <= trial.started + trial.wait + ARRIVAL_SLACK:
            self.proven = max(self.proven, answered_at - silent_since)
            self.keepalive = max(FLOOR, min(CEILING, int(self.proven * MARGIN)))
        else:
            silence = trial.started + trial.wait - silent_since
            self.failed = silence if self.failed is None else min(self.failed, silence)
        self._next_trial = now + TRIAL_SPACING

    def poll_answered(self, started: float, wait: float, answered_at: float,
                      unchanged: bool, now: float) -> bool:
        """An ordinary long poll through the hub ended. A 304 (`unchanged`) later than
        `wait` + LATE waited at the NAT: the binding dies between our keepalives. Returns True
        when that brought the keepalive back to FLOOR."""
        if not unchanged or answered_at <= started + wait + LATE or self.keepalive <= FLOOR:
            return False
        self.failed = float(self.keepalive)
        self.keepalive, self.proven = FLOOR, 0.0  # what was proven no longer holds
        self._retune_at = now + RETUNE_AFTER
        self._next_trial = now + TRIAL_SPACING
        return True
