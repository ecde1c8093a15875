"""What the agent sends up besides the peer-map poll: its state report (LAN candidates, version,
paths, app states) and the app containers' log lines.

    reporter = Reporter(link, make_report, log)   # reporter.wake(): something worth reporting
    uploader = LogUploader(link, applier.logs, log)

Both loops end when the coordinator refuses the credential (the device was revoked) and never
for anything else: a failed call is logged once per distinct error and retried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

import trio

from mesh.control import MAX_LOG_LINES, ControlError, DeviceReport, LogLine

from ._link import CoordinatorLink, ErrorOnce, Log

# A heartbeat only: what changes (paths, LAN candidates, app state) is reported at once, and
# "online" comes from the hub's WireGuard session (docs/api.md). Each report is a TLS request
# over a metered link, so the idle rate is low (docs/gossip.md "Idle cost").
REPORT_INTERVAL: Final = 300.0
# While a release is in flight (an app downloading, loading or switching over) the operator
# watches the rollout: a report reaches the coordinator at least every 30 s even when nothing
# moves (a download stalled behind a slow link reports no progress). 10 s leaves room for one
# attempt cut at its deadline (agent/_link.py CALL_TIMEOUT) before 30 s are up. Waiting for the
# app's update lock is no work in flight: it may last an hour (a recording), its start and end
# are reported at once, and 10 s reports for that long would cost a metered link ~1 MB/h.
ROLLOUT_REPORT_INTERVAL: Final = 10.0
SETTLED_STATES: Final = frozenset({"idle", "running", "failed", "waiting-lock"})
MIN_REPORT_SPACING: Final = 1.0  # path flaps cannot turn into a report storm
LOG_UPLOAD_INTERVAL: Final = 2.0  # app log lines go up in batches, at most this often


class LogSource(Protocol):
    """The applier's log buffer (agent/_applogs.py LogBuffer)."""

    def take(self, max_lines: int) -> tuple[list[dict[str, Any]], int]: ...

    def put_back(self, lines: Iterable[dict[str, Any]], dropped: int) -> None: ...


def in_flight(report: DeviceReport) -> bool:
    """The report shows a release on its way (an app downloading, loading, switching...)."""
    return any(a.state not in SETTLED_STATES for a in report.apps)


class Reporter:
    """Sends `make_report()` every `interval` (every ROLLOUT_REPORT_INTERVAL while a release is
    in flight), and at once (at most every MIN_REPORT_SPACING) after `wake()`. Each attempt is
    bounded by the link's per-call deadline, so nothing queues a report for long."""

    def __init__(self, link: CoordinatorLink, make_report: Callable[[], DeviceReport],
                 log: Log, interval: float = REPORT_INTERVAL) -> None:
        self.link = link
        self.make_report = make_report
        self.log = log
        self.interval = interval
        self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        errors = ErrorOnce(self.log, self.interval)
        while not self.link.revoked:
            sent_at = trio.current_time()
            report = self.make_report()
            try:
                await self.link.report(report)
            except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
                if self.link.failed(exc, errors, "report"):
                    return
            else:
                errors.ok("report: delivered again")
            interval = min(self.interval, ROLLOUT_REPORT_INTERVAL) if in_flight(report) \
                else self.interval
            with trio.move_on_at(sent_at + interval):
                await self._wake.wait()
            self._wake = trio.Event()
            spent = trio.current_time() - sent_at
            if spent < MIN_REPORT_SPACING:
                await trio.sleep(MIN_REPORT_SPACING - spent)


class LogUploader:
    """The app's log lines to the coordinator; kept (within the buffer's bound) while it
    cannot be reached."""

    def __init__(self, link: CoordinatorLink, buffer: LogSource, log: Log) -> None:
        self.link = link
        self.buffer = buffer
        self.log = log

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        errors = ErrorOnce(self.log, LOG_UPLOAD_INTERVAL)
        while not self.link.revoked:
            lines, dropped = self.buffer.take(MAX_LOG_LINES)
            batch: list[LogLine] = []
            for x in lines:  # one the coordinator would refuse is dropped, not retried forever
                try:
                    batch.append(LogLine.from_json(x))
                except ControlError:
                    dropped += 1
            if batch or dropped:
                try:
                    await self.link.upload_logs(batch, dropped)
                except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
                    self.buffer.put_back([x.to_json() for x in batch], dropped)
                    if self.link.failed(exc, errors, "logs"):
                        return
                else:
                    errors.ok()
            await trio.sleep(LOG_UPLOAD_INTERVAL)


__all__ = ["LOG_UPLOAD_INTERVAL", "MIN_REPORT_SPACING", "REPORT_INTERVAL",
           "ROLLOUT_REPORT_INTERVAL", "LogUploader", "Reporter", "in_flight"]
