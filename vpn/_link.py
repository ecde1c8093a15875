"""wireguard-go processes and their interfaces' addresses, MTU, state and routes (pyroute2)."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Interface, IPv6Interface
from types import TracebackType
from typing import IO, Any, Final, Self

from ._backend import UapiBackend
from ._model import IPNetwork
from ._uapi import UapiClient, UapiProtocolError

NETNS_RUN_DIR: Final = "/var/run/netns"
# Linux IFNAMSIZ is 16 including the NUL; wireguard-go also uses the name in a socket path.
_IFNAME_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
# WireGuard's default MTU: 1500 minus 80 bytes of IPv6+UDP+WireGuard overhead (wg-quick).
DEFAULT_MTU: Final = 1420
IFA_F_NODAD: Final = 0x02  # linux/if_addr.h: skip duplicate address detection for IPv6

IPInterface = IPv4Interface | IPv6Interface


class WireGuardGoError(RuntimeError):
    """wireguard-go did not start, or its control socket never answered."""


def check_ifname(ifname: str) -> str:
    if not isinstance(ifname, str) or not _IFNAME_RE.match(ifname):
        raise ValueError(
            f"invalid interface name {ifname!r}: 1-15 characters of letters, digits, '_', '.', '-'"
        )
    return ifname


def netns_path(netns: str) -> str:
    """A namespace name (as in `ip netns`) or a path (/var/run/netns/X, /proc/PID/ns/net)."""
    if not netns:
        raise ValueError("empty network namespace name")
    path = netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {netns!r} does not exist ({path})")
    return path


_PROC_MNT = re.compile(r"^/proc/(\d+)/ns/mnt$")


# `mountns` that runs wireguard-go in the caller's own mount namespace (in a container)
OWN_MOUNT_NAMESPACE: Final = "self"


def mount_namespace_args(mountns: str) -> list[str]:
    """nsenter arguments that enter a mount namespace. Entering one resets the root directory
    to the namespace's own root, which escapes a chroot (a fresh-debian box, a container
    build); for /proc/PID/ns/mnt, --root=/proc/PID/root restores that process's root."""
    found = _PROC_MNT.match(mountns)
    root = [f"--root=/proc/{found.group(1)}/root"] if found else []
    return [f"--mount={mountns}", *root]


class WireGuardGo:
    """Owns one wireguard-go child process: start it, find its UAPI socket, stop it by PID.

    wireguard-go puts its socket in /run/wireguard, which every network namespace shares, so each
    daemon runs in a private mount namespace with its own tmpfs there; we reach the socket through
    /proc/PID/root, which resolves paths inside the daemon's mount namespace.
    """

    def __init__(
        self,
        executable: str = "wireguard-go",
        start_timeout: float = 5.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.executable = executable
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ifname: str | None = None
        self.netns: str | None = None

    # -- properties --------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("wireguard-go is not started")
        return self._proc.pid

    @property
    def ifname(self) -> str:
        if self._ifname is None:
            raise RuntimeError("wireguard-go is not started")
        return self._ifname

    @property
    def socket_path(self) -> str:
        return f"/proc/{self.pid}/root/run/wireguard/{self.ifname}.sock"

    @property
    def mount_namespace(self) -> str:
        """Path to the daemon's mount namespace, for `nsenter --mount=` (e.g. to run wg)."""
        return f"/proc/{self.pid}/ns/mnt"

    def enter(self, argv: list[str]) -> list[str]:
        """argv run in the daemon's network and mount namespaces (so `wg` finds its socket)."""
        net = [f"--net={netns_path(self.netns)}"] if self.netns is not None else []
        return ["nsenter", *net, *mount_namespace_args(self.mount_namespace), "--", *argv]

    def client(self, timeout: float = 5.0) -> UapiClient:
        return UapiClient(self.socket_path, timeout=timeout)

    def backend(self) -> UapiBackend:
        return UapiBackend(self.socket_path)

    # -- lifecycle ---------------------------------------------------------

    def command(self, ifname: str, netns: str | None, mountns: str | None) -> list[str]:
        check_ifname(ifname)
        enter: list[str] = []
        if netns is not None:
            enter.append(f"--net={netns_path(netns)}")
        if mountns == OWN_MOUNT_NAMESPACE:
            # a container's /run is its own already: nothing to make private
            return ["nsenter", *enter, self.executable, "-f", ifname] if enter else [
                self.executable, "-f", ifname]
        if mountns is not None:
            if not os.path.exists(mountns):
                raise FileNotFoundError(f"mount namespace {mountns!r} does not exist")
            # The lab's node mount namespace already has a private tmpfs on /run/wireguard.
            return ["nsenter", *enter, *mount_namespace_args(mountns), self.executable, "-f",
                    ifname]
        # The interface name is passed as $1, never spliced into the shell text.
        script = (
            "mkdir -p /run/wireguard && mount -t tmpfs -o mode=0700 tmpfs /run/wireguard"
            ' && exec "$0" -f "$1"'
        )
        inner = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            self.executable,
            ifname,
        ]
        # nsenter and unshare (without --fork) exec in place, so Popen's PID is the daemon's.
        return ["nsenter", *enter, *inner] if enter else inner

    def start(
        self, ifname: str, netns: str | None = None, mountns: str | None = None
    ) -> WireGuardGo:
        if self._proc is not None:
            raise RuntimeError("this WireGuardGo was already started")
        argv = self.command(ifname, netns, mountns)
        # Kept open for the daemon's lifetime (closed in stop()), so no `with` here.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        env = dict(os.environ, LOG_LEVEL=os.environ.get("WG_LOG_LEVEL", "error"))
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # our Ctrl-C must not reach it before we stop it in order
            )
        except FileNotFoundError as exc:
            self._log.close()
            self._log = None
            raise WireGuardGoError(f"cannot run {argv[0]!r}: {exc}") from exc
        self._ifname = ifname
        self.netns = netns
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read(8192).decode("utf-8", "replace")
        # Drop wireguard-go's boxed "kernel has first class support" banner noise.
        lines = [
            ln
            for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith(("│", "┌", "└"))
        ]
        return " | ".join(lines[-5:])

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise WireGuardGoError(
                    f"wireguard-go for {self._ifname} exited with status {rc}: {self._output()}"
                )
            if os.path.exists(self.socket_path):
                try:
                    self.client(timeout=1.0).get()
                    return
                except (OSError, UapiProtocolError) as exc:
                    last_error = exc
            if time.monotonic() >= deadline:
                raise WireGuardGoError(
                    f"wireguard-go for {self._ifname} did not answer on {self.socket_path} "
                    f"within {self.start_timeout:g}s (last error: {last_error})"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM by PID, wait, SIGKILL if it lingers. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.stop_timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self._proc is not None else "not started"
        return f"WireGuardGo({self._ifname!r}, {state})"


# --------------------------------------------------------------------------- links and routes


@contextmanager
def iproute(netns: str | None = None) -> Iterator[Any]:
    """An IPRoute socket; a netlink error inside the block comes out as an OSError with its
    errno (pyroute2's NetlinkError is not one), so callers report it like any system error."""
    from pyroute2 import IPRoute  # start-up time: pyroute2 takes ~160 ms to import
    from pyroute2.netlink.exceptions import NetlinkError  # (the same reason)

    if netns is None:
        ipr = IPRoute()
    else:
        # flags=0: pyroute2 would otherwise create a missing namespace silently.
        ipr = IPRoute(netns=netns_path(netns), flags=0)
    try:
        yield ipr
    except NetlinkError as exc:
        code = exc.code if isinstance(exc.code, int) else errno.EIO
        raise OSError(code, f"netlink: {os.strerror(code)}") from None
    finally:
        ipr.close()


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=check_ifname(ifname))
    if not found:
        raise FileNotFoundError(f"no interface {ifname!r}")
    return int(found[0])


def configure_link(
    ifname: str,
    netns: str | None,
    addresses: Iterable[IPInterface],
    mtu: int = DEFAULT_MTU,
    up: bool = True,
) -> None:
    """Make the link's addresses exactly `addresses` (IPv6 link-local ones aside), set its MTU
    and bring it up. Idempotent: a second call with the same arguments changes nothing."""
    wanted = list(addresses)
    for a in wanted:
        if not isinstance(a, (IPv4Interface, IPv6Interface)):
            raise TypeError(f"addresses must be ip_interface objects, got {a!r}")
    if not 68 <= mtu <= 65535:  # 68: the IPv4 minimum (RFC 791)
        raise ValueError(f"MTU {mtu} out of range 68..65535")
    with iproute(netns) as ipr:
        idx = _index(ipr, ifname)
        ipr.link("set", index=idx, mtu=mtu)
        current: set[IPInterface] = set()
        for msg in ipr.addr("dump", index=idx):
            addr = msg.get_attr("IFA_ADDRESS")
            iface = ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}")
            if not (isinstance(iface, IPv6Interface) and iface.ip.is_link_local):
                current.add(iface)
        for iface in current - set(wanted):
            ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        for iface in wanted:
            if iface in current:
                continue
            kwargs: dict[str, Any] = {}
            if isinstance(iface, IPv6Interface):
                # No DAD: the tunnel address must be usable at once, not "tentative" for ~1 s.
                kwargs["flags"] = IFA_F_NODAD
            ipr.addr(
                "add",
                index=idx,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                **kwargs,
            )
        if up:
            ipr.link("set", index=idx, state="up")


def _route_args(dst: IPNetwork) -> dict[str, Any]:
    if not isinstance(dst, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        raise TypeError(f"route destination must be an ip_network, got {dst!r}")
    family = 2 if dst.version == 4 else 10  # AF_INET, AF_INET6
    return {"dst": str(dst.network_address), "dst_len": dst.prefixlen, "family": family}


def add_route(dst: IPNetwork, ifname: str, netns: str | None = None) -> None:
    """Route `dst` into the interface; `replace` makes it idempotent."""
    with iproute(netns) as ipr:
        idx = _index(ipr, ifname)
        ipr.route("replace", oif=idx, **_route_args(dst))


def remove_route(dst: IPNetwork, ifname: str, netns: str | None = None) -> bool:
    """Remove the route if present; returns whether one was removed."""
    # start-up time: pyroute2 is slow to import
    from pyroute2.netlink.exceptions import NetlinkError

    with iproute(netns) as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.route("del", oif=idx, **_route_args(dst))
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise
        return True


def routes(ifname: str, netns: str | None = None) -> list[IPNetwork]:
    """Destinations routed into the interface (main table), for reconciling routes."""
    out: list[IPNetwork] = []
    with iproute(netns) as ipr:
        idx = _index(ipr, ifname)
        for family in (2, 10):
            for msg in ipr.route("dump", family=family, oif=idx):
                dst = msg.get_attr("RTA_DST")
                if dst is None:
                    continue
                net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
                if isinstance(net, ipaddress.IPv6Network) and net.is_link_local:
                    continue
                out.append(net)
    return out
