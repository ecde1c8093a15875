"""`GET /metrics` (coordinator/_metrics.py, docs/metrics.md): the exact exposition text of a
small fleet, the histogram and escaping rules, who may read it, and that a coordinator's
figures follow its devices' reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from coordinator._metrics import (
    ApiMetrics,
    DeviceFigures,
    Family,
    HistogramData,
    Snapshot,
    exposition,
    fleet_families,
)
from coordinator._server import CoordinatorConfig, CoordinatorConfigError, read_metrics_token
from tests.coordinator.conftest import Harness, client_for, running_harness


def _samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample line."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_exposition_of_a_small_fleet_is_exact() -> None:
    snap = Snapshot(
        devices=(
            DeviceFigures("a", "f", "online", 7, {"direct": 1, "relay": 1, "none": 0}, (10.0,),
                          {"wireguard": 100, "control": 5}, (1000, 105)),
            DeviceFigures("b", "f", "offline", 8, {"direct": 0, "relay": 0, "none": 0}),
            DeviceFigures("c", "f", "revoked"),
        ),
        rollouts={("f", "running"): 1})
    text = exposition(fleet_families(snap))
    expected = """\
# HELP fleetmesh_devices Devices by state (online, offline: active devices)
# TYPE fleetmesh_devices gauge
fleetmesh_devices{fleet="f",state="online"} 1
fleetmesh_devices{fleet="f",state="offline"} 1
fleetmesh_devices{fleet="f",state="revoked"} 1
fleetmesh_devices{fleet="f",state="provisioned"} 0
# HELP fleetmesh_devices_online Active devices online now
# TYPE fleetmesh_devices_online gauge
fleetmesh_devices_online{fleet="f"} 1
# HELP fleetmesh_paths Peer paths as active devices last reported them
# TYPE fleetmesh_paths gauge
fleetmesh_paths{fleet="f",kind="direct"} 1
fleetmesh_paths{fleet="f",kind="relay"} 1
fleetmesh_paths{fleet="f",kind="none"} 0
# HELP fleetmesh_handshake_age_seconds Age of reported direct paths' last handshake
# TYPE fleetmesh_handshake_age_seconds histogram
fleetmesh_handshake_age_seconds_bucket{fleet="f",le="30"} 1
fleetmesh_handshake_age_seconds_bucket{fleet="f",le="120"} 1
fleetmesh_handshake_age_seconds_bucket{fleet="f",le="300"} 1
fleetmesh_handshake_age_seconds_bucket{fleet="f",le="900"} 1
fleetmesh_handshake_age_seconds_bucket{fleet="f",le="3600"} 1
fleetmesh_handshake_age_seconds_bucket{fleet="f",le="21600"} 1
fleetmesh_handshake_age_seconds_bucket{fleet="f",le="86400"} 1
fleetmesh_handshake_age_seconds_bucket{fleet="f",le="+Inf"} 1
fleetmesh_handshake_age_seconds_sum{fleet="f"} 10
fleetmesh_handshake_age_seconds_count{fleet="f"} 1
# HELP fleetmesh_peermap_version Published peer-map version of each active device
# TYPE fleetmesh_peermap_version gauge
fleetmesh_peermap_version{fleet="f",device="a"} 7
fleetmesh_peermap_version{fleet="f",device="b"} 8
# HELP fleetmesh_rollouts Rollouts by state
# TYPE fleetmesh_rollouts gauge
fleetmesh_rollouts{fleet="f",state="held"} 0
fleetmesh_rollouts{fleet="f",state="running"} 1
fleetmesh_rollouts{fleet="f",state="paused"} 0
fleetmesh_rollouts{fleet="f",state="halted"} 0
fleetmesh_rollouts{fleet="f",state="aborted"} 0
fleetmesh_rollouts{fleet="f",state="done"} 0
# HELP fleetmesh_device_wan_bytes WAN bytes of the newest UTC day in the device's report
# TYPE fleetmesh_device_wan_bytes gauge
fleetmesh_device_wan_bytes{fleet="f",device="a",purpose="wireguard"} 100
fleetmesh_device_wan_bytes{fleet="f",device="a",purpose="control"} 5
fleetmesh_device_wan_bytes{fleet="f",device="a",purpose="gossip"} 0
fleetmesh_device_wan_bytes{fleet="f",device="a",purpose="blobs"} 0
fleetmesh_device_wan_bytes{fleet="f",device="a",purpose="logs"} 0
# HELP fleetmesh_device_wan_budget_bytes WAN budget limit and use, from the device's report
# TYPE fleetmesh_device_wan_budget_bytes gauge
fleetmesh_device_wan_budget_bytes{fleet="f",device="a",figure="limit"} 1000
fleetmesh_device_wan_budget_bytes{fleet="f",device="a",figure="used"} 105
"""
    assert text == expected


def test_histograms_are_cumulative_and_label_values_escaped() -> None:
    hist = HistogramData((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    fam = Family("fleetmesh_x_seconds", "histogram", "h \\ elp",
                 histograms=(((("route", 'a"b\\c\nd'),), hist),))
    assert exposition([fam]) == (
        "# HELP fleetmesh_x_seconds h \\\\ elp\n"
        "# TYPE fleetmesh_x_seconds histogram\n"
        'fleetmesh_x_seconds_bucket{route="a\\"b\\\\c\\nd",le="0.1"} 2\n'
        'fleetmesh_x_seconds_bucket{route="a\\"b\\\\c\\nd",le="1"} 3\n'
        'fleetmesh_x_seconds_bucket{route="a\\"b\\\\c\\nd",le="+Inf"} 4\n'
        'fleetmesh_x_seconds_sum{route="a\\"b\\\\c\\nd"} 3.65\n'
        'fleetmesh_x_seconds_count{route="a\\"b\\\\c\\nd"} 4\n')


def test_api_metrics_file_requests_by_route_method_and_status_class() -> None:
    api = ApiMetrics()
    api.observe("/api/v1/devices/{name}", "GET", 200, 0.02)
    api.observe("/api/v1/devices/{name}", "GET", 404, 0.001)
    api.observe("/api/v1/devices/{name}", "GET", 204, 0.3)
    for i in range(100):  # invented methods all land in one series
        api.observe("unmatched", f"X{i}", 405, 0.001)
    api.blob_sent(10)
    api.blob_sent(5)
    s = _samples(exposition(api.families()))
    base = 'fleetmesh_api_request_duration_seconds_count{route="/api/v1/devices/{name}"'
    assert s[base + ',method="GET",code="2xx"}'] == 2
    assert s[base + ',method="GET",code="4xx"}'] == 1
    assert s['fleetmesh_api_request_duration_seconds_count{route="unmatched",method="other",'
             'code="4xx"}'] == 100
    assert len(api.requests) == 3
    assert s["fleetmesh_blob_served_bytes_total"] == 15


async def test_only_the_operator_reads_metrics(h: Harness) -> None:
    dev = await h.enroll("a")
    r = await h.anon.get("/metrics")
    assert r.status_code == 401 and "operator API key" in r.json()["error"]
    assert (await dev.client.get("/metrics")).status_code == 403
    async with httpx.AsyncClient(base_url=h.coord.url, verify=False,
                                 headers={"Authorization": "Bearer fmo_wrong"}) as bad:
        assert (await bad.get("/metrics")).status_code == 401
    r = await h.op.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


async def test_metrics_follow_the_devices_reports(tmp_path: Path) -> None:
    """Online goes with the clock past the online window; paths and WAN bytes come from the
    reports; the request that asked for a device is timed under its route template."""
    now = [1_800_000_000.0]
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            clock=lambda: now[0])) as h:
        a = await h.enroll("a")
        b = await h.enroll("b")
        await h.enroll("c", fleet="other")
        r = await a.client.post("/api/v1/device/state", json={
            "peers": [{"public_key": b.public_key, "path": "direct",
                       "endpoint": "203.0.113.5:4000", "last_handshake": now[0] - 50}],
            "wan_bytes": {"2027-01-15": {"wireguard": 900, "blobs": 40},
                          "2027-01-14": {"wireguard": 1}}})
        assert r.status_code == 204, r.text
        r = await b.client.post("/api/v1/device/state", json={
            "peers": [{"public_key": a.public_key, "path": "relay"}]})
        assert r.status_code == 204, r.text
        assert (await h.op.get("/api/v1/devices/a")).status_code == 200

        s = _samples((await h.op.get("/metrics")).text)
        assert s['fleetmesh_devices_online{fleet="fleet"}'] == 2
        assert s['fleetmesh_devices_online{fleet="other"}'] == 0  # enrolled, never reported
        assert s['fleetmesh_devices{fleet="other",state="offline"}'] == 1
        assert s['fleetmesh_paths{fleet="fleet",kind="direct"}'] == 1
        assert s['fleetmesh_paths{fleet="fleet",kind="relay"}'] == 1
        assert s['fleetmesh_handshake_age_seconds_bucket{fleet="fleet",le="30"}'] == 0
        assert s['fleetmesh_handshake_age_seconds_bucket{fleet="fleet",le="120"}'] == 1
        assert s['fleetmesh_device_wan_bytes{fleet="fleet",device="a",purpose="wireguard"}'] \
            == 900
        assert s['fleetmesh_device_wan_bytes{fleet="fleet",device="a",purpose="blobs"}'] == 40
        assert s['fleetmesh_api_request_duration_seconds_count{route="/api/v1/devices/{name}",'
                 'method="GET",code="2xx"}'] == 1
        assert s['fleetmesh_api_request_duration_seconds_count{route="/api/v1/device/state",'
                 'method="POST",code="2xx"}'] == 2

        now[0] += 61  # b stops reporting; a reports again, now with its path to b relayed
        r = await a.client.post("/api/v1/device/state", json={
            "peers": [{"public_key": b.public_key, "path": "relay"}]})
        assert r.status_code == 204, r.text
        r = await h.op.post("/api/v1/devices/c/revoke")
        assert r.status_code == 200
        s = _samples((await h.op.get("/metrics")).text)
        assert s['fleetmesh_devices_online{fleet="fleet"}'] == 1
        assert s['fleetmesh_devices{fleet="fleet",state="offline"}'] == 1
        assert s['fleetmesh_devices{fleet="other",state="revoked"}'] == 1
        assert s['fleetmesh_devices{fleet="other",state="offline"}'] == 0
        # a's new report replaces its paths; b's last report stands
        assert s['fleetmesh_paths{fleet="fleet",kind="relay"}'] == 2
        assert s['fleetmesh_paths{fleet="fleet",kind="direct"}'] == 0
        assert s['fleetmesh_handshake_age_seconds_count{fleet="fleet"}'] == 0


async def test_fanout_counts_a_waiting_poll_answered_by_a_new_map(h: Harness) -> None:
    """A long poll that waits when a change to its map is published is one fan-out sample,
    no shorter than the batch window; a poll that finds a newer map at once is none."""
    a = await h.enroll("a")
    b = await h.enroll("b")
    await trio.sleep(0.2)  # let the enrollments' batch settle
    version = (await a.client.get("/api/v1/device/peermap",
                                  params={"wait": 0})).json()["version"]
    s = _samples((await h.op.get("/metrics")).text)
    assert s["fleetmesh_peermap_fanout_seconds_count"] == 0

    answered: list[int] = []

    async def poll() -> None:
        r = await a.client.get("/api/v1/device/peermap", params={"version": version,
                                                                 "wait": 30})
        answered.append(r.status_code)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await _until(lambda: "a" in h.coord.service._waiters)
            r = await b.client.post("/api/v1/device/state",
                                    json={"lan_endpoints": ["192.168.1.11:51820"]})
            assert r.status_code == 204
    assert answered == [200]
    s = _samples((await h.op.get("/metrics")).text)
    assert s["fleetmesh_peermap_fanout_seconds_count"] == 1
    assert s["fleetmesh_peermap_fanout_seconds_sum"] >= 0.05  # the fixture's batch window
    # a poll with an old version answers at once: no fan-out
    r = await a.client.get("/api/v1/device/peermap", params={"version": version, "wait": 5})
    assert r.status_code == 200
    s = _samples((await h.op.get("/metrics")).text)
    assert s["fleetmesh_peermap_fanout_seconds_count"] == 1


async def _until(ready: Callable[[], object]) -> None:
    """Until `ready()` is truthy (a bounded wait: the caller's fail_after)."""
    while not ready():
        await trio.sleep(0.01)


async def test_a_scrape_token_reads_metrics_and_nothing_else(tmp_path: Path) -> None:
    token_file = tmp_path / "scrape.token"
    token = "0123456789abcdef" * 4
    token_file.write_text(token + "\n")
    async with running_harness(CoordinatorConfig(
            data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False, batch_window=0.05,
            metrics_token_file=token_file)) as h:
        scraper = client_for(h.coord, token)
        async with scraper:
            r = await scraper.get("/metrics")
            assert r.status_code == 200 and "fleetmesh_devices_online" in r.text
            r = await scraper.get("/api/v1/devices")
            assert r.status_code == 403 and "/metrics only" in r.json()["error"]
            assert (await scraper.post("/api/v1/tokens",
                                       json={"fleet": "f"})).status_code == 403
        async with client_for(h.coord, "9" * 64) as wrong:
            assert (await wrong.get("/metrics")).status_code == 401
        assert (await h.op.get("/metrics")).status_code == 200  # the operator key still does


@pytest.mark.parametrize("content", ["short", "x" * 300, "fmo_" + "a" * 40, "two words" * 8,
                                     ""])
def test_a_bad_scrape_token_file_is_one_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "scrape.token"
    path.write_text(content)
    with pytest.raises(CoordinatorConfigError) as err:
        read_metrics_token(path)
    assert str(err.value).startswith(f"--metrics-token-file {path}: must hold one token")
    with pytest.raises(CoordinatorConfigError, match="No such file"):
        read_metrics_token(tmp_path / "absent")
