"""The running coordinator: store, TLS identity, keys, peer maps, batcher, hub and HTTP server,
all owned by one nursery.

    async with Coordinator(CoordinatorConfig(data_dir=tmp, listen="127.0.0.1:0", hub=False)) as c:
        c.url, c.port, c.fingerprint, c.cert_path, c.operator_key   # ready to serve

or `await nursery.start(coordinator.run)` (the start value is the coordinator itself).
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from mesh.control import (
    AppStatus,
    ControlError,
    DeviceReport,
    Enrollment,
    EnrollRequest,
    HubInfo,
    LogUpload,
    TokenParts,
    check_endpoint,
)
from vpn import generate_keypair, public_key_from_private, read_private_key, write_private_key

from . import _ipam, _secrets
from ._api import build_app
from ._blobs import BlobStore
from ._hub import Hub, HubPeer, Observation
from ._model import (
    Device,
    DeviceState,
    EnrollmentToken,
    EnrollParams,
    NotFound,
    Unauthorized,
    device_info,
)
from ._peermap import Member, PeerMapCore
from ._releases import ReleaseRegistry, lock_stale
from ._store import Store
from ._store_sqlite import SqliteStore

log = logging.getLogger("fleetmesh.coordinator")

ONLINE_WINDOW: Final = 60.0  # s: a hub handshake (WireGuard rekeys every 120 s; devices keep
#                              a 25 s keepalive) or a report within this counts as online
BATCH_WINDOW: Final = 0.2  # s: coalesce a burst so both sides of a pair hear it together
DB_NAME: Final = "coordinator.db"
CERT_NAME: Final = "tls.crt"
KEY_NAME: Final = "tls.key"
HUB_KEY_NAME: Final = "hub.key"
OPERATOR_KEY_NAME: Final = "operator.key"
BLOBS_DIR: Final = "blobs"
# An update lock held longer than this is shown as stale (issue 6); an hour covers a long
# recording or call, which is what apps hold their lock for.
LOCK_STALE_AFTER: Final = 3600.0
LOG_KEEP: Final = 5000  # newest log lines kept per device (docs/api.md)


class CoordinatorConfigError(ValueError):
    """A bad setting; str() is one line for the CLI."""


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """`a.b.c.d:port` or `[v6]:port` with an IP literal host; raises CoordinatorConfigError."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError
        ipaddress.ip_address(host)
    except ValueError:
        raise CoordinatorConfigError(f"{what}: must be HOST:PORT with an IP address (e.g. 0.0.0.0:8443 "
                          f"or [::]:8443), got {text!r}") from None
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    data_dir: Path
    listen: str = "0.0.0.0:8443"
    wg_port: int = 51820
    hub_endpoint: str | None = None  # HOST:PORT devices reach the hub at (default: listen host)
    mesh_ipv4: str = "10.250.0.0/16"
    mesh_ipv6: str = "fd7a:f1ee:7000::/48"
    hub: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    batch_window: float = BATCH_WINDOW
    online_window: float = ONLINE_WINDOW
    hub_poll_interval: float = 1.0
    lock_stale_after: float = LOCK_STALE_AFTER
    clock: Callable[[], float] = field(default=time.time)

    def check(self) -> None:
        split_hostport(self.listen, "--listen")
        if not 1 <= self.wg_port < 65536:
            raise CoordinatorConfigError(f"--wg-port: must be 1..65535, got {self.wg_port}")
        if self.hub_endpoint is not None:
            split_hostport(self.hub_endpoint, "--hub-endpoint")
            try:
                check_endpoint(self.hub_endpoint, "--hub-endpoint")
            except ControlError as exc:
                raise CoordinatorConfigError(str(exc)) from None
        try:
            _ipam.parse_prefixes(self.mesh_ipv4, self.mesh_ipv6)
        except ValueError as exc:
            raise CoordinatorConfigError(str(exc)) from None
        if not 0 < self.lock_stale_after < float("inf"):
            raise CoordinatorConfigError(f"--lock-stale-after: must be a positive number of seconds, got "
                              f"{self.lock_stale_after}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CoordinatorConfigError("--tls-cert and --tls-key go together")
        host, _ = split_hostport(self.listen, "--listen")
        if ipaddress.ip_address(host).is_unspecified and self.hub_endpoint is None:
            raise CoordinatorConfigError(f"--hub-endpoint HOST:PORT is required when listening on {host}: "
                              "it is the address devices reach this coordinator at")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        config.check()
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.store: Store | None = None
        self.blobs = BlobStore(self.data_dir / BLOBS_DIR)
        self._releases: ReleaseRegistry | None = None
        self.core: PeerMapCore | None = None
        self.hub: Hub | None = None
        self.port = 0
        self.url = ""
        self.public_url = ""
        self.fingerprint = ""
        self.cert_path = self.data_dir / CERT_NAME
        self.key_path = self.data_dir / KEY_NAME
        self.operator_key_path = self.data_dir / OPERATOR_KEY_NAME
        self.operator_key_created = False
        self.prefix_v4, self.prefix_v6 = _ipam.parse_prefixes(config.mesh_ipv4,
                                                              config.mesh_ipv6)
        self.hub_v4, self.hub_v6 = _ipam.addresses(self.prefix_v4, self.prefix_v6,
                                                   _ipam.HUB_INDEX)
        self._operator_hash = ""
        self._hub_private = ""
        self._hub_info: HubInfo | None = None
        self._key_names: dict[str, str] = {}  # public key -> active device name
        self._operator_names: dict[str, str] = {}
        self._last_handshake: dict[str, float] = {}  # or the last time rx_bytes grew
        self._rx_bytes: dict[str, int] = {}
        self._waiters: dict[str, trio.Event] = {}
        self._log_waiters: dict[str, trio.Event] = {}  # device id -> set on new lines
        self._dirty = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self._nursery_cm: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def releases(self) -> ReleaseRegistry:
        """The release registry (blobs, releases, keys, targets); there once started."""
        if self._releases is None:
            raise RuntimeError("coordinator not started")
        return self._releases

    @property
    def operator_key(self) -> str:
        return self.operator_key_path.read_text().strip()

    def _prepare(self) -> None:
        """Everything on disk, before any socket: data dir, DB, keys, certificate."""
        cfg = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            store = SqliteStore(self.data_dir / DB_NAME, cfg.mesh_ipv4, cfg.mesh_ipv6)
        except ValueError as exc:
            raise CoordinatorConfigError(str(exc)) from None
        self.store = store
        self.blobs.prepare()
        self._releases = ReleaseRegistry(store, self.blobs, cfg.clock, self.targets_changed)
        hub_key = self.data_dir / HUB_KEY_NAME
        if not hub_key.exists():
            write_private_key(hub_key, generate_keypair().private)
        self._hub_private = read_private_key(hub_key)
        store.set_meta("hub_public_key", public_key_from_private(self._hub_private))
        self._operator_hash = store.get_meta("operator_key_hash") or ""
        if not self._operator_hash:
            key = _secrets.new_operator_key()
            _secrets.write_secret_file(self.operator_key_path, key + "\n")
            self._operator_hash = _secrets.secret_hash(key)
            store.set_meta("operator_key_hash", self._operator_hash)
            self.operator_key_created = True
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            self.cert_path, self.key_path = Path(cfg.tls_cert), Path(cfg.tls_key)
        elif not (self.cert_path.exists() and self.key_path.exists()):
            ips = [split_hostport(cfg.listen, "--listen")[0], self.hub_v4, self.hub_v6]
            if cfg.hub_endpoint:
                ips.append(split_hostport(cfg.hub_endpoint, "--hub-endpoint")[0])
            _secrets.make_self_signed(self.cert_path, self.key_path, ips,
                                      dt.datetime.now(dt.UTC))
        try:
            self.fingerprint = _secrets.cert_fingerprint(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CoordinatorConfigError(f"cannot read certificate {self.cert_path}: {exc}") from None

    def _load(self) -> None:
        assert self.store is not None and self._hub_info is not None
        self.core = PeerMapCore(self._hub_info, first_version=int(self.config.clock() * 1000))
        for d in self.store.list_devices():
            if d.state is DeviceState.ACTIVE:
                self._add_member(d, None)
                if d.public_endpoint:
                    self.core.set_public(d.name, d.public_endpoint)
        self._set_operators()
        self.core.publish()

    async def run(self, *, task_status: trio.TaskStatus[Coordinator] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        cfg = self.config
        await trio.to_thread.run_sync(self._prepare)
        assert self.store is not None
        try:
            host, port = split_hostport(cfg.listen, "--listen")
            try:
                sock = _bind(host, port)
            except OSError as exc:
                raise CoordinatorConfigError(f"cannot listen on {cfg.listen}: {exc.strerror}") from None
            self.port = sock.getsockname()[1]
            unspecified = ipaddress.ip_address(host).is_unspecified
            public_host = split_hostport(cfg.hub_endpoint, "")[0] if cfg.hub_endpoint else host
            self.url = f"https://{join_hostport('127.0.0.1' if unspecified else host, self.port)}"
            self.public_url = f"https://{join_hostport(public_host, self.port)}"
            hub_endpoint = cfg.hub_endpoint or join_hostport(host, cfg.wg_port)
            api_url = (f"https://{join_hostport(self.hub_v4, self.port)}" if cfg.hub
                       else self.public_url)
            self._hub_info = HubInfo(public_key_from_private(self._hub_private), hub_endpoint,
                                     self.hub_v4, self.hub_v6, api_url)
            self._load()
            fds = [sock.detach()]
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                if cfg.hub:
                    self.hub = Hub(self._hub_private, cfg.wg_port,
                                   [f"{self.hub_v4}/{self.prefix_v4.prefixlen}",
                                    f"{self.hub_v6}/{self.prefix_v6.prefixlen}"],
                                   self._hub_peers, self._observe, cfg.hub_poll_interval)
                    await nursery.start(self.hub.run)
                    if not unspecified and host != self.hub_v4:
                        # the API through the tunnel (HubInfo.api_url), same port
                        fds.append(_bind(self.hub_v4, self.port).detach())
                hc = HypercornConfig()
                hc.bind = [f"fd://{fd}" for fd in fds]
                hc.certfile, hc.keyfile = str(self.cert_path), str(self.key_path)
                hc.accesslog = None
                hc.errorlog = logging.getLogger("fleetmesh.coordinator.http")
                hc.graceful_timeout = 1.0
                hc.include_server_header = False
                nursery.start_soon(self._batcher)
                await nursery.start(partial(serve, build_app(self), hc))  # type: ignore[arg-type]
                log.info("coordinator listening on %s (fingerprint %s)", self.url,
                         self.fingerprint)
                task_status.started(self)
        finally:
            self.store.close()

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    async def __aenter__(self) -> Coordinator:
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException as exc:
            await self._nursery_cm.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        self.stop()
        return await self._nursery_cm.__aexit__(et, ev, tb)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ peer maps

    def _add_member(self, d: Device, public_ip: str | None) -> None:
        assert self.core is not None and d.public_key and d.mesh_ipv4 and d.mesh_ipv6
        old = self.core.member(d.name)
        self.core.add(Member(d.name, d.fleet, d.public_key, d.mesh_ipv4, d.mesh_ipv6,
                             d.lan_endpoints,
                             public_endpoint=old.public_endpoint if old else None,
                             public_ip=public_ip or (old.public_ip if old else None)))
        if old is not None and old.public_key != d.public_key:
            self._key_names.pop(old.public_key, None)
        self._key_names[d.public_key] = d.name

    def _set_operators(self) -> None:
        assert self.store is not None and self.core is not None
        ops = self.store.list_operators()
        self._operator_names = {o.public_key: o.name for o in ops}
        self.core.set_relay_ips([ip for o in ops for ip in (f"{o.mesh_ipv4}/32",
                                                            f"{o.mesh_ipv6}/128")])

    def targets_changed(self, fleet: str, device: str | None = None) -> None:
        """The release targets of one device of `fleet` (None: all) changed: their next peer
        map carries a new `targets` revision, which makes their agents read the targets."""
        if self.core is not None and self.core.targets_changed(fleet, device):
            self._changed()

    def _changed(self) -> None:
        if self.core is not None and self.core.pending:
            self._dirty.set()

    async def _batcher(self) -> None:
        assert self.core is not None
        while True:
            await self._dirty.wait()
            await trio.sleep(self.config.batch_window)
            self._dirty = trio.Event()
            for name in self.core.publish():
                event = self._waiters.pop(name, None)
                if event is not None:
                    event.set()

    async def wait_peermap(self, device: Device, version: int, wait: float) -> bytes | None:
        """The map as JSON if its version is not `version`, as soon as that is true within
        `wait` seconds; None (304) otherwise. Waits on an event, never polls."""
        core = self.core
        assert core is not None
        deadline = trio.current_time() + wait
        while True:
            member = core.member(device.name)
            if member is None or member.public_key != device.public_key:
                raise Unauthorized("device revoked")
            if core.version(device.name) != version:
                return core.render(device.name)
            if trio.current_time() >= deadline:
                return None
            event = self._waiters.setdefault(device.name, trio.Event())
            with trio.move_on_at(deadline):
                await event.wait()

    # ------------------------------------------------------------------ hub

    def _hub_peers(self) -> list[HubPeer]:
        assert self.store is not None and self.core is not None
        peers = [HubPeer(m.public_key, m.mesh_ipv4, m.mesh_ipv6) for m in self.core.members()]
        peers += [HubPeer(o.public_key, o.mesh_ipv4, o.mesh_ipv6)
                  for o in self.store.list_operators()]
        return peers

    def _observe(self, observed: list[Observation]) -> None:
        assert self.core is not None
        for o in observed:
            name = self._key_names.get(o.public_key)
            if name is None:
                continue
            # A handshake happens only every ~2 minutes; the 25 s keepalives show up as
            # growing rx_bytes, so either counts as "seen" for the 60 s online window.
            seen = o.last_handshake
            if o.rx_bytes > self._rx_bytes.get(name, 0):
                seen = max(seen or 0.0, self.config.clock())
            self._rx_bytes[name] = o.rx_bytes
            if seen is not None:
                self._last_handshake[name] = max(seen, self._last_handshake.get(name, 0.0))
            if o.endpoint is not None and self.core.set_public(name, o.endpoint):
                self._persist_endpoint(name, o.endpoint)
        self._changed()

    def _persist_endpoint(self, name: str, endpoint: str) -> None:
        assert self.store is not None
        device = self.store.device_by_name(name)
        if device is not None:
            self.store.record_public_endpoint(device.id, endpoint)

    async def hub_changed(self) -> None:
        """Bring the hub's peers up to date now; on failure the hub's loop retries."""
        if self.hub is None:
            return
        try:
            await self.hub.sync()
        except (OSError, ValueError, trio.TooSlowError) as exc:
            log.warning("hub sync failed (will retry): %s", exc)
            self.hub.request_sync()

    # ------------------------------------------------------------------ auth

    def is_operator_key(self, secret: str) -> bool:
        if not secret.startswith(_secrets.OPERATOR_PREFIX) or not self._operator_hash:
            return False
        return hmac.compare_digest(_secrets.secret_hash(secret), self._operator_hash)

    def device_for(self, secret: str) -> Device | None:
        if not secret.startswith(_secrets.DEVICE_PREFIX) or len(secret) > 200:
            return None
        assert self.store is not None
        return self.store.device_by_credential(_secrets.secret_hash(secret))

    # ------------------------------------------------------------------ device API

    def enroll(self, req: EnrollRequest, client_ip: str | None) -> Enrollment:
        assert self.store is not None and self._hub_info is not None
        parts = TokenParts.parse(req.token)
        if not hmac.compare_digest(parts.fingerprint, self.fingerprint):
            raise Unauthorized("enrollment token is for another coordinator (certificate "
                               "fingerprint differs)")
        credential = _secrets.new_device_credential()
        device = self.store.enroll(EnrollParams(
            secret_hash=_secrets.secret_hash(parts.secret), public_key=req.public_key,
            credential_hash=_secrets.secret_hash(credential), device_id=_secrets.new_id("d_"),
            generated_name=f"dev-{_secrets.new_id('')[:6]}", now=self.config.clock(),
            name=req.name, lan_endpoints=req.lan_endpoints, agent_version=req.agent_version))
        self._add_member(device, None if self.config.hub else client_ip)
        self._changed()
        assert device.mesh_ipv4 and device.mesh_ipv6
        return Enrollment(device.id, device.name, device.fleet, credential, device.mesh_ipv4,
                          device.mesh_ipv6, str(self.prefix_v4), str(self.prefix_v6),
                          self._hub_info, release_key=self.releases.release_key(device.fleet))

    def report(self, device: Device, report: DeviceReport, client_ip: str | None) -> None:
        assert self.store is not None and self.core is not None
        cleared = self.store.record_report(device.id, report.lan_endpoints,
                                           report.agent_version, report.peers,
                                           self.config.clock(), report.apps)
        if cleared:  # a force the device no longer needs has left its targets
            self.releases.targets_changed(device.fleet, device.name)
        self.core.set_lan(device.name, report.lan_endpoints)
        if not self.config.hub and client_ip is not None:
            # No hub to observe handshakes: the address the report came from is the best
            # public-IP evidence there is (it decides who shares a NAT, hence LAN endpoints).
            self.core.set_public(device.name, None, ip=client_ip)
        self._changed()

    def upload_logs(self, device: Device, upload: LogUpload) -> None:
        assert self.store is not None
        self.store.append_logs(device.id, upload.lines, upload.dropped, LOG_KEEP)
        event = self._log_waiters.pop(device.id, None)
        if event is not None:
            event.set()

    # ------------------------------------------------------------------ operator API

    def _seen(self, d: Device) -> tuple[bool, float | None]:
        """(online, last seen): a hub handshake or a report within the online window."""
        live = d.state is DeviceState.ACTIVE
        handshake = self._last_handshake.get(d.name) if live else None
        seen = [t for t in (d.last_report, handshake) if t is not None]
        last_seen = max(seen) if seen else None
        online = live and last_seen is not None and \
            self.config.clock() - last_seen < self.config.online_window
        return online, last_seen

    def _info(self, d: Device, apps: list[AppStatus] | None = None) -> dict[str, Any]:
        """DeviceInfo; `apps` are the device's app statuses when the caller has them."""
        assert self.core is not None and self.store is not None
        member = self.core.member(d.name) if d.state is DeviceState.ACTIVE else None
        online, last_seen = self._seen(d)
        if apps is None:
            apps = self.store.app_statuses(d.fleet).get(d.id, [])
        now, stale_after = self.config.clock(), self.config.lock_stale_after
        info = device_info(d, online=online, last_seen=last_seen,
                           endpoint=member.public_endpoint if member else None)
        # "release": the running version of its app (the first by name if it has several)
        info["release"] = apps[0].running if apps else None
        info["apps"] = [{**a.to_json(), "lock_stale": lock_stale(a, now, stale_after)}
                        for a in apps]
        return info

    def create_token(self, fleet: str, uses: int, expires_in: int, name: str | None
                     ) -> dict[str, Any]:
        assert self.store is not None
        secret, now = _secrets.new_secret(), self.config.clock()
        token = EnrollmentToken(_secrets.secret_hash(secret), fleet, uses, now + expires_in,
                                now, name)
        self.store.create_token(token)
        return {"token": str(TokenParts(self.fingerprint, secret)), "fleet": fleet,
                "uses": uses, "expires_at": token.expires_at}

    def provision(self, name: str, fleet: str, expires_in: int) -> dict[str, Any]:
        assert self.store is not None
        secret, now = _secrets.new_secret(), self.config.clock()
        token = EnrollmentToken(_secrets.secret_hash(secret), fleet, 1, now + expires_in, now,
                                name)
        device = self.store.provision(_secrets.new_id("d_"), name, fleet, token, now)
        return {"device": self._info(device),
                "join": {"url": self.public_url, "token": str(TokenParts(self.fingerprint,
                                                                         secret)),
                         "name": name, "fleet": fleet}}

    def list_devices(self, fleet: str | None) -> list[dict[str, Any]]:
        assert self.store is not None
        apps = self.store.app_statuses(fleet)
        return [self._info(d, apps.get(d.id, [])) for d in self.store.list_devices(fleet)]

    def _device(self, name: str) -> Device:
        assert self.store is not None
        device = self.store.device_by_name(name)
        if device is None:
            raise NotFound(f"no device {name!r}")
        return device

    def device_info(self, name: str) -> dict[str, Any]:
        return self._info(self._device(name))

    async def revoke(self, name: str) -> dict[str, Any]:
        assert self.store is not None and self.core is not None
        device = self.store.revoke(name, self.config.clock())
        member = self.core.member(name)
        if member is not None and member.public_key == device.public_key:
            self.core.remove(name)
            self._key_names.pop(member.public_key, None)
            self._last_handshake.pop(name, None)
            self._rx_bytes.pop(name, None)
            event = self._waiters.pop(name, None)
            if event is not None:
                event.set()  # its long poll ends now, with 401
            self._changed()
            await self.hub_changed()
        return self._info(device)

    def release_status(self, fleet: str, app: str, version: int) -> dict[str, Any]:
        return self.releases.release_status(fleet, app, version, lambda d: self._seen(d)[0],
                                            self.config.lock_stale_after)

    async def device_logs(self, name: str, *, after: int, limit: int, wait: float,
                          tail: int | None) -> dict[str, Any]:
        """The device's log lines after `after` (or its newest `tail`), waiting up to `wait`
        seconds for some to arrive; `next` is the `after` of the following call."""
        assert self.store is not None
        device = self._device(name)
        if tail is not None:
            page = self.store.tail_logs(device.id, tail)
        else:
            deadline = trio.current_time() + wait
            while True:
                page = self.store.read_logs(device.id, after, limit)
                if page.lines or trio.current_time() >= deadline:
                    break
                event = self._log_waiters.setdefault(device.id, trio.Event())
                with trio.move_on_at(deadline):
                    await event.wait()
        if page.lines:
            next_seq = page.lines[-1][0]
        else:  # never beyond what exists: a follower of a reset database is not stuck
            next_seq = page.last_seq if tail is not None else min(after, page.last_seq)
        return {"lines": [{"seq": seq, **line.to_json()} for seq, line in page.lines],
                "next": next_seq, "dropped": page.dropped}

    def device_peers(self, name: str) -> list[dict[str, Any]]:
        assert self.store is not None
        device = self._device(name)
        names = {**self._operator_names, **self._key_names}
        return [{"peer": names.get(p.public_key), "public_key": p.public_key, "path": p.path,
                 "endpoint": p.endpoint, "last_handshake": p.last_handshake}
                for p in self.store.peer_paths(device.id)]

    def add_operator(self, name: str, public_key: str) -> dict[str, Any]:
        assert self.store is not None and self._hub_info is not None
        op = self.store.add_operator(name, public_key, self.config.clock())
        self._set_operators()
        self._changed()
        return {"name": op.name, "mesh_ipv4": op.mesh_ipv4, "mesh_ipv6": op.mesh_ipv6,
                "hub": self._hub_info.to_json(), "mesh_prefix_v4": str(self.prefix_v4),
                "mesh_prefix_v6": str(self.prefix_v6)}
