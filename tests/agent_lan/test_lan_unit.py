"""LAN discovery without a network: fingerprint, advert validation, neighbour bookkeeping and
the trio-side event handling (zeroconf replaced by a fake)."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

import pytest
import trio

from agent._lan import (
    MAX_PENDING,
    SERVICE_TYPE,
    InvalidAdvert,
    LanAdvert,
    LanDiscoveryError,
    LanNeighbours,
    Neighbour,
    _Discovery,
    _local_error,
    fingerprint,
    instance_label,
    main,
    parse_advert,
    pick_underlay,
)

UNDERLAY = IPv4Interface("10.201.1.11/24")
KEY = base64.b64encode(bytes(range(32))).decode()
FP = hashlib.sha256(bytes(range(32))).hexdigest()[:16]


def props(**kw: bytes | None) -> dict[bytes, bytes | None]:
    base: dict[bytes, bytes | None] = {b"id": b"home-2", b"fp": FP.encode(), b"fleet": b"f1",
                                       b"v": b"1"}
    for k, v in kw.items():
        if v is None and k.startswith("drop_"):
            base.pop(k[5:].encode(), None)
        else:
            base[k.encode()] = v
    return base


def parse(fqdn: str = f"home-2.{SERVICE_TYPE}", port: object = 51820,
          addresses: list[object] | None = None, properties: Any = None,
          text_len: int = 60) -> Neighbour:
    return parse_advert(fqdn, port, ["10.201.1.12"] if addresses is None else addresses,
                        props() if properties is None else properties, text_len,
                        fleet="f1", underlay=UNDERLAY, now=100.0)


# --- fingerprint -----------------------------------------------------------------------------

def test_fingerprint_is_sha256_prefix_of_raw_key() -> None:
    assert fingerprint(KEY) == FP
    assert fingerprint(bytes(range(32))) == FP
    assert len(FP) == 16 and int(FP, 16) >= 0


@pytest.mark.parametrize("bad", ["", "not base64!", base64.b64encode(b"short").decode(),
                                 base64.b64encode(bytes(33)).decode()])
def test_fingerprint_rejects_bad_keys(bad: str) -> None:
    with pytest.raises(ValueError):
        fingerprint(bad)


# --- instance names and adverts ---------------------------------------------------------------

def test_instance_label() -> None:
    assert instance_label(f"home-2.{SERVICE_TYPE}") == "home-2"
    assert instance_label("x._FLEETMESH._udp.local.") == "x"  # DNS is case-insensitive
    for bad in ["Home-2." + SERVICE_TYPE, "a_b." + SERVICE_TYPE, "." + SERVICE_TYPE,
                "a" * 64 + "." + SERVICE_TYPE, "a.b." + SERVICE_TYPE, "home-2._http._tcp.local.",
                "a b." + SERVICE_TYPE, "é." + SERVICE_TYPE, None, 42, "x" * 5000]:
        with pytest.raises(InvalidAdvert) as e:
            instance_label(bad)
        assert e.value.reason == "name"


def test_parse_good_advert() -> None:
    n = parse()
    assert n == Neighbour("home-2", IPv4Address("10.201.1.12"), 51820, FP, 100.0)


def test_parse_picks_first_address_inside_the_underlay_subnet() -> None:
    n = parse(addresses=["fe80::1", "100.64.0.1", "garbage", "10.201.1.13", "10.201.1.14"])
    assert n.ipv4 == IPv4Address("10.201.1.13")


@pytest.mark.parametrize("addresses", [
    [], ["10.201.2.12"], ["10.99.0.1"], ["10.201.1.0"], ["10.201.1.255"],
    ["10.201.1.11"],  # our own address
    ["fe80::1"], ["nonsense"], [None], [True], ["10.201.1.12"] * 17,
])
def test_parse_rejects_addresses(addresses: list[object]) -> None:
    with pytest.raises(InvalidAdvert) as e:
        parse(addresses=addresses)
    assert e.value.reason == "address"


@pytest.mark.parametrize("port", [0, -1, 65536, None, "51820", True, 1.5])
def test_parse_rejects_ports(port: object) -> None:
    with pytest.raises(InvalidAdvert) as e:
        parse(port=port)
    assert e.value.reason == "port"


@pytest.mark.parametrize("properties", [
    None.__class__,  # not a mapping at all
    props(drop_id=None), props(drop_fp=None), props(drop_fleet=None), props(drop_v=None),
    props(id=b"home-3"),                       # id must equal the instance name
    props(id=None), props(fp=None),            # keys without values
    props(fp=FP.upper().encode()), props(fp=b"abc"), props(fp=FP.encode() + b"0"),
    props(fp=b"\xff" * 16),
    props(fleet=b"F1"), props(fleet=b"a" * 64), props(fleet=b"\xc3\xa9"),
    {**props(), **{f"k{i}".encode(): b"x" for i in range(20)}},   # too many keys
    {b"id": "home-2", b"fp": FP.encode(), b"fleet": b"f1", b"v": b"1"},  # str value
])
def test_parse_rejects_txt(properties: Any) -> None:
    with pytest.raises(InvalidAdvert) as e:
        parse(properties=properties if isinstance(properties, dict) else 7)
    assert e.value.reason == "txt"


def test_parse_rejects_long_txt_and_other_version_and_fleet() -> None:
    with pytest.raises(InvalidAdvert) as e:
        parse(text_len=5000)
    assert e.value.reason == "txt"
    with pytest.raises(InvalidAdvert) as e:
        parse(properties=props(v=b"2"))
    assert e.value.reason == "version"
    with pytest.raises(InvalidAdvert) as e:
        parse(properties=props(fleet=b"other"))
    assert e.value.reason == "other-fleet"


def test_unknown_txt_keys_are_ignored() -> None:
    assert parse(properties=props(extra=b"whatever", flag=None)).name == "home-2"


def test_advert_txt_round_trips_through_parse() -> None:
    me = LanAdvert("home-2", "f1", FP, IPv4Interface("10.201.1.12/24"), 51821)
    txt = {k.encode(): v.encode() for k, v in me.txt().items()}
    n = parse(fqdn=me.instance, port=me.port, properties=txt)
    assert (n.name, n.port, n.fp) == ("home-2", 51821, FP)
    assert me.server == "home-2.fleetmesh.local."


# --- neighbour bookkeeping ------------------------------------------------------------------

def nb(name: str, ip: str = "10.201.1.12", port: int = 51820, fp: str = FP,
       t: float = 1.0) -> Neighbour:
    return Neighbour(name, IPv4Address(ip), port, fp, t)


def test_neighbours_add_update_seen_remove() -> None:
    s = LanNeighbours()
    assert s.upsert(nb("a")) == "added"
    assert s.upsert(nb("a", t=2.0)) == "seen"
    assert s.get("a") == nb("a", t=2.0)  # last_seen refreshed
    assert s.upsert(nb("a", port=1)) == "updated"
    assert s.upsert(nb("a", port=1, ip="10.201.1.13")) == "updated"
    assert s.upsert(nb("a", port=1, ip="10.201.1.13", fp="0" * 16)) == "updated"
    assert s.upsert(nb("b")) == "added"
    assert {n.name for n in s.snapshot()} == {"a", "b"} and len(s) == 2 and "a" in s
    assert s.remove("a") and not s.remove("a") and "a" not in s
    assert s.snapshot() == frozenset({nb("b")})


def test_neighbours_are_bounded() -> None:
    s = LanNeighbours(limit=3)
    assert [s.upsert(nb(f"n{i}")) for i in range(5)] == ["added"] * 3 + ["full"] * 2
    assert s.upsert(nb("n0", port=9)) == "updated"  # known names still update
    assert len(s) == 3


# --- underlay selection -----------------------------------------------------------------------

ROWS = [("lo", "127.0.0.1", 8), ("eth0", "10.201.1.11", 24), ("eth0", "10.201.1.99", 24),
        ("wg0", "10.99.0.5", 16)]


def test_pick_underlay_by_name_or_address() -> None:
    assert pick_underlay(ROWS, "eth0") == ("eth0", IPv4Interface("10.201.1.11/24"))
    assert pick_underlay(ROWS, "10.201.1.99") == ("eth0", IPv4Interface("10.201.1.99/24"))
    assert pick_underlay(ROWS, "wg0")[0] == "wg0"  # the caller chooses; the agent passes eth0
    for bad in ["eth9", "10.0.0.1", "lo", "127.0.0.1"]:
        with pytest.raises(LanDiscoveryError):
            pick_underlay(ROWS, bad)


# --- CLI input errors: one line, exit 2, no network touched --------------------------------------

@pytest.mark.parametrize("argv", [
    ["--name", "Bad_Name", "--fleet", "f1", "--key", KEY, "--interface", "lo", "--port", "1"],
    ["--name", "a", "--fleet", "f1", "--key", "nope", "--interface", "lo", "--port", "1"],
    ["--name", "a", "--fleet", "f1", "--key", KEY, "--interface", "lo", "--port", "70000"],
    ["--name", "a", "--fleet", "f1", "--key", KEY, "--interface", "nosuch9", "--port", "1"],
    ["--name", "a", "--fleet", "f1", "--key", KEY, "--interface", "lo", "--port", "1",
     "--seconds", "0"],
    ["--name", "a", "--fleet", "f1", "--key", KEY, "--interface", "lo", "--port", "1",
     "--seconds", "99999"],
])
def test_cli_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agent._lan: ") and "\n" not in err


def test_local_error_unwraps_groups() -> None:
    e = LanDiscoveryError("x")
    assert _local_error(ExceptionGroup("g", [ExceptionGroup("h", [e])])) is e
    assert _local_error(ExceptionGroup("g", [ValueError()])) is None


# --- trio side: events from "zeroconf's thread", resolves, bookkeeping --------------------------

class FakeInfo:
    def __init__(self, name: str, ip: str, port: int = 51820, fleet: bytes = b"f1",
                 text: bytes = b"x" * 60, **txt: bytes) -> None:
        self.port = port
        self._ip = ip
        self.properties = {b"id": name.encode(), b"fp": FP.encode(), b"fleet": fleet,
                           b"v": b"1", **{k.encode(): v for k, v in txt.items()}}
        self.text = text

    def parsed_addresses(self) -> list[str]:
        return [self._ip]


class ExplodingInfo:
    port = 51820
    text = b""

    def parsed_addresses(self) -> list[str]:
        raise RuntimeError("hostile record")

    @property
    def properties(self) -> dict[bytes, bytes]:
        raise RuntimeError("hostile record")


class FakeZeroconf:
    def __init__(self) -> None:
        self.infos: dict[str, Any] = {}
        self.calls: list[str] = []

    def get_service_info(self, type_: str, name: str, timeout: int) -> Any:
        assert type_ == SERVICE_TYPE and 0 < timeout <= 5000
        self.calls.append(name)
        return self.infos.get(name)


def fq(name: str) -> str:
    return f"{name}.{SERVICE_TYPE}"


async def settle(disc: _Discovery) -> None:
    with trio.fail_after(5):
        while disc.pending or disc.in_flight:
            await trio.sleep(0.01)


async def test_discovery_tracks_adds_updates_removals_and_counts_garbage() -> None:
    zc = FakeZeroconf()
    me = LanAdvert("home-1", "f1", FP, UNDERLAY, 51820)
    changes: list[frozenset[Neighbour]] = []
    stats: Counter[str] = Counter()
    disc = _Discovery(zc, me, changes.append, stats, now=lambda: 5.0)
    zc.infos = {fq("home-2"): FakeInfo("home-2", "10.201.1.12"),
                fq("home-3"): FakeInfo("home-3", "10.201.1.13", port=51821),
                fq("evil"): FakeInfo("evil", "10.201.2.50"),              # outside the subnet
                fq("other"): FakeInfo("other", "10.201.1.20", fleet=b"f2"),
                fq("boom"): ExplodingInfo()}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(disc.run)

            def from_thread(name: object, change: str) -> None:
                trio.from_thread.run_sync(disc.note, name, change)

            for name in [fq("home-2"), fq("home-3"), fq("evil"), fq("other"), fq("boom"),
                         fq("home-1"), "Bad!." + SERVICE_TYPE, fq("ghost"), 12]:
                await trio.to_thread.run_sync(from_thread, name, "added")
            await settle(disc)
            last = changes[-1]
            assert {(n.name, str(n.ipv4), n.port) for n in last} == {
                ("home-2", "10.201.1.12", 51820), ("home-3", "10.201.1.13", 51821)}
            assert stats["malformed-address"] == 1 and stats["other-fleet"] == 1
            assert stats["malformed-record"] == 1 and stats["malformed-name"] == 2
            assert stats["self"] == 1 and stats["resolve-timeout"] == 1  # ghost
            assert stats["added"] == 2

            # an update that changes the port is reported; one that changes nothing is not
            n_changes = len(changes)
            zc.infos[fq("home-2")] = FakeInfo("home-2", "10.201.1.12", port=40000)
            disc.note(fq("home-2"), "added")
            await settle(disc)
            assert len(changes) == n_changes + 1
            assert {n.port for n in changes[-1] if n.name == "home-2"} == {40000}
            disc.note(fq("home-2"), "added")
            await settle(disc)
            assert len(changes) == n_changes + 1 and stats["seen"] == 1

            # an advert that turns invalid drops the neighbour
            zc.infos[fq("home-3")] = FakeInfo("home-3", "10.201.1.13", v=b"9")
            disc.note(fq("home-3"), "added")
            await settle(disc)
            assert {n.name for n in changes[-1]} == {"home-2"}
            assert stats["malformed-version"] == 1

            # goodbye / expiry
            disc.note(fq("home-2"), "removed")
            disc.note(fq("never-seen"), "removed")  # ignored, not resolved
            await settle(disc)
            assert changes[-1] == frozenset() and stats["removed"] == 1
            assert fq("never-seen") not in zc.calls
            nursery.cancel_scope.cancel()


async def test_discovery_coalesces_events_and_bounds_pending() -> None:
    zc = FakeZeroconf()
    me = LanAdvert("home-1", "f1", FP, UNDERLAY, 51820)
    stats: Counter[str] = Counter()
    disc = _Discovery(zc, me, lambda s: None, stats, now=lambda: 0.0)
    # not running yet: events only queue up
    for _ in range(5):
        disc.note(fq("home-2"), "added")
    disc.note(fq("home-2"), "removed")
    assert disc.pending == {"home-2": (fq("home-2"), "removed")}
    for i in range(MAX_PENDING + 10):
        disc.note(fq(f"spam-{i}"), "added")
    assert len(disc.pending) == MAX_PENDING and stats["dropped-flood"] == 11
    disc.note(fq("home-2"), "added")  # a name already pending is still updated
    assert disc.pending["home-2"][1] == "added"
