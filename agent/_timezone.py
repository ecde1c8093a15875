"""The device's time zone, as its report names it (`DeviceReport.timezone`, docs/api.md).

A rollout's maintenance window is read in the device's local time (agent/_apply_core.py
`apply_gate`, through `time.localtime`); the coordinator shows the zone so an operator can
write windows that mean what they think. Where the name comes from, first found wins:

1. `TZ`, which is what `time.localtime` follows when it is set: `Europe/Berlin`,
   `:Europe/Berlin` or a path under a `zoneinfo` directory give that name; empty is `UTC`;
   anything else (a POSIX rule such as `CET-1CEST,M3.5.0,M10.5.0/3`) the current offset;
2. `/etc/timezone` (Debian, Ubuntu);
3. the `/etc/localtime` symlink's target below `zoneinfo/` (systemd, Alpine, Fedora);
4. else the current offset, `UTC+HH:MM` / `UTC-HH:MM` (`time.localtime().tm_gmtoff`).

A candidate the report codec would refuse (`mesh.control.check_timezone`) is skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from mesh.control import ControlError, check_timezone

ETC_TIMEZONE: Final = Path("/etc/timezone")
ETC_LOCALTIME: Final = Path("/etc/localtime")
_ZONEINFO: Final = "zoneinfo/"


def _name(text: str | None) -> str | None:
    """`text` as a zone name the report accepts, else None."""
    if not text:
        return None
    text = text.strip().removeprefix(":")
    if _ZONEINFO in text:  # a path to a zone file: its name is what follows zoneinfo/
        text = text.rsplit(_ZONEINFO, 1)[1]
    elif text.startswith("/"):  # another file: no name
        return None
    try:
        return check_timezone(text)
    except ControlError:
        return None


def utc_offset_name(offset: int) -> str:
    """`UTC+01:00` for 3600 seconds east of UTC, `UTC-05:30` west."""
    sign = "-" if offset < 0 else "+"
    minutes = abs(offset) // 60
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _read_first_line(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline(256)
    except OSError:
        return None


def _link_target(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # absent, or a copy of the zone file rather than a link
        return None


def device_timezone(env: Mapping[str, str] | None = None, etc_timezone: Path = ETC_TIMEZONE,
                    etc_localtime: Path = ETC_LOCALTIME,
                    clock: Callable[[], float] = time.time) -> str:
    """The device's time zone name (module docstring); never fails."""
    tz = (os.environ if env is None else env).get("TZ")
    if tz is not None and not tz.strip():
        return "UTC"  # the C library's reading of an empty TZ
    name = _name(tz) if tz is not None else (_name(_read_first_line(etc_timezone))
                                             or _name(_link_target(etc_localtime)))
    return name or utc_offset_name(time.localtime(clock()).tm_gmtoff)


__all__ = ["device_timezone", "utc_offset_name"]
