"""Coordinator replicas on one PostgreSQL database (docs/scale.md, "Replicas"): the change
feed's decisions (coordinator/_changes.py, pure), the notifications the store sends in its
transactions, and two real `fleetmesh coordinator serve` processes on one database, whose
long polls hear what the other replica wrote, also across a lost LISTEN connection."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import psycopg
import pytest
import trio
from nacl.signing import SigningKey

from coordinator._changes import (
    CHANNEL,
    LEADER_LOCK,
    Change,
    ChangeFeed,
    Effect,
    Kind,
    _Heard,
    decode,
    effects,
)
from coordinator._model import EnrollmentToken, EnrollParams, StoreUnavailable, TokenUnknown
from coordinator._rollouts import RolloutService
from coordinator._server import IDENTITY_FILES, Coordinator, CoordinatorConfig
from coordinator._store_pg import FEED_APPLICATION, PostgresStore
from mesh.control import PeerMap
from ops.client import ApiError, DeviceClient, OperatorClient, enroll
from tests.coordinator_process import FLEETMESH, RunningCoordinator, running_coordinator
from tests.pgserver import PgServer
from vpn import generate_keypair

from .conftest import Harness, running_harness
from .releasekit import build

T = TypeVar("T")
LONG = 1800  # s: a long poll's longest wait; an answer before it came from a change
BOUND = 90  # s: the most a test step may take on a loaded machine (never a measurement)

# ----------------------------------------------------------------------------- decisions


def test_each_kind_causes_the_updates_a_local_write_makes() -> None:
    def of(kind: str, device: str = "cam-1", leader: bool = True) -> frozenset[Effect]:
        return effects(Change("other", kind, "cams", device), "me", leader)

    assert of(Kind.DEVICE) == {Effect.SYNC_DEVICE}
    assert of(Kind.REPORT) == {Effect.SYNC_DEVICE, Effect.STEP_FLEET}
    assert of(Kind.REPORT, leader=False) == {Effect.SYNC_DEVICE}
    assert of(Kind.TARGETS) == {Effect.TARGETS_DEVICE}
    assert of(Kind.TARGETS, device="") == {Effect.TARGETS_FLEET}
    assert of(Kind.ROLLOUT, device="") == {Effect.TARGETS_FLEET, Effect.WAKE_ROLLOUTS}
    assert of(Kind.OPERATORS, device="") == {Effect.OPERATORS}
    assert of(Kind.LOGS) == {Effect.WAKE_LOGS}


def test_own_changes_are_ignored_and_unreadable_ones_reload() -> None:
    assert effects(Change("me", Kind.DEVICE, "cams", "cam-1"), "me", True) == frozenset()
    assert effects(Change("other", "a-kind-of-a-newer-replica"), "me", True) == {Effect.RELOAD}
    assert effects(None, "me", False) == {Effect.RELOAD}


@pytest.mark.parametrize("payload", ["", "{", "[]", '{"k": "device"}', '["r", "device", "f"]',
                                     '["r", "device", "f", 7]'])
def test_a_payload_that_is_not_a_change_decodes_to_none(payload: str) -> None:
    assert decode(payload) is None


def test_a_change_round_trips_and_never_exceeds_the_payload_limit() -> None:
    change = Change("r_1", Kind.TARGETS, "cams", "cam-ä")
    assert decode(change.encode()) == change
    with pytest.raises(ValueError, match="too long"):
        Change("r_1", Kind.DEVICE, "f", "x" * 8000).encode()


class _FlakyReplica:
    """A replica whose store fails `failures` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures, self.done = failures, list[str]()

    def _store(self, what: str) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("database unavailable: connection refused")
        self.done.append(what)

    async def sync_device(self, name: str) -> None:
        self._store(f"sync {name}")

    def targets_changed(self, fleet: str, device: str | None = None) -> None:
        self._store(f"targets {fleet}")

    def sync_operators(self) -> None:
        self._store("operators")

    def wake_logs(self, name: str) -> None:
        self._store(f"logs {name}")

    def wake_rollouts(self) -> None:
        self._store("rollouts")

    def step_fleet(self, fleet: str) -> None:
        self._store(f"step {fleet}")

    async def reload(self) -> None:
        self._store("reload")


async def test_a_change_the_store_cannot_apply_is_made_good_by_a_reload(
        autojump_clock: trio.abc.Clock) -> None:
    """The store fails while a change is applied, and twice more: the feed goes on and, once
    the store answers, reloads everything (the change may have been lost)."""
    feed = ChangeFeed(lambda: cast(Any, None), "me")
    replica = _FlakyReplica(failures=3)
    await feed.deliver(replica, _Heard(Change("other", Kind.DEVICE, "cams", "cam-1")))
    assert replica.done == ["reload"]
    await feed.deliver(replica, _Heard(Change("other", Kind.DEVICE, "cams", "cam-2")))
    assert replica.done == ["reload", "sync cam-2"]


# ----------------------------------------------------------------------------- the store


def test_postgres_writes_notify_on_commit_only(pg_server: PgServer) -> None:
    """A write sends its notification in its transaction: a refused enrollment and a
    rolled-back transaction send none, so the first one heard is the enrollment that
    committed after them (PostgreSQL delivers in commit order)."""
    url = pg_server.new_database()
    store = PostgresStore(url)
    try:
        with psycopg.connect(url, autocommit=True) as listener:
            listener.execute(f"LISTEN {CHANNEL}")
            store.create_token(EnrollmentToken("h", "cams", 5, 2e9, 1.0))
            with pytest.raises(TokenUnknown):  # refused before it wrote anything
                store.enroll(EnrollParams(
                    secret_hash="nope", public_key=generate_keypair().public,
                    credential_hash="c0", device_id="d_0", generated_name="dev-0", now=2.0))
            with pytest.raises(RuntimeError), store._tx() as c:  # notified, then rolled back
                store._notify(c, Kind.DEVICE, "cams", "ghost")
                raise RuntimeError("refused after the notification")
            store.enroll(EnrollParams(
                secret_hash="h", public_key=generate_keypair().public, credential_hash="c1",
                device_id="d_1", generated_name="dev-1", now=2.0, name="cam-1"))
            heard = [decode(n.payload) for n in listener.notifies(stop_after=1, timeout=BOUND)]
        assert heard == [Change(store.replica_id, Kind.DEVICE, "cams", "cam-1")]
    finally:
        store.close()


# ----------------------------------------------------------------------------- two replicas



def share_identity(first: Path, second: Path) -> None:
    """What the operator does for a second replica (docs/scale.md): the first one's key and
    certificate files in the second one's data directory."""
    second.mkdir(mode=0o700)
    for name in IDENTITY_FILES:
        shutil.copy2(first / name, second / name)


@contextmanager
def two_replicas(tmp_path: Path, url: str) -> Iterator[tuple[RunningCoordinator,
                                                            RunningCoordinator]]:
    with running_coordinator(tmp_path / "r1", tmp_path / "r1.log", "--store", url) as r1:
        share_identity(tmp_path / "r1", tmp_path / "r2")
        with running_coordinator(tmp_path / "r2", tmp_path / "r2.log", "--store", url) as r2:
            assert r2.der == r1.der and r2.api_key == r1.api_key
            yield r1, r2


async def _sync(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


CREDENTIALS: dict[str, str] = {}  # device name -> its credential (any replica takes it)


async def _device(r: RunningCoordinator, token: str, name: str) -> DeviceClient:
    e, der = await enroll(r.url, token, generate_keypair().public, name=name)
    CREDENTIALS[name] = e.credential
    return DeviceClient(r.url, e.credential, der)


async def _until(device: DeviceClient, pm: PeerMap, done: Callable[[PeerMap], bool]
                 ) -> PeerMap:
    """Long polls (each LONG: an answer is a change, never a timeout) until `done(map)`."""
    while not done(pm):
        answer = await device.peermap(version=pm.version, wait=LONG)
        assert answer is not None  # a 304 would mean LONG seconds without the change
        pm = answer
    return pm


def _names(pm: PeerMap) -> set[str]:
    return {p.name for p in pm.peers}


async def test_a_change_on_one_replica_reaches_long_polls_on_the_other(
        tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.new_database()
    with two_replicas(tmp_path, url) as (r1, r2), \
            OperatorClient(r1.url, r1.api_key, cert_der=r1.der) as op1, \
            OperatorClient(r2.url, r2.api_key, cert_der=r2.der) as op2, \
            trio.fail_after(BOUND):
        token = (await _sync(op1.create_token, "cams", 3))["token"]
        async with await _device(r2, token, "cam-1") as d1:
            first = await d1.peermap(version=0, wait=0)
            assert first is not None and _names(first) == set()
            # cam-1 long-polls replica 2 while cam-2 enrolls on replica 1
            async with trio.open_nursery() as nursery:
                polled: list[PeerMap] = []

                async def poll() -> None:
                    polled.append(await _until(d1, first, lambda m: "cam-2" in _names(m)))

                nursery.start_soon(poll)
                await trio.sleep(0)
                d2 = await _device(r1, token, "cam-2")
            assert _names(polled[0]) == {"cam-2"}

            # a release published on replica 1 reaches cam-1's poll on replica 2
            key = SigningKey.generate()
            release = build(key, fleet="cams")
            await _sync(op1.set_release_key, "cams", bytes(key.verify_key).hex())
            for blob_id, (data, kind) in release.blobs.items():
                await _sync(op1.put_blob, blob_id, data, kind)
            await _sync(op1.publish_release, release.signed)
            before = polled[0]
            after = await _until(d1, before, lambda m: m.targets != before.targets)
            revision = after.targets
            assert [t["version"] for t in await d1.targets()] == [1]
            # a rollout started on replica 1 (its release published held first)
            v2 = build(key, fleet="cams", version=2)
            for blob_id, (data, kind) in v2.blobs.items():
                await _sync(op1.put_blob, blob_id, data, kind)
            await _sync(op1.publish_release, v2.signed, "held")
            after = await _until(d1, after, lambda m: m.targets != revision)
            revision = after.targets
            await _sync(op1.start_rollout, "cams", "app", 2, {"phases": "100%", "soak": 20})
            after = await _until(d1, after, lambda m: m.targets != revision)
            assert [t["version"] for t in await d1.targets()] == [2]
            # and a fleet target set there
            revision = after.targets
            assert (await _sync(op1.set_target, "cams", "app", 2))["version"] == 2
            after = await _until(d1, after, lambda m: m.targets != revision)
            assert [t["version"] for t in await d1.targets()] == [2]

            # revoked on replica 2: its own poll on replica 1 is refused, cam-1 loses it
            async with d2, DeviceClient(r1.url, CREDENTIALS["cam-1"], r1.der) as d1_on_r1:
                v2 = (await d2.peermap(version=0, wait=0)).version  # type: ignore[union-attr]
                on_r1 = await d1_on_r1.peermap(version=0, wait=0)
                assert on_r1 is not None and "cam-2" in _names(on_r1)
                refused: list[ApiError] = []
                async with trio.open_nursery() as nursery:
                    async def poll_revoked() -> None:
                        with pytest.raises(ApiError) as err:
                            await d2.peermap(version=v2, wait=LONG)
                        refused.append(err.value)

                    nursery.start_soon(poll_revoked)
                    await trio.sleep(0)
                    await _sync(op2.revoke, "cam-2")
                assert refused[0].status == 401
                await _until(d1_on_r1, on_r1, lambda m: "cam-2" not in _names(m))


async def test_a_lost_listen_connection_reloads_and_misses_nothing(
        tmp_path: Path, pg_server: PgServer) -> None:
    """Replica 2's LISTEN connection is killed and kept from coming back while replica 1
    enrolls a device (so its notification is surely lost); once it may connect again, it
    reloads from the store and its long poll answers with the device."""
    url = pg_server.new_database()
    dbname = url.rsplit("/", 1)[1]
    with two_replicas(tmp_path, url) as (r1, r2), \
            OperatorClient(r1.url, r1.api_key, cert_der=r1.der) as op1, \
            psycopg.connect(pg_server.url(), autocommit=True) as admin, \
            trio.fail_after(BOUND):
        token = (await _sync(op1.create_token, "cams", 3))["token"]
        async with await _device(r2, token, "cam-1") as d1:
            pm = await d1.peermap(version=0, wait=0)
            assert pm is not None
            admin.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS false")
            try:
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                    "AND application_name = %s", (dbname, FEED_APPLICATION)).fetchall()
                assert len(killed) == 2  # both replicas' feeds: nobody hears anything now
                await (await _device(r1, token, "cam-2")).aclose()
            finally:
                admin.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS true")
            pm = await _until(d1, pm, lambda m: "cam-2" in _names(m))
    log = (tmp_path / "r2.log").read_text()
    assert "change feed: lost the database connection" in log
    assert "change feed: reconnected; reloading everything" in log
    assert "Traceback" not in log


async def test_replicas_survive_a_postgresql_restart(tmp_path: Path) -> None:
    """PostgreSQL restarted under two replicas: both feeds come back and a change on one
    reaches a long poll on the other again."""
    server = PgServer()  # its own: the session's server is not stopped under other tests
    try:
        server.start()
        url = server.new_database()
        with two_replicas(tmp_path, url) as (r1, r2), \
                OperatorClient(r1.url, r1.api_key, cert_der=r1.der) as op1, \
                trio.fail_after(BOUND):
            token = (await _sync(op1.create_token, "cams", 3))["token"]
            async with await _device(r2, token, "cam-1") as d1:
                pm = await d1.peermap(version=0, wait=0)
                assert pm is not None
                server.stop_server()
                server.start_again()
                while True:  # the first request after the restart may meet a dead socket
                    try:
                        await (await _device(r1, token, "cam-2")).aclose()
                        break
                    except ApiError as exc:
                        assert exc.status == 503
                        await trio.sleep(0.2)
                await _until(d1, pm, lambda m: "cam-2" in _names(m))
        for name in ("r1.log", "r2.log"):
            assert "Traceback" not in (tmp_path / name).read_text()
    finally:
        server.stop()


async def test_the_sdk_and_a_device_fail_over_when_a_replica_dies(
        tmp_path: Path, pg_server: PgServer) -> None:
    """Both replicas' URLs in the operator's client and the device's: SIGKILL of the one in
    use, and the next request goes to the other (a 4xx would not have moved them)."""
    url = pg_server.new_database()
    with two_replicas(tmp_path, url) as (r1, r2), \
            OperatorClient([r1.url, r2.url], r1.api_key, fingerprint=r1.fingerprint) as op, \
            trio.fail_after(BOUND):
        token = (await _sync(op.create_token, "cams", 3))["token"]
        assert op.url == r1.url
        with pytest.raises(ApiError) as err:  # an answer, even an error, is final
            await _sync(op.device, "nobody")
        assert err.value.status == 404 and op.url == r1.url
        e, der = await enroll(r1.url, token, generate_keypair().public, name="cam-1")
        async with DeviceClient(f"{r1.url},{r2.url}", e.credential, der) as d1:
            pm = await d1.peermap(version=0, wait=0)
            assert pm is not None and d1.url == r1.url
            os.kill(r1.pid, signal.SIGKILL)
            os.waitpid(r1.pid, 0)
            assert [d["name"] for d in await _sync(op.list_devices)] == ["cam-1"]
            assert op.url == r2.url
            await (await _device(r2, token, "cam-2")).aclose()
            pm = await _until(d1, pm, lambda m: "cam-2" in _names(m))
            assert d1.url == r2.url


async def test_peer_urls_reach_the_device_in_its_enrollment_and_join_object(
        tmp_path: Path, pg_server: PgServer) -> None:
    config = CoordinatorConfig(data_dir=tmp_path / "c", listen="127.0.0.1:0", hub=False,
                               batch_window=0.05, store=pg_server.new_database(),
                               peer_urls=("https://r2.example:8443/", "https://r3.example:8443"))
    async with running_harness(config) as h:
        e = await h.enroll("cam-1", "cams")
        own = h.coord.public_url
        assert e.enrollment["urls"] == [own, "https://r2.example:8443",
                                         "https://r3.example:8443"]
        r = await h.op.post("/api/v1/devices", json={"name": "cam-2", "fleet": "cams"})
        assert r.status_code == 201, r.text
        join = r.json()["join"]
        assert join["url"] == own and join["urls"] == e.enrollment["urls"]


async def test_one_coordinator_hands_out_no_url_list(h: Harness) -> None:
    e = await h.enroll("cam-1", "cams")
    assert "urls" not in e.enrollment


@pytest.mark.parametrize("argv, fragment", [
    (("--peer-url", "https://r2:8443"), "--peer-url goes with --store"),
    (("--store", "postgresql://u@127.0.0.1:1/db", "--peer-url", "http://r2:8443"),
     "--peer-url:"),
])
def test_bad_peer_urls_stop_serve_with_one_line(tmp_path: Path, argv: tuple[str, ...],
                                                fragment: str) -> None:
    done = subprocess.run([FLEETMESH, "coordinator", "serve", "--data", str(tmp_path / "d"),
                           "--listen", "127.0.0.1:0", "--no-hub", *argv],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]


# ----------------------------------------------------------------------------- the leader


class _CountingStore:
    """The one store call stepping makes first: which fleets were stepped."""

    def __init__(self) -> None:
        self.stepped: list[str | None] = []

    def rollouts(self, fleet: str | None = None, states: Any = None) -> list[Any]:
        self.stepped.append(fleet)
        return []


def test_only_the_leader_steps_rollouts_on_reports() -> None:
    store = _CountingStore()
    releases = cast(Any, SimpleNamespace(clock=lambda: 0.0))
    rollouts = RolloutService(cast(Any, store), releases, lambda name: None)
    rollouts.step_reported("cams")
    rollouts.leader = False
    rollouts.step_reported("dogs")
    assert store.stepped == ["cams"]


async def test_the_leader_lock_moves_to_another_replica_when_its_holder_stops(
        tmp_path: Path, pg_server: PgServer) -> None:
    """Two replicas in this process: the first to start leads, the other does not; when the
    leader stops (its feed's session ends) the other takes the lock and runs the driver."""
    url = pg_server.new_database()

    def config(name: str) -> CoordinatorConfig:
        return CoordinatorConfig(data_dir=tmp_path / name, listen="127.0.0.1:0", hub=False,
                                 batch_window=0.05, store=url)

    with trio.fail_after(BOUND):
        async with Coordinator(config("a")) as a:
            share_identity(tmp_path / "a", tmp_path / "b")
            async with Coordinator(config("b")) as b:
                while not a.service.rollouts.leader:  # the feed hands the news over
                    await trio.sleep(0.05)
                assert a.feed is not None and a.feed.leader and b.feed is not None
                assert not b.feed.leader and not b.service.rollouts.leader
                a.stop()  # its nursery ends; the feed's thread closes its connection
                while not b.service.rollouts.leader:
                    await trio.sleep(0.05)
                assert b.feed.leader


def _leader_backend(admin: psycopg.Connection[Any], dbname: str) -> int | None:
    """The database backend (pid) that holds the leader lock, None if nobody does."""
    row = admin.execute(
        "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE "
        "d.datname = %s AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND "
        "((l.classid::bigint << 32) | l.objid::bigint) = %s", (dbname, LEADER_LOCK)).fetchone()
    return None if row is None else int(row[0])


async def test_sigkill_of_the_leading_process_hands_the_lock_to_the_other(
        tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.new_database()
    dbname = url.rsplit("/", 1)[1]
    with two_replicas(tmp_path, url) as (r1, _r2), \
            psycopg.connect(pg_server.url(), autocommit=True) as admin, \
            trio.fail_after(BOUND):
        first = _leader_backend(admin, dbname)
        assert first is not None  # the first replica took it before it was ready
        os.kill(r1.pid, signal.SIGKILL)
        os.waitpid(r1.pid, 0)
        while (holder := _leader_backend(admin, dbname)) in (None, first):
            await trio.sleep(0.1)  # the other replica tries again every LISTEN_POLL
        row = admin.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                            (holder,)).fetchone()
        assert row == (FEED_APPLICATION,)
