"""The coordinator link on its own: validated targets, revocation, errors logged once."""

from __future__ import annotations

from typing import Any

import trio

from agent import CoordinatorLink, DataDir
from agent._link import UNREACHABLE_AFTER, ErrorOnce
from mesh.control import DeviceTarget

from .fakes import FakeClient, FakeCoordinator


class TargetsClient(FakeClient):
    answer: list[dict[str, Any]] = []

    async def targets(self) -> list[dict[str, Any]]:
        await self._gate()
        return self.answer


def link(enrolled: DataDir, coord: FakeCoordinator, logs: list[str]) -> CoordinatorLink:
    def factory(url: str, credential: str, cert: bytes) -> TargetsClient:
        return TargetsClient(coord, url, credential, cert)

    return CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: False,
                           log=logs.append)


def test_error_once_logs_each_distinct_error_and_the_recovery_once() -> None:
    logs: list[str] = []
    errors = ErrorOnce(logs.append, 30)
    for message in ("report: down", "report: down", "report: refused", "report: refused"):
        errors.failed(message)
    errors.ok("report: delivered again")
    errors.ok("report: delivered again")
    assert logs == ["report: down; retrying every 30 s", "report: refused; retrying every 30 s",
                    "report: delivered again"]


async def test_targets_are_validated_and_bad_entries_left_out(enrolled: DataDir) -> None:
    logs: list[str] = []
    coord = FakeCoordinator()
    TargetsClient.answer = [
        {"app": "web", "version": 2, "pin": None, "force": True, "retry": 1},
        {"app": "web", "version": 3},  # the same app twice: the first one counts
        {"app": "db", "version": "7"},  # not a version
        {"app": "cam", "version": 1},  # an older coordinator: no force, no retry
    ]
    ours = link(enrolled, coord, logs)
    with trio.fail_after(5):
        for _ in range(2):
            assert await ours.targets() == [DeviceTarget("web", 2, None, True, 1),
                                            DeviceTarget("cam", 1)]
    assert len([m for m in logs if m.startswith("targets: ignoring")]) == 1  # once


async def failed_calls(ours: CoordinatorLink, errors: ErrorOnce, calls: int = 2) -> list[bool]:
    """`failed()` of each of `calls` failing targets calls (True: revoked)."""
    out: list[bool] = []
    with trio.fail_after(5):
        for _ in range(calls):
            try:
                await ours.targets()
            except Exception as exc:  # noqa: BLE001 - whatever the SDK raises
                out.append(ours.failed(exc, errors, "targets"))
    return out


async def test_a_401_revokes_once_and_other_errors_do_not(enrolled: DataDir) -> None:
    logs: list[str] = []
    coord = FakeCoordinator()
    ours = link(enrolled, coord, logs)
    errors = ErrorOnce(logs.append, 2)
    coord.down = True
    assert await failed_calls(ours, errors) == [False, False]
    assert not ours.revoked
    assert sum("targets: cannot reach" in m for m in logs) == 1
    coord.down, coord.revoked = False, True
    assert await failed_calls(ours, errors) == [True, True]
    assert ours.revoked and sum("revoked" in m for m in logs) == 1


async def test_a_401_without_the_revoked_marker_is_an_error_not_a_revocation(
        enrolled: DataDir) -> None:
    """Somebody's enrollment under our name (or any unknown credential) is no revocation."""
    logs: list[str] = []
    coord = FakeCoordinator()
    coord.unknown_credential = True
    ours = link(enrolled, coord, logs)
    assert await failed_calls(ours, ErrorOnce(logs.append, 2)) == [False, False]
    assert not ours.revoked
    assert sum("without saying the device was revoked" in m for m in logs) == 1


class BlobClient(TargetsClient):
    """Records which client (connection pool) each call used."""

    calls: list[tuple[str, int]] = []

    async def blob(self, blob_id: str, start: int | None = None, end: int | None = None
                   ) -> bytes:
        self.calls.append(("blob", id(self)))
        return b"x" * ((end or 1) - (start or 0))

    async def targets(self) -> list[dict[str, Any]]:
        self.calls.append(("targets", id(self)))
        return []


async def test_seed_downloads_use_clients_of_their_own(enrolled: DataDir) -> None:
    coord = FakeCoordinator()
    made: list[BlobClient] = []

    def factory(url: str, credential: str, cert: bytes) -> BlobClient:
        made.append(BlobClient(coord, url, credential, cert))
        return made[-1]

    BlobClient.calls = []
    lk = CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: False,
                         log=lambda _m: None)
    assert await lk.blob("ab" * 32, 0, 4) == b"xxxx"
    await lk.targets()
    await lk.blob("ab" * 32, 4, 8)
    await lk.targets()
    (blob_client,) = {c for what, c in BlobClient.calls if what == "blob"}
    (control_client,) = {c for what, c in BlobClient.calls if what == "targets"}
    # a bulk transfer never holds up a control call on one connection pool
    assert blob_client != control_client and len(made) == 2
    await lk.aclose()
    assert all(c.closed for c in made)


class DownClient(TargetsClient):
    down = True

    async def targets(self) -> list[dict[str, Any]]:
        if DownClient.down:
            raise OSError("connection refused")
        return []


async def test_the_coordinator_is_unreachable_after_calls_in_a_row_go_unanswered(
        enrolled: DataDir) -> None:
    coord = FakeCoordinator()
    seen: list[bool] = []

    def factory(url: str, credential: str, cert: bytes) -> DownClient:
        return DownClient(coord, url, credential, cert)

    lk = CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: False,
                         log=lambda _m: None)
    lk.reachability.append(seen.append)
    DownClient.down = True
    for i in range(UNREACHABLE_AFTER):
        assert lk.reachable and seen == [], i
        try:
            await lk.targets()
        except OSError:
            pass
    assert not lk.reachable and seen == [False]  # told once
    DownClient.down = False
    await lk.targets()
    assert lk.reachable and seen == [False, True]
