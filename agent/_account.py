"""The device's own WAN byte account (issue 14): bytes per UTC day per purpose, for the last
week, without I/O (docs/architecture.md, principle 1). The drivers feed it:

    account = WanAccount()
    account.observe_tunnel(status, hub_key, lan_keys, now)   # agent/_wg_sync.py, every second
    account.add("control", 812, in_tunnel=True, now=now)     # agent/_link.py, per API call
    account.add("gossip", len(frame), in_tunnel=True, now=now)  # agent/_gossip.py, non-LAN peers
    account.days(now, 2)   # {"2026-12-03": {"wireguard": ..., "control": ..., ...}, ...}

What each purpose counts:

- `control`, `logs`, `blobs`: coordinator API calls as httpx sees them (request line, headers
  and body; status line, headers and body as received). What TLS and TCP/IP add on top is not
  counted there: for a call through the hub tunnel it lands in `wireguard` (below); a call on
  the join URL (outside the tunnel: blob seed downloads, the fallback when the hub is down)
  counts only what httpx sees.
- `gossip`: mesh frames to and from peers that are not on our LAN (they cross the WAN inside
  the tunnel, direct or through the hub).
- `wireguard`: the WireGuard counters (tx + rx) of the hub entry and of every peer entry that
  is not a LAN neighbour, minus what the purposes above counted inside the tunnel (never below
  0): framing, keepalives, handshakes, and the TCP/TLS overhead of in-tunnel calls.

A WireGuard counter that goes down was reset (the peer was removed and added again, the daemon
restarted): what it shows since counts, from a new baseline. The first reading of an entry is
only a baseline: the bytes before it belong to the previous run, whose account was saved.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any, Final

from mesh.control import MAX_WAN_BYTES, WAN_PURPOSES
from vpn import DeviceStatus

KEEP_DAYS: Final = 7  # today and the six days before it
KEEP_MONTHS: Final = 2  # this UTC month and the last: a monthly budget's `used`
# The raw counts kept per day: the tunnel's counters and, of the purposes, how much of each
# went through the tunnel (subtracted from the tunnel to give `wireguard`).
_TUNNEL: Final = "tunnel"
_IN_TUNNEL: Final = "in_tunnel"
COUNTED: Final = ("control", "gossip", "blobs", "logs")  # purposes counted by their drivers
FORMAT: Final = 1


class AccountError(ValueError):
    """A saved account that does not validate; str() is one line."""


def utc_day(now: float) -> str:
    """The UTC day of epoch time `now`, as YYYY-MM-DD."""
    return datetime.datetime.fromtimestamp(now, datetime.UTC).date().isoformat()


class WanAccount:
    """Bytes per UTC day: the tunnel's counters and each counted purpose; `days()` derives
    `wireguard`. Days older than KEEP_DAYS go as new ones come."""

    def __init__(self) -> None:
        self._days: dict[str, dict[str, int]] = {}
        self._months: dict[str, dict[str, int]] = {}  # "YYYY-MM" -> the same raw counts
        self._counters: dict[str, int] = {}  # public key -> the last tx + rx read
        self.changed = False  # something to save since `saved()`

    # -- the drivers ---------------------------------------------------------------------------

    def add(self, purpose: str, n: int, *, in_tunnel: bool, now: float) -> None:
        """`n` bytes for `purpose` (one of COUNTED); `in_tunnel`: they crossed the WAN inside
        the WireGuard tunnel, so the tunnel's counters include them too."""
        if purpose not in COUNTED:
            raise ValueError(f"unknown purpose {purpose!r}")
        if n <= 0:
            return
        for bucket in self._buckets(now):
            bucket[purpose] = bucket.get(purpose, 0) + n
            if in_tunnel:
                bucket[_IN_TUNNEL] = bucket.get(_IN_TUNNEL, 0) + n
        self.changed = True

    def observe_tunnel(self, status: DeviceStatus, hub_key: str, lan_keys: Iterable[str],
                       now: float) -> None:
        """A reading of the WireGuard device: the growth of the hub entry's and every non-LAN
        peer entry's tx + rx counts. LAN entries keep a baseline too, so a peer that moves off
        the LAN does not bring its whole history with it."""
        lan = set(lan_keys) - {hub_key}
        grown = 0
        seen: dict[str, int] = {}
        for peer in status.peers:
            total = peer.tx_bytes + peer.rx_bytes
            seen[peer.public_key] = total
            last = self._counters.get(peer.public_key)
            if last is None:
                continue  # a baseline: what came before is not ours to count
            delta = total - last if total >= last else total  # reset: counts from 0 again
            if peer.public_key not in lan:
                grown += delta
        self._counters = seen  # removed entries forget their baseline
        if grown > 0:
            for bucket in self._buckets(now):
                bucket[_TUNNEL] = bucket.get(_TUNNEL, 0) + grown
            self.changed = True

    # -- reading -------------------------------------------------------------------------------

    def days(self, now: float, count: int = KEEP_DAYS) -> dict[str, dict[str, int]]:
        """The last `count` UTC days up to `now`'s, newest first, each `{purpose: bytes}` over
        WAN_PURPOSES (mesh.control's report form): today always (zeros before its first
        byte, so the days named change only when the UTC day does), the others when they
        have any bytes."""
        today = datetime.date.fromisoformat(utc_day(now))
        wanted = [(today - datetime.timedelta(days=i)).isoformat() for i in range(count)]
        out: dict[str, dict[str, int]] = {}
        for i, day in enumerate(wanted):
            raw = self._days.get(day)
            if raw is not None or i == 0:
                out[day] = self._purposes(raw or {})
        return out

    def used(self, now: float, period: str) -> int:
        """All WAN bytes of `now`'s UTC day or month (`period`: "day" or "month")."""
        if period == "day":
            raw = self._days.get(utc_day(now), {})
        elif period == "month":
            raw = self._months.get(utc_day(now)[:7], {})
        else:
            raise ValueError(f"unknown period {period!r}")
        return sum(self._purposes(raw).values())

    @staticmethod
    def _purposes(raw: Mapping[str, int]) -> dict[str, int]:
        wireguard = max(0, raw.get(_TUNNEL, 0) - raw.get(_IN_TUNNEL, 0))
        out = {"wireguard": wireguard, **{p: raw.get(p, 0) for p in COUNTED}}
        assert tuple(out) == WAN_PURPOSES
        return {p: min(n, MAX_WAN_BYTES - 1) for p, n in out.items()}

    # -- persistence (the driver writes and reads the file) -----------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "days": {d: dict(c) for d, c in sorted(self._days.items())},
                "months": {m: dict(c) for m, c in sorted(self._months.items())}}

    @classmethod
    def from_json(cls, obj: Any) -> WanAccount:
        """A saved account, validated (AccountError): at most KEEP_DAYS + 1 days and
        KEEP_MONTHS + 1 months of known counts, each a non-negative integer below 2**53."""
        if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
            raise AccountError(f"not a byte account of format {FORMAT}")
        account = cls()
        account._days = _buckets_from_json(obj.get("days"), "days", KEEP_DAYS + 1, 10)
        account._months = _buckets_from_json(obj.get("months", {}), "months",
                                             KEEP_MONTHS + 1, 7)
        return account

    def saved(self) -> None:
        self.changed = False

    # -- days ----------------------------------------------------------------------------------

    def _buckets(self, now: float) -> tuple[dict[str, int], dict[str, int]]:
        """The raw counts of `now`'s UTC day and month (made when new, the oldest let go)."""
        key = utc_day(now)
        day = self._days.get(key)
        if day is None:
            day = self._days[key] = {}
            oldest = (datetime.date.fromisoformat(key)
                      - datetime.timedelta(days=KEEP_DAYS - 1)).isoformat()
            for old in [d for d in self._days if d < oldest]:
                del self._days[old]
        month = self._months.get(key[:7])
        if month is None:
            month = self._months[key[:7]] = {}
            for old in sorted(self._months)[:-KEEP_MONTHS]:
                del self._months[old]
        return day, month


def _buckets_from_json(obj: Any, where: str, most: int, key_len: int
                       ) -> dict[str, dict[str, int]]:
    """Days (YYYY-MM-DD, `key_len` 10) or months (YYYY-MM, 7) of raw counts, validated."""
    if not isinstance(obj, Mapping) or len(obj) > most:
        raise AccountError(f"{where}: must be an object of at most {most} entries")
    known = (_TUNNEL, _IN_TUNNEL, *COUNTED)
    out: dict[str, dict[str, int]] = {}
    for key, counts in obj.items():
        try:
            valid = isinstance(key, str) and len(key) == key_len and \
                datetime.date.fromisoformat(key if key_len == 10 else key + "-01") is not None
        except ValueError:
            valid = False
        if not valid:
            raise AccountError(f"{where}: {str(key)[:20]!r} is not a "
                               f"{'day' if key_len == 10 else 'month'}")
        if not isinstance(counts, Mapping) or any(
                k not in known or not isinstance(n, int) or isinstance(n, bool)
                or not 0 <= n < MAX_WAN_BYTES for k, n in counts.items()):
            raise AccountError(f"{where}.{key}: counts must be {', '.join(known)}: "
                               "integers from 0 to 2**53 - 1")
        out[key] = dict(counts)
    return out


__all__ = ["COUNTED", "KEEP_DAYS", "AccountError", "WanAccount", "utc_day"]
