"""A real Prometheus (Debian's `prometheus` package, installed by scripts/setup) scrapes a real
`fleetmesh coordinator serve --metrics-token-file` over HTTPS with that scrape token, trusting
exactly the coordinator's certificate; its HTTP API answers the number of online devices and
direct paths, and the count drops when a device stops reporting (after the online window:
docs/api.md).
Prometheus runs on 127.0.0.1 with a temporary config and data directory, stopped by PID."""

from __future__ import annotations

import json
import re
import secrets
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from tests.coordinator_process import (
    RunningCoordinator,
    free_port,
    running_coordinator,
)
from tests.procs import stop
from vpn import generate_keypair

PROMETHEUS: Final = Path("/usr/bin/prometheus")
EXAMPLES: Final = Path(__file__).parents[2] / "examples"
EXAMPLE: Final = EXAMPLES / "prometheus" / "prometheus.yml"
DASHBOARD: Final = EXAMPLES / "grafana" / "fleetmesh.json"
READY_SECONDS: Final = 60.0
# The coordinator counts a device online for 60 s after its last report (ONLINE_WINDOW);
# Prometheus scrapes every second: a drop shows within the window plus a few scrapes.
CHANGE_SECONDS: Final = 150.0


def _until(what: str, seconds: float, probe: Callable[[], Any]) -> Any:
    """`probe()`'s first truthy answer within `seconds` (a bounded wait, not a timing claim)."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {seconds:.0f} s (last answer: {last!r})")


@contextmanager
def running_prometheus(work: Path, coord: RunningCoordinator, token_file: Path
                       ) -> Iterator[str]:
    """A private Prometheus scraping `coord` every second with the scrape token in
    `token_file`: yields its base URL."""
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} missing: run scripts/setup (it installs Debian's "
                    "prometheus package)")
    port = free_port()
    work.mkdir()
    config = work / "prometheus.yml"
    # the example scrape job (examples/prometheus/prometheus.yml) with this run's paths,
    # address and a 1 s interval: the example itself is what gets tested
    text = EXAMPLE.read_text()
    for old, new in (("credentials_file: /etc/prometheus/fleetmesh.token",
                      f"credentials_file: {token_file}"),
                     ("ca_file: /etc/prometheus/fleetmesh.crt",
                      f"ca_file: {coord.data / 'tls.crt'}"),
                     ("203.0.113.10:8443", coord.url.removeprefix("https://")),
                     ("scrape_interval: 15s", "scrape_interval: 1s\n  scrape_timeout: 1s")):
        assert text.count(old) == 1, f"{EXAMPLE} no longer has {old!r} once"
        text = text.replace(old, new)
    config.write_text(text)
    log_path = work / "prometheus.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}",
             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"prometheus exited with {proc.returncode}: "
                                f"{log.read()[-2000:]}")
                try:
                    return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            _until("prometheus ready", READY_SECONDS, ready)
            yield url
        finally:
            stop(proc, 20)


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _value(prom: str, expr: str) -> float | None:
    """The single sample `expr` gives now, or None while it gives none."""
    result = _query(prom, expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def _dashboard_queries_hold(prom: str, exposed: str) -> None:
    """Every query of the example Grafana dashboard is PromQL this Prometheus accepts, and
    names only metric families the coordinator exposes."""
    families = set(re.findall(r"^# TYPE (\S+) ", exposed, re.MULTILINE))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][0]["definition"]
                 .replace("label_values(", "group by (fleet) (").replace(", fleet)", ")"))
    assert len(exprs) > 10
    for expr in exprs:
        _query(prom, expr.replace("$fleet", ".*"))  # status "success", else it fails
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

        def report(name: str, peer: str) -> None:
            """What an agent sends: its path to the other device, direct."""
            r = api.post("/api/v1/device/state", headers={
                "Authorization": f"Bearer {devices[name][0]}"}, json={"peers": [{
                    "public_key": devices[peer][1], "path": "direct",
                    "endpoint": "203.0.113.5:51820", "last_handshake": time.time()}]})
            assert r.status_code == 204, r.text

        report("a", "b")
        report("b", "a")
        with running_prometheus(tmp_path / "prom", coord, token_file) as prom:
            _until("the scrape succeeds", READY_SECONDS,
                   lambda: _value(prom, 'up{job="fleetmesh"}') == 1)
            _until("2 devices online", READY_SECONDS,
                   lambda: _value(prom, 'fleetmesh_devices_online{fleet="f"}') == 2)
            assert _value(prom, 'fleetmesh_paths{fleet="f",kind="direct"}') == 2
            assert _value(prom, 'fleetmesh_devices{fleet="f",state="offline"}') == 0
            _dashboard_queries_hold(prom, api.get("/metrics", headers=op).text)

            # b's agent stops; a's goes on reporting (every 10 s, as while it works)
            last = 0.0

            def a_alone_online() -> bool:
                nonlocal last
                if time.monotonic() - last > 10:
                    report("a", "b")
                    last = time.monotonic()
                return _value(prom, 'fleetmesh_devices_online{fleet="f"}') == 1

            _until("1 device online after b stopped", CHANGE_SECONDS, a_alone_online)
            assert _value(prom, 'fleetmesh_devices{fleet="f",state="offline"}') == 1
            # the API says the same: b is the one offline
            listed = api.get("/api/v1/devices", params={"fleet": "f"}, headers=op).json()
            assert {d["name"]: d["online"] for d in listed["devices"]} == {"a": True,
                                                                           "b": False}
            # the scrape went through the token, counted like any API request
            assert (_value(prom, 'sum(fleetmesh_api_request_duration_seconds_count'
                                 '{route="/metrics",code="2xx"})') or 0) >= 1
