"""The coordinator process: data directory, database (SQLite in the data directory, or
PostgreSQL by URL), blobs (files in the data directory, or an S3 bucket), TLS certificate,
keys, listening sockets, hypercorn, the WireGuard relay hub, and the service
(coordinator._service) with its peer-map batcher, all owned by one nursery.

    async with Coordinator(CoordinatorConfig(data_dir=tmp, listen="127.0.0.1:0", hub=False)) as c:
        c.url, c.port, c.fingerprint, c.cert_path, c.operator_key   # ready to serve
        c.service                                                   # the domain operations

or `await nursery.start(coordinator.run)` (the start value is the coordinator itself).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import trio

from mesh.control import MAX_COORDINATOR_URLS, ControlError, HubInfo, check_endpoint
from mesh.release import ReleaseError, read_signing_key, write_signing_key
from mesh.tlspin import PinError, split_url
from vpn import generate_keypair, public_key_from_private, read_private_key, write_private_key

from . import _ipam, _secrets
from ._app import build_app
from ._blobs import BlobBackend, BlobSeed, BlobStoreUnavailable
from ._blobs_s3 import S3Blobs, S3ConfigError, S3Location, read_credentials
from ._changes import ChangeFeed
from ._hub import Hub
from ._listen import HttpLimits, SourceGate, hypercorn_config, serve
from ._service import (
    BATCH_WINDOW,
    LOCK_STALE_AFTER,
    MAX_FLEET_DEVICES,
    ONLINE_WINDOW,
    CoordinatorIdentity,
    FleetService,
    ServiceSettings,
)
from ._store import Store
from ._store_pg import PostgresStore, describe
from ._store_sqlite import SqliteStore

log = logging.getLogger("fleetmesh.coordinator")

DB_NAME: Final = "coordinator.db"
CERT_NAME: Final = "tls.crt"
KEY_NAME: Final = "tls.key"
HUB_KEY_NAME: Final = "hub.key"
OPERATOR_KEY_NAME: Final = "operator.key"
TIMESTAMP_KEY_NAME: Final = "timestamp.key"
# What replicas on one database share (docs/scale.md, "Replicas"): the first one's files,
# copied into each other one's data directory before its first start.
IDENTITY_FILES: Final = (CERT_NAME, KEY_NAME, HUB_KEY_NAME, OPERATOR_KEY_NAME,
                         TIMESTAMP_KEY_NAME)
BLOBS_DIR: Final = "blobs"
BLOBS_STAGING_DIR: Final = "blobs-staging"  # uploads being verified before they go to S3


class CoordinatorConfigError(ValueError):
    """A bad setting; str() is one line for the CLI."""


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """`a.b.c.d:port` or `[v6]:port` with an IP literal host; raises CoordinatorConfigError."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
            raise ValueError
        ipaddress.ip_address(host)
    except ValueError:
        raise CoordinatorConfigError(f"{what}: must be HOST:PORT with an IP address (e.g. "
                                     f"0.0.0.0:8443 or [::]:8443), got {text!r}") from None
    return host, int(port)


# A scrape token: what `openssl rand -hex 32` or `fleetmesh`-style secrets look like, long
# enough not to be guessed; never an operator key or a device credential.
_METRICS_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/=-]{32,256}\Z")


def read_metrics_token(path: Path) -> str:
    """The scrape token in `path` (surrounding whitespace ignored); CoordinatorConfigError
    with one line if it is unreadable or not a token."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not ASCII"
        raise CoordinatorConfigError(f"--metrics-token-file {path}: {reason}") from None
    if not _METRICS_TOKEN_RE.match(token) or token.startswith(("fmo_", "fmd_")):
        raise CoordinatorConfigError(
            f"--metrics-token-file {path}: must hold one token of 32 to 256 characters "
            "A-Z a-z 0-9 . _ ~ + / = - (e.g. `openssl rand -hex 32`), not an operator key "
            "or device credential")
    return token


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
    store: str | None = None  # a postgresql:// URL; None: SQLite in data_dir (DB_NAME)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_token_file: Path | None = None  # a scrape token for /metrics (docs/metrics.md)
    blobs: str | None = None  # an s3:// URL (docs/scale.md); None: files in data_dir/BLOBS_DIR
    blobs_credentials_file: Path | None = None  # else AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    # the other replicas' public URLs on the same database (docs/scale.md, "Replicas"):
    # handed to devices, which fail over to them
    peer_urls: tuple[str, ...] = ()
    batch_window: float = BATCH_WINDOW
    online_window: float = ONLINE_WINDOW
    hub_poll_interval: float = 1.0
    lock_stale_after: float = LOCK_STALE_AFTER
    max_fleet_devices: int = MAX_FLEET_DEVICES
    http_limits: HttpLimits = HttpLimits()
    clock: Callable[[], float] = field(default=time.time)

    def check(self) -> None:
        split_hostport(self.listen, "--listen")
        if self.blobs is not None:
            try:
                S3Location.parse(self.blobs)
            except S3ConfigError as exc:
                raise CoordinatorConfigError(str(exc)) from None
        elif self.blobs_credentials_file is not None:
            raise CoordinatorConfigError("--blobs-credentials-file goes with --blobs s3://…")
        if self.store is not None:
            try:
                describe(self.store)
            except ValueError as exc:
                raise CoordinatorConfigError(str(exc)) from None
        if self.peer_urls and self.store is None:
            raise CoordinatorConfigError("--peer-url goes with --store postgresql://… (replicas "
                                         "share one database)")
        for url in self.peer_urls:
            try:
                split_url(url)
            except PinError as exc:
                raise CoordinatorConfigError(f"--peer-url: {exc}") from None
        if len(self.peer_urls) >= MAX_COORDINATOR_URLS:
            raise CoordinatorConfigError(f"--peer-url: at most {MAX_COORDINATOR_URLS - 1} other "
                                         "replicas")
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
            raise CoordinatorConfigError(f"--lock-stale-after: must be a positive number of "
                                         f"seconds, got {self.lock_stale_after}")
        if not 1 <= self.max_fleet_devices <= MAX_FLEET_DEVICES:
            raise CoordinatorConfigError(
                f"--max-fleet-devices: must be 1..{MAX_FLEET_DEVICES} (agents refuse a peer map "
                f"of more peers), got {self.max_fleet_devices}")
        for problem in self.http_limits.problems():
            raise CoordinatorConfigError(f"http limits: {problem}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CoordinatorConfigError("--tls-cert and --tls-key go together")
        host, _ = split_hostport(self.listen, "--listen")
        if ipaddress.ip_address(host).is_unspecified and self.hub_endpoint is None:
            raise CoordinatorConfigError(f"--hub-endpoint HOST:PORT is required when listening "
                                         f"on {host}: it is the address devices reach this "
                                         "coordinator at")


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
    """The process around a FleetService: what is on disk, what listens, what runs."""

    def __init__(self, config: CoordinatorConfig) -> None:
        config.check()
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.store: Store | None = None
        self.blobs: BlobBackend = BlobSeed(self.data_dir / BLOBS_DIR)
        self._service: FleetService | None = None
        self.feed: ChangeFeed | None = None  # on PostgreSQL: the other replicas' changes
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
        self._cancel: trio.CancelScope | None = None
        self._nursery_cm: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def service(self) -> FleetService:
        """The domain operations (devices, tokens, logs, releases); there once started."""
        if self._service is None:
            raise RuntimeError("coordinator not started")
        return self._service

    @property
    def operator_key(self) -> str:
        return self.operator_key_path.read_text().strip()

    def _prepare(self) -> None:
        """Everything on disk, before any socket: data dir, DB, keys, certificate."""
        cfg = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cfg.blobs is not None:
            self.blobs = self._s3_blobs(cfg.blobs, cfg.blobs_credentials_file)
        else:
            self.blobs.prepare()
        try:
            store: Store = (
                SqliteStore(self.data_dir / DB_NAME, cfg.mesh_ipv4, cfg.mesh_ipv6)
                if cfg.store is None else PostgresStore(cfg.store, cfg.mesh_ipv4, cfg.mesh_ipv6))
        except ValueError as exc:  # one line, without the URL's password
            raise CoordinatorConfigError(str(exc)) from None
        self.store = store
        hub_key = self.data_dir / HUB_KEY_NAME
        if not hub_key.exists():
            write_private_key(hub_key, generate_keypair().private)
        self._hub_private = read_private_key(hub_key)
        store.set_meta("hub_public_key", public_key_from_private(self._hub_private))
        # The online timestamp key (docs/security.md, "A frozen coordinator is detected"):
        # kept across restarts, since the operator's grant names it.
        timestamp_key = self.data_dir / TIMESTAMP_KEY_NAME
        try:
            self._timestamp_key = (read_signing_key(timestamp_key) if timestamp_key.exists()
                                   else write_signing_key(timestamp_key))
        except (OSError, ReleaseError) as exc:
            raise CoordinatorConfigError(f"timestamp key {timestamp_key}: {exc}") from None
        self._metrics_hash = (_secrets.secret_hash(read_metrics_token(cfg.metrics_token_file))
                              if cfg.metrics_token_file is not None else "")
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
            raise CoordinatorConfigError(
                f"cannot read certificate {self.cert_path}: {exc}") from None

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
                raise CoordinatorConfigError(
                    f"cannot listen on {cfg.listen}: {exc.strerror}") from None
            self.port = sock.getsockname()[1]
            unspecified = ipaddress.ip_address(host).is_unspecified
            public_host = split_hostport(cfg.hub_endpoint, "")[0] if cfg.hub_endpoint else host
            self.url = f"https://{join_hostport('127.0.0.1' if unspecified else host, self.port)}"
            self.public_url = f"https://{join_hostport(public_host, self.port)}"
            hub_endpoint = cfg.hub_endpoint or join_hostport(host, cfg.wg_port)
            api_url = (f"https://{join_hostport(self.hub_v4, self.port)}" if cfg.hub
                       else self.public_url)
            hub_info = HubInfo(public_key_from_private(self._hub_private), hub_endpoint,
                               self.hub_v4, self.hub_v6, api_url)
            urls = tuple(dict.fromkeys((self.public_url, *(u.rstrip("/")
                                                           for u in cfg.peer_urls))))
            identity = CoordinatorIdentity(self.fingerprint, self._operator_hash,
                                           self.public_url, hub_info, self.prefix_v4,
                                           self.prefix_v6, self._hub_private,
                                           self._metrics_hash,
                                           urls if len(urls) > 1 else ())
            settings = ServiceSettings(relay_hub=cfg.hub, batch_window=cfg.batch_window,
                                       online_window=cfg.online_window,
                                       lock_stale_after=cfg.lock_stale_after,
                                       max_fleet_devices=cfg.max_fleet_devices, clock=cfg.clock)
            service = FleetService(settings, identity, self.store, self.blobs,
                                   self._sync_hub if cfg.hub else None)
            service.releases.timestamp_key = self._timestamp_key
            self._service = service
            socks = [sock]
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                if cfg.hub:
                    self.hub = Hub(self._hub_private, cfg.wg_port,
                                   [f"{self.hub_v4}/{self.prefix_v4.prefixlen}",
                                    f"{self.hub_v6}/{self.prefix_v6.prefixlen}"],
                                   service.hub_peers, service.observe, cfg.hub_poll_interval,
                                   api_port=self.port, policies=service.hub_policies)
                    await nursery.start(self.hub.run)
                    if not unspecified and host != self.hub_v4:
                        # the API through the tunnel (HubInfo.api_url), same port
                        socks.append(_bind(self.hub_v4, self.port))
                limits = cfg.http_limits
                gate = SourceGate(limits.max_unauthenticated_per_source)
                hc = hypercorn_config(limits, str(self.cert_path), str(self.key_path))
                nursery.start_soon(service.batcher)
                if isinstance(self.store, PostgresStore):
                    # replicas on one database: hear each other's changes; the rollout driver
                    # runs on the leader only (docs/scale.md, "Replicas")
                    service.rollouts.leader = False
                    self.feed = ChangeFeed(self.store.connect, self.store.replica_id,
                                           self._leading)
                    await nursery.start(self.feed.run, service)
                await nursery.start(service.rollouts.run)
                await nursery.start(partial(serve, build_app(service, limits, gate), hc, socks,
                                            gate))
                log.info("coordinator listening on %s (fingerprint %s)", self.url,
                         self.fingerprint)
                task_status.started(self)
        finally:
            self.store.close()
            self.blobs.close()

    async def _leading(self, leader: bool) -> None:
        """The change feed took (True) or lost (False) the leader lock."""
        if self._service is not None:
            self._service.rollouts.leader = leader
            if leader:
                self._service.rollouts.wake()

    def _s3_blobs(self, url: str, credentials_file: Path | None) -> S3Blobs:
        """The bucket, checked: a bad URL, credentials or bucket stop the start (one line);
        a store that does not answer yet does not (blob requests get 503 until it does)."""
        try:
            # signed with the wall clock, never the config's (a test's clock would be refused)
            blobs = S3Blobs(S3Location.parse(url), read_credentials(credentials_file),
                            self.data_dir / BLOBS_STAGING_DIR)
        except S3ConfigError as exc:
            raise CoordinatorConfigError(str(exc)) from None
        try:
            blobs.prepare()
        except S3ConfigError as exc:
            blobs.close()
            raise CoordinatorConfigError(str(exc)) from None
        except BlobStoreUnavailable as exc:
            log.warning("%s (starting anyway: blob requests get 503 until it answers)", exc)
        return blobs

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

    async def _sync_hub(self) -> None:
        """Bring the hub's peers up to date now; on failure the hub's loop retries."""
        if self.hub is None:
            return
        try:
            await self.hub.sync()
        except (OSError, ValueError, trio.TooSlowError) as exc:
            log.warning("hub sync failed (will retry): %s", exc)
            self.hub.request_sync()
