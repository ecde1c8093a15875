"""Coordinator benchmark: enrollment rate and peer-map fan-out, 500 vs 5,000 devices.

    python -m bench.coordinator [--sizes 500,5000] [--pollers 200] [--full]

One in-process coordinator per size (no hub, loopback HTTPS, a fresh data directory), all
devices in ONE fleet (the worst case: every device's map lists every other device).
- enrollments/s: N enrollments over HTTPS by 16 concurrent clients (each enrollment also marks
  the whole fleet's maps: O(N) per enrollment by design).
- fan-out: P devices park a long poll (`wait=30`, `delta=1` as agents ask: docs/api.md,
  "Incremental peer maps"; `--full`: without, as agents did before deltas); one other device
  reports new LAN endpoints (all devices share one "public IP", 127.0.0.1, so everybody's
  entry for it changes); we time
  from the report's 204 to the last of the P `200` answers. That includes the batch window
  (200 ms, on purpose; "wake ms" is report -> waiters woken, the server-side latency the API
  promises to keep under 500 ms) and P answers going over TLS: with `--full` P full maps of N-1
  peers each, O(P x N) bytes, so the interesting ratio is time per (poller x peer); with deltas
  P answers of one changed entry each. "answer B" is the mean body of those P answers: the
  bytes per device for this change.
Client and server share one process and one core, so the client's TLS and JSON parsing are
counted too: the numbers are a pessimistic bound on the server.

Replicas (docs/scale.md, "Replicas"): `--store postgresql://USER@HOST:PORT/DB` runs each size
on a fresh database made beside DB (dropped after); `--replicas R` starts R coordinators on it
(in this process, sharing one identity), spreads the enrollments and the long polls over them
and makes the change on the first: the others hear it through the change feed. `--changes K`
times K changes, one after another (each poller parks again); "p50/p99 ms" are over every
poller's answer to every change, from the report's 204.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import trio

from coordinator._server import IDENTITY_FILES, Coordinator, CoordinatorConfig
from vpn import generate_keypair

ENROLL_CONCURRENCY = 16


@contextmanager
def fresh_database(store: str | None) -> Iterator[str | None]:
    """A new database beside the one `store` names (None: SQLite), dropped afterwards."""
    if store is None:
        yield None
        return
    name = f"fm_bench_{secrets.token_hex(4)}"
    with psycopg.connect(store, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(store)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(store, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@asynccontextmanager
async def replicas(tmp: Path, store: str | None, count: int) -> AsyncIterator[list[Coordinator]]:
    """`count` coordinators on one database, the later ones with the first one's identity."""
    config = CoordinatorConfig(data_dir=tmp / "r0", listen="127.0.0.1:0", hub=False,
                               store=store)
    async with AsyncExitStack() as stack:
        coords = [await stack.enter_async_context(Coordinator(config))]
        for k in range(1, count):
            data = tmp / f"r{k}"
            data.mkdir(mode=0o700)
            for name in IDENTITY_FILES:
                shutil.copy2(tmp / "r0" / name, data / name)
            coords.append(await stack.enter_async_context(
                Coordinator(dataclasses.replace(config, data_dir=data))))
        yield coords


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run_size(n: int, pollers: int, full: bool = False, store: str | None = None,
                   replica_count: int = 1, changes: int = 1) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp, \
            fresh_database(store) as db:
        async with replicas(Path(tmp), db, replica_count) as coords, AsyncExitStack() as st:
            coord = coords[0]
            ctx = ssl.create_default_context(cafile=str(coord.cert_path))
            limits = httpx.Limits(max_connections=pollers + 32,
                                  max_keepalive_connections=pollers + 32)
            clients = [await st.enter_async_context(httpx.AsyncClient(
                base_url=c.url, verify=ctx, limits=limits, timeout=120)) for c in coords]
            http = clients[0]
            op = {"Authorization": f"Bearer {coord.operator_key}"}
            r = await http.post("/api/v1/tokens", headers=op,
                                json={"fleet": "bench", "uses": n, "expires_in": 3600})
            token = r.json()["token"]
            keys = [generate_keypair().public for _ in range(n)]
            creds: list[str] = [""] * n

            async def enroller(start: int) -> None:
                on = clients[start % len(clients)]
                for i in range(start, n, ENROLL_CONCURRENCY):
                    r = await on.post("/api/v1/enroll", json={
                        "token": token, "public_key": keys[i], "name": f"d{i}",
                        "lan_endpoints": [f"192.168.{i // 250}.{i % 250 + 1}:51820"]})
                    assert r.status_code == 201, r.text
                    creds[i] = r.json()["credential"]

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for s in range(ENROLL_CONCURRENCY):
                    nursery.start_soon(enroller, s)
            enroll_s = time.perf_counter() - t0
            await trio.sleep(0.5)  # let the last batch publish
            with trio.fail_after(120):  # every replica heard every enrollment
                while any(len(c.service.core) < n for c in coords):
                    await trio.sleep(0.1)

            def auth(i: int) -> dict[str, str]:
                return {"Authorization": f"Bearer {creds[i]}"}

            # one map, alone: size and time
            t0 = time.perf_counter()
            r = await http.get("/api/v1/device/peermap", headers=auth(0),
                               params={"wait": 0})
            one_map_s = time.perf_counter() - t0
            map_bytes = len(r.content)

            def on(i: int) -> httpx.AsyncClient:  # pollers spread over the replicas
                return clients[i % len(clients)]

            versions: dict[int, int] = {}
            for i in range(1, pollers + 1):
                r = await on(i).get("/api/v1/device/peermap", headers=auth(i),
                                    params={"wait": 0})
                versions[i] = r.json()["version"]
            done_at: list[float] = []
            answer_bytes: list[int] = []
            latencies: list[float] = []
            delta = {} if full else {"delta": 1}

            async def poll(i: int, task_status: trio.TaskStatus[None]) -> None:
                task_status.started()
                r = await on(i).get("/api/v1/device/peermap", headers=auth(i),
                                    params={"version": versions[i], "wait": 30, **delta})
                assert r.status_code == 200, r.status_code
                body = json.loads(r.content)
                assert body["version"] != versions[i]
                assert ("base" in body) != full  # a delta exactly when asked for
                versions[i] = body["version"]
                answer_bytes.append(len(r.content))
                done_at.append(time.perf_counter())

            changer = n - 1
            woke_at: list[float] = []
            core = coord.service.core
            assert core is not None
            publish = core.publish

            def timed_publish(floor: int = 0) -> set[str]:
                names = publish(floor)
                if names:
                    woke_at.append(time.perf_counter())
                return names

            core.publish = timed_publish  # type: ignore[method-assign]
            for k in range(changes):
                done_at.clear()
                async with trio.open_nursery() as nursery:
                    for i in range(1, pollers + 1):
                        await nursery.start(poll, i)
                    # every poll is parked on a server once its waiter event exists
                    with trio.fail_after(60):
                        while sum(len(c.service._waiters)  # noqa: SLF001 (bench probe)
                                  for c in coords) < pollers:
                            await trio.sleep(0.01)
                    t_change = time.perf_counter()
                    if k == 0:
                        t0 = t_change
                    r = await http.post("/api/v1/device/state", headers=auth(changer),
                                        json={"lan_endpoints": [f"10.9.9.{k + 1}:51820"]})
                    assert r.status_code == 204
                latencies += [t - t_change for t in done_at]
                if k == 0:
                    fanout_s = max(done_at) - t0
                    first_s = min(done_at) - t0
    return {"n": n, "pollers": pollers, "wake_ms": (woke_at[0] - t0) * 1000,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000,
            "enroll_per_s": n / enroll_s, "enroll_s": enroll_s,
            "map_kib": map_bytes / 1024, "one_map_ms": one_map_s * 1000,
            "answer_bytes": sum(answer_bytes) / len(answer_bytes),
            "first_answer_ms": first_s * 1000, "fanout_ms": fanout_s * 1000,
            "us_per_poller_peer": fanout_s * 1e6 / (pollers * (n - 1))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coordinator")
    parser.add_argument("--sizes", default="500,5000")
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--full", action="store_true",
                        help="the long polls ask for full maps (no delta=1)")
    parser.add_argument("--store", metavar="URL",
                        help="postgresql://USER@HOST:PORT/DB: each size on a fresh database "
                             "made beside DB (default: SQLite)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="coordinators on the one database (needs --store)")
    parser.add_argument("--changes", type=int, default=1,
                        help="changes timed one after another (p50/p99 over all answers)")
    args = parser.parse_args(argv)
    if args.replicas < 1 or (args.replicas > 1 and not args.store) or args.changes < 1:
        parser.error("--replicas N (>= 1) above 1 needs --store postgresql://...; "
                     "--changes >= 1")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        pollers = min(args.pollers, n - 2)
        print(f"... {n} devices, {pollers} long polls, {args.replicas} replica(s) on "
              f"{'PostgreSQL' if args.store else 'SQLite'}", file=sys.stderr, flush=True)
        rows.append(trio.run(run_size, n, pollers, args.full, args.store, args.replicas,
                             args.changes))
    head = (f"{'devices':>8} {'polls':>6} {'enroll/s':>9} {'map KiB':>8} {'1 map ms':>9} "
            f"{'wake ms':>8} {'first 200 ms':>13} {'last 200 ms':>12} {'us/(poll*peer)':>15} "
            f"{'answer B':>9} {'p50 ms':>7} {'p99 ms':>7}")
    print(head)
    for r in rows:
        print(f"{r['n']:>8} {r['pollers']:>6} {r['enroll_per_s']:>9.0f} {r['map_kib']:>8.0f} "
              f"{r['one_map_ms']:>9.1f} {r['wake_ms']:>8.0f} {r['first_answer_ms']:>13.0f} "
              f"{r['fanout_ms']:>12.0f} {r['us_per_poller_peer']:>15.2f} "
              f"{r['answer_bytes']:>9.0f} {r['p50_ms']:>7.0f} {r['p99_ms']:>7.0f}")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        grow = b["n"] / a["n"]
        print(f"growth {a['n']}->{b['n']} (x{grow:g} devices): enroll/s x"
              f"{b['enroll_per_s'] / a['enroll_per_s']:.2f}, fan-out time x"
              f"{b['fanout_ms'] / a['fanout_ms']:.2f} (same pollers; each answer "
              f"x{b['answer_bytes'] / a['answer_bytes']:.2f}), per poller*peer x"
              f"{b['us_per_poller_peer'] / a['us_per_poller_peer']:.2f} (<= 1: linear or better), "
              f"p99 x{b['p99_ms'] / a['p99_ms']:.2f}; "
              f"answers are {'full maps' if args.full else 'deltas'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
