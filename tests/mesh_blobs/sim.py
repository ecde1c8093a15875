"""A pure-Python discrete-event simulation of blob exchange: LANs of devices, each running a
`BlobScheduler`, a coordinator seed, and transfers whose time depends on whether they cross the
WAN. Each transfer gets the configured per-transfer rate (jittered by a seeded `random.Random`);
shared-link contention is not modelled.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mesh.blobsched import (
    COORDINATOR,
    Action,
    Announce,
    BlobScheduler,
    Cancel,
    Fetch,
    SchedConfig,
)

LAN_LATENCY = 0.002  # s, one-way, for announcements
WAN_LATENCY = 0.08
MAX_EVENTS = 2_000_000


@dataclass
class SimResult:
    finished_at: dict[str, float]  # device -> time it completed
    wan_fetches: Counter[int]  # LAN index -> fetches issued across the WAN by its devices
    lan_fetches: Counter[int]
    coordinator_fetches: int
    bad_deliveries: int
    end: float
    fetch_log: list[tuple[float, str, Fetch]] = field(default_factory=list)

    def complete(self, devices: Sequence[str]) -> bool:
        return all(d in self.finished_at for d in devices)


class FleetSim:
    def __init__(self, lans: int, per_lan: int, blobs: Mapping[bytes, int], *,
                 config: SchedConfig, rogues: Sequence[str] = (), seed: int = 0,
                 start_spread: float = 1.0) -> None:
        self.rng = random.Random(seed)
        self.config = config
        self.blobs = dict(blobs)
        self.rogues = set(rogues)
        self.lan_of: dict[str, int] = {}
        for i in range(lans):
            for j in range(per_lan):
                self.lan_of[f"lan{i}-dev{j}"] = i
        self.devices = sorted(self.lan_of)
        self.nodes = {d: BlobScheduler(d, config=config) for d in self.devices}
        self.held: dict[str, set[bytes]] = {d: set() for d in self.devices}
        self.queue: list[tuple[float, int, str, tuple[object, ...]]] = []
        self.seq = 0
        self.transfers: dict[tuple[str, bytes, str], int] = {}  # live transfer -> token
        self.ticks: dict[str, set[float]] = {d: set() for d in self.devices}
        self.result = SimResult({}, Counter(), Counter(), 0, 0, 0.0)
        for d in self.devices:
            self._push(self.rng.uniform(0.0, start_spread), "start", (d,))

    def _push(self, t: float, kind: str, payload: tuple[object, ...]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, kind, payload))

    def _wan(self, a: str, b: str) -> bool:
        return b == COORDINATOR or self.lan_of[a] != self.lan_of[b]

    def _apply(self, d: str, actions: list[Action], now: float) -> None:
        for a in actions:
            if isinstance(a, Fetch):
                self.result.fetch_log.append((now, d, a))
                wan = self._wan(d, a.source)
                if wan:
                    self.result.wan_fetches[self.lan_of[d]] += 1
                else:
                    self.result.lan_fetches[self.lan_of[d]] += 1
                if a.source == COORDINATOR:
                    self.result.coordinator_fetches += 1
                rate = self.config.wan_rate if wan else self.config.lan_rate
                duration = a.size / rate * self.rng.uniform(0.7, 1.3)
                self.seq += 1
                self.transfers[(d, a.blob_id, a.source)] = self.seq
                self._push(now + duration, "done", (d, a.blob_id, a.source, self.seq))
            elif isinstance(a, Cancel):
                self.transfers.pop((d, a.blob_id, a.source), None)
            elif isinstance(a, Announce):
                for other in self.devices:
                    if other != d:
                        lat = WAN_LATENCY if self._wan(d, other) else LAN_LATENCY
                        self._push(now + lat, "have", (other, d, a.blob_ids, a.complete))
        node = self.nodes[d]
        if node.complete and node.wanted and d not in self.result.finished_at:
            self.result.finished_at[d] = now
        deadline = node.next_deadline()
        if deadline is not None and deadline not in self.ticks[d]:
            self.ticks[d].add(deadline)
            self._push(max(deadline, now), "tick", (d, deadline))

    def run(self, until: float = 1e7) -> SimResult:
        events = 0
        while self.queue and events < MAX_EVENTS:
            now, _, kind, p = heapq.heappop(self.queue)
            if now > until:
                break
            events += 1
            if kind == "start":
                (d,) = p
                node = self.nodes[d]
                lan = [x for x in self.devices if x != d and self.lan_of[x] == self.lan_of[d]]
                wan = [x for x in self.devices if self.lan_of[x] != self.lan_of[d]]
                self._apply(d, node.set_peers(lan, wan, now), now)
                self._apply(d, node.want(self.blobs, now), now)
            elif kind == "have":
                d, src, ids, complete = p
                assert isinstance(d, str) and isinstance(src, str)
                self._apply(d, self.nodes[d].on_have(src, ids, bool(complete), now), now)
            elif kind == "tick":
                d, deadline = p
                assert isinstance(d, str)
                self.ticks[d].discard(deadline)  # type: ignore[arg-type]
                self._apply(d, self.nodes[d].tick(now), now)
            elif kind == "done":
                d, blob, src, token = p
                assert isinstance(d, str) and isinstance(blob, bytes) and isinstance(src, str)
                if self.transfers.get((d, blob, src)) != token:
                    continue  # cancelled
                del self.transfers[(d, blob, src)]
                if src != COORDINATOR and blob not in self.held[src]:
                    self._apply(d, self.nodes[d].on_failed(src, blob, now), now)
                    continue
                ok = src not in self.rogues
                if not ok:
                    self.result.bad_deliveries += 1
                else:
                    self.held[d].add(blob)
                self._apply(d, self.nodes[d].on_received(src, blob, ok, now), now)
            self.result.end = now
        return self.result
