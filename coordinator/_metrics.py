"""Prometheus metrics of the coordinator (`GET /metrics`, docs/metrics.md): one module.

Two halves. `ApiMetrics` is what the process counts as it goes (API request latency by route
template, method and status class; blob bytes served; peer-map fan-out latency) and
`snapshot` reads the fleet as the store and the service see it at scrape time (devices
online/offline, reported peer paths, handshake ages, peer-map versions, rollout states, the
figures the agents' reports carry).
`exposition` writes both in the Prometheus text format (version 0.0.4), in a fixed order, so
tests compare exact text. Nothing here asks a device anything: every per-device figure comes
from the reports the agents send anyway.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh.control import PATH_KINDS, WAN_PURPOSES
from mesh.rollout import ROLLOUT_STATES

from ._model import DeviceState
from ._service import FleetService

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# API latency buckets (seconds). The peer-map long poll's duration is its wait (up to
# 1800 s, routes/devices.py MAX_WAIT), hence the long tail.
API_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                      120.0, 600.0, 1800.0)
# Age of a direct path's last handshake as of the scrape (seconds). WireGuard re-handshakes
# every 2 minutes on a live session; reports go up by exception, so ages of hours are normal
# at rest (docs/api.md, `GET /api/v1/devices/{name}/peers`).
# Peer-map fan-out (seconds): from a batch's first change to a waiting device's answer; at
# least the batch window (0.2 s by default, coordinator._service.BATCH_WINDOW).
FANOUT_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HANDSHAKE_BUCKETS: Final = (30.0, 120.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)
UNMATCHED_ROUTE: Final = "unmatched"
# Methods kept as labels; any other (a client may send any token) is "other", so nobody can
# grow the label set (and the process's memory) by inventing methods.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class HistogramData:
    """Cumulative-ready counts per bucket bound (not cumulative: `counts[i]` is the number of
    observations in (bounds[i-1], bounds[i]]; the last slot is above every bound)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: name, type, help, and its samples as (labels, value) or, for a
    histogram, (labels, HistogramData)."""

    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    samples: tuple[tuple[Labels, float], ...] = ()
    histograms: tuple[tuple[Labels, HistogramData], ...] = ()


def exposition(families: Iterable[Family]) -> str:
    """The Prometheus text format of `families`, in the order given."""
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {fam.help.replace(chr(92), chr(92) * 2)}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            out.append(f"{fam.name}{_labels(labels)} {_number(value)}")
        for labels, hist in fam.histograms:
            running = 0
            for bound, count in zip((*hist.bounds, math.inf), hist.counts, strict=True):
                running += count
                out.append(f"{fam.name}_bucket{_labels((*labels, ('le', _number(bound))))} "
                           f"{running}")
            out.append(f"{fam.name}_sum{_labels(labels)} {_number(hist.total)}")
            out.append(f"{fam.name}_count{_labels(labels)} {running}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- counted as it goes


class ApiMetrics:
    """What the process counts while it serves: request latency per (route template, method,
    status class), the blob bytes it sent, and peer-map fan-out (FleetService.fanout_observer).
    One per app; trio runs the app on one thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.requests: dict[Labels, HistogramData] = {}
        self.blob_bytes_served = 0
        self.fanout = HistogramData(FANOUT_BUCKETS)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (("route", route), ("method", method if method in METHODS else "other"),
               ("code", f"{status // 100}xx"))
        hist = self.requests.get(key)
        if hist is None:
            hist = self.requests[key] = HistogramData(API_BUCKETS)
        hist.observe(seconds)

    def blob_sent(self, count: int) -> None:
        self.blob_bytes_served += count

    def families(self) -> list[Family]:
        return [
            Family("fleetmesh_api_request_duration_seconds", "histogram",
                   "API request time to the end of the answer (a long poll's: its wait)",
                   histograms=tuple(sorted(self.requests.items()))),
            Family("fleetmesh_peermap_fanout_seconds", "histogram",
                   "From a peer-map batch's first change to each waiting long poll's answer",
                   histograms=(((), self.fanout),)),
            Family("fleetmesh_blob_served_bytes_total", "counter",
                   "Blob bytes sent by GET /api/v1/blobs/{id} since the process started",
                   samples=(((), float(self.blob_bytes_served)),)),
        ]


class MetricsMiddleware:
    """ASGI middleware: times every HTTP request to the end of its answer and files it under
    the route template Starlette matched (`scope["route"]`), or `unmatched`."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = self.metrics.clock()
        status = 500
        done = False

        def record() -> None:
            nonlocal done
            if done:
                return
            done = True
            route = getattr(scope.get("route"), "path", None)
            self.metrics.observe(route if isinstance(route, str) else UNMATCHED_ROUTE,
                                 scope["method"], status, self.metrics.clock() - start)

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                record()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            record()  # an exception, or a client gone before the last piece


# --------------------------------------------------------------------------- read at scrape time


@dataclass(frozen=True, slots=True)
class DeviceFigures:
    """One device as a scrape sees it."""

    name: str
    fleet: str
    state: str  # "online" | "offline" | "revoked" | "provisioned"
    peermap_version: int | None = None  # active devices only
    paths: Mapping[str, int] = field(default_factory=dict)  # PATH_KINDS -> count
    handshake_ages: tuple[float, ...] = ()  # of its direct paths that report one
    wan_bytes: Mapping[str, int] = field(default_factory=dict)  # newest day: purpose -> bytes
    wan_budget: tuple[int, int] | None = None  # (limit, used)


@dataclass(frozen=True, slots=True)
class Snapshot:
    devices: tuple[DeviceFigures, ...]
    rollouts: Mapping[tuple[str, str], int]  # (fleet, state) -> count


DEVICE_STATES: Final = ("online", "offline", "revoked", "provisioned")


def snapshot(service: FleetService) -> Snapshot:
    """The fleet now, from the store and the service's own view (online, peer-map versions)."""
    now = service.settings.clock()
    devices: list[DeviceFigures] = []
    for d in service.store.list_devices():
        if d.state is DeviceState.ACTIVE:
            summary = service.path_summary(d)
            paths = dict(summary.kinds)
            ages = [max(0.0, now - t) for t in summary.direct_handshakes]
            newest = max(d.wan_bytes) if d.wan_bytes else None
            devices.append(DeviceFigures(
                d.name, d.fleet, "online" if service.online(d) else "offline",
                service.core.version(d.name), paths, tuple(ages),
                dict(d.wan_bytes[newest]) if d.wan_bytes and newest is not None else {},
                (d.wan_budget.limit, d.wan_budget.used) if d.wan_budget else None))
        else:
            devices.append(DeviceFigures(d.name, d.fleet, d.state.value))
    rollouts: dict[tuple[str, str], int] = {}
    for r in service.store.rollouts():
        rollouts[(r.fleet, r.state)] = rollouts.get((r.fleet, r.state), 0) + 1
    return Snapshot(tuple(sorted(devices, key=lambda f: (f.fleet, f.name))), rollouts)


def fleet_families(snap: Snapshot) -> list[Family]:
    """The scrape-time families. Every fleet that has a device (or a rollout) gets a sample
    for every state and kind, zeros included, so a query sees a count drop to 0."""
    fleets = sorted({f.fleet for f in snap.devices} | {fl for fl, _ in snap.rollouts})
    by_state = {(fl, s): 0 for fl in fleets for s in DEVICE_STATES}
    paths = {(fl, k): 0 for fl in fleets for k in PATH_KINDS}
    ages = {(("fleet", fl),): HistogramData(HANDSHAKE_BUCKETS) for fl in fleets}
    for dev in snap.devices:
        by_state[(dev.fleet, dev.state)] += 1
        for kind, count in dev.paths.items():
            paths[(dev.fleet, kind)] += count
        for age in dev.handshake_ages:
            ages[(("fleet", dev.fleet),)].observe(age)
    active = [d for d in snap.devices if d.peermap_version is not None]
    return [
        Family("fleetmesh_devices", "gauge",
               "Devices by state (online, offline: active devices)",
               samples=tuple(((("fleet", fl), ("state", s)), float(by_state[(fl, s)]))
                             for fl in fleets for s in DEVICE_STATES)),
        Family("fleetmesh_devices_online", "gauge", "Active devices online now",
               samples=tuple(((("fleet", fl),), float(by_state[(fl, "online")]))
                             for fl in fleets)),
        Family("fleetmesh_paths", "gauge",
               "Peer paths as active devices last reported them",
               samples=tuple(((("fleet", fl), ("kind", k)), float(paths[(fl, k)]))
                             for fl in fleets for k in PATH_KINDS)),
        Family("fleetmesh_handshake_age_seconds", "histogram",
               "Age of reported direct paths' last handshake",
               histograms=tuple(sorted(ages.items()))),
        Family("fleetmesh_peermap_version", "gauge",
               "Published peer-map version of each active device",
               samples=tuple(((("fleet", d.fleet), ("device", d.name)),
                              float(d.peermap_version or 0)) for d in active)),
        Family("fleetmesh_rollouts", "gauge", "Rollouts by state",
               samples=tuple(((("fleet", fl), ("state", s)),
                              float(snap.rollouts.get((fl, s), 0)))
                             for fl in fleets for s in ROLLOUT_STATES)),
        Family("fleetmesh_device_wan_bytes", "gauge",
               "WAN bytes of the newest UTC day in the device's report",
               samples=tuple(((("fleet", d.fleet), ("device", d.name), ("purpose", p)),
                              float(d.wan_bytes.get(p, 0)))
                             for d in active if d.wan_bytes for p in WAN_PURPOSES)),
        Family("fleetmesh_device_wan_budget_bytes", "gauge",
               "WAN budget limit and use, from the device's report",
               samples=tuple(((("fleet", d.fleet), ("device", d.name), ("figure", fig)),
                              float(val))
                             for d in active if d.wan_budget is not None
                             for fig, val in (("limit", d.wan_budget[0]),
                                              ("used", d.wan_budget[1])))),
    ]


def render(service: FleetService, api: ApiMetrics) -> str:
    return exposition([*fleet_families(snapshot(service)), *api.families()])
