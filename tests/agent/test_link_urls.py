"""Which URL each kind of coordinator call goes to (agent/_link.py CoordinatorLink): control
calls through the hub tunnel first, blob downloads on the join URL first (no WireGuard headers
on a release's bytes, issue 12), each falling back to the other, the blob side remembering
which one answered."""

from __future__ import annotations

from typing import Any

from agent import CoordinatorLink, DataDir
from tests.agent.conftest import URL
from tests.agent.fakes import HUB


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (url, call)
        self.down: set[str] = set()

    def factory(self, url: str, credential: str, cert_der: bytes) -> Any:
        rec = self

        class Client:
            async def _call(self, what: str) -> bytes:
                rec.calls.append((url, what))
                if url in rec.down:
                    raise OSError(f"{url}: connection refused")
                return b"x"

            async def blob(self, blob_id: str, start: int | None, end: int | None) -> bytes:
                return await self._call("blob")

            async def manifest(self, fleet: str, app: str, version: int) -> bytes:
                return await self._call("manifest")

            async def aclose(self) -> None:
                pass

        return Client()


def link(enrolled: DataDir, rec: Recorder, hub_up: bool = True) -> CoordinatorLink:
    return CoordinatorLink(enrolled.read_identity(), rec.factory, hub_up=lambda: hub_up,
                           log=lambda m: None)


async def test_blobs_go_direct_first_and_control_through_the_tunnel(enrolled: DataDir) -> None:
    rec = Recorder()
    lk = link(enrolled, rec)
    await lk.blob("ab" * 32, 0, 10)
    await lk.manifest("cams", "cam", 1)
    assert rec.calls == [(URL, "blob"), (HUB.api_url, "manifest")]


async def test_a_direct_url_that_does_not_answer_sends_blobs_through_the_tunnel(
        enrolled: DataDir) -> None:
    rec = Recorder()
    rec.down.add(URL)
    lk = link(enrolled, rec)
    await lk.blob("ab" * 32, 0, 10)
    await lk.blob("ab" * 32, 10, 20)  # the tunnel answered: asked first now
    assert rec.calls == [(URL, "blob"), (HUB.api_url, "blob"), (HUB.api_url, "blob")]


async def test_without_the_hub_every_call_takes_the_join_url(enrolled: DataDir) -> None:
    rec = Recorder()
    lk = link(enrolled, rec, hub_up=False)
    await lk.blob("ab" * 32, 0, 10)
    await lk.manifest("cams", "cam", 1)
    assert rec.calls == [(URL, "blob"), (URL, "manifest")]
