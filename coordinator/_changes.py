"""The change feed between coordinator replicas on one PostgreSQL database (docs/scale.md).

Each replica keeps part of the fleet in memory (the peer-map core, long-poll and log waiters,
the rollout driver's wake-up). A write that changes any of that sends, in its own transaction,
`pg_notify(CHANNEL, payload)` (PostgresStore; SQLite has no feed): PostgreSQL delivers it on
commit, never for a rolled-back transaction. The payload only names what changed (a `Change`:
the sending replica, a kind, a fleet, a device name); a replica that hears it re-reads those
rows from the store and makes the same in-memory updates a local write makes, which wakes its
long polls. It never takes data from the payload.

`effects` (pure) is the decision: which in-memory updates a change causes. `ChangeFeed` is the
I/O: one dedicated connection per replica that LISTENs (in a thread: psycopg is synchronous
here, as the store is), reconnects when the connection is lost and then reloads everything
(a notification may have been missed while it was away), and holds the leader's session
advisory lock (`LEADER_LOCK`) for the work that must run once (the rollout driver): the lock
is released with the session, so a replica whose process or connection dies hands it over.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import psycopg
import trio

log = logging.getLogger("fleetmesh.coordinator.changes")

CHANNEL: Final = "fleetmesh_changes"
# The session advisory lock whose holder is the leader (any constant other than the store's
# write lock; "fleetldr").
LEADER_LOCK: Final = 0x666C6565_746C6472
MAX_PAYLOAD: Final = 7900  # PostgreSQL refuses a NOTIFY payload of 8000 bytes or more
# How long one wait for notifications lasts before the listener looks at its stop flag and,
# unless it leads, tries the leader lock again: the longest a dead leader goes unreplaced once
# its session has ended.
LISTEN_POLL: Final = 1.0
RECONNECT_MIN: Final = 0.2  # s: the first retry after a lost connection, doubling up to
RECONNECT_MAX: Final = 5.0


class Kind(enum.StrEnum):
    """What a write changed."""

    DEVICE = "device"  # a device's row: enrolled, re-keyed, revoked, its public endpoint
    REPORT = "report"  # a device reported (LAN endpoints; may step its fleet's rollouts)
    TARGETS = "targets"  # release targets of a device (device "") or of its whole fleet
    ROLLOUT = "rollout"  # a rollout of the fleet was stored
    OPERATORS = "operators"  # the operator workstations (every map's relay addresses)
    LOGS = "logs"  # a device's log lines (wakes log followers)


class Effect(enum.Enum):
    """An in-memory update a replica makes for a change it heard."""

    SYNC_DEVICE = "sync the device's peer-map member with its stored row"
    TARGETS_DEVICE = "new targets revision in the device's map"
    TARGETS_FLEET = "new targets revision in every map of the fleet"
    OPERATORS = "re-read the operators (relay addresses)"
    WAKE_LOGS = "wake the device's log followers"
    WAKE_ROLLOUTS = "wake the rollout driver"
    STEP_FLEET = "step the fleet's rollouts (the leader only)"
    RELOAD = "re-read everything"


@dataclass(frozen=True, slots=True)
class Change:
    replica: str  # who wrote it
    kind: str  # a Kind, or one a newer replica knows (then: RELOAD)
    fleet: str = ""
    device: str = ""  # a device name ("": none, or the whole fleet)

    def encode(self) -> str:
        """The NOTIFY payload; ValueError if it would not fit (names are far shorter)."""
        text = json.dumps([self.replica, self.kind, self.fleet, self.device],
                          separators=(",", ":"))
        if len(text.encode()) > MAX_PAYLOAD:
            raise ValueError(f"change notification too long ({len(text)} bytes)")
        return text


def decode(payload: str) -> Change | None:
    """The Change a payload names; None if it is not one (then the hearer reloads)."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not (isinstance(obj, list) and len(obj) == 4 and all(isinstance(x, str) for x in obj)):
        return None
    return Change(*obj)


_EFFECTS: Final[dict[str, frozenset[Effect]]] = {
    Kind.DEVICE: frozenset({Effect.SYNC_DEVICE}),
    Kind.REPORT: frozenset({Effect.SYNC_DEVICE, Effect.STEP_FLEET}),
    Kind.OPERATORS: frozenset({Effect.OPERATORS}),
    Kind.LOGS: frozenset({Effect.WAKE_LOGS}),
    Kind.ROLLOUT: frozenset({Effect.TARGETS_FLEET, Effect.WAKE_ROLLOUTS}),
}


def effects(change: Change | None, replica: str, leader: bool) -> frozenset[Effect]:
    """What `replica` (leading or not) does about `change` (None: a payload it could not
    read). Its own changes: nothing, it made the updates when it wrote."""
    if change is None:
        return frozenset({Effect.RELOAD})
    if change.replica == replica:
        return frozenset()
    if change.kind == Kind.TARGETS:
        return frozenset({Effect.TARGETS_DEVICE if change.device else Effect.TARGETS_FLEET})
    found = _EFFECTS.get(change.kind)
    if found is None:  # a kind this replica does not know: whatever it was, re-read all
        return frozenset({Effect.RELOAD})
    return found if leader else found - {Effect.STEP_FLEET}


class Replica(Protocol):
    """What the feed updates (FleetService)."""

    async def sync_device(self, name: str) -> None: ...

    def targets_changed(self, fleet: str, device: str | None = None) -> None: ...

    def sync_operators(self) -> None: ...

    def wake_logs(self, name: str) -> None: ...

    def wake_rollouts(self) -> None: ...

    def step_fleet(self, fleet: str) -> None: ...

    async def reload(self) -> None: ...


async def apply(replica: Replica, change: Change | None, effs: frozenset[Effect]) -> None:
    """Make the in-memory updates `effs` for `change`."""
    if Effect.RELOAD in effs or change is None:
        await replica.reload()
        return
    if Effect.SYNC_DEVICE in effs:
        await replica.sync_device(change.device)
    if Effect.TARGETS_DEVICE in effs:
        replica.targets_changed(change.fleet, change.device)
    if Effect.TARGETS_FLEET in effs:
        replica.targets_changed(change.fleet, None)
    if Effect.OPERATORS in effs:
        replica.sync_operators()
    if Effect.WAKE_LOGS in effs:
        replica.wake_logs(change.device)
    if Effect.STEP_FLEET in effs:
        replica.step_fleet(change.fleet)
    if Effect.WAKE_ROLLOUTS in effs:
        replica.wake_rollouts()


class _Event:
    """What the listener thread tells the trio side."""


@dataclass(frozen=True, slots=True)
class _Heard(_Event):
    change: Change | None


@dataclass(frozen=True, slots=True)
class _Reconnected(_Event):
    pass


@dataclass(frozen=True, slots=True)
class _Leading(_Event):
    leader: bool


class ChangeFeed:
    """One replica's LISTEN connection, its reconnects and its leader lock. `run` in the
    process's nursery; `leader` says whether this replica holds the lock now."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], replica_id: str,
                 on_leader: Callable[[bool], Awaitable[None]] | None = None) -> None:
        self._connect = connect
        self.replica_id = replica_id
        self.leader = False
        self._on_leader = on_leader
        self._stop = threading.Event()

    async def run(self, target: Replica,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled. Started once the first LISTEN is in place (a change
        committed after that is heard)."""
        send, receive = trio.open_memory_channel[_Event](math.inf)
        token = trio.lowlevel.current_trio_token()
        first = threading.Event()
        failed: list[BaseException] = []

        def post(event: _Event) -> None:
            if not self._stop.is_set():
                try:
                    trio.from_thread.run_sync(send.send_nowait, event, trio_token=token)
                except (trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
                    self._stop.set()

        def thread() -> None:
            try:
                self._listen(post, first)
            except BaseException as exc:  # noqa: BLE001 - handed to the trio side
                failed.append(exc)
                first.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial_thread(thread, self._stop))
            await trio.to_thread.run_sync(first.wait, abandon_on_cancel=True)
            if failed:
                raise failed[0]
            task_status.started()
            async for event in receive:
                await self.deliver(target, event)

    async def deliver(self, target: Replica, event: _Event) -> None:
        """Make the update `event` calls for. One that fails (the store did not answer while
        re-reading) may have lost the change: everything is reloaded, retried until the
        store answers (logged once); the replica never stops for it."""
        try:
            if isinstance(event, _Heard):
                await apply(target, event.change,
                            effects(event.change, self.replica_id, self.leader))
            elif isinstance(event, _Reconnected):
                await target.reload()
            elif isinstance(event, _Leading):
                self.leader = event.leader
                if self._on_leader is not None:
                    await self._on_leader(event.leader)
            return
        except Exception as exc:  # noqa: BLE001 - the feed must outlive a store outage
            log.warning("change feed: applying a change failed (%s); reloading everything "
                        "once the store answers", first_line(exc))
        pause = RECONNECT_MIN
        while True:
            await trio.sleep(pause)
            try:
                await target.reload()
                return
            except Exception:  # noqa: BLE001 - logged above; tried again
                pause = min(RECONNECT_MAX, pause * 2)

    def _listen(self, post: Callable[[_Event], None], first: threading.Event) -> None:
        """The thread: LISTEN, hand over each notification, try the leader lock between
        waits; on a lost connection say so once, reconnect with a growing pause, then have
        everything reloaded."""
        lost = False
        pause = RECONNECT_MIN
        leading = False
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if lost:
                        log.warning("change feed: reconnected; reloading everything from the "
                                    "store (a change may have been missed)")
                        post(_Reconnected())
                        lost, pause = False, RECONNECT_MIN
                    while not self._stop.is_set():
                        if not leading:
                            row = conn.execute("SELECT pg_try_advisory_lock(%s)",
                                               (LEADER_LOCK,)).fetchone()
                            if row is not None and row[0]:
                                leading = True
                                log.info("this replica leads (runs the rollout driver)")
                                post(_Leading(True))
                        first.set()  # listening, and the leader if nobody else was
                        for note in conn.notifies(timeout=LISTEN_POLL):
                            post(_Heard(decode(note.payload)))
            except psycopg.Error as exc:
                if not first.is_set():
                    raise
                if self._stop.is_set():  # the process is stopping: nothing was lost
                    return
                if leading:  # the lock went with the session
                    leading = False
                    post(_Leading(False))
                if not lost:
                    log.warning("change feed: lost the database connection (%s); reconnecting",
                                first_line(exc))
                    lost = True
                self._stop.wait(pause)
                pause = min(RECONNECT_MAX, pause * 2)


def partial_thread(fn: Callable[[], None], stop: threading.Event
                   ) -> Callable[[], Awaitable[None]]:
    """`fn` in a worker thread, told to stop (`stop`) when the task is cancelled."""

    async def run() -> None:
        try:
            await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        finally:
            stop.set()

    return run


def first_line(exc: BaseException) -> str:
    """An exception as one line (libpq's messages run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
