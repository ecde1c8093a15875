"""A tiny process supervisor, as systemd's Restart=always would run a device's agent; the
program is lab.supervise (`python -m lab.supervise --status FILE -- ARGV...`), this is its logic
and its status file, which lab.fleet reads. Two modules because the lab package imports this one
(through lab.fleet): a module run with `python -m` must not be one the package imports first.

A Supervisor starts ARGV, and whenever it exits (any status, any signal) starts it again after
RESTART_DELAY; a child that keeps dying young waits longer each time (doubling up to MAX_DELAY,
like systemd's RestartSteps), so a crash loop cannot eat the machine. SIGTERM/SIGINT: stop the
child (SIGTERM, then SIGKILL after STOP_TIMEOUT: the agent needs a moment to stop its
wireguard-go) and exit without restarting.

FILE (JSON, replaced atomically) says what is going on: ``{"supervisor_pid", "pid", "start",
"restarts", "state", "last_exit"}``; ``pid`` is the running child's (``start`` its start time in
/proc/PID/stat, against PID reuse), ``state`` is running, restarting, stopping or stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

from ._host import proc_start_time

RESTART_DELAY: Final = 1.0  # systemd's RestartSec=1s, the brief for the lab's agents
MAX_DELAY: Final = 30.0  # bounded backoff for a crash loop
HEALTHY_RUN: Final = 10.0  # a child that ran this long gets the short delay again
STOP_TIMEOUT: Final = 15.0  # SIGTERM -> SIGKILL (systemd's default is 90 s; the lab is impatient)
POLL: Final = 0.2


def write_status(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def next_delay(previous: float, ran: float) -> float:
    """The pause before the next start: RESTART_DELAY after a child that ran HEALTHY_RUN or
    longer, else twice the previous pause, at most MAX_DELAY."""
    if ran >= HEALTHY_RUN:
        return RESTART_DELAY
    return min(MAX_DELAY, max(RESTART_DELAY, previous * 2))


class Supervisor:
    def __init__(self, argv: Sequence[str], status_path: Path):
        self.argv = list(argv)
        self.status_path = status_path
        self.stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.last_exit: int | None = None

    def _status(self, state: str) -> None:
        pid = self.child.pid if self.child is not None and state == "running" else None
        write_status(self.status_path, {
            "supervisor_pid": os.getpid(), "pid": pid,
            "start": proc_start_time(pid) if pid else None, "restarts": self.restarts,
            "state": state, "last_exit": self.last_exit, "argv": self.argv,
        })

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping.set()
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        delay = RESTART_DELAY
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
            except OSError as e:
                print(f"supervise: cannot start {self.argv[0]}: {e}", file=sys.stderr, flush=True)
                self.child = None
            else:
                self._status("running")
                self._wait_child()
            if self.stopping.is_set():
                break
            delay = next_delay(delay, time.monotonic() - started)
            print(f"supervise: {self.argv[0]} exited ({self.last_exit}); restarting in "
                  f"{delay:.0f} s", file=sys.stderr, flush=True)
            self._status("restarting")
            if self.stopping.wait(delay):
                break
            self.restarts += 1
        self._status("stopping")
        self._stop_child()
        self._status("stopped")
        return 0

    def _wait_child(self) -> None:
        assert self.child is not None
        while not self.stopping.is_set():  # a signal during Popen found no child to forward to
            try:
                self.last_exit = self.child.wait(timeout=POLL)
            except subprocess.TimeoutExpired:
                continue
            return

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        try:
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=5)
        except ProcessLookupError:
            pass
        self.last_exit = child.returncode
