"""A real coordinator on 127.0.0.1:0 (no hub) and httpx clients that trust its certificate."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator._server import Coordinator, CoordinatorConfig
from tests.pgserver import PgServer, running_server
from tests.s3server import S3Server
from vpn import generate_keypair


class Clock:
    """A coordinator's wall clock (`CoordinatorConfig.clock`), moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def client_for(coord: Coordinator, secret: str | None = None) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=str(coord.cert_path))
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.AsyncClient(base_url=coord.url, verify=ctx, headers=headers, timeout=40)


@dataclass
class Enrolled:
    name: str
    public_key: str
    credential: str
    enrollment: dict[str, Any]
    client: httpx.AsyncClient


class Harness:
    def __init__(self, coord: Coordinator, op: httpx.AsyncClient, anon: httpx.AsyncClient):
        self.coord, self.op, self.anon = coord, op, anon
        self._clients: list[httpx.AsyncClient] = []

    async def token(self, fleet: str = "fleet", **kw: Any) -> str:
        r = await self.op.post("/api/v1/tokens", json={"fleet": fleet, **kw})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    async def enroll(self, name: str, fleet: str = "fleet", lan: list[str] | None = None,
                     token: str | None = None) -> Enrolled:
        keys = generate_keypair()
        r = await self.anon.post("/api/v1/enroll", json={
            "token": token or await self.token(fleet), "public_key": keys.public, "name": name,
            "lan_endpoints": lan or [], "agent_version": "test"})
        assert r.status_code == 201, r.text
        body = r.json()
        client = client_for(self.coord, body["credential"])
        self._clients.append(client)
        return Enrolled(body["name"], keys.public, body["credential"], body, client)

    async def aclose(self) -> None:
        for c in self._clients:
            await c.aclose()


@asynccontextmanager
async def running_harness(config: CoordinatorConfig) -> AsyncIterator[Harness]:
    """A coordinator started with `config` and its harness (for tests that need settings)."""
    async with Coordinator(config) as c, client_for(c, c.operator_key) as op, \
            client_for(c) as anon:
        harness = Harness(c, op, anon)
        try:
            yield harness
        finally:
            await harness.aclose()


@pytest.fixture
async def coord(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Coordinator]:
    """On SQLite; on PostgreSQL (a database of the session's server) when the environment
    says FLEETMESH_TEST_STORE=postgresql: the whole API suite on the other store, on demand
    (scripts/test runs the store's own tests on both either way)."""
    store = None
    if os.environ.get("FLEETMESH_TEST_STORE") == "postgresql":
        store = request.getfixturevalue("pg_server").new_database()
    config = CoordinatorConfig(data_dir=tmp_path / "coord", listen="127.0.0.1:0", hub=False,
                               batch_window=0.05, store=store)
    async with Coordinator(config) as c:
        yield c


@pytest.fixture
async def h(coord: Coordinator) -> AsyncIterator[Harness]:
    async with client_for(coord, coord.operator_key) as op, client_for(coord) as anon:
        harness = Harness(coord, op, anon)
        try:
            yield harness
        finally:
            await harness.aclose()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One private PostgreSQL for the session (tests/pgserver.py); each test that needs it
    takes a database of its own (`pg_server.new_database()`). Stopped by PID at the end, also
    when a test failed."""
    with running_server() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One private S3-compatible server for the session (tests/s3server.py); each test that
    needs it makes a bucket of its own. Stopped by PID at the end, also when a test failed."""
    server = S3Server()
    try:
        server.start()
        yield server
    finally:
        server.stop()
