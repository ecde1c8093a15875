"""App logs go up only while someone reads them (issue 14, "reports by exception"): the peer
map's `logs_wanted_until` says until when; otherwise they stay in the agent's bounded buffer,
except the last lines of an app that fails. On trio's autojump clock with a fake coordinator."""

from __future__ import annotations

from collections.abc import Callable

import trio

from agent import CoordinatorLink, DataDir
from agent._applogs import LogBuffer
from agent._uploads import FAILURE_TAIL_LINES, LOG_UPLOAD_INTERVAL, LogUploader
from mesh.control import LogLine

from .fakes import FakeClient, FakeCoordinator


class LogCoordinator(FakeCoordinator):
    def __init__(self) -> None:
        super().__init__()
        self.uploads: list[tuple[float, list[LogLine], int]] = []  # (when, lines, dropped)


class LogClient(FakeClient):
    coord: LogCoordinator

    async def upload_logs(self, lines: list[LogLine], dropped: int = 0) -> None:
        await self._gate()
        self.coord.uploads.append((trio.current_time(), list(lines), dropped))


def uploaded(coord: LogCoordinator) -> list[str]:
    return [x.line for _, lines, _ in coord.uploads for x in lines]


def link_to(enrolled: DataDir, coord: LogCoordinator) -> CoordinatorLink:
    def factory(url: str, credential: str, cert: bytes) -> LogClient:
        return LogClient(coord, url, credential, cert)

    return CoordinatorLink(enrolled.read_identity(), factory, hub_up=lambda: False,
                           log=lambda m: None)


async def until(condition: Callable[[], bool]) -> None:
    """Until `condition()` holds, looking every 10 ms of virtual time (the caller's deadline)."""
    while not condition():
        await trio.sleep(0.01)


async def test_logs_go_up_only_while_wanted(enrolled: DataDir,
                                            autojump_clock: trio.abc.Clock) -> None:
    coord = LogCoordinator()
    link = link_to(enrolled, coord)
    buffer = LogBuffer(max_lines=100)
    wanted = [False]
    uploader = LogUploader(link, buffer, lambda m: None, lambda: wanted[0])
    for i in range(3):
        buffer.append(LogLine(float(i), "web", "stdout", f"web {i}"))
    buffer.append(LogLine(9.0, "db", "stdout", "db 0"))
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            await trio.sleep(600)  # nobody reads them: kept, nothing sent
            assert coord.uploads == [] and len(buffer) == 4

            # someone reads them (a new peer map says so): all of them, then every 2 s
            wanted[0] = True
            asked = trio.current_time()
            uploader.wake()
            await until(lambda: len(coord.uploads) == 1)
            assert coord.uploads[0][0] - asked < 1
            assert uploaded(coord) == ["web 0", "web 1", "web 2", "db 0"]
            buffer.append(LogLine(10.0, "web", "stderr", "web 3"))
            await until(lambda: len(coord.uploads) == 2)
            assert uploaded(coord)[-1] == "web 3"
            assert coord.uploads[1][0] - coord.uploads[0][0] <= LOG_UPLOAD_INTERVAL + 0.1

            # the reader left (the map's deadline passed): kept again
            wanted[0] = False
            await trio.sleep(LOG_UPLOAD_INTERVAL + 1)
            sent = len(coord.uploads)
            buffer.append(LogLine(11.0, "web", "stdout", "web 4"))
            await trio.sleep(600)
            assert len(coord.uploads) == sent and len(buffer) == 1
            nursery.cancel_scope.cancel()
    assert uploader.uploads == 2


async def test_a_failing_app_ships_its_last_lines_unasked(enrolled: DataDir,
                                                          autojump_clock: trio.abc.Clock
                                                          ) -> None:
    coord = LogCoordinator()
    link = link_to(enrolled, coord)
    buffer = LogBuffer(max_lines=1000)
    for i in range(FAILURE_TAIL_LINES + 20):
        buffer.append(LogLine(float(i), "web", "stdout", f"web {i}"))
        buffer.append(LogLine(float(i), "db", "stdout", f"db {i}"))
    uploader = LogUploader(link, buffer, lambda m: None, lambda: False)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(uploader.run)
            await trio.sleep(60)
            assert coord.uploads == []
            uploader.ship_tail("web")
            await until(lambda: len(coord.uploads) == 1)
            await trio.sleep(60)
            nursery.cancel_scope.cancel()
    # the newest FAILURE_TAIL_LINES of that app, oldest first; nothing of the other app
    assert uploaded(coord) == [f"web {i}" for i in range(20, FAILURE_TAIL_LINES + 20)]
    lines, _ = buffer.take(1000)  # the rest is kept, in order
    assert [x["line"] for x in lines] == \
        [f"{app} {i}" for i in range(FAILURE_TAIL_LINES + 20) for app in ("web", "db")
         if app == "db" or i < 20]
