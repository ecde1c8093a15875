"""Incremental peer maps over HTTP: `delta=1` gets the changes since the version held, the SDK
applies them (and falls back to the full map), and agents that do not ask get full maps."""

from __future__ import annotations

import ssl

import trio

from coordinator._openapi import openapi_document
from mesh.control import PeerMap, PeerMapDelta, peermap_answer
from mesh.meter import metered
from ops.client import DeviceClient

from .conftest import Enrolled, Harness


async def _settled(dev: Enrolled) -> PeerMap:
    """The device's map once its batch published (a 304 after a short wait)."""
    m = PeerMap.from_json((await dev.client.get("/api/v1/device/peermap",
                                                params={"wait": 0})).json())
    while True:
        r = await dev.client.get("/api/v1/device/peermap",
                                 params={"version": m.version, "wait": 0.3})
        if r.status_code == 304:
            return m
        m = PeerMap.from_json(r.json())


async def test_a_device_that_asks_gets_only_the_changes(h: Harness) -> None:
    devs = [await h.enroll(f"d{i}", lan=[f"192.168.1.{i + 10}:51820"]) for i in range(6)]
    a = devs[0]
    with trio.fail_after(20):
        held = await _settled(a)
        r = await devs[3].client.post("/api/v1/device/state",
                                      json={"lan_endpoints": ["192.168.1.99:51820"]})
        assert r.status_code == 204
        r = await a.client.get("/api/v1/device/peermap",
                               params={"version": held.version, "wait": 10, "delta": 1})
        assert r.status_code == 200
        delta = peermap_answer(r.json())
        assert isinstance(delta, PeerMapDelta) and delta.base == held.version
        # the answer has the documented shape (the API fuzzing cannot hold a map to ask with)
        schema = openapi_document()["components"]["schemas"]["PeerMapDelta"]
        assert set(schema["required"]) <= set(r.json()) <= set(schema["properties"])
        assert [p.name for p in delta.upsert] == ["d3"] and delta.remove == ()
        full = PeerMap.from_json((await a.client.get("/api/v1/device/peermap",
                                                     params={"wait": 0})).json())
        assert delta.apply(held) == full
        # without delta=1 (an agent that does not know deltas) the same question gets it whole
        r = await a.client.get("/api/v1/device/peermap",
                               params={"version": held.version, "wait": 0})
        assert "base" not in r.json() and PeerMap.from_json(r.json()) == full
        # a version this coordinator never handed out: the full map, delta or not
        r = await a.client.get("/api/v1/device/peermap",
                               params={"version": 5, "wait": 0, "delta": 1})
        assert PeerMap.from_json(r.json()) == full


async def test_delta_must_be_0_or_1(h: Harness) -> None:
    a = await h.enroll("a")
    for bad in ("2", "yes", "-1"):
        r = await a.client.get("/api/v1/device/peermap", params={"wait": 0, "delta": bad})
        assert r.status_code == 400 and "delta" in r.json()["error"]


async def test_the_sdk_keeps_the_held_map_with_deltas_and_they_cost_less(h: Harness) -> None:
    devs = [await h.enroll(f"d{i}") for i in range(40)]
    der = ssl.PEM_cert_to_DER_cert(h.coord.cert_path.read_text())
    incremental, whole = [0], [0]
    with trio.fail_after(30):
        async with DeviceClient(h.coord.url, devs[0].credential, der) as c:
            held = await _settled(devs[0])
            await h.enroll("late")  # one peer joins: the change is one entry
            with metered(lambda n: incremental.__setitem__(0, incremental[0] + n)):
                got = await c.peermap(held.version, 10, held=held)
            assert got is not None and "late" in {p.name for p in got.peers}
            with metered(lambda n: whole.__setitem__(0, whole[0] + n)):
                full = await c.peermap(0, 0)
            assert got == full
    # the delta is one entry and the head; the full map is 40 entries more
    assert incremental[0] * 4 < whole[0], (incremental, whole)
