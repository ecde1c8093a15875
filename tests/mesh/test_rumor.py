"""mesh.rumor: verified-only storage, newest wins, rumor mongering and anti-entropy."""

from __future__ import annotations

import random

from nacl.signing import SigningKey

from mesh.release import ReleaseManifest, encode_signed_manifest, sign_manifest
from mesh.rumor import LAN_RUMOR, Dissemination, RumorConfig, make_verifier, rumor_rounds
from mesh.wire import Digest, ManifestRequest, Rumor

KEY = SigningKey(b"k" * 32)
OTHER = SigningKey(b"o" * 32)
VERIFY = make_verifier(bytes(KEY.verify_key), fleet="fleet")


def signed(version: int, key: SigningKey = KEY, app: str = "app") -> bytes:
    m = ReleaseManifest("fleet", app, version, 1_700_000_000, b'{"a":1}', ())
    return encode_signed_manifest(sign_manifest(m, key))


def node(name: str, peers: list[str], seed: int = 1,
         config: RumorConfig = LAN_RUMOR) -> Dissemination:
    return Dissemination(name, random.Random(seed), VERIFY, lambda: peers, config)


def rumors(out: list[tuple[str, object]]) -> list[tuple[str, Rumor]]:
    return [(d, m) for d, m in out if isinstance(m, Rumor)]


def test_invalid_manifest_dropped_counted_not_forwarded() -> None:
    a = node("a", ["b", "c", "d"])
    a.tick(0.0)
    forged = signed(5, OTHER)
    assert a.receive(Rumor((forged, b"garbage")), "b", 1.0) == []
    assert a.stats.invalid == 2 and a.newest("fleet", "app") is None
    assert a.receive(Rumor((forged,)), "c", 1.5) == []  # cached: counted, not re-verified
    assert a.stats.invalid == 3
    out = []
    for t in range(2, 10):
        out += a.tick(float(t))
    assert not rumors(out)  # nothing hot: the forged manifest is never pushed
    assert a.drain_events() == []


def test_newer_replaces_older_and_stale_sender_is_answered() -> None:
    a = node("a", ["b"])
    a.tick(0.0)
    assert a.publish(signed(1), 0.0)
    a.receive(Rumor((signed(2),)), "b", 1.0)
    assert a.newest("fleet", "app") == (2, signed(2))
    assert [e.version for e in a.drain_events()] == [1, 2]
    out = a.receive(Rumor((signed(1),)), "c", 2.0)  # c is behind: it gets v2 back
    assert out == [("c", Rumor((signed(2),)))]
    assert a.stats.stale == 1 and a.newest("fleet", "app") == (2, signed(2))


def test_rumor_mongering_bounded_rounds() -> None:
    peers = [f"p{i}" for i in range(20)]
    cfg = RumorConfig(fanout=3, rumor_mult=3)
    a = node("a", peers, config=cfg)
    a.tick(0.0)
    a.publish(signed(1), 0.0)
    pushes = []
    t = 0.0
    while (d := a.next_deadline()) is not None and d < 25.0:
        t = d
        pushes += [(t, dest) for dest, m in rumors(a.tick(t))]
    rounds = rumor_rounds(cfg, len(peers) + 1)
    assert rounds == 6
    assert len(pushes) == 3 * rounds
    assert len({t for t, _ in pushes}) == rounds
    # duplicates received are the counter feedback: the rumor goes cold early
    b = node("b", peers, config=cfg)
    b.tick(0.0)
    b.publish(signed(1), 0.0)
    for i in range(cfg.cold_after_duplicates):
        b.receive(Rumor((signed(1),)), f"p{i}", 0.0)
    assert not rumors(b.tick(1.0) + b.tick(2.0))


def test_anti_entropy_catches_up_a_node_that_missed_the_rumor() -> None:
    cfg = RumorConfig(anti_entropy_interval=30.0)
    a = node("a", ["b"], config=cfg)
    b = node("b", ["a"], seed=2, config=cfg)
    a.tick(0.0)
    b.tick(0.0)
    a.publish(signed(3), 1.0)  # b is offline: every push of the rumor is lost
    t = 1.0
    while (d := a.next_deadline()) is not None and d < 29.0:
        t = d
        a.tick(t)
    # b's next anti-entropy exchange is exactly one interval after its first
    assert b.next_deadline() == 30.0
    [(dest, digest)] = b.tick(30.0)
    assert dest == "a" and digest == Digest(())
    [(dest, reply)] = a.receive(digest, "b", 30.01)
    assert dest == "b" and reply == Rumor((signed(3),))
    b.receive(reply, "a", 30.02)
    assert b.newest("fleet", "app") == (3, signed(3))


def test_digest_from_a_newer_peer_makes_us_request() -> None:
    a = node("a", ["b"])
    a.tick(0.0)
    a.publish(signed(1), 0.0)
    a.publish(signed(1, app="other"), 0.0)
    out = a.receive(Digest((signed_key(2),)), "b", 1.0)
    # b is newer for app (we request it) and lacks "other" (we send it)
    assert ("b", Rumor((signed(1, app="other"),))) in out
    req = [m for _, m in out if isinstance(m, ManifestRequest)]
    assert req == [ManifestRequest((signed_key(2),))]
    b = node("b", ["a"])
    b.tick(0.0)
    b.publish(signed(2), 0.0)
    assert b.receive(req[0], "a", 1.1) == [("a", Rumor((signed(2),)))]


def signed_key(version: int):  # type: ignore[no-untyped-def]
    from mesh.wire import ReleaseKey
    return ReleaseKey("fleet", "app", version)
