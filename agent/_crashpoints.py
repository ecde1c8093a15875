"""Named points where a test can have the agent killed with a real SIGKILL.

    echo after-stop-old > DATA/crash-at      # the next time the agent passes that point, it dies

`crash_point(name)` reads `DATA/crash-at` (one name); if it names this point, the file is removed
(and the removal fsynced, so a restarted agent does not die again at the same place) and the
process sends itself SIGKILL: no finally blocks, no atexit, no flushing, exactly like the power
cord or the OOM killer. The lab's crash test walks ALL_CRASH_POINTS (issue 6, acceptance).
Without `arm(data_dir)` (every production start calls it; tests that must not die do not)
nothing is read.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Final

CRASH_FILE: Final = "crash-at"

# In the order an update passes them (docs/agent-apply.md describes each).
ALL_CRASH_POINTS: Final = (
    "after-blob-stored",  # gossip: a verified blob was just written to the store
    "before-load",  # apply: rebuilding the image from blobs is about to start
    "after-materialize",  # the verified image tar exists, not yet `docker load`ed
    "after-load",  # loaded and tagged, nothing stopped yet
    "before-stop-old",  # the journal says "stopping"; the old container still runs
    "after-stop-old",  # the old container is stopped, the new one not created
    "after-create-new",  # the new container exists, not started
    "after-start-new",  # the new container was started, the journal not yet "checking"
    "during-health",  # a health probe ran; not yet passed
    "before-commit",  # the check passed; the journal still says "checking"
    "after-commit-journal",  # committed on disk; the old container not yet removed
    "after-remove-old",  # the old container removed; the new one not yet renamed
    "before-rollback",  # the journal says "rolling-back"; nothing undone yet
    "during-rollback",  # the failed container is removed, the old one not started
    "after-rollback",  # the old container runs again; the journal still says "rolling-back"
)

# Process-wide on purpose: the points sit in the gossip node and the applier alike, and a
# crash file concerns the whole process.
_armed: list[Path] = []


def arm(data_dir: str | os.PathLike[str]) -> None:
    """Honour `<data_dir>/crash-at` from now on (the agent calls this at start)."""
    _armed[:] = [Path(data_dir) / CRASH_FILE]


def disarm() -> None:
    _armed.clear()


def crash_point(name: str) -> None:
    """SIGKILL this process if the armed crash file names `name`."""
    if name not in ALL_CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if not _armed:
        return
    path = _armed[0]
    try:
        wanted = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return
    if wanted != name:
        return
    path.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ALL_CRASH_POINTS", "CRASH_FILE", "arm", "crash_point", "disarm"]
