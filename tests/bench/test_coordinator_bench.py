"""`scripts/bench coordinator --store postgresql://… --replicas 2`, tiny: two replicas on a
fresh database, the long polls spread over both, every poller answered for every change."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from bench import coordinator
from tests.pgserver import PgServer, running_server


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with running_server() as server:
        yield server


async def test_two_replicas_answer_every_poller_and_leave_no_database(pg: PgServer) -> None:
    row = await coordinator.run_size(30, 6, store=pg.url(), replica_count=2, changes=3)
    assert row["n"] == 30 and row["pollers"] == 6
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert row["answer_bytes"] < 2000  # deltas, not maps
    with psycopg.connect(pg.url()) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE "
                            "'fm_bench_%'").fetchall()
    assert left == []


def test_replicas_need_a_database(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        coordinator.main(["--replicas", "2"])
    assert exit_.value.code == 2 and "--store" in capsys.readouterr().err
