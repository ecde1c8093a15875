"""The agent's link to the coordinator: every device API call, with its deadline, the URL
fallback (the hub tunnel first when it is up, else the URL given at join), backoff, revocation
detection, and the one way the agent logs an error that repeats: once per distinct message.

    link = CoordinatorLink(identity, client_factory, hub_up=wg.hub_up, log=log)
    peermap = await link.peermap(version, wait)      # None: unchanged within `wait`
    targets = await link.targets()                   # [mesh.control.DeviceTarget], validated
    ...
    if link.failed(exc, errors): return              # revoked: the caller's loop ends

Every call's bytes (request and answer as httpx sees them: mesh.meter, ops/client.py
`exchange_size`) go to the device's WAN byte account (agent/_account.py) by purpose: `blobs`
for blob downloads, `logs` for log uploads, `control` for everything else (peer map, reports,
targets, manifests, roots, timestamps, punches), marked in the tunnel when the call went to the
hub's API URL. What TLS and TCP/IP add on top is not counted here; through the tunnel it lands in
the account's `wireguard` (the tunnel's counters minus what the purposes counted).

An exception with an integer `status` attribute is an answer from the coordinator (the SDK's
`ApiError`) and is final for that call. Only a 401 that says so explicitly (`revoked` true,
from the coordinator's `{"revoked": true}`) means the device was revoked; any other 401 (an
unknown credential, e.g. one replaced by somebody's enrollment under our name) is an error
like others: the mesh stays up and the loops retry with backoff (docs/security.md). Anything
else means no usable answer from that URL, and the next one is tried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final, Protocol, TypeVar

import trio

from mesh.control import (
    MAX_APPS,
    ControlError,
    DeviceReport,
    DeviceTarget,
    LogLine,
    PeerMap,
)
from mesh.meter import metered
from mesh.release import SignedRoot

from ._account import WanAccount
from ._datadir import Identity

T = TypeVar("T")
Log = Callable[[str], None]

# The SDK already adds 10 s of read slack to a long poll; ours is the outer bound on top of it.
POLL_SLACK: Final = 15.0
CALL_TIMEOUT: Final = 15.0  # a report or anything that is not a long poll
# A blob from the coordinator: the gossip node's own fetch deadline (blobsched.fetch_timeout) is
# the real bound; this only caps one attempt per URL.
BLOB_CALL_TIMEOUT: Final = 600.0
BACKOFF_INITIAL: Final = 1.0
BACKOFF_MAX: Final = 30.0  # bounded: a device that was cut off finds the coordinator within 30 s
# Calls in a row with no answer from any URL after which the coordinator counts as unreachable
# (the mesh node then lets peers on other LANs help: mesh.node.ServePolicy); the same count as
# the node's own rule for seed downloads (mesh.node.OUTAGE_SEED_FAILURES).
UNREACHABLE_AFTER: Final = 3


class DeviceApi(Protocol):
    """Every coordinator call the agent makes (the SDK's `DeviceClient` fits).

    Errors: an exception with an integer `status` attribute is an answer from the coordinator
    (`ApiError`); a 401 with `revoked` true means the device was revoked. Anything else means
    no usable answer.
    """

    # `held`: the map at `version`; the answer is then that map with the changes since applied
    # (ops/client.py DeviceClient.peermap asks for a delta)
    async def peermap(self, version: int, wait: float, hold: float = 0.0,
                      quiet: bool = False, held: PeerMap | None = None) -> PeerMap | None: ...

    async def report(self, report: DeviceReport) -> None: ...

    async def punch(self, peer: str) -> None: ...

    # the JSON entries of `GET /device/target`; the link validates them (DeviceTarget)
    async def targets(self) -> Sequence[Mapping[str, object]]: ...

    # the fleet's signed timestamp, None without a grant (agent/_freshness.py verifies it)
    async def timestamp(self) -> bytes | None: ...

    async def manifest(self, fleet: str, app: str, version: int) -> bytes: ...

    # the fleet's signed roots newer than `since`, decoded, oldest first (agent/_rotation.py
    # verifies them)
    async def roots(self, fleet: str, since: int) -> list[SignedRoot]: ...

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes: ...

    async def upload_logs(self, lines: Sequence[LogLine], dropped: int = 0) -> None: ...

    async def aclose(self) -> None: ...


ClientFactory = Callable[[str, str, bytes], DeviceApi]  # (url, credential, cert_der)


def error_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def revoked_answer(exc: BaseException) -> bool:
    """The coordinator said explicitly that this device was revoked (not merely 401)."""
    return error_status(exc) == 401 and getattr(exc, "revoked", False) is True


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class ErrorOnce:
    """An error that repeats is logged once per distinct message (with the retry interval when
    given), and its end once (when a message for that is given)."""

    def __init__(self, log: Log, retry_every: float | None = None) -> None:
        self.log = log
        self.retry_every = retry_every
        self.last: str | None = None

    def failed(self, message: str) -> None:
        if message != self.last:
            suffix = "" if self.retry_every is None else f"; retrying every {self.retry_every:g} s"
            self.log(message + suffix)
            self.last = message

    def ok(self, message: str | None = None) -> None:
        """The call worked again; `message` is logged if it had failed."""
        if self.last is not None and message is not None:
            self.log(message)
        self.last = None


class Backoff:
    """Exponential backoff with "equal jitter" (AWS Architecture Blog, "Exponential Backoff and
    Jitter"): half the step is fixed, half random, so retries spread out but never collapse to 0."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rng = rng or random.Random()
        self.failures = 0

    def next(self) -> float:
        step = min(self.maximum, self.initial * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return step / 2 + self.rng.random() * step / 2

    def reset(self) -> None:
        self.failures = 0


class CoordinatorLink:
    """One device's calls to the coordinator; `revoked` once it refused our credential."""

    def __init__(self, identity: Identity, client_factory: ClientFactory, *,
                 hub_up: Callable[[], bool], log: Log, rng: random.Random | None = None,
                 account: WanAccount | None = None, clock: Callable[[], float] = time.time
                 ) -> None:
        self.identity = identity
        self.account = account if account is not None else WanAccount()
        self.clock = clock
        self.client_factory = client_factory
        self.hub_up = hub_up
        self.log = log
        self.backoff = Backoff(rng=rng)
        self.revoked = False
        self._clients: dict[str, DeviceApi] = {}
        # Blob downloads get clients (connection pools) of their own: a report or the peer-map
        # long poll never queues behind a bulk transfer on one connection (issue 12).
        self._bulk_clients: dict[str, DeviceApi] = {}
        self._last_url: str | None = None
        # The URL that last answered a blob call: tried first by the next one (a direct URL
        # that does not answer costs one timeout, not one per piece).
        self._bulk_url: str | None = None
        self._replica_url: str | None = None  # the direct URL that last answered
        self._bad_targets = ErrorOnce(lambda m: log(f"targets: {m}"))
        self._unanswered = 0  # calls in a row that no URL answered
        # called with False when the coordinator becomes unreachable, True when it answers again
        self.reachability: list[Callable[[bool], None]] = []

    # -- the calls -----------------------------------------------------------------------------

    async def peermap(self, version: int, wait: int, direct_wait: int | None = None,
                      hold: float = 0.0, quiet: bool = False, held: PeerMap | None = None
                      ) -> PeerMap | None:
        """Long poll: the peer map if its version differs from `version`, None if unchanged.
        It waits `wait` seconds through the hub tunnel and `direct_wait` (default: `wait`) on
        the join URL, whose TCP connection crosses the NAT with nothing sent while it waits.
        Through the tunnel the answer may come up to `hold` s late (our hub keepalive: a NAT
        that forgot our binding holds it until our next packet), and is waited for; `quiet`:
        a keepalive trial (the coordinator counts us online through the wait); `held`: the map
        at `version`, to which only the changes since are fetched and applied."""
        tunnel = self.identity.enrollment.hub.api_url

        def attempt(url: str) -> tuple[Callable[[DeviceApi], Awaitable[PeerMap | None]], float]:
            if url == tunnel:
                return ((lambda c: c.peermap(version, wait, hold, quiet, held=held)),
                        wait + POLL_SLACK + hold)
            w = wait if direct_wait is None else direct_wait
            return (lambda c: c.peermap(version, w, held=held)), w + POLL_SLACK

        return await self._call(attempt)

    async def report(self, report: DeviceReport) -> None:
        await self.call(lambda c: c.report(report), CALL_TIMEOUT)

    async def punch(self, peer: str) -> None:
        await self.call(lambda c: c.punch(peer), CALL_TIMEOUT)

    async def targets(self) -> list[DeviceTarget]:
        """The coordinator's targets, validated; an entry that is not (or names an app twice,
        or is past MAX_APPS) is left out and logged once (docs/architecture.md, principle 5)."""
        entries = await self.call(lambda c: c.targets(), CALL_TIMEOUT)
        out: dict[str, DeviceTarget] = {}
        problem: str | None = None
        for i, entry in enumerate(entries):
            try:
                t = DeviceTarget.from_json(entry, f"targets[{i}]")
            except ControlError as exc:
                problem = str(exc)
                continue
            if t.app in out or len(out) >= MAX_APPS:
                problem = f"targets[{i}]: {t.app} named twice or past {MAX_APPS} apps"
                continue
            out[t.app] = t
        if problem is None:
            self._bad_targets.ok()
        else:
            self._bad_targets.failed(f"ignoring what does not validate: {problem}")
        return list(out.values())

    async def manifest(self, fleet: str, app: str, version: int) -> bytes:
        return await self.call(lambda c: c.manifest(fleet, app, version), CALL_TIMEOUT)

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        """A blob from the coordinator, or its slice [start:end): the gossip node's seed
        (agent/_gossip.py BlobSource), on the blob connections, apart from control calls."""
        return await self.call(lambda c: c.blob(blob_id, start, end), BLOB_CALL_TIMEOUT,
                               bulk=True, purpose="blobs")

    async def upload_logs(self, lines: Sequence[LogLine], dropped: int) -> None:
        await self.call(lambda c: c.upload_logs(lines, dropped), CALL_TIMEOUT, purpose="logs")

    # -- errors --------------------------------------------------------------------------------

    def failed(self, exc: Exception, errors: ErrorOnce, what: str) -> bool:
        """A call of a periodic loop failed: True if the device was revoked (the loop ends);
        otherwise the error is logged once per distinct message."""
        if self.revoked_by(exc):
            return True
        errors.failed(f"{what}: {self.describe(exc)}")
        return False

    def revoked_by(self, exc: Exception) -> bool:
        """True (logged once) if `exc` is the coordinator saying our device was revoked. A 401
        without that is not proof of revocation: whoever holds a fleet token could otherwise
        silence a device for good."""
        if revoked_answer(exc):
            self.revoke(exc)
            return True
        return False

    @staticmethod
    def describe(exc: Exception) -> str:
        """One line for the log; a 401 that is no revocation says what the agent does."""
        if error_status(exc) == 401:
            return (f"coordinator refused our credential ({one_line(exc)}) without saying "
                    "the device was revoked: keeping the mesh up and retrying")
        return one_line(exc)

    def revoke(self, exc: BaseException) -> None:
        if not self.revoked:
            self.revoked = True
            self.log(f"coordinator refused our credential ({one_line(exc)}): this device was "
                     "revoked; keeping the mesh as it is and no longer polling or reporting")

    def lost(self) -> None:
        """No answer at all: the next call logs which URL answers again."""
        self._last_url = None

    # -- clients and URLs ----------------------------------------------------------------------

    def _urls(self, bulk: bool = False) -> list[str]:
        """Control calls: the hub tunnel first (it reaches the coordinator whatever the
        underlay filters). Blob downloads: the join URL first, outside the tunnel: the same
        WAN link, without WireGuard's ~4.5 % of headers on every byte of a release and without
        the hub's encryption work (issue 12); the tunnel if that does not answer."""
        tunnel = self.identity.enrollment.hub.api_url
        direct = self._direct_urls()
        if not (self.hub_up() and tunnel and tunnel != self.identity.url):
            urls = direct
        else:
            urls = [direct[0], tunnel, *direct[1:]] if bulk else [tunnel, *direct]
        if bulk and self._bulk_url in urls:
            urls.remove(self._bulk_url)
            urls.insert(0, self._bulk_url)
        return urls

    def _direct_urls(self) -> list[str]:
        """The join URL and the other replicas' (Identity.urls), the one that last answered
        first: a replica that died costs one failed connection, not one per call."""
        urls = list(dict.fromkeys((self.identity.url, *self.identity.urls)))
        if self._replica_url in urls:
            urls.remove(self._replica_url)
            urls.insert(0, self._replica_url)
        return urls

    def _client(self, url: str, bulk: bool = False) -> DeviceApi:
        pool = self._bulk_clients if bulk else self._clients
        client = pool.get(url)
        if client is None:
            client = self.client_factory(url, self.identity.enrollment.credential,
                                         self.identity.cert_der)
            pool[url] = client
        return client

    async def aclose(self) -> None:
        clients = [*self._clients.values(), *self._bulk_clients.values()]
        self._clients, self._bulk_clients = {}, {}
        for client in clients:
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - closing must not mask the real exit reason
                pass

    async def call(self, op: Callable[[DeviceApi], Awaitable[T]], timeout: float, *,
                   bulk: bool = False, purpose: str = "control") -> T:
        """Through the hub tunnel first when it is up, else (or if that gives no answer) the URL
        given at join. An error answer from the coordinator is final: it did answer. `bulk`:
        on the blob clients. Its bytes count for `purpose` in the WAN byte account."""
        return await self._call(lambda url: (op, timeout), bulk=bulk, purpose=purpose)

    def _meter(self, purpose: str, url: str) -> Callable[[int], None]:
        in_tunnel = url == self.identity.enrollment.hub.api_url and url != self.identity.url
        return lambda n: self.account.add(purpose, n, in_tunnel=in_tunnel, now=self.clock())

    async def _call(self, attempt: Callable[[str], tuple[Callable[[DeviceApi], Awaitable[T]],
                                                          float]], *, bulk: bool = False,
                    purpose: str = "control") -> T:
        """`call`, with the operation and its deadline chosen per URL by `attempt(url)`."""
        last: BaseException | None = None
        for url in self._urls(bulk):
            op, timeout = attempt(url)
            try:
                with trio.fail_after(timeout), metered(self._meter(purpose, url)):
                    result = await op(self._client(url, bulk))
            except trio.TooSlowError:
                last = TimeoutError(f"no answer from {url} within {timeout:g} s")
                continue
            except Exception as exc:  # noqa: BLE001 - the SDK's errors, whatever their class
                if error_status(exc) is not None:
                    self._answered(True)  # an error answer is an answer
                    raise
                last = exc
                continue
            if url != self.identity.enrollment.hub.api_url:
                self._replica_url = url
            if bulk:
                self._bulk_url = url
            elif url != self._last_url:
                via = ("the direct URL" if url == self.identity.url else "another replica"
                       if url in self.identity.urls else "the hub tunnel")
                self.log(f"coordinator reached at {url} ({via})")
                self._last_url = url
            self._answered(True)
            return result
        assert last is not None
        self._answered(False)
        raise last

    @property
    def answered_via_tunnel(self) -> bool:
        """The last call was answered through the hub tunnel (not the join URL)."""
        return self._last_url == self.identity.enrollment.hub.api_url

    @property
    def reachable(self) -> bool:
        return self._unanswered < UNREACHABLE_AFTER

    def _answered(self, ok: bool) -> None:
        was = self.reachable
        self._unanswered = 0 if ok else self._unanswered + 1
        if self.reachable != was:
            for watcher in self.reachability:
                watcher(self.reachable)


__all__ = ["BLOB_CALL_TIMEOUT", "CALL_TIMEOUT", "POLL_SLACK", "UNREACHABLE_AFTER", "Backoff",
           "ClientFactory", "CoordinatorLink", "DeviceApi", "ErrorOnce", "error_status",
           "one_line", "revoked_answer"]
