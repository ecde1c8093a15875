"""The store in domain terms, against both databases (SqliteStore and PostgresStore on a
private PostgreSQL server, tests/pgserver.py): migrations, IPAM that never reuses, hashed
single-use tokens, releases, roots, targets, logs and app controls."""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator._model import (
    AppControl,
    Conflict,
    DeviceState,
    EnrollmentToken,
    EnrollParams,
    FleetReleaseKey,
    FleetTarget,
    MisbehaviourReport,
    NotFound,
    ProofRequired,
    Release,
    StoreUnavailable,
    TokenExpired,
    TokenUnknown,
    TokenUsedUp,
)
from coordinator._secrets import new_secret, secret_hash
from coordinator._store_pg import PostgresStore, pg_dialect
from coordinator._store_sql import SqlStore
from coordinator._store_sqlite import MIGRATIONS, SqliteStore
from mesh.control import MAX_APPS, MAX_COUNT, AppStatus, LogLine, PeerMisbehaviour, PeerPath
from tests.pgserver import PgServer
from vpn import generate_keypair

NOW = 1_700_000_000.0


def token(store: SqlStore, fleet: str = "f", uses: int = 1, ttl: float = 3600,
          name: str | None = None) -> str:
    secret = new_secret()
    store.create_token(EnrollmentToken(secret_hash(secret), fleet, uses, NOW + ttl, NOW, name))
    return secret


def enroll(store: SqlStore, secret: str, name: str | None = None, key: str | None = None,
           now: float = NOW, gen: str = "gen", proven: str | None = None):
    return store.enroll(EnrollParams(
        secret_hash=secret_hash(secret), public_key=key or generate_keypair().public,
        credential_hash=secret_hash(new_secret()), device_id="d_" + new_secret()[:8],
        generated_name=gen + new_secret()[:4].lower().replace("_", "a").replace("-", "a"),
        now=now, name=name, proven_device_id=proven))


class Database:
    """One empty database of either kind: `open()` opens a store on it (again and again, as a
    restarted coordinator does), `execute()` changes it behind the store's back."""

    def __init__(self, kind: str, tmp_path: Path, pg: PgServer | None) -> None:
        self.kind = kind
        self.path = tmp_path / "c.db"
        self.url = pg.new_database() if pg is not None else ""
        self._opened: list[SqlStore] = []

    def open(self, mesh_ipv4: str = "10.250.0.0/16",
             mesh_ipv6: str = "fd7a:f1ee:7000::/48") -> SqlStore:
        store: SqlStore = (SqliteStore(self.path, mesh_ipv4, mesh_ipv6) if self.kind == "sqlite"
                           else PostgresStore(self.url, mesh_ipv4, mesh_ipv6))
        self._opened.append(store)
        return store

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        if self.kind == "sqlite":
            db = sqlite3.connect(self.path)
            try:
                rows = db.execute(sql, args).fetchall()
                db.commit()
                return rows
            finally:
                db.close()
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []

    def close_all(self) -> None:
        for store in self._opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    pg = request.getfixturevalue("pg_server") if request.param == "postgresql" else None
    db = Database(request.param, tmp_path, pg)
    try:
        yield db
    finally:
        db.close_all()


@pytest.fixture
def store(database: Database) -> SqlStore:
    return database.open("10.250.0.0/29", "fd7a:f1ee:7000::/120")


def test_migrations_recorded_once(database: Database) -> None:
    database.open().close()
    database.open().close()
    assert [r[0] for r in database.execute("SELECT version FROM schema_migrations ORDER BY "
                                           "version")] == list(range(1, len(MIGRATIONS) + 1))


def test_a_newer_schema_is_refused(database: Database) -> None:
    database.open().close()
    database.execute("INSERT INTO schema_migrations VALUES (?, ?)", (len(MIGRATIONS) + 1, 0.0))
    with pytest.raises(ValueError, match="newer than this coordinator"):
        database.open()


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "c.db").close()
    db = sqlite3.connect(tmp_path / "c.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_prefixes_are_fixed_at_first_open(database: Database) -> None:
    database.open("10.250.0.0/16", "fd7a:f1ee:7000::/48").close()
    with pytest.raises(ValueError, match="addresses cannot move"):
        database.open("10.99.0.0/16", "fd7a:f1ee:7000::/48")


def test_token_is_stored_hashed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    secret = token(store)
    raw = b"".join((tmp_path / n).read_bytes() for n in ("c.db", "c.db-wal")
                   if (tmp_path / n).exists())
    store.close()
    assert secret.encode() not in raw
    assert secret_hash(secret).encode() in raw


def test_a_token_stored_twice_is_a_conflict(store: SqlStore) -> None:
    """A broken unique constraint is the domain's Conflict in both databases, and the
    transaction it broke leaves nothing behind."""
    t = EnrollmentToken(secret_hash(new_secret()), "f", 1, NOW + 60, NOW)
    store.create_token(t)
    with pytest.raises(Conflict, match="already exists"):
        store.create_token(EnrollmentToken(t.secret_hash, "g", 5, NOW + 60, NOW))
    assert store.get_token(t.secret_hash) == t


def test_token_unknown_expired_used_up_are_distinct(store: SqlStore) -> None:
    with pytest.raises(TokenUnknown):
        enroll(store, new_secret())
    expired = token(store, ttl=10)
    with pytest.raises(TokenExpired):
        enroll(store, expired, now=NOW + 10)
    once = token(store)
    enroll(store, once)
    with pytest.raises(TokenUsedUp):
        enroll(store, once)
    assert len({str(TokenUnknown()), str(TokenExpired()), str(TokenUsedUp())}) == 3


def test_multi_use_token_counts_down(store: SqlStore) -> None:
    t = token(store, uses=2)
    enroll(store, t)
    assert store.get_token(secret_hash(t)).uses_left == 1  # type: ignore[union-attr]
    enroll(store, t)
    with pytest.raises(TokenUsedUp):
        enroll(store, t)


def test_ipam_never_reuses_a_revoked_devices_addresses(store: SqlStore) -> None:
    # /29: host indexes 2..6 (1 is the hub, 7 the broadcast)
    t = token(store, uses=10)
    a = enroll(store, t, name="a")
    b = enroll(store, t, name="b")
    assert (a.mesh_ipv4, b.mesh_ipv4) == ("10.250.0.2", "10.250.0.3")
    assert (a.mesh_ipv6, b.mesh_ipv6) == ("fd7a:f1ee:7000::2", "fd7a:f1ee:7000::3")
    store.revoke("b", NOW)
    c = enroll(store, t, name="b")  # the name is free again; the address is not
    assert c.mesh_ipv4 == "10.250.0.4" and c.id != b.id
    store.add_operator("op", generate_keypair().public, NOW)  # .5
    enroll(store, t, name="d")  # .6
    with pytest.raises(Conflict, match="exhausted"):
        enroll(store, t, name="e")
    assert store.device_by_name("b").id == c.id  # type: ignore[union-attr]


def test_name_and_key_conflicts(store: SqlStore) -> None:
    t = token(store, uses=10)
    key = generate_keypair().public
    first = enroll(store, t, name="a", key=key)
    with pytest.raises(Conflict, match="taken"):
        enroll(store, t, name="a")
    with pytest.raises(Conflict, match="already belongs"):
        enroll(store, t, name="b", key=key)
    with pytest.raises(ProofRequired, match="proof of possession"):
        enroll(store, t, name="a", key=key)  # the same name and key, but nothing proven
    # lost answer: the same device, proven (credential or key), keeps its addresses
    again = enroll(store, t, name="a", key=key, proven=first.id)
    assert (again.id, again.mesh_ipv4) == (first.id, first.mesh_ipv4)


def test_revoked_credential_is_told_apart_from_an_unknown_one(store: SqlStore) -> None:
    t = token(store, uses=10)
    credential = new_secret()
    store.enroll(EnrollParams(secret_hash=secret_hash(t), public_key=generate_keypair().public,
                              credential_hash=secret_hash(credential), device_id="d_rev",
                              generated_name="gen", now=NOW, name="a"))
    assert not store.credential_revoked(secret_hash(credential))
    store.revoke("a", NOW)
    assert store.device_by_credential(secret_hash(credential)) is None
    assert store.credential_revoked(secret_hash(credential))
    assert not store.credential_revoked(secret_hash(new_secret()))


def test_provision_then_bound_token_enrolls_that_name(store: SqlStore) -> None:
    secret = new_secret()
    dev = store.provision("d_x", "kiosk", "f", EnrollmentToken(
        secret_hash(secret), "f", 1, NOW + 60, NOW, "kiosk"), NOW)
    assert dev.state is DeviceState.PROVISIONED and dev.mesh_ipv4 is None
    with pytest.raises(Conflict, match="only device 'kiosk'"):
        enroll(store, secret, name="other")
    got = enroll(store, secret)
    assert (got.id, got.name, got.state) == ("d_x", "kiosk", DeviceState.ACTIVE)
    with pytest.raises(Conflict):
        store.provision("d_y", "kiosk", "f", EnrollmentToken(
            secret_hash(new_secret()), "f", 1, NOW + 60, NOW, "kiosk"), NOW)


def test_revoke_kills_credential_and_bound_tokens(store: SqlStore) -> None:
    secret = new_secret()
    cred = secret_hash("fmd_cred")
    store.create_token(EnrollmentToken(secret_hash(secret), "f", 5, NOW + 60, NOW, "k"))
    store.enroll(EnrollParams(secret_hash(secret), generate_keypair().public, cred, "d_1", "x",
                              NOW))
    assert store.device_by_credential(cred) is not None
    assert store.revoke("k", NOW).state is DeviceState.REVOKED
    assert store.device_by_credential(cred) is None
    with pytest.raises(TokenUsedUp):
        enroll(store, secret)
    with pytest.raises(NotFound):
        store.revoke("nope", NOW)


def test_reports_round_trip(store: SqlStore) -> None:
    dev = enroll(store, token(store), name="a")
    key = generate_keypair().public
    store.record_report(dev.id, ["192.168.1.2:51820"], "1.2", [
        PeerPath(key, "direct", "203.0.113.1:5", NOW)], NOW)
    assert store.peer_paths(dev.id) == (PeerPath(key, "direct", "203.0.113.1:5", NOW),)
    got = store.device_by_name("a")
    assert got is not None and got.lan_endpoints == ("192.168.1.2:51820",)
    assert (got.agent_version, got.last_report) == ("1.2", NOW)


def test_the_platform_from_enrollment_and_reports_survives_a_reopen(database: Database
                                                                    ) -> None:
    store = database.open()
    secret = token(store)
    dev = store.enroll(EnrollParams(
        secret_hash=secret_hash(secret), public_key=generate_keypair().public,
        credential_hash=secret_hash(new_secret()), device_id="d_pi", generated_name="g",
        now=NOW, name="pi", platform="linux/arm/v7"))
    assert dev.platform == "linux/arm/v7"
    old = enroll(store, token(store), name="old")
    assert old.platform is None  # an old agent says nothing
    store.record_report(old.id, [], "1", [], NOW, platform="linux/arm64")
    store.record_report(dev.id, [], "1", [], NOW)  # a report that does not say keeps it
    store.close()
    again = database.open()
    assert again.device_by_name("pi").platform == "linux/arm/v7"
    assert again.device_by_name("old").platform == "linux/arm64"
    again.close()


def _day(n: int) -> str:
    return f"2026-12-{n:02}"


def _counts(control: int) -> dict[str, int]:
    return {"wireguard": 10, "control": control, "gossip": 0, "blobs": 0, "logs": 0}


def test_wan_bytes_merge_by_day_keep_a_week_and_survive_a_reopen(database: Database) -> None:
    """Each report names today and yesterday: yesterday's final figure stays, a week of days
    is kept, and a report without the account changes nothing."""
    store = database.open()
    dev = enroll(store, token(store), name="a")
    assert store.device_by_name("a").wan_bytes is None
    for n in range(1, 11):  # ten days, each reported twice (early and late)
        for control in (n, 100 * n):
            store.record_report(dev.id, [], "1", [], NOW,
                                wan_bytes={_day(n): _counts(control),
                                           **({_day(n - 1): _counts(100 * (n - 1))}
                                              if n > 1 else {})})
    store.record_report(dev.id, [], "1", [], NOW)  # an old agent: no account
    store.close()
    again = database.open()
    kept = again.device_by_name("a").wan_bytes
    assert kept == {_day(n): _counts(100 * n) for n in range(4, 11)}
    again.close()


def test_a_damaged_wan_bytes_row_reads_as_none(database: Database) -> None:
    store = database.open()
    enroll(store, token(store), name="a")
    store.close()
    database.execute("UPDATE devices SET wan_bytes = '{\"2026-12-01\": {\"bogus\": 1}}'")
    again = database.open()
    assert again.device_by_name("a").wan_bytes is None
    again.close()


def test_operator_idempotent_and_conflicts(store: SqlStore) -> None:
    key = generate_keypair().public
    a = store.add_operator("op", key, NOW)
    assert store.add_operator("op", key, NOW) == a
    with pytest.raises(Conflict):
        store.add_operator("op", generate_keypair().public, NOW)
    with pytest.raises(Conflict):
        store.add_operator("op2", key, NOW)


def test_public_endpoint_survives_a_reopen(database: Database) -> None:
    first = database.open()
    device = enroll(first, token(first), name="dev-a")
    assert first.device_by_name("dev-a").public_endpoint is None
    first.record_public_endpoint(device.id, "198.51.100.10:51820")
    first.close()
    again = database.open()
    assert again.device_by_name("dev-a").public_endpoint == "198.51.100.10:51820"
    again.close()


# -- the same schema and semantics in both databases ---------------------------------------

def test_pg_dialect_maps_sqlite_types_to_the_same_meaning() -> None:
    assert pg_dialect("CREATE TABLE x (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, t REAL, "
                      "b BLOB, s TEXT UNIQUE) WITHOUT ROWID") == (
        "CREATE TABLE x (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT "
        'NULL, t DOUBLE PRECISION, b BYTEA, s TEXT COLLATE "C" UNIQUE)')


def test_both_databases_get_the_same_tables_columns_and_indexes(tmp_path: Path,
                                                                pg_server: PgServer) -> None:
    SqliteStore(tmp_path / "c.db").close()
    db = sqlite3.connect(tmp_path / "c.db")
    lite = set(db.execute("SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) "
                          "p WHERE m.type = 'table'").fetchall())
    lite_indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = "
                                             "'index' AND sql IS NOT NULL")}
    db.close()
    url = pg_server.new_database()
    PostgresStore(url).close()
    with psycopg.connect(url) as conn:
        pg = set(conn.execute("SELECT table_name, column_name FROM information_schema.columns "
                              "WHERE table_schema = 'public'").fetchall())
        pg_indexes = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes i WHERE schemaname = 'public' AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)")}
    assert pg == lite and len(lite) > 50
    assert pg_indexes == lite_indexes and "devices_live_name" in pg_indexes


def _release(version: int, blobs: tuple[str, ...], app: str = "app", signed: bytes = b"",
             size: int = 10) -> Release:
    return Release(fleet="f", app=app, version=version, signed=signed or b"\x00s%d" % version,
                   key_id="k", created_at=1_700_000_000 + version, published_at=NOW + version,
                   layers=1, size=size, stored_size=5, delta_size=0, blob_ids=blobs)


def test_releases_targets_and_blob_references(store: SqlStore) -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    first, created = store.add_release(_release(1, (a, b), size=MAX_COUNT))
    assert created and store.get_release("f", "app", 1) == replace(first, blob_ids=())
    assert store.get_release("f", "app", 1).size == MAX_COUNT  # type: ignore[union-attr]
    assert store.add_release(_release(1, (a, b)))[1] is False  # the same bytes again
    with pytest.raises(Conflict, match="other content"):
        store.add_release(_release(1, (a,), signed=b"other"))
    store.add_release(_release(2, (b, c)))
    store.add_release(_release(1, (c,), app="other"))
    assert [(r.app, r.version) for r in store.list_releases("f")] == \
        [("other", 1), ("app", 2), ("app", 1)]
    assert [r.version for r in store.list_releases("f", "app")] == [2, 1]
    assert store.latest_version("f", "app") == 2 and store.latest_version("f", "none") is None
    with pytest.raises(NotFound):
        store.set_target(FleetTarget("f", "app", 9, None, None, NOW))
    store.set_target(FleetTarget("f", "app", 1, None, None, NOW))
    store.set_target(FleetTarget("f", "app", 2, "dev-b", b"\x00pin\xff", NOW))
    store.set_target(FleetTarget("f", "app", 2, None, None, NOW + 1))  # replaces the first
    assert store.targets("f") == [FleetTarget("f", "app", 2, None, None, NOW + 1),
                                  FleetTarget("f", "app", 2, "dev-b", b"\x00pin\xff", NOW)]
    with pytest.raises(Conflict, match="target of fleet f"):
        store.delete_release("f", "app", 2)
    assert store.delete_release("f", "app", 1) == [a]  # b is still named by version 2
    assert store.blob_referenced(b) and not store.blob_referenced(a)
    assert store.blob_referenced(c, "f") and not store.blob_referenced(c, "g")
    with pytest.raises(NotFound):
        store.delete_release("f", "app", 1)
    with pytest.raises(Conflict, match="not newer"):  # a deleted number is never reused
        store.add_release(_release(1, (a,), signed=b"new"))
    store.add_release(_release(3, (a,)))
    assert [r.version for r in store.list_releases("f", "app")] == [3, 2]


def test_roots_grow_one_version_at_a_time_and_name_the_key(store: SqlStore) -> None:
    key = FleetReleaseKey("f", "ab" * 32, "k1", NOW)
    assert store.latest_root("f") is None and store.release_key("f") is None
    with pytest.raises(Conflict, match="next one is 1"):
        store.add_root("f", 2, b"{2}", key)
    store.add_root("f", 1, b"{1}", key)
    store.add_root("f", 2, b"{2}\x00", replace(key, key_id="k2"))
    with pytest.raises(Conflict, match="next one is 3"):
        store.add_root("f", 2, b"{2'}", key)
    assert store.roots("f", 0, 10) == [b"{1}", b"{2}\x00"]
    assert store.roots("f", 1, 10) == [b"{2}\x00"] and store.roots("f", 0, 1) == [b"{1}"]
    assert store.latest_root("f") == b"{2}\x00"
    assert store.release_key("f") == replace(key, key_id="k2")
    store.set_release_key(FleetReleaseKey("g", "cd" * 32, "k3", NOW))
    assert store.release_key("g") == FleetReleaseKey("g", "cd" * 32, "k3", NOW)


def test_logs_number_keep_the_newest_and_page(store: SqlStore) -> None:
    dev = enroll(store, token(store), name="a")
    lines = [LogLine(NOW + i, "app", "stdout", f"line {i} 100% ?") for i in range(5)]
    assert store.append_logs(dev.id, lines[:3], 0, keep=4) == 3
    assert store.append_logs(dev.id, lines[3:], 7, keep=4) == 5
    page = store.read_logs(dev.id, 0, 10)
    assert [s for s, _ in page.lines] == [2, 3, 4, 5] and (page.last_seq, page.dropped) == (5, 7)
    assert page.lines[0][1] == lines[1]
    assert [s for s, _ in store.read_logs(dev.id, 3, 1).lines] == [4]
    assert [s for s, _ in store.tail_logs(dev.id, 2).lines] == [4, 5]
    with pytest.raises(NotFound):
        store.append_logs("d_nobody", lines, 0, keep=4)


def test_app_status_force_and_retry(store: SqlStore) -> None:
    dev = enroll(store, token(store), name="a")
    store.set_force(dev.id, "web", 3)
    assert store.add_retry([dev.id], "web") == {dev.id: 1}
    assert store.add_retry([dev.id], "web") == {dev.id: 2}
    assert store.app_controls(dev.id) == {"web": AppControl(3, 2)}
    status = AppStatus("web", "running", running=2, updated_at=NOW)
    assert store.record_report(dev.id, [], "1", [], NOW, apps=[status]) == []
    assert store.app_statuses() == {dev.id: [status]}
    newer = replace(status, running=3)
    assert store.record_report(dev.id, [], "1", [], NOW, apps=[newer]) == ["web"]
    assert store.app_controls(dev.id) == {"web": AppControl(None, 2)}
    assert store.app_statuses("f") == {dev.id: [newer]} and store.app_statuses("g") == {}
    many = [AppStatus(f"app{i}", "idle") for i in range(MAX_APPS)]
    store.record_report(dev.id, [], "1", [], NOW, apps=many)  # past the bound: web's goes
    assert [s.app for s in store.app_statuses()[dev.id]] == sorted(a.app for a in many)
    assert store.app_controls(dev.id)["web"] == AppControl(None, 2)  # its retry stays


def test_misbehaviour_reports_only_name_live_devices_of_the_fleet(store: SqlStore) -> None:
    t = token(store, uses=5)
    a, b = enroll(store, t, name="a"), enroll(store, t, name="b")
    c = enroll(store, token(store, fleet="g"), name="c")
    store.record_report(a.id, [], "1", [], NOW, misbehaving=[
        PeerMisbehaviour("b", {"corrupt_blob": 2}), PeerMisbehaviour("c", {"bad_frame": 1}),
        PeerMisbehaviour("zz", {"bad_frame": 1})])
    store.record_report(b.id, [], "1", [], NOW, misbehaving=[
        PeerMisbehaviour("a", {"ghost_member": 4})])
    assert store.misbehaviour_reports() == [MisbehaviourReport("b", "a", {"ghost_member": 4}),
                                            MisbehaviourReport("a", "b", {"corrupt_blob": 2})]
    assert store.misbehaviour_reports("g") == [] and c.fleet == "g"
    store.revoke("b", NOW)
    # a revoked reporter's claims go; claims about a revoked device stay
    assert store.misbehaviour_reports("f") == [MisbehaviourReport("a", "b",
                                                                  {"corrupt_blob": 2})]


def test_lists_sort_byte_by_byte(store: SqlStore) -> None:
    """SQLite compares TEXT byte by byte; PostgreSQL's columns are made "C" to do the same,
    whatever the database's own collation (which may sort "a-b" after "ab")."""
    t = token(store, uses=5)
    for name in ("ab", "a-b", "a0", "b"):
        enroll(store, t, name=name)
    assert [d.name for d in store.list_devices()] == ["a-b", "a0", "ab", "b"]
    assert store.fleet_size("f") == 4 and store.fleet_size("g") == 0


def test_writers_on_one_postgresql_database_take_turns(pg_server: PgServer) -> None:
    """Two stores (two coordinators) enrolling at once on one database, each with its own
    token: every device gets its own address and none fails. Without the write lock both
    read the same next address and the second insert breaks its uniqueness."""
    url = pg_server.new_database()
    stores = [PostgresStore(url), PostgresStore(url)]
    try:
        got: list[Any] = []
        errors: list[BaseException] = []

        def run(store: SqlStore, prefix: str) -> None:
            t = token(store, uses=100)
            try:
                got.extend(enroll(store, t, name=f"{prefix}{i}") for i in range(100))
            except BaseException as exc:  # noqa: B036 - reported by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s, p))
                   for s, p in zip(stores, "xy", strict=True)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        assert len({d.mesh_ipv4 for d in got}) == 200 and len(got) == 200
    finally:
        for s in stores:
            s.close()


def _drop_connections(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                     "datname = current_database() AND pid != pg_backend_pid()")


def test_postgres_store_reconnects_after_the_server_dropped_it(pg_server: PgServer) -> None:
    """A dropped connection (a server restart) costs no failed call: the first statement of
    the next read or write goes again on a new connection."""
    url = pg_server.new_database()
    store = PostgresStore(url)
    try:
        enroll(store, token(store), name="a")
        _drop_connections(url)
        assert [d.name for d in store.list_devices()] == ["a"]
        _drop_connections(url)
        assert enroll(store, token(store), name="b").name == "b"
    finally:
        store.close()


def test_a_database_that_does_not_answer_is_unavailable(pg_server: PgServer) -> None:
    url = pg_server.new_database()
    store = PostgresStore(url)
    try:
        with psycopg.connect(pg_server.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")
        with pytest.raises(StoreUnavailable, match="database unavailable") as info:
            store.list_devices()
        assert "\n" not in str(info.value) and info.value.status == 503
        with pytest.raises(StoreUnavailable):
            store.create_token(EnrollmentToken(secret_hash(new_secret()), "f", 1, NOW, NOW))
    finally:
        store.close()


@pytest.mark.parametrize("url, fragment", [
    ("mysql://x@127.0.0.1/db", "must be a postgresql://"),
    ("postgresql://x@127.0.0.1:notaport/db", "not a PostgreSQL URL"),
])
def test_bad_store_urls_are_one_line(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        PostgresStore(url)
    assert "\n" not in str(info.value)


def test_an_unreachable_database_is_one_line_without_the_password(pg_server: PgServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match="cannot reach") as info:
            PostgresStore(f"postgresql://u:s3cret@127.0.0.1:{port}/db")
    assert "\n" not in str(info.value) and "s3cret" not in str(info.value)
    assert f"postgresql://u@127.0.0.1:{port}/db" in str(info.value)


def test_postgresql_flushes_the_wal_at_commit_only_for_durable_transactions(
        pg_server: PgServer) -> None:
    """As SQLite's FULL and NORMAL (docs/security.md): enrollment, tokens, revocation, keys
    wait for the WAL flush; reports and logs do not."""
    store = PostgresStore(pg_server.new_database())
    try:
        with store._tx(durable=True) as c:
            assert c.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        with store._tx() as c:
            assert c.execute("SHOW synchronous_commit").fetchone()[0] == "off"
            locks = c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                              "pid = pg_backend_pid()").fetchone()[0]
            assert locks == 1
        assert store._query("SHOW synchronous_commit") == [("on",)]  # SET LOCAL ended there
    finally:
        store.close()


def test_two_coordinators_starting_at_once_migrate_one_database_once(
        pg_server: PgServer) -> None:
    """The migrations run under the write lock: the second store waits and finds them done."""
    url = pg_server.new_database()
    opened: list[SqlStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(PostgresStore(url))
        except BaseException as exc:  # noqa: B036 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in opened:
        s.close()
    assert errors == [] and len(opened) == 3
    with psycopg.connect(url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert sorted(versions) == list(range(1, len(MIGRATIONS) + 1))


def test_a_user_who_may_not_create_the_tables_is_one_line(pg_server: PgServer) -> None:
    """PostgreSQL 15 lets only the database's owner create tables in `public`."""
    url = pg_server.new_database()
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute("CREATE ROLE guest LOGIN")
    try:
        with pytest.raises(ValueError, match="permission denied for schema public") as info:
            PostgresStore(url.replace("//fleetmesh@", "//guest@"))
        assert "\n" not in str(info.value)
    finally:
        with psycopg.connect(pg_server.url(), autocommit=True) as conn:
            conn.execute("DROP ROLE guest")


def test_fleet_policy_versions_and_survives_a_reopen(database: Database) -> None:
    """Migration 13 (docs/policy.md): one policy per fleet, its text as sent, version + 1 per
    change, the fleet created if it was not there."""
    store = database.open()
    assert store.get_policy("f") is None
    first = store.set_policy("f", "# mine\nrole=cam -> role=nvr tcp/554\n", 10.0)
    assert (first.fleet, first.version, first.updated_at) == ("f", 1, 10.0)
    second = store.set_policy("f", "* -> * any", 20.0)
    assert (second.version, second.policy) == (2, "* -> * any")
    assert store.set_policy("g", "", 30.0).version == 1
    store.close()
    again = database.open()
    assert again.get_policy("f") == second
    assert again.get_policy("g") is not None and again.get_policy("h") is None
    again.close()


def test_active_tags_are_the_live_devices_of_the_fleet(store: SqlStore) -> None:
    """What the policy compiler reads: (name, tags) of active devices only, by name."""
    for name in ("b", "a", "gone"):
        enroll(store, token(store), name=name)
    enroll(store, token(store, fleet="other"), name="elsewhere")
    store.update_tags("b", {"role": "cam"}, (), 32)
    store.revoke("gone", NOW)
    assert store.active_tags("f") == [("a", {}), ("b", {"role": "cam"})]
    assert store.active_tags("nobody") == []
