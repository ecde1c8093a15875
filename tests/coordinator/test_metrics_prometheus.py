"""A real Prometheus (Debian's `prometheus` package, installed by scripts/setup) scrapes a real
`fleetmesh coordinator serve --metrics-token-file` over HTTPS with that scrape token, trusting
exactly the coordinator's certificate; its HTTP API answers the number of online devices and
direct paths, and the count drops when a device's agent stops (its last report says so:
docs/api.md).
Prometheus runs on 127.0.0.1 with a temporary config and data directory, stopped by PID."""

from __future__ import annotations

import json
import re
import secrets
import ssl
import time
from pathlib import Path
from typing import Final

import httpx

from tests.coordinator_process import free_port, running_coordinator
from tests.prometheus import (
    EXAMPLES,
    READY_SECONDS,
    Prometheus,
    running_prometheus,
    scrape_config,
    until,
)
from vpn import generate_keypair

DASHBOARD: Final = EXAMPLES / "grafana" / "fleetmesh.json"
# A stopping agent's last report makes its device offline at once; Prometheus scrapes every
# second: the drop shows after a few scrapes.
CHANGE_SECONDS: Final = 30.0


def _dashboard_queries_hold(prom: Prometheus, exposed: str) -> None:
    """Every query of the example Grafana dashboard is PromQL this Prometheus accepts, and
    names only metric families the coordinator exposes."""
    families = set(re.findall(r"^# TYPE (\S+) ", exposed, re.MULTILINE))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][0]["definition"]
                 .replace("label_values(", "group by (fleet) (").replace(", fleet)", ")"))
    assert len(exprs) > 10
    for expr in exprs:
        prom.query(expr.replace("$fleet", ".*"))  # status "success", else it fails
        for name in re.findall(r"fleetmesh_[a-z_]+", expr):
            assert re.sub(r"_(bucket|count|sum)$", "", name) in families, (name, expr)


def test_prometheus_scrapes_online_devices_and_sees_one_stop(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics.token"
    token_file.write_text(secrets.token_hex(32) + "\n")
    with running_coordinator(tmp_path / "coord", tmp_path / "coord.log",
                             "--metrics-token-file", str(token_file)) as coord, \
            httpx.Client(base_url=coord.url, timeout=10, verify=ssl.create_default_context(
                cafile=str(coord.data / "tls.crt"))) as api:
        op = {"Authorization": f"Bearer {coord.api_key}"}
        devices: dict[str, tuple[str, str]] = {}  # name -> (credential, public key)
        for name in ("a", "b"):
            r = api.post("/api/v1/tokens", json={"fleet": "f"}, headers=op)
            assert r.status_code == 201, r.text
            keys = generate_keypair()
            r = api.post("/api/v1/enroll", json={
                "token": r.json()["token"], "public_key": keys.public, "name": name,
                "agent_version": "test"})
            assert r.status_code == 201, r.text
            devices[name] = (r.json()["credential"], keys.public)

        def report(name: str, peer: str, stopping: bool = False) -> None:
            """What an agent sends: its path to the other device, direct (and, the last
            time before it stops, `stopping`)."""
            r = api.post("/api/v1/device/state", headers={
                "Authorization": f"Bearer {devices[name][0]}"}, json={"peers": [{
                    "public_key": devices[peer][1], "path": "direct",
                    "endpoint": "203.0.113.5:51820", "last_handshake": time.time()}],
                    "stopping": stopping})
            assert r.status_code == 204, r.text

        report("a", "b")
        report("b", "a")
        config = scrape_config(coord.url.removeprefix("https://"), coord.data / "tls.crt",
                               token_file)
        with running_prometheus(tmp_path / "prom", config, port=free_port()) as prom:
            until("the scrape succeeds", READY_SECONDS,
                   lambda: prom.value('up{job="fleetmesh"}') == 1)
            until("2 devices online", READY_SECONDS,
                   lambda: prom.value('fleetmesh_devices_online{fleet="f"}') == 2)
            assert prom.value('fleetmesh_paths{fleet="f",kind="direct"}') == 2
            assert prom.value('fleetmesh_devices{fleet="f",state="offline"}') == 0
            _dashboard_queries_hold(prom, api.get("/metrics", headers=op).text)

            # b's agent stops: its last report says so, and a few scrapes later b is offline
            # (a's last report is well within the online window)
            report("b", "a", stopping=True)
            until("1 device online after b stopped", CHANGE_SECONDS,
                  lambda: prom.value('fleetmesh_devices_online{fleet="f"}') == 1)
            assert prom.value('fleetmesh_devices{fleet="f",state="offline"}') == 1
            # the API says the same: b is the one offline
            listed = api.get("/api/v1/devices", params={"fleet": "f"}, headers=op).json()
            assert {d["name"]: d["online"] for d in listed["devices"]} == {"a": True,
                                                                           "b": False}
            # the scrape went through the token, counted like any API request
            assert (prom.value('sum(fleetmesh_api_request_duration_seconds_count'
                                 '{route="/metrics",code="2xx"})') or 0) >= 1
