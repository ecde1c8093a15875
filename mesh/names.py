"""Names that cross the wire: one definition each, for every module that checks them.

- Device names are one DNS label in lower case, no '-' at either end (RFC 1035 §2.3.4, RFC 1123
  §2.1), so a device name can become a host name; mesh.control checks them in control
  messages, agent LAN discovery in mDNS records.
- Fleet and app names are what the release format allows (mesh.release's codec) and what
  control messages carry: letters, digits, '.', '_' and '-', starting with a letter or digit,
  at most a DNS name's 253 characters.

Each pattern matches a whole string with `.match` or `.fullmatch` (`\\Z`, not `$`, which would
also accept a trailing newline).
"""

from __future__ import annotations

import re
from typing import Final

DEVICE_NAME_RE: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")  # 1-63 characters
MAX_APP_NAME: Final = 253  # a DNS name (RFC 1035): fleet and app names
APP_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# An app's container is `fleetmesh-<app>` on the device's engine: the app `agent` would take
# the agent container's documented name (`fleetmesh-agent`, docs/services.md). The app
# `fleetmesh-agent` is the agent itself (agent/_selfupdate.py), published like any other.
UNPUBLISHABLE_APPS: Final = {"agent": "its container would be named fleetmesh-agent, the "
                                      "agent's own container; choose another app name"}


def unpublishable_app(app: str) -> str | None:
    """Why no release of `app` may be published (one line), None if it may."""
    why = UNPUBLISHABLE_APPS.get(app)
    return None if why is None else f"app {app!r} is reserved: {why}"


__all__ = ["APP_NAME_RE", "DEVICE_NAME_RE", "MAX_APP_NAME", "UNPUBLISHABLE_APPS",
           "unpublishable_app"]
