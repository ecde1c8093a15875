"""SqliteStore in domain terms: migrations, IPAM that never reuses, hashed single-use tokens."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from coordinator._model import (
    Conflict,
    DeviceState,
    EnrollmentToken,
    EnrollParams,
    NotFound,
    ProofRequired,
    TokenExpired,
    TokenUnknown,
    TokenUsedUp,
)
from coordinator._secrets import new_secret, secret_hash
from coordinator._store_sqlite import MIGRATIONS, SqliteStore
from mesh.control import PeerPath
from vpn import generate_keypair

NOW = 1_700_000_000.0


def token(store: SqliteStore, fleet: str = "f", uses: int = 1, ttl: float = 3600,
          name: str | None = None) -> str:
    secret = new_secret()
    store.create_token(EnrollmentToken(secret_hash(secret), fleet, uses, NOW + ttl, NOW, name))
    return secret


def enroll(store: SqliteStore, secret: str, name: str | None = None, key: str | None = None,
           now: float = NOW, gen: str = "gen", proven: str | None = None):
    return store.enroll(EnrollParams(
        secret_hash=secret_hash(secret), public_key=key or generate_keypair().public,
        credential_hash=secret_hash(new_secret()), device_id="d_" + new_secret()[:8],
        generated_name=gen + new_secret()[:4].lower().replace("_", "a").replace("-", "a"),
        now=now, name=name, proven_device_id=proven))


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteStore(tmp_path / "c.db", "10.250.0.0/29", "fd7a:f1ee:7000::/120")
    yield s
    s.close()


def test_migrations_recorded_once_and_wal(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "c.db").close()
    s = SqliteStore(tmp_path / "c.db")
    s.close()
    db = sqlite3.connect(tmp_path / "c.db")
    assert [r[0] for r in db.execute("SELECT version FROM schema_migrations")] == \
        list(range(1, len(MIGRATIONS) + 1))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_prefixes_are_fixed_at_first_open(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "c.db", "10.250.0.0/16", "fd7a:f1ee:7000::/48").close()
    with pytest.raises(ValueError, match="addresses cannot move"):
        SqliteStore(tmp_path / "c.db", "10.99.0.0/16", "fd7a:f1ee:7000::/48")


def test_token_is_stored_hashed(tmp_path: Path, store: SqliteStore) -> None:
    secret = token(store)
    raw = b"".join((tmp_path / n).read_bytes() for n in ("c.db", "c.db-wal")
                   if (tmp_path / n).exists())
    assert secret.encode() not in raw
    assert secret_hash(secret).encode() in raw


def test_token_unknown_expired_used_up_are_distinct(store: SqliteStore) -> None:
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


def test_multi_use_token_counts_down(store: SqliteStore) -> None:
    t = token(store, uses=2)
    enroll(store, t)
    assert store.get_token(secret_hash(t)).uses_left == 1  # type: ignore[union-attr]
    enroll(store, t)
    with pytest.raises(TokenUsedUp):
        enroll(store, t)


def test_ipam_never_reuses_a_revoked_devices_addresses(store: SqliteStore) -> None:
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


def test_name_and_key_conflicts(store: SqliteStore) -> None:
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


def test_revoked_credential_is_told_apart_from_an_unknown_one(store: SqliteStore) -> None:
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


def test_provision_then_bound_token_enrolls_that_name(store: SqliteStore) -> None:
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


def test_revoke_kills_credential_and_bound_tokens(store: SqliteStore) -> None:
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


def test_reports_round_trip(store: SqliteStore) -> None:
    dev = enroll(store, token(store), name="a")
    key = generate_keypair().public
    store.record_report(dev.id, ["192.168.1.2:51820"], "1.2", [
        PeerPath(key, "direct", "203.0.113.1:5", NOW)], NOW)
    assert store.peer_paths(dev.id) == (PeerPath(key, "direct", "203.0.113.1:5", NOW),)
    got = store.device_by_name("a")
    assert got is not None and got.lan_endpoints == ("192.168.1.2:51820",)
    assert (got.agent_version, got.last_report) == ("1.2", NOW)


def _day(n: int) -> str:
    return f"2026-12-{n:02}"


def _counts(control: int) -> dict[str, int]:
    return {"wireguard": 10, "control": control, "gossip": 0, "blobs": 0, "logs": 0}


def test_wan_bytes_merge_by_day_keep_a_week_and_survive_a_reopen(tmp_path: Path) -> None:
    """Each report names today and yesterday: yesterday's final figure stays, a week of days
    is kept, and a report without the account changes nothing."""
    store = SqliteStore(tmp_path / "c.db")
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
    again = SqliteStore(tmp_path / "c.db")
    kept = again.device_by_name("a").wan_bytes
    assert kept == {_day(n): _counts(100 * n) for n in range(4, 11)}
    again.close()


def test_a_damaged_wan_bytes_row_reads_as_none(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    enroll(store, token(store), name="a")
    store.close()
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute("UPDATE devices SET wan_bytes = '{\"2026-12-01\": {\"bogus\": 1}}'")
    db.commit()
    db.close()
    again = SqliteStore(tmp_path / "c.db")
    assert again.device_by_name("a").wan_bytes is None
    again.close()


def test_operator_idempotent_and_conflicts(store: SqliteStore) -> None:
    key = generate_keypair().public
    a = store.add_operator("op", key, NOW)
    assert store.add_operator("op", key, NOW) == a
    with pytest.raises(Conflict):
        store.add_operator("op", generate_keypair().public, NOW)
    with pytest.raises(Conflict):
        store.add_operator("op2", key, NOW)


def test_public_endpoint_survives_a_reopen(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "c.db")
    device = enroll(first, token(first), name="dev-a")
    assert first.device_by_name("dev-a").public_endpoint is None
    first.record_public_endpoint(device.id, "198.51.100.10:51820")
    first.close()
    again = SqliteStore(tmp_path / "c.db")
    assert again.device_by_name("dev-a").public_endpoint == "198.51.100.10:51820"
    again.close()
