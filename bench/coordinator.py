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
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from coordinator._server import Coordinator, CoordinatorConfig
from vpn import generate_keypair

ENROLL_CONCURRENCY = 16


async def run_size(n: int, pollers: int, full: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
        config = CoordinatorConfig(data_dir=Path(tmp), listen="127.0.0.1:0", hub=False)
        async with Coordinator(config) as coord:
            ctx = ssl.create_default_context(cafile=str(coord.cert_path))
            limits = httpx.Limits(max_connections=pollers + 32,
                                  max_keepalive_connections=pollers + 32)
            async with httpx.AsyncClient(base_url=coord.url, verify=ctx, limits=limits,
                                         timeout=120) as http:
                op = {"Authorization": f"Bearer {coord.operator_key}"}
                r = await http.post("/api/v1/tokens", headers=op,
                                    json={"fleet": "bench", "uses": n, "expires_in": 3600})
                token = r.json()["token"]
                keys = [generate_keypair().public for _ in range(n)]
                creds: list[str] = [""] * n

                async def enroller(start: int) -> None:
                    for i in range(start, n, ENROLL_CONCURRENCY):
                        r = await http.post("/api/v1/enroll", json={
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

                def auth(i: int) -> dict[str, str]:
                    return {"Authorization": f"Bearer {creds[i]}"}

                # one map, alone: size and time
                t0 = time.perf_counter()
                r = await http.get("/api/v1/device/peermap", headers=auth(0),
                                   params={"wait": 0})
                one_map_s = time.perf_counter() - t0
                map_bytes = len(r.content)

                versions: dict[int, int] = {}
                for i in range(1, pollers + 1):
                    r = await http.get("/api/v1/device/peermap", headers=auth(i),
                                       params={"wait": 0})
                    versions[i] = r.json()["version"]
                parked = trio.Event()
                waiting = [pollers]
                done_at: list[float] = []
                answer_bytes: list[int] = []
                delta = {} if full else {"delta": 1}

                async def poll(i: int, task_status: trio.TaskStatus[None]) -> None:
                    task_status.started()
                    r = await http.get("/api/v1/device/peermap", headers=auth(i),
                                       params={"version": versions[i], "wait": 30, **delta})
                    assert r.status_code == 200, r.status_code
                    body = json.loads(r.content)
                    assert body["version"] != versions[i]
                    assert ("base" in body) != full  # a delta exactly when asked for
                    answer_bytes.append(len(r.content))
                    done_at.append(time.perf_counter())
                    waiting[0] -= 1

                changer = n - 1
                woke_at: list[float] = []
                core = coord.service.core
                assert core is not None
                publish = core.publish

                def timed_publish() -> set[str]:
                    names = publish()
                    if names:
                        woke_at.append(time.perf_counter())
                    return names

                core.publish = timed_publish  # type: ignore[method-assign]
                async with trio.open_nursery() as nursery:
                    for i in range(1, pollers + 1):
                        await nursery.start(poll, i)
                    # every poll is parked on the server once its waiter event exists
                    with trio.fail_after(60):
                        while len(coord.service._waiters) < pollers:  # noqa: SLF001 (bench probe)
                            await trio.sleep(0.01)
                    parked.set()
                    t0 = time.perf_counter()
                    r = await http.post("/api/v1/device/state", headers=auth(changer), json={
                        "lan_endpoints": ["10.9.9.9:51820"]})
                    assert r.status_code == 204
                fanout_s = max(done_at) - t0
                first_s = min(done_at) - t0
    return {"n": n, "pollers": pollers, "wake_ms": (woke_at[0] - t0) * 1000,
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
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        pollers = min(args.pollers, n - 2)
        print(f"... {n} devices, {pollers} long polls", file=sys.stderr, flush=True)
        rows.append(trio.run(run_size, n, pollers, args.full))
    head = (f"{'devices':>8} {'polls':>6} {'enroll/s':>9} {'map KiB':>8} {'1 map ms':>9} "
            f"{'wake ms':>8} {'first 200 ms':>13} {'last 200 ms':>12} {'us/(poll*peer)':>15} "
            f"{'answer B':>9}")
    print(head)
    for r in rows:
        print(f"{r['n']:>8} {r['pollers']:>6} {r['enroll_per_s']:>9.0f} {r['map_kib']:>8.0f} "
              f"{r['one_map_ms']:>9.1f} {r['wake_ms']:>8.0f} {r['first_answer_ms']:>13.0f} "
              f"{r['fanout_ms']:>12.0f} {r['us_per_poller_peer']:>15.2f} "
              f"{r['answer_bytes']:>9.0f}")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        grow = b["n"] / a["n"]
        print(f"growth {a['n']}->{b['n']} (x{grow:g} devices): enroll/s x"
              f"{b['enroll_per_s'] / a['enroll_per_s']:.2f}, fan-out time x"
              f"{b['fanout_ms'] / a['fanout_ms']:.2f} (same pollers; each answer "
              f"x{b['answer_bytes'] / a['answer_bytes']:.2f}), per poller*peer x"
              f"{b['us_per_poller_peer'] / a['us_per_poller_peer']:.2f} (<= 1: linear or better); "
              f"answers are {'full maps' if args.full else 'deltas'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
