"""Helpers for the lab tests: root/tool guards and a lab that is always torn down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lab import LOG_DIR, Lab, LabAlreadyUp, Topology, teardown_all
from lab._host import lab_netns_names, read_state

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / ".venv" / "bin" / "fleetmesh-lab"
# lab_cli runs this tree's fleetmesh-lab: the venv's console script may belong to another
# checkout, whose lab need not read a state file this tree's lab wrote
THIS_CLI = [sys.executable, "-m", "lab.cli"]
NEEDED_TOOLS = ("nsenter", "unshare", "iptables-restore", "tc", "busybox", "iperf3", "mount")


def lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network and mount namespaces)"
    missing = [t for t in NEEDED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"lab tests need {', '.join(missing)}"
    return None


def require_lab_machine() -> None:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    if Lab.is_up():
        message = "a lab is already up on this machine; not touching it (fleetmesh-lab down)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI nothing else runs: a leftover lab is a bug
        pytest.skip(message)


def teardown_if_ours() -> None:
    """Remove the lab if this test process made it (or it crashed without a state file);
    leave alone a lab someone else brought up on the same machine meanwhile."""
    state = read_state()
    if state is None:
        if lab_netns_names():
            teardown_all()  # a crashed lab: state.json is written before any namespace
        return
    if state.get("owner_pid") == os.getpid():
        teardown_all()


@contextmanager
def lab_up(topology: Topology, network_only: bool = True) -> Iterator[Lab]:
    """Bring a lab up (with the fleet unless network_only) and ALWAYS remove it again,
    whatever the test does."""
    require_lab_machine()
    try:
        lab = Lab.up(topology, network_only=network_only)
    except LabAlreadyUp:
        pytest.skip("another lab came up on this machine meanwhile")
    try:
        yield lab
    finally:
        try:
            keep_logs(topology)
        finally:
            teardown_if_ours()


def keep_logs(topology: Topology) -> None:
    """The lab's logs (agents, coordinator, engines) outlive it in
    test-artifacts/lab-logs/<test module>/, so a failure in CI can be read afterwards; the
    next run of the same module replaces them."""
    if not LOG_DIR.is_dir():
        return
    dest = REPO / "test-artifacts" / "lab-logs" / Path(topology.source or "lab").stem
    shutil.rmtree(dest, ignore_errors=True)
    try:
        shutil.copytree(LOG_DIR, dest, ignore_dangling_symlinks=True)
    except (OSError, shutil.Error) as exc:  # the copy is a help, never a reason to fail
        print(f"lab logs not kept in {dest}: {exc}")


def log_tail(device: str, lines: int = 60) -> str:
    """The end of a device's agent log, for a failure's message: which neighbours it found,
    where it fetched from and why."""
    try:
        text = (LOG_DIR / f"{device}.log").read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def lab_cli(*argv: str, timeout: float = 300, check: bool = True) -> str:
    """`fleetmesh-lab ARGV`'s output; a non-zero exit (with `check`) fails the test with it."""
    r = subprocess.run([*THIS_CLI, *argv], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"fleetmesh-lab {' '.join(argv)}: exit {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def operator(*argv: str, timeout: float = 300) -> str:
    """A command on the lab's operator node (its fleet config, key and engine)."""
    return lab_cli("exec", "operator", "--", *argv, timeout=timeout)


def release_status(app: str, version: int) -> dict[str, dict[str, Any]]:
    """`fleetmesh release status VERSION --app APP --json`, by device."""
    out = json.loads(operator("fleetmesh", "release", "status", str(version), "--app", app,
                              "--json", timeout=60))
    return {d["device"]: d for d in out["devices"]}
