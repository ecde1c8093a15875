"""The SQL behind `Store`, written once for both databases: the migrations and every method.

`SqlStore` holds the domain logic in SQL that SQLite and PostgreSQL both accept (`?`
placeholders, `INSERT ... ON CONFLICT`, `RETURNING`); a subclass supplies the connection, the
transaction (one writer at a time, as SQLite has it) and its dialect of the migrations' column
types: `SqliteStore` (_store_sqlite.py, the embedded default) and `PostgresStore`
(_store_pg.py). The only SQL in the coordinator lives in these three modules.
"""

from __future__ import annotations

import abc
import ipaddress
import json
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol, TypeVar

from mesh.control import (
    MAX_APPS,
    AppStatus,
    ControlError,
    LinkState,
    LogLine,
    PeerMisbehaviour,
    PeerPath,
    WanBudget,
    WanBytes,
    wan_bytes_from_json,
)

from . import _ipam
from ._changes import Kind
from ._model import (
    ROLLOUT_ACTIVE,
    AppControl,
    Conflict,
    Device,
    DeviceState,
    EnrollmentToken,
    EnrollParams,
    FleetPolicy,
    FleetReleaseKey,
    FleetTarget,
    LogPage,
    MisbehaviourReport,
    NotFound,
    Operator,
    ProofRequired,
    Release,
    RolloutRecord,
    TokenExpired,
    TokenUnknown,
    TokenUsedUp,
    merge_wan_bytes,
)

# Each entry runs once, in order, inside one transaction; never edit a released one, append.
# Written in SQLite's words; PostgresStore maps the column types (INTEGER, REAL, BLOB, TEXT) and
# drops WITHOUT ROWID (_store_pg.py, pg_dialect), nothing else differs.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE fleets (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
    CREATE TABLE tokens (
        secret_hash TEXT PRIMARY KEY,
        fleet TEXT NOT NULL REFERENCES fleets(name),
        uses_left INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        name TEXT,
        created_at REAL NOT NULL);
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        fleet TEXT NOT NULL REFERENCES fleets(name),
        state TEXT NOT NULL CHECK (state IN ('provisioned', 'active', 'revoked')),
        public_key TEXT,
        mesh_index INTEGER UNIQUE,
        mesh_ipv4 TEXT UNIQUE,
        mesh_ipv6 TEXT UNIQUE,
        credential_hash TEXT UNIQUE,
        agent_version TEXT NOT NULL DEFAULT '',
        lan_endpoints TEXT NOT NULL DEFAULT '[]',
        peer_paths TEXT NOT NULL DEFAULT '[]',
        last_report REAL,
        created_at REAL NOT NULL,
        enrolled_at REAL,
        revoked_at REAL);
    CREATE UNIQUE INDEX devices_live_name ON devices(name) WHERE state != 'revoked';
    CREATE UNIQUE INDEX devices_live_key ON devices(public_key) WHERE state = 'active';
    CREATE INDEX devices_fleet ON devices(fleet);
    CREATE TABLE operators (
        name TEXT PRIMARY KEY,
        public_key TEXT NOT NULL UNIQUE,
        mesh_index INTEGER NOT NULL UNIQUE,
        mesh_ipv4 TEXT NOT NULL UNIQUE,
        mesh_ipv6 TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL);
    """,
    # 2: the endpoint the hub last saw, so a restarted coordinator hands out the same peer
    # maps at once instead of maps without endpoints (which would send every pair to the relay
    # until the next keepalives reach the hub).
    "ALTER TABLE devices ADD COLUMN public_endpoint TEXT;",
    # 3: the release registry. `signed` is the SignedManifest exactly as published;
    # release_blobs says which releases name which blob (garbage collection on delete);
    # app_versions keeps the highest version ever published, so a deleted release's number is
    # never reused for other content (devices refuse versions they have seen).
    """
    CREATE TABLE releases (
        id INTEGER PRIMARY KEY,
        fleet TEXT NOT NULL REFERENCES fleets(name),
        app TEXT NOT NULL,
        version INTEGER NOT NULL,
        signed BLOB NOT NULL,
        key_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        published_at REAL NOT NULL,
        layers INTEGER NOT NULL,
        size INTEGER NOT NULL,
        stored_size INTEGER NOT NULL,
        delta_size INTEGER NOT NULL,
        UNIQUE (fleet, app, version));
    CREATE TABLE release_blobs (
        release_id INTEGER NOT NULL REFERENCES releases(id) ON DELETE CASCADE,
        blob_id TEXT NOT NULL,
        PRIMARY KEY (release_id, blob_id));
    CREATE INDEX release_blobs_blob ON release_blobs(blob_id);
    CREATE TABLE app_versions (
        fleet TEXT NOT NULL REFERENCES fleets(name),
        app TEXT NOT NULL,
        max_version INTEGER NOT NULL,
        PRIMARY KEY (fleet, app));
    CREATE TABLE release_keys (
        fleet TEXT PRIMARY KEY REFERENCES fleets(name),
        public_key TEXT NOT NULL,
        key_id TEXT NOT NULL,
        set_at REAL NOT NULL);
    CREATE TABLE targets (
        fleet TEXT NOT NULL REFERENCES fleets(name),
        app TEXT NOT NULL,
        device TEXT NOT NULL DEFAULT '',
        version INTEGER NOT NULL,
        pin BLOB,
        set_at REAL NOT NULL,
        PRIMARY KEY (fleet, app, device));
    """,
    # 4: device app status and logs (issue 6). device_apps holds, per device and app, the
    # AppStatus its agent last reported (JSON, validated by mesh.control on arrival) and the
    # operator's controls: the version forced past the update lock, and the retry counter.
    # device_logs keeps the newest lines per device; devices.log_seq numbers them (it only
    # grows, so a follower's `after` stays valid while old lines are pruned). Keyed by device
    # id: a name that comes back on a new device starts with no history.
    """
    CREATE TABLE device_apps (
        device_id TEXT NOT NULL REFERENCES devices(id),
        app TEXT NOT NULL,
        status TEXT,
        force_version INTEGER,
        retry INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (device_id, app));
    CREATE TABLE device_logs (
        device_id TEXT NOT NULL REFERENCES devices(id),
        seq INTEGER NOT NULL,
        ts REAL NOT NULL,
        app TEXT NOT NULL,
        stream TEXT NOT NULL,
        line TEXT NOT NULL,
        PRIMARY KEY (device_id, seq)) WITHOUT ROWID;
    ALTER TABLE devices ADD COLUMN log_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN logs_dropped INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: the hash of a revoked device's last credential, so that a refusal can say "revoked"
    # explicitly: an agent stops only on that, not on any 401 (docs/security.md).
    """
    ALTER TABLE devices ADD COLUMN revoked_credential_hash TEXT;
    CREATE INDEX devices_revoked_credential ON devices(revoked_credential_hash);
    """,
    # 6: the peers each device last reported misbehaving (mesh.control.PeerMisbehaviour): its
    # latest totals per offender name (a live device of its fleet), replaced by each report;
    # counts are JSON (reason -> count, validated on arrival). A claim of the reporter's
    # (docs/security.md).
    """
    CREATE TABLE peer_reports (
        reporter_id TEXT NOT NULL REFERENCES devices(id),
        offender TEXT NOT NULL,
        counts TEXT NOT NULL,
        PRIMARY KEY (reporter_id, offender)) WITHOUT ROWID;
    CREATE INDEX peer_reports_offender ON peer_reports(offender);
    """,
    # 7: root metadata (issue 13, item 14): each fleet's signed roots, one row per version, as
    # the JSON document the operator published (mesh.release's codec). Versions only grow, one
    # at a time; the newest names the fleet's release key (release_keys follows it).
    """
    CREATE TABLE fleet_roots (
        fleet TEXT NOT NULL REFERENCES fleets(name),
        version INTEGER NOT NULL,
        document BLOB NOT NULL,
        added_at REAL NOT NULL,
        PRIMARY KEY (fleet, version)) WITHOUT ROWID;
    """,
    # 8: how each device holds its NAT binding to the hub (mesh.control.LinkState as JSON,
    # from its reports): its hub keepalive decides how long "online" may go without a packet.
    "ALTER TABLE devices ADD COLUMN link TEXT;",
    # 9: each device's own WAN byte account (mesh.control wan_bytes JSON), its reports' days
    # merged: the newest week (coordinator/_model.py merge_wan_bytes).
    "ALTER TABLE devices ADD COLUMN wan_bytes TEXT;",
    # 10: each device's WAN budget and what it used, as its last report said
    # (mesh.control.WanBudget JSON; NULL: its agent runs without one)
    "ALTER TABLE devices ADD COLUMN wan_budget TEXT;",
    # 11: rollouts (issue 16). Each device's tags (a JSON object, mesh.rollout.check_tags) and
    # the time zone its last report named (maintenance windows are in local time); a token's
    # tags go to the device it enrolls. One rollout per release: `state` is its
    # mesh.rollout.ROLLOUT_STATES name ('held': published for nobody yet), `spec` the
    # RolloutSpec JSON, `data` the coordinator._rollout.Rollout JSON (both NULL while held),
    # `rollback_pin` the SignedPin of `previous` that takes devices back on a halt.
    """
    ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE devices ADD COLUMN timezone TEXT;
    ALTER TABLE tokens ADD COLUMN tags TEXT;
    CREATE TABLE rollouts (
        fleet TEXT NOT NULL REFERENCES fleets(name),
        app TEXT NOT NULL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,
        previous INTEGER,
        spec TEXT,
        data TEXT,
        rollback_pin BLOB,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (fleet, app, version));
    CREATE INDEX rollouts_state ON rollouts(state);
    """,
    # 12: each device's platform, os/arch[/variant], as its enrollment or last report said
    # (docs/releases.md, "Several platforms"); NULL: an old agent that does not say
    "ALTER TABLE devices ADD COLUMN platform TEXT;",
    # 13: each fleet's reachability policy (issue 18 item 6, docs/policy.md): the operator's
    # file as sent (comments kept; mesh.policy parsed it before it was stored), `version`
    # counting its changes from 1.
    """
    CREATE TABLE fleet_policies (
        fleet TEXT PRIMARY KEY REFERENCES fleets(name),
        policy TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated_at REAL NOT NULL);
    """,
)

T = TypeVar("T")

_DEVICE_COLS: Final = ("id, name, fleet, state, created_at, public_key, mesh_ipv4, mesh_ipv6, "
                       "agent_version, lan_endpoints, last_report, enrolled_at, revoked_at, "
                       "public_endpoint, link, wan_bytes, wan_budget, tags, timezone, platform")


def _json_column(text: str | None, parse: Callable[[Any], T]) -> T | None:
    """A JSON column written from a validated report, parsed again: a damaged row reads as
    None (no link, no account, no budget), never as an error."""
    if text is None:
        return None
    try:
        return parse(json.loads(text))
    except (ValueError, ControlError):
        return None


def _device(row: Sequence[Any]) -> Device:
    return Device(id=row[0], name=row[1], fleet=row[2], state=DeviceState(row[3]),
                  created_at=row[4], public_key=row[5], mesh_ipv4=row[6], mesh_ipv6=row[7],
                  agent_version=row[8], lan_endpoints=tuple(json.loads(row[9])),
                  last_report=row[10], enrolled_at=row[11], revoked_at=row[12],
                  public_endpoint=row[13], link=_json_column(row[14], LinkState.from_json),
                  wan_bytes=_json_column(row[15], wan_bytes_from_json),
                  wan_budget=_json_column(row[16], WanBudget.from_json),
                  tags=_json_column(row[17], _tags) or {}, timezone=row[18], platform=row[19])


def _tags(obj: Any) -> dict[str, str]:
    """Tags as stored (validated before they were written)."""
    if not isinstance(obj, dict):
        raise ValueError("tags: not an object")
    return {str(k): str(v) for k, v in obj.items()}


def _tags_text(tags: dict[str, str] | None) -> str | None:
    return None if tags is None else json.dumps(dict(sorted(tags.items())))


_RELEASE_COLS: Final = ("fleet, app, version, signed, key_id, created_at, published_at, layers, "
                        "size, stored_size, delta_size")


def _release(row: Sequence[Any]) -> Release:
    return Release(fleet=row[0], app=row[1], version=row[2], signed=bytes(row[3]),
                   key_id=row[4], created_at=row[5], published_at=row[6], layers=row[7],
                   size=row[8], stored_size=row[9], delta_size=row[10])


def _target(row: Sequence[Any]) -> FleetTarget:
    return FleetTarget(fleet=row[0], app=row[1], version=row[2], device=row[3] or None,
                  pin=None if row[4] is None else bytes(row[4]), set_at=row[5])


_TOKEN_COLS: Final = "secret_hash, fleet, uses_left, expires_at, name, created_at, tags"


def _token(row: Sequence[Any]) -> EnrollmentToken:
    return EnrollmentToken(secret_hash=row[0], fleet=row[1], uses_left=row[2],
                           expires_at=row[3], name=row[4], created_at=row[5],
                           tags=_json_column(row[6], _tags))


def _token_row(t: EnrollmentToken) -> tuple[Any, ...]:
    return (t.secret_hash, t.fleet, t.uses_left, t.expires_at, t.name, t.created_at,
            _tags_text(t.tags))


_ROLLOUT_COLS: Final = ("fleet, app, version, state, previous, created_at, updated_at, spec, "
                        "data, rollback_pin")


def _rollout(row: Sequence[Any]) -> RolloutRecord:
    return RolloutRecord(fleet=row[0], app=row[1], version=row[2], state=row[3],
                         previous=row[4], created_at=row[5], updated_at=row[6],
                         spec=None if row[7] is None else json.loads(row[7]),
                         data=None if row[8] is None else json.loads(row[8]),
                         rollback_pin=None if row[9] is None else bytes(row[9]))


class Cursor(Protocol):
    """What a statement gives back, as sqlite3 and psycopg both have it."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One open transaction: statements with `?` placeholders."""

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> object: ...


def split_statements(script: str) -> list[str]:
    """A migration's statements (none of them holds a `;` of its own)."""
    return [s for s in script.split(";") if s.strip()]


class SqlStore(abc.ABC):
    """`Store` on a SQL database. `prefixes` are fixed at the first open (kept in `meta`)."""

    def _open(self, where: str, mesh_ipv4: str, mesh_ipv6: str) -> None:
        """Migrate, then fix or check the mesh prefixes; `where` names the database in errors.
        The subclass has connected; it closes again on ValueError."""
        self.schema_version = self._migrate()
        v4, v6 = self.get_meta("mesh_ipv4"), self.get_meta("mesh_ipv6")
        if v4 is None or v6 is None:
            _ipam.parse_prefixes(mesh_ipv4, mesh_ipv6)
            self.set_meta("mesh_ipv4", mesh_ipv4)
            self.set_meta("mesh_ipv6", mesh_ipv6)
            v4, v6 = mesh_ipv4, mesh_ipv6
        elif (ipaddress.ip_network(mesh_ipv4), ipaddress.ip_network(mesh_ipv6)) != (
                ipaddress.ip_network(v4), ipaddress.ip_network(v6)):
            raise ValueError(f"{where} was created for mesh {v4} and {v6}, not {mesh_ipv4} and "
                             f"{mesh_ipv6}; addresses cannot move")
        self.prefix_v4, self.prefix_v6 = _ipam.parse_prefixes(v4, v6)

    # -- what a database supplies ----------------------------------------------------------

    @abc.abstractmethod
    def _tx(self, durable: bool = False) -> AbstractContextManager[Tx]:
        """One write transaction, serialized with every other one on the database (SQLite's
        single writer; PostgreSQL: one lock), so that a check and the write it allows see the
        same rows. `durable`: it must survive a power loss once committed: for what hands
        out, spends or takes back a secret (enrollment, tokens, revocation, keys), where the
        other side acts on our answer at once. Everything else may lose its last commits to a
        power loss (a report or a log line is restated by the next one). A unique constraint
        the statements break raises Conflict."""

    @abc.abstractmethod
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read, outside any transaction."""

    @abc.abstractmethod
    def _dialect(self, statement: str) -> str:
        """A migration statement in this database's words."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _notify(self, c: Tx, kind: Kind, fleet: str = "", device: str = "") -> None:
        """Tell the other replicas on this database, in transaction `c`, that this write
        changed what they keep in memory (coordinator/_changes.py). PostgresStore sends it;
        SqliteStore has nobody to tell (one process)."""

    @abc.abstractmethod
    def _notify_device(self, c: Tx, kind: Kind, device_id: str) -> None:
        """`_notify` for the device with that id (its name and fleet read in `c`)."""

    # -- plumbing --------------------------------------------------------------------------

    def _migrate(self) -> int:
        with self._tx(durable=True) as c:
            c.execute(self._dialect("CREATE TABLE IF NOT EXISTS schema_migrations "
                                    "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"))
            done = {r[0] for r in c.execute("SELECT version FROM schema_migrations").fetchall()}
            if done and max(done) > len(MIGRATIONS):
                raise ValueError(f"database schema {max(done)} is newer than this coordinator "
                                 f"({len(MIGRATIONS)})")
            for version, script in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                for statement in split_statements(script):
                    c.execute(self._dialect(statement))
                c.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
        return len(MIGRATIONS)

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx(durable=True) as c:
            c.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                      "value = excluded.value", (key, value))

    def _next_index(self, c: Tx) -> tuple[int, str, str]:
        # One counter that only grows: revoked devices keep theirs, so nobody inherits them.
        row = c.execute("SELECT value FROM meta WHERE key = 'next_mesh_index'").fetchone()
        index = int(row[0]) if row else _ipam.FIRST_INDEX
        v4, v6 = _ipam.addresses(self.prefix_v4, self.prefix_v6, index)
        c.execute("INSERT INTO meta VALUES ('next_mesh_index', ?) ON CONFLICT(key) DO UPDATE "
                  "SET value = excluded.value", (str(index + 1),))
        return index, v4, v6

    @staticmethod
    def _ensure_fleet(c: Tx, fleet: str, now: float) -> None:
        c.execute("INSERT INTO fleets VALUES (?, ?) ON CONFLICT DO NOTHING", (fleet, now))

    @staticmethod
    def _key_owner(c: Tx, public_key: str) -> str | None:
        row = c.execute("SELECT name FROM devices WHERE public_key = ? AND state = 'active'",
                        (public_key,)).fetchone()
        if row:
            return f"device {row[0]}"
        row = c.execute("SELECT name FROM operators WHERE public_key = ?",
                        (public_key,)).fetchone()
        if row:
            return f"operator {row[0]}"
        hub = c.execute("SELECT value FROM meta WHERE key = 'hub_public_key'").fetchone()
        return "the hub" if hub and hub[0] == public_key else None

    # -- tokens ----------------------------------------------------------------------------

    def create_token(self, token: EnrollmentToken) -> None:
        with self._tx(durable=True) as c:
            self._ensure_fleet(c, token.fleet, token.created_at)
            c.execute(f"INSERT INTO tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      _token_row(token))

    def get_token(self, secret_hash: str) -> EnrollmentToken | None:
        rows = self._query(f"SELECT {_TOKEN_COLS} FROM tokens WHERE secret_hash = ?",
                           (secret_hash,))
        return _token(rows[0]) if rows else None

    # -- devices ---------------------------------------------------------------------------

    def enroll(self, p: EnrollParams) -> Device:
        with self._tx(durable=True) as c:
            row = c.execute(f"SELECT {_TOKEN_COLS} FROM tokens WHERE secret_hash = ?",
                            (p.secret_hash,)).fetchone()
            if row is None:
                raise TokenUnknown()
            token = _token(row)
            if token.uses_left <= 0:
                raise TokenUsedUp()
            if p.now >= token.expires_at:
                raise TokenExpired()
            if token.name is not None and p.name is not None and p.name != token.name:
                raise Conflict(f"this token enrolls only device {token.name!r}, not {p.name!r}")
            name = token.name or p.name or p.generated_name
            live = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE name = ? AND "
                             "state != 'revoked'", (name,)).fetchone()
            existing = _device(live) if live else None
            if existing is not None and existing.fleet != token.fleet:
                raise Conflict(f"device name {name!r} is taken in another fleet")
            if existing is not None and existing.state is DeviceState.ACTIVE and \
                    existing.public_key != p.public_key:
                raise Conflict(f"device name {name!r} is taken; pick another name or revoke it")
            # Whoever holds a fleet token must not take over a device: an active name only
            # with a proof of being it, a provisioned name only with its own token.
            if existing is not None and existing.state is DeviceState.ACTIVE and \
                    p.proven_device_id != existing.id:
                raise ProofRequired(name, existing.public_key or p.public_key)
            if existing is not None and existing.state is DeviceState.PROVISIONED and \
                    token.name != name:
                raise Conflict(f"device {name!r} is provisioned: it joins only with its own "
                               "provisioning token")
            owner = self._key_owner(c, p.public_key)
            if owner is not None and not (existing and owner == f"device {existing.name}"):
                raise Conflict(f"public key already belongs to {owner}; make a new key pair")
            c.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE secret_hash = ?",
                      (p.secret_hash,))
            lan = json.dumps(list(p.lan_endpoints))
            if existing is not None and existing.mesh_ipv4 is not None:
                # The same device enrolling again (its answer was lost): new credential only.
                c.execute("UPDATE devices SET state = 'active', public_key = ?, "
                          "credential_hash = ?, lan_endpoints = ?, agent_version = ?, "
                          "enrolled_at = ? WHERE id = ?",
                          (p.public_key, p.credential_hash, lan, p.agent_version, p.now,
                           existing.id))
                device_id = existing.id
            else:
                index, v4, v6 = self._next_index(c)
                if existing is not None:  # provisioned: keep its id and creation time
                    device_id = existing.id
                    c.execute("UPDATE devices SET state = 'active', public_key = ?, "
                              "mesh_index = ?, mesh_ipv4 = ?, mesh_ipv6 = ?, "
                              "credential_hash = ?, lan_endpoints = ?, agent_version = ?, "
                              "enrolled_at = ? WHERE id = ?",
                              (p.public_key, index, v4, v6, p.credential_hash, lan,
                               p.agent_version, p.now, device_id))
                    if token.tags is not None:
                        c.execute("UPDATE devices SET tags = ? WHERE id = ?",
                                  (_tags_text(token.tags), device_id))
                else:
                    device_id = p.device_id
                    c.execute("INSERT INTO devices (id, name, fleet, state, public_key, "
                              "mesh_index, mesh_ipv4, mesh_ipv6, credential_hash, "
                              "agent_version, lan_endpoints, created_at, enrolled_at, tags) "
                              "VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (device_id, name, token.fleet, p.public_key, index, v4, v6,
                               p.credential_hash, p.agent_version, lan, p.now, p.now,
                               _tags_text(token.tags or {})))
            if p.platform:
                c.execute("UPDATE devices SET platform = ? WHERE id = ?",
                          (p.platform, device_id))
            out = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE id = ?",
                            (device_id,)).fetchone()
            self._notify(c, Kind.DEVICE, token.fleet, name)
            return _device(out)

    def provision(self, device_id: str, name: str, fleet: str, token: EnrollmentToken,
                  now: float) -> Device:
        with self._tx(durable=True) as c:
            if c.execute("SELECT 1 FROM devices WHERE name = ? AND state != 'revoked'",
                         (name,)).fetchone():
                raise Conflict(f"device {name!r} exists; revoke it first to reuse the name")
            self._ensure_fleet(c, fleet, now)
            c.execute("INSERT INTO devices (id, name, fleet, state, created_at, tags) "
                      "VALUES (?, ?, ?, 'provisioned', ?, ?)",
                      (device_id, name, fleet, now, _tags_text(token.tags or {})))
            c.execute(f"INSERT INTO tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      _token_row(token))
            row = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE id = ?",
                            (device_id,)).fetchone()
            return _device(row)

    def device_by_name(self, name: str) -> Device | None:
        rows = self._query(f"SELECT {_DEVICE_COLS} FROM devices WHERE name = ? "
                           "ORDER BY state = 'revoked', revoked_at DESC LIMIT 1", (name,))
        return _device(rows[0]) if rows else None

    def device_by_credential(self, credential_hash: str) -> Device | None:
        rows = self._query(f"SELECT {_DEVICE_COLS} FROM devices WHERE credential_hash = ? "
                           "AND state = 'active'", (credential_hash,))
        return _device(rows[0]) if rows else None

    def credential_revoked(self, credential_hash: str) -> bool:
        return bool(self._query("SELECT 1 FROM devices WHERE revoked_credential_hash = ? AND "
                                "state = 'revoked'", (credential_hash,)))

    def list_devices(self, fleet: str | None = None) -> list[Device]:
        if fleet is None:
            rows = self._query(f"SELECT {_DEVICE_COLS} FROM devices ORDER BY name, created_at")
        else:
            rows = self._query(f"SELECT {_DEVICE_COLS} FROM devices WHERE fleet = ? "
                               "ORDER BY name, created_at", (fleet,))
        return [_device(r) for r in rows]

    def fleet_size(self, fleet: str) -> int:
        rows = self._query("SELECT COUNT(*) FROM devices WHERE fleet = ? AND state != 'revoked'",
                           (fleet,))
        return int(rows[0][0])

    def revoke(self, name: str, now: float) -> Device:
        with self._tx(durable=True) as c:
            row = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE name = ? "
                            "ORDER BY state = 'revoked', revoked_at DESC LIMIT 1",
                            (name,)).fetchone()
            if row is None:
                raise NotFound(f"no device {name!r}")
            device = _device(row)
            if device.state is not DeviceState.REVOKED:
                # The credential hash goes: nothing can ever authenticate as it again. It is
                # kept aside only to answer that credential with an explicit "revoked".
                c.execute("UPDATE devices SET state = 'revoked', revoked_at = ?, "
                          "revoked_credential_hash = credential_hash, credential_hash = NULL "
                          "WHERE id = ?", (now, device.id))
                # Tokens bound to the name would resurrect it: spend them.
                c.execute("UPDATE tokens SET uses_left = 0 WHERE name = ?", (name,))
                self._notify(c, Kind.DEVICE, device.fleet, name)
                row = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE id = ?",
                                (device.id,)).fetchone()
            return _device(row)

    def record_report(self, device_id: str, lan_endpoints: Sequence[str], agent_version: str,
                      peers: Sequence[PeerPath], now: float, apps: Sequence[AppStatus] = (),
                      misbehaving: Sequence[PeerMisbehaviour] = (),
                      link: LinkState | None = None, wan_bytes: WanBytes | None = None,
                      wan_budget: WanBudget | None = None, timezone: str | None = None,
                      platform: str | None = None) -> list[str]:
        cleared = []
        with self._tx() as c:
            # Only names of the reporter's fleet's live devices are kept: a report can name
            # anything, but the rows stay bounded by the fleet (docs/security.md).
            c.execute("DELETE FROM peer_reports WHERE reporter_id = ?", (device_id,))
            c.executemany("INSERT INTO peer_reports SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM "
                          "devices o JOIN devices r ON r.id = ? WHERE o.name = ? AND "
                          "o.fleet = r.fleet AND o.state != 'revoked' AND o.id != r.id)",
                          [(device_id, m.name, json.dumps(dict(m.counts)), device_id, m.name)
                           for m in misbehaving if any(m.counts.values())])
            c.execute("UPDATE devices SET lan_endpoints = ?, agent_version = ?, peer_paths = ?, "
                      "last_report = ?, timezone = ? WHERE id = ?",
                      (json.dumps(list(lan_endpoints)), agent_version,
                       json.dumps([p.to_json() for p in peers]), now, timezone, device_id))
            if link is not None:
                c.execute("UPDATE devices SET link = ? WHERE id = ?",
                          (json.dumps(link.to_json()), device_id))
            if platform is not None:
                c.execute("UPDATE devices SET platform = ? WHERE id = ?", (platform, device_id))
            if wan_bytes is not None:
                row = c.execute("SELECT wan_bytes FROM devices WHERE id = ?",
                                (device_id,)).fetchone()
                merged = merge_wan_bytes(_json_column(row[0] if row else None,
                                                      wan_bytes_from_json), wan_bytes)
                c.execute("UPDATE devices SET wan_bytes = ? WHERE id = ?",
                          (json.dumps(merged), device_id))
            c.execute("UPDATE devices SET wan_budget = ? WHERE id = ?",
                      (None if wan_budget is None else json.dumps(wan_budget.to_json()),
                       device_id))
            for a in apps:
                c.execute("INSERT INTO device_apps (device_id, app, status) VALUES (?, ?, ?) "
                          "ON CONFLICT(device_id, app) DO UPDATE SET status = excluded.status",
                          (device_id, a.app, json.dumps(a.to_json())))
                if a.running is not None and c.execute(
                        "UPDATE device_apps SET force_version = NULL WHERE device_id = ? AND "
                        "app = ? AND force_version <= ?",
                        (device_id, a.app, a.running)).rowcount:
                    cleared.append(a.app)
            self._bound_app_rows(c, device_id, [a.app for a in apps])
            self._notify_device(c, Kind.REPORT, device_id)
            if cleared:
                self._notify_device(c, Kind.TARGETS, device_id)
        return cleared

    @staticmethod
    def _bound_app_rows(c: Tx, device_id: str, reported: Sequence[str]) -> None:
        """At most MAX_APPS app statuses per device (docs/security.md, "Bounded app rows"):
        a report is at most MAX_APPS apps, but apps it leaves out keep their status, so a
        device naming new apps in every report would grow the table without bound. Past the
        bound, the statuses of the apps this report leaves out go (rows the operator's force
        or retry still needs keep those, without a status)."""
        count = c.execute("SELECT COUNT(*) FROM device_apps WHERE device_id = ? AND status IS "
                          "NOT NULL", (device_id,)).fetchone()[0]
        if count <= MAX_APPS:
            return
        # PostgreSQL has no empty `IN ()`; past the bound a report names at least one app
        marks = ", ".join("?" * len(reported))
        kept = f" AND app NOT IN ({marks})" if reported else ""
        c.execute(f"UPDATE device_apps SET status = NULL WHERE device_id = ?{kept}",
                  (device_id, *reported))
        c.execute("DELETE FROM device_apps WHERE device_id = ? AND status IS NULL AND "
                  "force_version IS NULL AND retry = 0", (device_id,))

    # -- apps and logs -----------------------------------------------------------------------

    def app_statuses(self, fleet: str | None = None) -> dict[str, list[AppStatus]]:
        sql = ("SELECT a.device_id, a.status FROM device_apps a JOIN devices d ON "
               "d.id = a.device_id WHERE a.status IS NOT NULL")
        rows = self._query(sql + " ORDER BY a.device_id, a.app") if fleet is None else \
            self._query(sql + " AND d.fleet = ? ORDER BY a.device_id, a.app", (fleet,))
        out: dict[str, list[AppStatus]] = {}
        for device_id, status in rows:
            try:
                out.setdefault(device_id, []).append(AppStatus.from_json(json.loads(status)))
            except ControlError:  # written by us after validation; skip rather than fail
                continue
        return out

    def app_controls(self, device_id: str) -> dict[str, AppControl]:
        rows = self._query("SELECT app, force_version, retry FROM device_apps WHERE "
                           "device_id = ?", (device_id,))
        return {app: AppControl(force, retry) for app, force, retry in rows}

    def set_force(self, device_id: str, app: str, version: int | None) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO device_apps (device_id, app, force_version) VALUES (?, ?, ?) "
                      "ON CONFLICT(device_id, app) DO UPDATE SET "
                      "force_version = excluded.force_version", (device_id, app, version))
            self._notify_device(c, Kind.TARGETS, device_id)

    def add_retry(self, device_ids: Sequence[str], app: str) -> dict[str, int]:
        out = {}
        with self._tx() as c:
            for device_id in device_ids:
                row = c.execute("INSERT INTO device_apps (device_id, app, retry) VALUES "
                                "(?, ?, 1) ON CONFLICT(device_id, app) DO UPDATE SET "
                                "retry = device_apps.retry + 1 RETURNING retry",
                                (device_id, app)).fetchone()
                out[device_id] = int(row[0])
                self._notify_device(c, Kind.TARGETS, device_id)
        return out

    def append_logs(self, device_id: str, lines: Sequence[LogLine], dropped: int, keep: int
                    ) -> int:
        with self._tx() as c:
            row = c.execute("UPDATE devices SET log_seq = log_seq + ?, logs_dropped = "
                            "logs_dropped + ? WHERE id = ? RETURNING log_seq",
                            (len(lines), dropped, device_id)).fetchone()
            if row is None:
                raise NotFound(f"no device {device_id}")
            last = int(row[0])
            first = last - len(lines) + 1
            c.executemany("INSERT INTO device_logs VALUES (?, ?, ?, ?, ?, ?)",
                          [(device_id, first + i, x.ts, x.app, x.stream, x.line)
                           for i, x in enumerate(lines)])
            c.execute("DELETE FROM device_logs WHERE device_id = ? AND seq <= ?",
                      (device_id, last - keep))
            self._notify_device(c, Kind.LOGS, device_id)
            return last

    def _log_page(self, device_id: str, rows: Sequence[Any]) -> LogPage:
        meta = self._query("SELECT log_seq, logs_dropped FROM devices WHERE id = ?",
                           (device_id,))
        last, dropped = meta[0] if meta else (0, 0)
        return LogPage(tuple((r[0], LogLine(r[1], r[2], r[3], r[4])) for r in rows),
                       int(last), int(dropped))

    def read_logs(self, device_id: str, after: int, limit: int) -> LogPage:
        rows = self._query("SELECT seq, ts, app, stream, line FROM device_logs WHERE "
                           "device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                           (device_id, after, limit))
        return self._log_page(device_id, rows)

    def tail_logs(self, device_id: str, count: int) -> LogPage:
        rows = self._query("SELECT seq, ts, app, stream, line FROM device_logs WHERE "
                           "device_id = ? ORDER BY seq DESC LIMIT ?", (device_id, count))
        return self._log_page(device_id, rows[::-1])

    def misbehaviour_reports(self, fleet: str | None = None) -> list[MisbehaviourReport]:
        sql = ("SELECT d.name, r.offender, r.counts FROM peer_reports r JOIN devices d ON "
               "d.id = r.reporter_id WHERE d.state != 'revoked'")
        rows = self._query(sql + " ORDER BY r.offender, d.name") if fleet is None else \
            self._query(sql + " AND d.fleet = ? ORDER BY r.offender, d.name", (fleet,))
        return [MisbehaviourReport(reporter, offender, json.loads(counts))
                for reporter, offender, counts in rows]

    def record_public_endpoint(self, device_id: str, endpoint: str | None) -> None:
        with self._tx() as c:
            c.execute("UPDATE devices SET public_endpoint = ? WHERE id = ?", (endpoint, device_id))
            self._notify_device(c, Kind.DEVICE, device_id)

    def peer_paths(self, device_id: str) -> tuple[PeerPath, ...]:
        rows = self._query("SELECT peer_paths FROM devices WHERE id = ?", (device_id,))
        if not rows:
            return ()
        out = []
        for item in json.loads(rows[0][0]):
            try:
                out.append(PeerPath.from_json(item))
            except ControlError:  # written by us after validation; skip rather than fail
                continue
        return tuple(out)

    # -- operators -------------------------------------------------------------------------

    def add_operator(self, name: str, public_key: str, now: float) -> Operator:
        with self._tx(durable=True) as c:
            row = c.execute("SELECT name, public_key, mesh_ipv4, mesh_ipv6, created_at FROM "
                            "operators WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if row[1] != public_key:
                    raise Conflict(f"operator {name!r} exists with another public key")
                return Operator(*row)
            owner = self._key_owner(c, public_key)
            if owner is not None:
                raise Conflict(f"public key already belongs to {owner}")
            index, v4, v6 = self._next_index(c)
            c.execute("INSERT INTO operators VALUES (?, ?, ?, ?, ?, ?)",
                      (name, public_key, index, v4, v6, now))
            self._notify(c, Kind.OPERATORS)
            return Operator(name, public_key, v4, v6, now)

    def list_operators(self) -> list[Operator]:
        rows = self._query("SELECT name, public_key, mesh_ipv4, mesh_ipv6, created_at FROM "
                           "operators ORDER BY name")
        return [Operator(*r) for r in rows]

    # -- releases --------------------------------------------------------------------------

    def add_release(self, release: Release) -> tuple[Release, bool]:
        r = release
        with self._tx() as c:
            row = c.execute(f"SELECT {_RELEASE_COLS} FROM releases WHERE fleet = ? AND app = ? "
                            "AND version = ?", (r.fleet, r.app, r.version)).fetchone()
            if row is not None:
                existing = _release(row)
                if existing.signed == r.signed:
                    return existing, False
                raise Conflict(f"{r.app} version {r.version} is already published in fleet "
                               f"{r.fleet} with other content")
            high = c.execute("SELECT max_version FROM app_versions WHERE fleet = ? AND app = ?",
                             (r.fleet, r.app)).fetchone()
            if high is not None and r.version <= high[0]:
                raise Conflict(f"{r.app} version {r.version} is not newer than the latest "
                               f"published in fleet {r.fleet} ({high[0]})")
            self._ensure_fleet(c, r.fleet, r.published_at)
            release_id = c.execute(f"INSERT INTO releases ({_RELEASE_COLS}) VALUES "
                                   "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                                   (r.fleet, r.app, r.version, r.signed, r.key_id,
                                    r.created_at, r.published_at, r.layers, r.size,
                                    r.stored_size, r.delta_size)).fetchone()[0]
            c.executemany("INSERT INTO release_blobs VALUES (?, ?) ON CONFLICT DO NOTHING",
                          [(release_id, b) for b in r.blob_ids])
            c.execute("INSERT INTO app_versions VALUES (?, ?, ?) ON CONFLICT(fleet, app) DO "
                      "UPDATE SET max_version = excluded.max_version",
                      (r.fleet, r.app, r.version))
            self._notify(c, Kind.TARGETS, r.fleet)
            return r, True

    def get_release(self, fleet: str, app: str, version: int) -> Release | None:
        rows = self._query(f"SELECT {_RELEASE_COLS} FROM releases WHERE fleet = ? AND app = ? "
                           "AND version = ?", (fleet, app, version))
        return _release(rows[0]) if rows else None

    def list_releases(self, fleet: str, app: str | None = None) -> list[Release]:
        if app is None:
            rows = self._query(f"SELECT {_RELEASE_COLS} FROM releases WHERE fleet = ? "
                               "ORDER BY id DESC", (fleet,))
        else:
            rows = self._query(f"SELECT {_RELEASE_COLS} FROM releases WHERE fleet = ? AND "
                               "app = ? ORDER BY id DESC", (fleet, app))
        return [_release(r) for r in rows]

    def latest_version(self, fleet: str, app: str) -> int | None:
        rows = self._query("SELECT max(version) FROM releases WHERE fleet = ? AND app = ?",
                           (fleet, app))
        return rows[0][0] if rows and rows[0][0] is not None else None

    def delete_release(self, fleet: str, app: str, version: int) -> list[str]:
        with self._tx() as c:
            row = c.execute("SELECT id FROM releases WHERE fleet = ? AND app = ? AND "
                            "version = ?", (fleet, app, version)).fetchone()
            if row is None:
                raise NotFound(f"no release {app} version {version} in fleet {fleet}")
            target = c.execute("SELECT device FROM targets WHERE fleet = ? AND app = ? AND "
                               "version = ? LIMIT 1", (fleet, app, version)).fetchone()
            if target is not None:
                who = f"device {target[0]}" if target[0] else f"fleet {fleet}"
                raise Conflict(f"{app} version {version} is the target of {who}; set another "
                               "target first")
            release_id = row[0]
            orphans = [r[0] for r in c.execute(
                "SELECT blob_id FROM release_blobs WHERE release_id = ? AND blob_id NOT IN "
                "(SELECT blob_id FROM release_blobs WHERE release_id != ?)",
                (release_id, release_id)).fetchall()]
            c.execute("DELETE FROM release_blobs WHERE release_id = ?", (release_id,))
            c.execute("DELETE FROM rollouts WHERE fleet = ? AND app = ? AND version = ?",
                      (fleet, app, version))
            c.execute("DELETE FROM releases WHERE id = ?", (release_id,))
            self._notify(c, Kind.TARGETS, fleet)
            return orphans

    def blob_referenced(self, blob_id: str, fleet: str | None = None) -> bool:
        if fleet is None:
            rows = self._query("SELECT 1 FROM release_blobs WHERE blob_id = ? LIMIT 1",
                               (blob_id,))
        else:
            rows = self._query("SELECT 1 FROM release_blobs b JOIN releases r ON "
                               "r.id = b.release_id WHERE b.blob_id = ? AND r.fleet = ? "
                               "LIMIT 1", (blob_id, fleet))
        return bool(rows)

    # -- release keys and targets ----------------------------------------------------------

    def set_release_key(self, key: FleetReleaseKey) -> None:
        with self._tx(durable=True) as c:
            self._ensure_fleet(c, key.fleet, key.set_at)
            c.execute("INSERT INTO release_keys VALUES (?, ?, ?, ?) ON CONFLICT(fleet) DO "
                      "UPDATE SET public_key = excluded.public_key, key_id = excluded.key_id, "
                      "set_at = excluded.set_at",
                      (key.fleet, key.public_key, key.key_id, key.set_at))

    def release_key(self, fleet: str) -> FleetReleaseKey | None:
        rows = self._query("SELECT fleet, public_key, key_id, set_at FROM release_keys WHERE "
                           "fleet = ?", (fleet,))
        return FleetReleaseKey(*rows[0]) if rows else None

    def add_root(self, fleet: str, version: int, document: bytes, key: FleetReleaseKey) -> None:
        with self._tx(durable=True) as c:
            self._ensure_fleet(c, fleet, key.set_at)
            row = c.execute("SELECT MAX(version) FROM fleet_roots WHERE fleet = ?",
                            (fleet,)).fetchone()
            newest = row[0] or 0
            if version != newest + 1:
                raise Conflict(f"fleet {fleet} is at root version {newest}: the next one is "
                               f"{newest + 1}, not {version}")
            c.execute("INSERT INTO fleet_roots VALUES (?, ?, ?, ?)",
                      (fleet, version, document, key.set_at))
            self._notify(c, Kind.TARGETS, fleet)
            c.execute("INSERT INTO release_keys VALUES (?, ?, ?, ?) ON CONFLICT(fleet) DO "
                      "UPDATE SET public_key = excluded.public_key, key_id = excluded.key_id, "
                      "set_at = excluded.set_at",
                      (key.fleet, key.public_key, key.key_id, key.set_at))

    def roots(self, fleet: str, since: int, limit: int) -> list[bytes]:
        rows = self._query("SELECT document FROM fleet_roots WHERE fleet = ? AND version > ? "
                           "ORDER BY version LIMIT ?", (fleet, since, limit))
        return [bytes(r[0]) for r in rows]

    def latest_root(self, fleet: str) -> bytes | None:
        rows = self._query("SELECT document FROM fleet_roots WHERE fleet = ? ORDER BY version "
                           "DESC LIMIT 1", (fleet,))
        return bytes(rows[0][0]) if rows else None

    def set_target(self, target: FleetTarget) -> None:
        t = target
        with self._tx() as c:
            if c.execute("SELECT 1 FROM releases WHERE fleet = ? AND app = ? AND version = ?",
                         (t.fleet, t.app, t.version)).fetchone() is None:
                raise NotFound(f"no release {t.app} version {t.version} in fleet {t.fleet}")
            c.execute("INSERT INTO targets VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(fleet, app, "
                      "device) DO UPDATE SET version = excluded.version, pin = excluded.pin, "
                      "set_at = excluded.set_at",
                      (t.fleet, t.app, t.device or "", t.version, t.pin, t.set_at))
            self._notify(c, Kind.TARGETS, t.fleet, t.device or "")

    def targets(self, fleet: str) -> list[FleetTarget]:
        rows = self._query("SELECT fleet, app, version, device, pin, set_at FROM targets "
                           "WHERE fleet = ? ORDER BY app, device", (fleet,))
        return [_target(r) for r in rows]

    # -- tags and rollouts (issue 16) --------------------------------------------------------

    def update_tags(self, name: str, set_tags: dict[str, str], remove: Sequence[str],
                    max_tags: int) -> Device:
        with self._tx() as c:
            row = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE name = ? AND "
                            "state != 'revoked'", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no device {name!r}")
            device = _device(row)
            tags = {k: v for k, v in device.tags.items() if k not in remove}
            tags.update(set_tags)
            if len(tags) > max_tags:
                raise ControlError(f"tags: device {name} would have {len(tags)} tags, at most "
                                   f"{max_tags} allowed")
            c.execute("UPDATE devices SET tags = ? WHERE id = ?", (_tags_text(tags), device.id))
            if device.state is DeviceState.ACTIVE:
                self._notify(c, Kind.TARGETS, device.fleet, name)
            row = c.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE id = ?",
                            (device.id,)).fetchone()
            return _device(row)

    def put_rollout(self, rollout: RolloutRecord, exclusive: bool = False) -> None:
        r = rollout
        with self._tx() as c:
            if c.execute("SELECT 1 FROM releases WHERE fleet = ? AND app = ? AND version = ?",
                         (r.fleet, r.app, r.version)).fetchone() is None:
                raise NotFound(f"no release {r.app} version {r.version} in fleet {r.fleet}")
            if exclusive:
                marks = ", ".join("?" * len(ROLLOUT_ACTIVE))
                other = c.execute(f"SELECT version, state FROM rollouts WHERE fleet = ? AND "
                                  f"app = ? AND version != ? AND state IN ({marks})",
                                  (r.fleet, r.app, r.version, *ROLLOUT_ACTIVE)).fetchone()
                if other is not None:
                    raise Conflict(f"the rollout of {r.app} version {other[0]} in fleet "
                                   f"{r.fleet} is {other[1]}: abort it or let it finish first")
            c.execute(f"INSERT INTO rollouts ({_ROLLOUT_COLS}) VALUES "
                      "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(fleet, app, version) DO UPDATE "
                      "SET state = excluded.state, previous = excluded.previous, "
                      "created_at = excluded.created_at, updated_at = excluded.updated_at, "
                      "spec = excluded.spec, data = excluded.data, "
                      "rollback_pin = excluded.rollback_pin",
                      (r.fleet, r.app, r.version, r.state, r.previous, r.created_at,
                       r.updated_at, None if r.spec is None else json.dumps(r.spec),
                       None if r.data is None else json.dumps(r.data), r.rollback_pin))
            self._notify(c, Kind.ROLLOUT, r.fleet)

    def get_rollout(self, fleet: str, app: str, version: int) -> RolloutRecord | None:
        rows = self._query(f"SELECT {_ROLLOUT_COLS} FROM rollouts WHERE fleet = ? AND app = ? "
                           "AND version = ?", (fleet, app, version))
        return _rollout(rows[0]) if rows else None

    def rollouts(self, fleet: str | None = None, states: Sequence[str] | None = None
                 ) -> list[RolloutRecord]:
        where, args = [], []
        if fleet is not None:
            where.append("fleet = ?")
            args.append(fleet)
        if states is not None:
            if not states:
                return []
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._query(f"SELECT {_ROLLOUT_COLS} FROM rollouts{clause} ORDER BY "
                           "created_at DESC, fleet, app, version DESC", args)
        return [_rollout(r) for r in rows]

    # -- reachability policy (issue 18 item 6) -----------------------------------------------

    def set_policy(self, fleet: str, policy: str, now: float) -> FleetPolicy:
        with self._tx() as c:
            self._ensure_fleet(c, fleet, now)
            row = c.execute("INSERT INTO fleet_policies VALUES (?, ?, 1, ?) ON CONFLICT(fleet) "
                            "DO UPDATE SET policy = excluded.policy, updated_at = "
                            "excluded.updated_at, version = fleet_policies.version + 1 "
                            "RETURNING version", (fleet, policy, now)).fetchone()
            return FleetPolicy(fleet, policy, row[0], now)

    def active_tags(self, fleet: str) -> list[tuple[str, dict[str, str]]]:
        rows = self._query("SELECT name, tags FROM devices WHERE fleet = ? AND state = 'active' "
                           "ORDER BY name", (fleet,))
        return [(r[0], _json_column(r[1], _tags) or {}) for r in rows]

    def get_policy(self, fleet: str) -> FleetPolicy | None:
        rows = self._query("SELECT fleet, policy, version, updated_at FROM fleet_policies "
                           "WHERE fleet = ?", (fleet,))
        return FleetPolicy(*rows[0]) if rows else None
