"""A device that knows several coordinator replicas (docs/scale.md, "Replicas"): `join` takes
every replica's URL and enrolls on the first that connects, the identity keeps the others (and
those the enrollment names), and the link fails over to them on a failure to connect, never
on an answer, remembering which one answered."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent import CoordinatorLink, DataDir, _commands
from agent.cli import main
from mesh.control import Enrollment
from mesh.release import SignedRoot
from ops.client import ApiError, CoordinatorUnreachable
from tests.agent.conftest import URL
from tests.agent.fakes import enrollment

TOKEN = "fm1." + "ab" * 32 + ".s3cretS3cretS3cret"
R2, R3 = "https://198.51.100.2:8443", "https://198.51.100.3:8443"


class Replicas:
    """Fake SDK clients per URL: the URLs in `down` do not connect; `refuse` answer 404."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.down: set[str] = set()
        self.refuse: set[str] = set()

    def factory(self, url: str, credential: str, cert_der: bytes) -> Any:
        rec = self

        class Client:
            async def manifest(self, fleet: str, app: str, version: int) -> bytes:
                rec.calls.append(url)
                if url in rec.down:
                    raise CoordinatorUnreachable(f"cannot reach the coordinator at {url}")
                if url in rec.refuse:
                    raise ApiError(404, "no such release")
                return url.encode()

            async def aclose(self) -> None:
                pass

        return Client()


def replica_link(enrolled: DataDir, rec: Replicas) -> CoordinatorLink:
    identity = dataclasses.replace(enrolled.read_identity(), urls=(R2, R3))
    enrolled.write_identity(identity)
    return CoordinatorLink(enrolled.read_identity(), rec.factory, hub_up=lambda: False,
                           log=lambda m: None)


async def test_a_replica_that_does_not_connect_passes_the_call_to_the_next(
        enrolled: DataDir) -> None:
    rec = Replicas()
    lk = replica_link(enrolled, rec)
    assert await lk.manifest("cams", "cam", 1) == URL.encode()
    rec.down.add(URL)
    assert await lk.manifest("cams", "cam", 1) == R2.encode()
    assert await lk.manifest("cams", "cam", 1) == R2.encode()  # R2 answered: asked first
    assert rec.calls == [URL, URL, R2, R2]


async def test_an_answer_even_an_error_is_final(enrolled: DataDir) -> None:
    rec = Replicas()
    rec.refuse.add(URL)
    lk = replica_link(enrolled, rec)
    with pytest.raises(ApiError):
        await lk.manifest("cams", "cam", 1)
    assert rec.calls == [URL]


class EnrollOn:
    """The SDK's enroll: the URLs in `down` do not connect; the enrollment names R3 too."""

    def __init__(self, *down: str) -> None:
        self.down, self.tried = set(down), list[str]()

    async def __call__(self, url: str, token: str, public_key: str, name: str | None,
                       lan: tuple[str, ...], version: str, *, private_key: str | None = None,
                       platform: str = "") -> tuple[Enrollment, bytes, SignedRoot | None]:
        self.tried.append(url)
        if url in self.down:
            raise CoordinatorUnreachable(f"cannot reach the coordinator at {url}")
        e = dataclasses.replace(enrollment(name or "home-0"), urls=(URL, R2, R3))
        return e, b"DER", None


def test_join_enrolls_on_the_first_replica_that_connects_and_keeps_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = EnrollOn(URL)
    monkeypatch.setattr(_commands, "sdk_enroll", lambda: fake)
    data = tmp_path / "d"
    assert main(["join", f"{URL},{R2}/", "--token", TOKEN, "--data", str(data),
                 "--lan-endpoint", "10.0.0.2:51820"]) == 0
    assert fake.tried == [URL, R2]
    identity = DataDir(data).read_identity()
    assert (identity.url, identity.urls) == (R2, (URL, R3))


def test_a_device_json_with_urls_and_a_bad_url_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake = EnrollOn()
    monkeypatch.setattr(_commands, "sdk_enroll", lambda: fake)
    conf = tmp_path / "device.json"
    conf.write_text(f'{{"url": "{URL}", "urls": ["{URL}", "{R2}"], "token": "{TOKEN}"}}')
    assert main(["join", "--config", str(conf), "--data", str(tmp_path / "d"),
                 "--lan-endpoint", "10.0.0.2:51820"]) == 0
    assert fake.tried == [URL]
    assert DataDir(tmp_path / "d").read_identity().urls == (R2, R3)
    capsys.readouterr()
    assert main(["join", f"{URL},http://x:1", "--token", TOKEN,
                 "--data", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "URL:" in err[0] and "https" in err[0]
