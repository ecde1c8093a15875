"""Host-side helpers: root check, overlap check, process scans, mounts, state file."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import ipaddress
import json
import os
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from pyroute2 import IPRoute

STATE_DIR: Final = Path("/run/fleetmesh-lab")
STATE_FILE: Final = STATE_DIR / "state.json"
LOCK_FILE: Final = STATE_DIR / "lock"
LOG_DIR: Final = STATE_DIR / "logs"  # the lab's processes' logs (engines, coordinator, agents)
NETNS_DIR: Final = Path("/var/run/netns")
NETNS_PREFIX: Final = "fm-"
WG_RUN_DIR: Final = Path("/run/wireguard")
CONTAINERD_RUN_DIR: Final = Path("/run/containerd")

MNT_DETACH: Final = 2


class LabError(RuntimeError):
    """A lab operation failed; str() is one line for the user."""


class LabUsageError(LabError):
    """The caller asked for something impossible (not root, overlap with the host, ...)."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabUsageError("must run as root (the lab creates network and mount namespaces)")


def host_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """The host's IPv4 address networks and non-default routes, with a description each."""
    out: list[tuple[ipaddress.IPv4Network, str]] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        for a in ipr.get_addr(family=socket.AF_INET):
            addr = a.get("IFA_ADDRESS") or a.get("address")
            plen = a["prefixlen"]
            if addr is None:
                continue
            net = ipaddress.IPv4Network(f"{addr}/{plen}", strict=False)
            out.append((net, f"address {addr}/{plen} on {names.get(a['index'], '?')}"))
        for r in ipr.get_routes(family=socket.AF_INET):
            if r.get("RTA_TABLE", r.get("table")) == 255:
                continue  # the local table only repeats the addresses above
            dst_len = r["dst_len"]
            if dst_len == 0:
                continue  # the default route overlaps everything by definition
            dst = r.get("RTA_DST") or r.get("dst")
            if dst is None:
                continue
            net = ipaddress.IPv4Network(f"{dst}/{dst_len}", strict=False)
            oif = names.get(r.get("RTA_OIF") or r.get("oif"), "?")
            out.append((net, f"route {net} dev {oif}"))
    return out


def check_host_overlap(subnets: Iterable[tuple[str, ipaddress.IPv4Network]]) -> None:
    host = host_networks()
    for field, net in subnets:
        for hnet, what in host:
            if net.overlaps(hnet):
                raise LabUsageError(
                    f"{field}: {net} overlaps the host's {what}; pick another subnet"
                )


# --- processes -------------------------------------------------------------------------------


def ns_inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_ns(kind: str, inode: int) -> list[int]:
    """PIDs whose /proc/PID/ns/<kind> is the namespace with this inode (like `ip netns pids`)."""
    want = f"{kind}:[{inode}]"
    out = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            if os.readlink(f"/proc/{pid}/ns/{kind}") == want:
                out.append(pid)
        except OSError:
            continue
    return out


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: distinguishes a process from a later one reusing its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()
    if rest[0] == "Z":
        return None  # a zombie is as good as gone
    return int(rest[19])


def kill_pids(pids: Iterable[int], timeout: float = 2.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL what is left. Only the given PIDs."""
    targets = {p: proc_start_time(p) for p in set(pids)}
    targets = {p: s for p, s in targets.items() if s is not None}
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def alive() -> list[int]:
        return [p for p, s in targets.items() if proc_start_time(p) == s]

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 1.0
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)


# --- mounts ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def umount(path: str) -> None:
    if _libc.umount2(path.encode(), 0) != 0:
        _libc.umount2(path.encode(), MNT_DETACH)


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below prefix in our mount namespace, deepest first."""
    points = []
    pre = str(prefix)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == pre or mp.startswith(pre + "/"):
                points.append(mp)
    return sorted(points, key=lambda p: (-p.count("/"), p))


def is_mountpoint(path: Path) -> bool:
    return str(path) in mounts_under(path)


# --- state -----------------------------------------------------------------------------------


@contextmanager
def state_lock() -> Iterator[None]:
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_state() -> dict[str, Any] | None:
    try:
        return json.loads(STATE_FILE.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None


def write_state(state: dict[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, STATE_FILE)


def lab_netns_names() -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(NETNS_PREFIX))
