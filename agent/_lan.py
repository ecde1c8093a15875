"""LAN discovery for the device agent: mDNS (zeroconf) on the underlay interface only.

Each agent advertises `<device>._fleetmesh._udp.local.` on its LAN underlay (never on the
WireGuard interface or any other), with its underlay IPv4 address, its WireGuard listen port and
a TXT record `id`, `fp` (first 16 hex digits of sha256 over the raw 32-byte WireGuard public key),
`fleet` and `v` (protocol version). It browses for the same type and keeps `LanNeighbours`:
device name -> (underlay IPv4, port, fingerprint, last seen).

Trust: everything received here is a *hint* about who might be on this LAN. mDNS is
unauthenticated; anyone on the segment can claim any name, address or fingerprint. A neighbour
found here is only a candidate LAN endpoint for a peer the coordinator already told us about,
and counts only if it advertises the fingerprint of the key the peer map has for its name, from
an address on our subnet (`lan_peers`, joined again on every peer-map change by the agent);
the WireGuard handshake (which proves possession of the peer's private key) is what establishes
identity. Never use TXT contents for authorisation, key material or anything but "try this
address first". Every received record is validated and size-bounded; malformed input is counted
and dropped, never raised.

Threads: zeroconf runs its own asyncio loop on its own thread (`use_asyncio=False`); its sync
API is called from trio through `trio.to_thread.run_sync`, and the threaded `ServiceBrowser`'s
callbacks are forwarded into trio with `trio.from_thread.run_sync(..., trio_token=...)`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import re
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Interface
from typing import Any, Final

import trio

from mesh.names import DEVICE_NAME_RE

SERVICE_TYPE: Final = "_fleetmesh._udp.local."
PROTOCOL_VERSION: Final = 1
FP_RE: Final = re.compile(r"[0-9a-f]{16}")
FP_HEX_DIGITS: Final = 16  # 64 bits: enough to tell LAN neighbours apart; not an identity proof
KEY_BYTES: Final = 32  # Curve25519 public key (RFC 7748)
MAX_NEIGHBOURS: Final = 256  # a LAN segment bigger than this is not a home/office LAN
MAX_PENDING: Final = 4 * MAX_NEIGHBOURS  # distinct names waiting to be resolved
MAX_TXT_BYTES: Final = 400  # ours is ~90 bytes; RFC 6763 §6.2 suggests keeping TXT under 200
MAX_TXT_KEYS: Final = 16
MAX_ADDRESSES: Final = 16  # A records per advert we are willing to look at
RESOLVE_TIMEOUT_MS: Final = 3000  # zeroconf's get_service_info default
RESOLVE_CONCURRENCY: Final = 8
# RFC 6762 §10: 120 s for records carrying host names. We use it for PTR/TXT too (default
# 75 min) so that a device that vanishes without a goodbye expires from caches in 2 minutes.
RECORD_TTL: Final = 120
REGISTER_TIMEOUT: Final = 10.0  # probing + announcing takes ~1.5 s (RFC 6762 §8.1, §8.3)
CLOSE_TIMEOUT: Final = 5.0  # goodbyes (3 x 125 ms) + thread joins
MAX_CLI_SECONDS: Final = 3600.0


class InvalidAdvert(ValueError):
    """A received advertisement we will not use; `reason` is the counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class LanDiscoveryError(Exception):
    """Local configuration or setup problem (bad own name, no such interface, ...)."""


@dataclass(frozen=True, slots=True)
class Neighbour:
    name: str
    ipv4: IPv4Address
    port: int
    fp: str
    last_seen: float

    def key(self) -> tuple[str, IPv4Address, int, str]:
        """Everything but last_seen: what a change means."""
        return (self.name, self.ipv4, self.port, self.fp)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ipv4": str(self.ipv4), "port": self.port, "fp": self.fp,
                "last_seen": round(self.last_seen, 3)}


@dataclass(frozen=True, slots=True)
class LanAdvert:
    """What this device advertises."""

    name: str
    fleet: str
    fp: str
    underlay: IPv4Interface
    port: int

    @property
    def instance(self) -> str:
        return f"{self.name}.{SERVICE_TYPE}"

    @property
    def server(self) -> str:
        # a sub-domain of .local so we never collide with the host's own avahi host name
        return f"{self.name}.fleetmesh.local."

    def txt(self) -> dict[str, str]:
        return {"id": self.name, "fp": self.fp, "fleet": self.fleet, "v": str(PROTOCOL_VERSION)}


# --- pure helpers -------------------------------------------------------------------------


def fingerprint(public_key: str | bytes) -> str:
    """First 16 hex digits of sha256 over the raw 32-byte WireGuard public key (base64 or raw)."""
    if isinstance(public_key, str):
        try:
            raw = base64.b64decode(public_key.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("public key is not valid base64") from exc
    else:
        raw = bytes(public_key)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"public key must be {KEY_BYTES} bytes, got {len(raw)}")
    return hashlib.sha256(raw).hexdigest()[:FP_HEX_DIGITS]


def valid_name(name: object) -> bool:
    return isinstance(name, str) and DEVICE_NAME_RE.fullmatch(name) is not None


def instance_label(fqdn: object) -> str:
    """The device name out of `<name>._fleetmesh._udp.local.` (case-sensitive: we advertise
    lower case and refuse anything else)."""
    if not isinstance(fqdn, str) or len(fqdn) > 63 + 1 + len(SERVICE_TYPE):
        raise InvalidAdvert("name", "too long or not text")
    suffix = "." + SERVICE_TYPE
    if not fqdn.lower().endswith(suffix.lower()):
        raise InvalidAdvert("name", "wrong service type")
    label = fqdn[: -len(suffix)]
    if not valid_name(label):
        raise InvalidAdvert("name", f"bad instance name {label[:70]!r}")
    return label


def _ascii(value: bytes | None, key: str) -> str:
    if value is None:
        raise InvalidAdvert("txt", f"{key} has no value")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidAdvert("txt", f"{key} is not ASCII") from None


def parse_advert(fqdn: str, port: object, addresses: Sequence[object],
                 properties: Mapping[object, object] | None, text_len: int, *,
                 fleet: str, underlay: IPv4Interface, now: float) -> Neighbour:
    """Validate one resolved advertisement. Raises InvalidAdvert(reason) for anything we will
    not use: reason is `name`, `txt`, `port`, `address`, `version` or `other-fleet`."""
    name = instance_label(fqdn)
    if not isinstance(text_len, int) or text_len > MAX_TXT_BYTES:
        raise InvalidAdvert("txt", "TXT record too long")
    if not isinstance(properties, Mapping) or len(properties) > MAX_TXT_KEYS:
        raise InvalidAdvert("txt", "missing or too many TXT keys")
    txt: dict[str, bytes | None] = {}
    for k, v in properties.items():
        if not isinstance(k, bytes) or not (v is None or isinstance(v, bytes)):
            raise InvalidAdvert("txt", "TXT keys and values must be bytes")
        txt[k.decode("ascii", "replace").lower()] = v
    for key in ("id", "fp", "fleet", "v"):
        if key not in txt:
            raise InvalidAdvert("txt", f"missing {key}")
    ident = _ascii(txt["id"], "id")
    if ident != name:
        raise InvalidAdvert("txt", "id does not match the instance name")
    fp = _ascii(txt["fp"], "fp")
    if FP_RE.fullmatch(fp) is None:
        raise InvalidAdvert("txt", "fp is not 16 lower-case hex digits")
    their_fleet = _ascii(txt["fleet"], "fleet")
    if not valid_name(their_fleet):
        raise InvalidAdvert("txt", "bad fleet name")
    version = _ascii(txt["v"], "v")
    if version != str(PROTOCOL_VERSION):
        raise InvalidAdvert("version", f"unsupported version {version[:8]!r}")
    if their_fleet != fleet:
        raise InvalidAdvert("other-fleet", their_fleet)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidAdvert("port", f"port {port!r} out of range")
    if len(addresses) > MAX_ADDRESSES:
        raise InvalidAdvert("address", "too many addresses")
    chosen: IPv4Address | None = None
    for a in addresses:
        try:
            ip = IPv4Address(a) if isinstance(a, (str, bytes, int)) and not isinstance(a, bool) \
                else None
        except ValueError:
            ip = None
        if ip is None:
            continue  # an IPv6 or garbage entry: skip, another may be good
        net = underlay.network
        if ip in net and ip not in (net.network_address, net.broadcast_address) \
                and ip != underlay.ip:
            chosen = ip
            break
    if chosen is None:
        raise InvalidAdvert("address", "no IPv4 address inside the underlay subnet")
    return Neighbour(name, chosen, port, fp, now)


def lan_peers(neighbours: Iterable[Neighbour], peer_keys: Mapping[str, str]
              ) -> frozenset[Neighbour]:
    """The neighbours that count as this device's LAN peers: those the peer map (`peer_keys`:
    name -> WireGuard public key, base64) has by name, advertising that key's fingerprint.
    Their address was checked against our underlay subnet by `parse_advert`. Anyone on the
    LAN can advertise any name; only the peer map says which key a name has, and a host
    outside the fleet does not know it. Pure: run again whenever either side changes."""
    out = []
    for n in neighbours:
        key = peer_keys.get(n.name)
        if key is None:
            continue
        try:
            expected = fingerprint(key)
        except ValueError:
            continue  # not a key: the peer map is validated elsewhere, count nobody for it
        if n.fp == expected:
            out.append(n)
    return frozenset(out)


# (name, fingerprint) pairs refused and logged once each; a LAN that churns through more is
# hostile, and only the logging forgets.
MAX_REFUSED_LOGGED: Final = 4 * MAX_NEIGHBOURS
LanDiscoveryFn = Callable[..., Awaitable[None]]


class LanPeerJoin:
    """LAN discovery's adverts joined with the peer map (`lan_peers`): whoever consumes the
    neighbours gets only the admitted ones, again after every change of either side (a peer
    map can arrive after the adverts, or give a name another key).

        join = LanPeerJoin(peer_keys, log)           # peer_keys() -> {name: public key}
        discover = join.wrap(run_lan_discovery)      # same signature, filtered on_change
        join.peers_changed()                         # the peer map changed
    """

    def __init__(self, peer_keys: Callable[[], Mapping[str, str]],
                 log: Callable[[str], None]) -> None:
        self.peer_keys = peer_keys
        self.log = log
        self._adverts: frozenset[Neighbour] = frozenset()
        self._sink: Callable[[frozenset[Neighbour]], None] | None = None
        self._told: frozenset[Neighbour] | None = None
        self._refused: set[tuple[str, str]] = set()

    def wrap(self, discover: LanDiscoveryFn) -> LanDiscoveryFn:
        """`discover` (run_lan_discovery's signature), its `on_change` told the admitted
        neighbours only."""
        async def discover_lan_peers(name: str, fleet: str, public_key: str | bytes,
                                     underlay: str, port: int,
                                     on_change: Callable[[frozenset[Neighbour]], None],
                                     **kw: Any) -> None:
            self._sink, self._told = on_change, None
            await discover(name, fleet, public_key, underlay, port, self.set_adverts, **kw)

        return discover_lan_peers

    def set_adverts(self, neighbours: Iterable[Neighbour]) -> None:
        self._adverts = frozenset(neighbours)
        self._tell()

    def peers_changed(self) -> None:
        self._tell()

    def _tell(self) -> None:
        if self._sink is None:
            return
        keys = self.peer_keys()
        admitted = lan_peers(self._adverts, keys)
        for n in self._adverts - admitted:
            if n.name in keys and (n.name, n.fp) not in self._refused:
                if len(self._refused) >= MAX_REFUSED_LOGGED:
                    self._refused.clear()
                self._refused.add((n.name, n.fp))
                self.log(f"LAN: {n.name} advertised from {n.ipv4} with key fingerprint {n.fp}, "
                         "not the peer map's: not taken for a LAN neighbour")
        if admitted != self._told:
            self._told = admitted
            self._sink(admitted)


class LanNeighbours:
    """The bounded set of validated LAN neighbours, by name. Pure bookkeeping."""

    def __init__(self, limit: int = MAX_NEIGHBOURS) -> None:
        self.limit = limit
        self._by_name: dict[str, Neighbour] = {}

    def upsert(self, n: Neighbour) -> str:
        """`added`, `updated` (address, port or fp changed), `seen` (only last_seen) or
        `full` (a new name while at the limit: not added)."""
        old = self._by_name.get(n.name)
        if old is None:
            if len(self._by_name) >= self.limit:
                return "full"
            self._by_name[n.name] = n
            return "added"
        self._by_name[n.name] = n
        return "seen" if old.key() == n.key() else "updated"

    def remove(self, name: str) -> bool:
        return self._by_name.pop(name, None) is not None

    def get(self, name: str) -> Neighbour | None:
        return self._by_name.get(name)

    def snapshot(self) -> frozenset[Neighbour]:
        return frozenset(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


def pick_underlay(addrs: Iterable[tuple[str, str, int]], spec: str) -> tuple[str, IPv4Interface]:
    """(ifname, address/prefix) for `spec`, an interface name or one of its IPv4 addresses,
    from (ifname, ipv4, prefixlen) rows. The first address of an interface wins."""
    rows = list(addrs)
    try:
        wanted: IPv4Address | None = IPv4Address(spec)
    except ValueError:
        wanted = None
    for ifname, ip, plen in rows:
        if (wanted is not None and IPv4Address(ip) == wanted) or (wanted is None
                                                                   and ifname == spec):
            iface = IPv4Interface(f"{ip}/{plen}")
            if iface.ip.is_loopback or iface.ip.is_multicast or iface.ip.is_unspecified:
                raise LanDiscoveryError(f"{spec}: not usable as a LAN underlay")
            return ifname, iface
    what = "address" if wanted is not None else "interface with an IPv4 address"
    raise LanDiscoveryError(f"no {what} {spec} in this network namespace")


def local_ipv4_addresses() -> list[tuple[str, str, int]]:
    """(ifname, ipv4, prefixlen) for this network namespace (pyroute2)."""
    from pyroute2 import IPRoute  # start-up time: pyroute2 takes ~160 ms to import

    ipr: Any = IPRoute()
    try:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        rows = []
        for msg in ipr.get_addr(family=socket.AF_INET):
            text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if text:
                rows.append((names.get(msg["index"]) or "", text, int(msg["prefixlen"])))
        return rows
    finally:
        ipr.close()


# --- the trio driver ----------------------------------------------------------------------


class _Discovery:
    """Trio-side state: browser events are coalesced per name (latest wins) into `pending`,
    resolved with bounded concurrency, at most one resolve per name at a time."""

    def __init__(self, zc: Any, advert: LanAdvert,
                 on_change: Callable[[frozenset[Neighbour]], None],
                 stats: Counter[str], now: Callable[[], float]) -> None:
        self.zc = zc
        self.advert = advert
        self.on_change = on_change
        self.stats = stats
        self.now = now
        self.neighbours = LanNeighbours()
        self.pending: dict[str, tuple[str, str]] = {}  # name -> (fqdn, "added"|"removed")
        self.in_flight: set[str] = set()
        self.wake = trio.Event()
        self.limiter = trio.CapacityLimiter(RESOLVE_CONCURRENCY)

    def note(self, fqdn: object, change: str) -> None:
        """A browser event, on the trio thread (via trio.from_thread.run_sync)."""
        try:
            name = instance_label(fqdn)
        except InvalidAdvert as exc:
            self.stats[f"malformed-{exc.reason}"] += 1
            return
        if name == self.advert.name:
            self.stats["self"] += 1  # our own announcements, looped back
            return
        if change == "removed" and name not in self.neighbours and name not in self.pending \
                and name not in self.in_flight:
            return
        if name not in self.pending and len(self.pending) >= MAX_PENDING:
            self.stats["dropped-flood"] += 1
            return
        self.pending[name] = (str(fqdn), change)
        self.wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                for name in list(self.pending):
                    if name in self.in_flight:
                        continue
                    fqdn, change = self.pending.pop(name)
                    self.in_flight.add(name)
                    nursery.start_soon(self._handle, name, fqdn, change)

    async def _handle(self, name: str, fqdn: str, change: str) -> None:
        try:
            if change == "removed":
                if self.neighbours.remove(name):
                    self.stats["removed"] += 1
                    self.on_change(self.neighbours.snapshot())
                return
            info = await trio.to_thread.run_sync(
                partial(self.zc.get_service_info, SERVICE_TYPE, fqdn, RESOLVE_TIMEOUT_MS),
                limiter=self.limiter, abandon_on_cancel=True)
            if info is None:
                self.stats["resolve-timeout"] += 1
                return
            try:
                n = parse_advert(fqdn, info.port, info.parsed_addresses(), info.properties,
                                 len(info.text or b""), fleet=self.advert.fleet,
                                 underlay=self.advert.underlay, now=self.now())
            except InvalidAdvert as exc:
                key = exc.reason if exc.reason == "other-fleet" else f"malformed-{exc.reason}"
                self.stats[key] += 1
                if self.neighbours.remove(name):  # it was valid before; not any more
                    self.on_change(self.neighbours.snapshot())
                return
            except Exception:  # zeroconf's own parsing of hostile records
                self.stats["malformed-record"] += 1
                return
            outcome = self.neighbours.upsert(n)
            self.stats[outcome] += 1
            if outcome in ("added", "updated"):
                self.on_change(self.neighbours.snapshot())
        finally:
            self.in_flight.discard(name)
            if name in self.pending:
                self.wake.set()


def _open_zeroconf(ip: str) -> Any:
    # start-up time: zeroconf (~65 ms of imports) is for `fleetmesh-agent run` alone
    from zeroconf import IPVersion, Zeroconf

    # interfaces=[ip]: multicast membership and the sending socket on the underlay only.
    # use_asyncio=False: zeroconf runs its own loop thread; we are under trio, not asyncio.
    return Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only, use_asyncio=False)


def _service_info(advert: LanAdvert) -> Any:
    from zeroconf import ServiceInfo  # start-up time, as in _open_zeroconf

    return ServiceInfo(SERVICE_TYPE, advert.instance, port=advert.port,
                       properties=advert.txt(), server=advert.server,
                       host_ttl=RECORD_TTL, other_ttl=RECORD_TTL,
                       addresses=[advert.underlay.ip.packed])


def _shutdown(zc: Any, browser: Any) -> None:
    """Stop browsing, say goodbye (TTL 0 for our records), close. Each step bounded by
    zeroconf's own timeouts; errors swallowed so the next step still runs."""
    for step in ((browser.cancel if browser is not None else None),
                 zc.unregister_all_services, zc.close):
        if step is None:
            continue
        try:
            step()
        except Exception:
            pass


async def run_lan_discovery(name: str, fleet: str, public_key: str | bytes,
                            underlay_ifname_or_ip: str, port: int,
                            on_change: Callable[[frozenset[Neighbour]], None], *,
                            stats: Counter[str] | None = None,
                            now: Callable[[], float] = time.time,
                            task_status: trio.TaskStatus[LanAdvert] = trio.TASK_STATUS_IGNORED,
                            ) -> None:
    """Advertise this device on its underlay and keep `on_change` told about the validated
    LAN neighbours (called on the trio thread with the whole set after every change).
    Runs until cancelled; then says goodbye and closes within CLOSE_TIMEOUT.
    `task_status.started(advert)` once registered and browsing."""
    # start-up time, as in _open_zeroconf
    from zeroconf import NonUniqueNameException, ServiceBrowser, ServiceStateChange

    if not valid_name(name):
        raise LanDiscoveryError(f"device name {name!r} must be 1-63 characters of [a-z0-9-]")
    if not valid_name(fleet):
        raise LanDiscoveryError(f"fleet name {fleet!r} must be 1-63 characters of [a-z0-9-]")
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise LanDiscoveryError(f"port {port} out of range 1-65535")
    try:
        fp = fingerprint(public_key)
    except ValueError as exc:
        raise LanDiscoveryError(str(exc)) from None
    stats = Counter() if stats is None else stats
    rows = await trio.to_thread.run_sync(local_ipv4_addresses)
    _ifname, underlay = pick_underlay(rows, underlay_ifname_or_ip)
    advert = LanAdvert(name, fleet, fp, underlay, port)
    token = trio.lowlevel.current_trio_token()
    try:
        zc = await trio.to_thread.run_sync(_open_zeroconf, str(underlay.ip))
    except OSError as exc:
        raise LanDiscoveryError(f"mDNS on {underlay.ip}: {exc}") from None
    browser: Any = None
    try:
        try:
            with trio.fail_after(REGISTER_TIMEOUT):
                await trio.to_thread.run_sync(zc.register_service, _service_info(advert),
                                              abandon_on_cancel=True)
            stats["registered"] += 1
        except NonUniqueNameException:
            # someone on this LAN already answers for our name: browse anyway (the neighbour
            # set is still useful); the squatter gains nothing, WireGuard checks identity
            stats["name-conflict"] += 1
        except trio.TooSlowError:
            stats["register-timeout"] += 1
        disc = _Discovery(zc, advert, on_change, stats, now)

        def on_state(zeroconf: Any, service_type: str, name: str,
                     state_change: Any) -> None:  # zeroconf's browser thread
            change = "removed" if state_change is ServiceStateChange.Removed else "added"
            try:
                trio.from_thread.run_sync(disc.note, name, change, trio_token=token)
            except trio.RunFinishedError:  # trio is gone: we are shutting down
                pass

        browser = await trio.to_thread.run_sync(
            partial(ServiceBrowser, zc, SERVICE_TYPE, handlers=[on_state]))
        task_status.started(advert)
        await disc.run()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await trio.to_thread.run_sync(_shutdown, zc, browser, abandon_on_cancel=True)


# --- CLI: python -m agent._lan -------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


async def _cli_main(args: argparse.Namespace) -> None:
    stats: Counter[str] = Counter()

    def on_change(neighbours: frozenset[Neighbour]) -> None:
        _emit({"event": "neighbours",
               "neighbours": [n.to_json() for n in sorted(neighbours, key=lambda n: n.name)]})

    with trio.move_on_after(args.seconds):
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            advert = await nursery.start(partial(
                run_lan_discovery, args.name, args.fleet, args.key, args.interface, args.port,
                on_change, stats=stats))
            _emit({"event": "ready", "name": advert.name, "ipv4": str(advert.underlay.ip),
                   "port": advert.port, "fp": advert.fp})
    _emit({"event": "stats", "stats": dict(sorted(stats.items()))})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent._lan",
        description="Advertise on the LAN underlay and print LAN neighbours as JSON lines.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--key", required=True, help="WireGuard public key (base64)")
    parser.add_argument("--interface", required=True, help="underlay interface or its IPv4")
    parser.add_argument("--port", type=int, required=True, help="WireGuard listen port")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help=f"run this long, at most {MAX_CLI_SECONDS:g}")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_CLI_SECONDS:
        print(f"agent._lan: --seconds must be in (0, {MAX_CLI_SECONDS:g}]", file=sys.stderr)
        return 2
    try:
        trio.run(_cli_main, args)
    except (LanDiscoveryError, BaseExceptionGroup) as exc:
        problem = _local_error(exc)
        if problem is None:
            raise
        print(f"agent._lan: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _local_error(exc: BaseException) -> LanDiscoveryError | None:
    """The LanDiscoveryError inside (possibly nested) trio exception groups, if any."""
    if isinstance(exc, LanDiscoveryError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _local_error(sub)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
