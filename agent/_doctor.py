"""`fleetmesh-agent doctor`: is this host ready to run the agent? One line per check.

Each check is a function of `Probes`, the few calls that touch the host (a file's stat, a
socket, a subprocess), so that tests can play a broken host; `Probes()` is the real one.
A check says ok, FAIL with what to fix, or skip when it does not apply.
"""

from __future__ import annotations

import ctypes
import email.utils
import http.client
import ipaddress
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from mesh.tlspin import pinned_ssl_context

from ._datadir import DataDir, DataDirError, Identity

TUN_PATH: Final = "/dev/net/tun"
TUN_RDEV: Final = (10, 200)  # misc char device 200: the kernel's TUN/TAP clone device
DEFAULT_DOCKER_HOST: Final = "unix:///var/run/docker.sock"
MAX_SKEW_S: Final = 30.0  # the Date header has 1 s resolution; certificates and tokens expire
MIN_FREE_BYTES: Final = 1024**3  # room for a release's layers, its delta and the rebuild
PROBE_TIMEOUT_S: Final = 5.0
TIME_ERROR: Final = 5  # adjtimex(2): the clock is not synchronized


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool | None  # None: skipped, does not apply here
    detail: str

    def line(self) -> str:
        word = "skip" if self.ok is None else "ok  " if self.ok else "FAIL"
        return f"{word} {self.name}: {self.detail}"


def _module_loaded(name: str) -> bool:
    return Path("/sys/module", name).exists()


def _open_tun() -> None:
    os.close(os.open(TUN_PATH, os.O_RDWR))


def _docker_version(host: str) -> str:
    import docker  # start-up time: only doctor needs the client here

    client = docker.DockerClient(base_url=host, timeout=int(PROBE_TIMEOUT_S))
    try:
        return str(client.version().get("Version", "unknown"))
    finally:
        client.close()


def _ntp_synchronized() -> bool | None:
    """timedatectl's word when it answers (systemd hosts), else the kernel's adjtimex state."""
    if shutil.which("timedatectl"):
        try:
            done = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                                  capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0 and done.stdout.strip() in ("yes", "no"):
            return done.stdout.strip() == "yes"
    buf = ctypes.create_string_buffer(512)  # struct timex, modes 0: read only
    try:
        state = ctypes.CDLL(None, use_errno=True).adjtimex(buf)
    except (OSError, AttributeError):
        return None
    if not isinstance(state, int) or state < 0:
        return None
    return state != TIME_ERROR


def _coordinator_date(identity: Identity) -> float:
    """The coordinator's clock from its Date header, through the pinned certificate."""
    parts = urlsplit(identity.url)
    host, port = parts.hostname or "", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=PROBE_TIMEOUT_S,
                                           context=pinned_ssl_context(identity.cert_der))
    else:
        conn = http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.request("GET", "/")
        date = conn.getresponse().getheader("Date")
    finally:
        conn.close()
    if date is None:
        raise ValueError("its answer has no Date header")
    return email.utils.parsedate_to_datetime(date).timestamp()


def _resolve(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass(frozen=True, slots=True)
class Probes:
    which: Callable[[str], str | None] = shutil.which
    module_loaded: Callable[[str], bool] = _module_loaded
    stat_tun: Callable[[], os.stat_result] = field(default=lambda: os.stat(TUN_PATH))
    open_tun: Callable[[], None] = _open_tun
    docker_version: Callable[[str], str] = _docker_version
    ntp_synchronized: Callable[[], bool | None] = _ntp_synchronized
    coordinator_date: Callable[[Identity], float] = _coordinator_date
    resolve: Callable[[str], list[str]] = _resolve
    disk_free: Callable[[Path], int] = _disk_free
    now: Callable[[], float] = time.time


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def check_wireguard(p: Probes) -> Check:
    found = p.which("wireguard-go")
    kernel = p.module_loaded("wireguard")
    if found:
        also = " (the kernel module is loaded too; the agent uses wireguard-go)" if kernel else ""
        return Check("wireguard", True, f"wireguard-go at {found}{also}")
    if kernel:
        return Check("wireguard", False, "the kernel module is loaded but the agent runs "
                     "wireguard-go, not on PATH: apt install wireguard-go")
    return Check("wireguard", False, "no wireguard-go on PATH (and no kernel module): "
                 "apt install wireguard-go")


def check_tun(p: Probes) -> Check:
    try:
        st = p.stat_tun()
    except FileNotFoundError:
        return Check("tun", False, f"{TUN_PATH} is missing: modprobe tun (in a container: "
                     f"--device {TUN_PATH})")
    except OSError as exc:
        return Check("tun", False, f"cannot stat {TUN_PATH}: {_reason(exc)}")
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if not stat.S_ISCHR(st.st_mode) or rdev != TUN_RDEV:
        kind = f"char device {rdev[0]}:{rdev[1]}" if stat.S_ISCHR(st.st_mode) else "no device"
        return Check("tun", False, f"{TUN_PATH} is {kind}, not the TUN device (char 10:200): "
                     f"give the agent the host's {TUN_PATH} (in a container: --device "
                     f"{TUN_PATH})")
    try:
        p.open_tun()
    except OSError as exc:
        return Check("tun", False, f"cannot open {TUN_PATH}: {_reason(exc)} (run as root or "
                     "with CAP_NET_ADMIN; in a container: --device /dev/net/tun)")
    return Check("tun", True, f"{TUN_PATH} opens read-write")


def check_docker(p: Probes, docker_host: str | None) -> Check:
    host = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    try:
        version = p.docker_version(host)
    except Exception as exc:  # noqa: BLE001 - whatever the client raises is the reason
        return Check("docker", False, f"no Docker engine answers at {host}: {_reason(exc)} "
                     "(start it: systemctl start docker; or set DOCKER_HOST / --docker-host)")
    return Check("docker", True, f"Docker Engine {version} at {host}")


def _ntp_check(p: Probes, note: str) -> Check:
    synced = p.ntp_synchronized()
    if synced is None:
        return Check("clock", None, f"cannot tell whether the clock is synchronized{note}")
    if synced:
        return Check("clock", True, f"NTP-synchronized{note}")
    return Check("clock", False, f"not NTP-synchronized{note}: enable systemd-timesyncd or "
                 "chrony (certificates, tokens and rollout windows need the right time)")


def check_clock(p: Probes, identity: Identity | None) -> Check:
    if identity is None:
        return _ntp_check(p, "")
    try:
        theirs = p.coordinator_date(identity)
    except Exception as exc:  # noqa: BLE001 - unreachable, TLS, bad header: fall back to NTP
        return _ntp_check(p, f" (coordinator not asked: {_reason(exc)})")
    skew = p.now() - theirs
    if abs(skew) > MAX_SKEW_S:
        return Check("clock", False, f"{skew:+.0f} s off the coordinator's clock: set it and "
                     "enable NTP (systemd-timesyncd or chrony)")
    return Check("clock", True, f"within {max(abs(skew), 1.0):.0f} s of the coordinator's")


def check_dns(p: Probes, identity: Identity | None) -> Check:
    if identity is None:
        return Check("dns", None, "not enrolled: no coordinator name to resolve")
    host = urlsplit(identity.url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return Check("dns", None, f"the coordinator is an address ({host}): nothing to resolve")
    try:
        addresses = p.resolve(host)
    except OSError as exc:
        return Check("dns", False, f"cannot resolve {host}: {_reason(exc)} (check "
                     "/etc/resolv.conf and the network)")
    return Check("dns", True, f"{host} is {', '.join(addresses)}")


def check_disk(p: Probes, data: Path) -> Check:
    where = data
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = p.disk_free(where)
    except OSError as exc:
        return Check("disk", False, f"cannot measure free space at {where}: {_reason(exc)}")
    text = f"{free / 1024**3:.1f} GiB free at {where}"
    if free < MIN_FREE_BYTES:
        return Check("disk", False, f"only {text}: releases need at least "
                     f"{MIN_FREE_BYTES // 1024**3} GiB for layers, deltas and the rebuild")
    return Check("disk", True, text)


def check_enrollment(data: DataDir) -> tuple[Check, Identity | None]:
    if not data.is_enrolled():
        return Check("enrollment", None, f"{data.path} is not enrolled (fleetmesh-agent "
                     "join)"), None
    try:
        identity = data.read_identity()
    except DataDirError as exc:
        return Check("enrollment", False, f"{exc} (remove {data.enrollment_path} and join "
                     "again)"), None
    who = identity.enrollment
    return Check("enrollment", True, f"{who.name} in fleet {who.fleet}, coordinator "
                 f"{identity.url}"), identity


def diagnose(data: Path, docker_host: str | None = None,
             probes: Probes | None = None) -> list[Check]:
    p = probes or Probes()
    enrolled, identity = check_enrollment(DataDir(data))
    return [check_wireguard(p), check_tun(p), check_docker(p, docker_host), enrolled,
            check_clock(p, identity), check_dns(p, identity), check_disk(p, data)]


__all__ = ["Check", "Probes", "diagnose"]
