"""A private, real Prometheus (Debian's `prometheus` package, installed by scripts/setup) for
tests: the example scrape job of examples/prometheus/prometheus.yml with a test's target,
certificate and token, a temporary data directory, stopped by PID.

    config = scrape_config("198.51.100.2:8443", ca_file, token_file)
    with running_prometheus(work, config) as prom:        # on this host's loopback
        until("online", 60, lambda: prom.value('fleetmesh_devices_online{fleet="f"}') == 2)

A lab test runs it in a lab node instead: `spawn` starts the argv there and `fetch` asks its
HTTP API from there (tests/lab/test_mesh_fleet.py).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Final

import httpx
import pytest

from tests.procs import stop

PROMETHEUS: Final = Path("/usr/bin/prometheus")
EXAMPLES: Final = Path(__file__).parents[1] / "examples"
EXAMPLE: Final = EXAMPLES / "prometheus" / "prometheus.yml"
READY_SECONDS: Final = 60.0
PORT: Final = 9090  # Prometheus's own default; tests on the host pass a free port

# (url, query parameters) -> (HTTP status, body)
Fetch = Callable[[str, dict[str, str]], tuple[int, str]]
Spawn = Callable[[Sequence[str], IO[Any]], "subprocess.Popen[Any]"]


def until(what: str, seconds: float, probe: Callable[[], Any]) -> Any:
    """`probe()`'s first truthy answer within `seconds` (a bounded wait, not a timing claim)."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {seconds:.0f} s (last answer: {last!r})")


def scrape_config(target: str, ca_file: Path, token_file: Path) -> str:
    """The example scrape job with this test's target (`host:port`), CA and token file, and a
    1 s interval: the example itself is what gets tested."""
    text = EXAMPLE.read_text()
    for old, new in (("credentials_file: /etc/prometheus/fleetmesh.token",
                      f"credentials_file: {token_file}"),
                     ("ca_file: /etc/prometheus/fleetmesh.crt", f"ca_file: {ca_file}"),
                     ("203.0.113.10:8443", target),
                     ("scrape_interval: 15s", "scrape_interval: 1s\n  scrape_timeout: 1s")):
        assert text.count(old) == 1, f"{EXAMPLE} no longer has {old!r} once"
        text = text.replace(old, new)
    return text


def _fetch_here(url: str, params: dict[str, str]) -> tuple[int, str]:
    try:
        r = httpx.get(url, params=params, timeout=5)
    except httpx.TransportError as exc:
        return 0, str(exc)
    return r.status_code, r.text


class Prometheus:
    def __init__(self, url: str, fetch: Fetch) -> None:
        self.url = url
        self.fetch = fetch

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, text = self.fetch(f"{self.url}/api/v1/query", {"query": expr})
        assert status == 200, (status, text)
        body = json.loads(text)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, expr: str) -> float | None:
        """The single sample `expr` gives now, or None while it gives none."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None


@contextmanager
def running_prometheus(work: Path, config: str, *, port: int = PORT,
                       spawn: Spawn | None = None, fetch: Fetch = _fetch_here
                       ) -> Iterator[Prometheus]:
    """Prometheus with `config` on 127.0.0.1:`port` (of the network namespace `spawn` starts
    it in: this host's by default), until it answers ready."""
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} missing: run scripts/setup (it installs Debian's "
                    "prometheus package)")
    work.mkdir()
    (work / "prometheus.yml").write_text(config)
    argv = [str(PROMETHEUS), f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"]
    with open(work / "prometheus.log", "w+") as log:
        proc = (spawn(argv, log) if spawn is not None
                else subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        try:
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"prometheus exited with {proc.returncode}: "
                                f"{log.read()[-2000:]}")
                return fetch(f"{url}/-/ready", {})[0] == 200

            until("prometheus ready", READY_SECONDS, ready)
            yield Prometheus(url, fetch)
        finally:
            stop(proc, 20)
