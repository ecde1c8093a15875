"""What the agent sends up besides the peer-map poll, by exception (issue 14: an idle device
sends nothing): its state report (LAN candidates, version, paths, app states) when it changed,
and the app containers' log lines while someone reads them.

    reporter = Reporter(link, make_report, log)   # reporter.wake(): something worth reporting
    uploader = LogUploader(link, applier.logs, log, wanted)   # uploader.wake(): wanted() moved

Both loops end when the coordinator refuses the credential (the device was revoked) and never
for anything else: a failed call is logged once per distinct error and retried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Final, Protocol

import trio

from mesh.control import MAX_LOG_LINES, ControlError, DeviceReport, LogLine

from ._link import CoordinatorLink, ErrorOnce, Log, one_line

# Reports go up by exception: what changes (paths, LAN candidates, app state, misbehaving
# peers) is reported at once, and "online" comes from the hub's WireGuard session, not from
# reports (docs/api.md). This heartbeat is only a safety net for a report that was lost
# (e.g. delivered to a coordinator that then lost its database). Each one is a TLS request,
# on a new connection (idle ones close after 20 s), over a metered link: an idle device's budget
# is 20 KB/h of WAN all included (issue 14; docs/gossip.md "Idle cost").
REPORT_INTERVAL: Final = 6 * 3600.0
# While a release is in flight (an app downloading, loading or switching over) the operator
# watches the rollout: a report reaches the coordinator at least every 30 s even when nothing
# moves (a download stalled behind a slow link reports no progress). 10 s leaves room for one
# attempt cut at its deadline (agent/_link.py CALL_TIMEOUT) before 30 s are up. Waiting for the
# app's update lock is no work in flight: it may last an hour (a recording), its start and end
# are reported at once, and 10 s reports for that long would cost a metered link ~1 MB/h. The
# same holds for a release downloaded ahead that waits for its rollout phase or its maintenance
# window (days, maybe).
ROLLOUT_REPORT_INTERVAL: Final = 10.0
SETTLED_STATES: Final = frozenset({"idle", "running", "failed", "waiting-lock", "waiting-phase",
                                   "waiting-window", "no-platform"})
# Some changes come with no event to wake the reporter: the device's LAN addresses (a new DHCP
# lease), a misbehaving peer counted again for a reason already reported, the fleet's timestamp
# expiring (the `stale` flag). The report is rebuilt locally this often and sent only when it
# differs from the last one delivered (handshake times and status times left out): no bytes on
# the WAN at rest. It also retries a failed report.
REPORT_CHECK_INTERVAL: Final = 60.0
MIN_REPORT_SPACING: Final = 1.0  # path flaps cannot turn into a report storm
LOG_UPLOAD_INTERVAL: Final = 2.0  # app log lines go up in batches, at most this often
# An app that fails ships this many of its newest lines at once, read or not: what the operator
# looks at first, and the buffer may have dropped them by the time someone reads the logs.
FAILURE_TAIL_LINES: Final = 50


class LogSource(Protocol):
    """The applier's log buffer (agent/_applogs.py LogBuffer)."""

    def take(self, max_lines: int) -> tuple[list[dict[str, Any]], int]: ...

    def take_tail(self, app: str, max_lines: int) -> list[dict[str, Any]]: ...

    def put_back(self, lines: Iterable[dict[str, Any]], dropped: int) -> None: ...


def in_flight(report: DeviceReport) -> bool:
    """The report shows a release on its way (an app downloading, loading, switching...)."""
    return any(a.state not in SETTLED_STATES for a in report.apps)


def report_shape(report: DeviceReport) -> DeviceReport:
    """What makes a report worth sending at rest: all but the times that move by themselves
    (each direct peer's handshake every two minutes, each app's last status update) and the
    byte counts, which ride on reports that go up anyway: only a new UTC day in the account
    makes a report of its own, at most one a day, and so does crossing the WAN budget."""
    wan: dict[str, dict[str, int]] | None = (
        None if report.wan_bytes is None else {day: {} for day in report.wan_bytes})
    return replace(report, peers=tuple(replace(p, last_handshake=None) for p in report.peers),
                   apps=tuple(replace(a, updated_at=0.0) for a in report.apps), wan_bytes=wan,
                   wan_budget=None if report.wan_budget is None  # over or not, not how much
                   else replace(report.wan_budget, used=report.wan_budget.limit
                                if report.wan_budget.over else 0))


class Reporter:
    """Sends `make_report()` at once (at most every MIN_REPORT_SPACING) after `wake()` or when
    the report, rebuilt every `check_interval`, differs from the last one delivered; otherwise
    every `interval` (REPORT_INTERVAL, a safety net), every ROLLOUT_REPORT_INTERVAL while a
    release is in flight. Each attempt is bounded by the link's per-call deadline, so nothing
    queues a report for long."""

    def __init__(self, link: CoordinatorLink, make_report: Callable[[], DeviceReport],
                 log: Log, interval: float = REPORT_INTERVAL,
                 check_interval: float = REPORT_CHECK_INTERVAL) -> None:
        self.link = link
        self.make_report = make_report
        self.log = log
        self.interval = interval
        self.check_interval = check_interval
        self.sent = 0  # reports delivered
        self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        errors = ErrorOnce(self.log, self.check_interval)
        delivered: DeviceReport | None = None  # the shape of the last report delivered
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
                delivered = report_shape(report)
                self.sent += 1
            interval = min(self.interval, ROLLOUT_REPORT_INTERVAL) if in_flight(report) \
                else self.interval
            await self._wait_for_news(sent_at + interval, delivered)
            self._wake = trio.Event()
            spent = trio.current_time() - sent_at
            if spent < MIN_REPORT_SPACING:
                await trio.sleep(MIN_REPORT_SPACING - spent)

    async def goodbye(self) -> bool:
        """The last report, before the agent stops on purpose: `stopping` tells the coordinator
        the device is offline now (not a minute or more later, when its online window ends).
        One attempt within the link's deadline; a failure is one line. True if delivered."""
        if self.link.revoked:
            return False
        try:
            await self.link.report(replace(self.make_report(), stopping=True))
        except Exception as exc:  # noqa: BLE001 - stopping anyway; the window says offline
            self.log(f"report: could not say the agent stops: {one_line(exc)}")
            return False
        return True

    async def _wait_for_news(self, heartbeat_at: float, delivered: DeviceReport | None
                             ) -> None:
        """Until `wake()`, `heartbeat_at`, or a rebuilt report that differs from `delivered`."""
        while trio.current_time() < heartbeat_at:
            with trio.move_on_at(min(heartbeat_at, trio.current_time() + self.check_interval)):
                await self._wake.wait()
                return
            if report_shape(self.make_report()) != delivered:
                return


class LogUploader:
    """The app's log lines to the coordinator while `wanted()` (someone reads them: the peer
    map's `logs_wanted_until`), every LOG_UPLOAD_INTERVAL; otherwise they stay in the bounded
    buffer, which drops the oldest. `wake()`: `wanted()` may have changed. `ship_tail(app)`:
    the app failed, its last FAILURE_TAIL_LINES go up at once, wanted or not. Lines are kept
    (within the buffer's bound) while the coordinator cannot be reached."""

    def __init__(self, link: CoordinatorLink, buffer: LogSource, log: Log,
                 wanted: Callable[[], bool] = lambda: True) -> None:
        self.link = link
        self.buffer = buffer
        self.log = log
        self.wanted = wanted
        self.uploads = 0  # upload calls that reached the coordinator
        self._tails: list[str] = []
        self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    def ship_tail(self, app: str) -> None:
        self._tails.append(app)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        errors = ErrorOnce(self.log, LOG_UPLOAD_INTERVAL)
        while not self.link.revoked:
            self._wake = trio.Event()  # a wake from here on is seen below
            tails, self._tails = self._tails, []
            for app in tails:
                if not await self._upload(self.buffer.take_tail(app, FAILURE_TAIL_LINES), 0,
                                          errors):
                    return
            if not self.wanted():
                await self._wake.wait()
                continue
            lines, dropped = self.buffer.take(MAX_LOG_LINES)
            if not await self._upload(lines, dropped, errors):
                return
            await trio.sleep(LOG_UPLOAD_INTERVAL)

    async def _upload(self, lines: list[dict[str, Any]], dropped: int, errors: ErrorOnce
                      ) -> bool:
        """Upload `lines` (put back if that fails); False once the device was revoked."""
        batch: list[LogLine] = []
        for x in lines:  # one the coordinator would refuse is dropped, not retried forever
            try:
                batch.append(LogLine.from_json(x))
            except ControlError:
                dropped += 1
        if not batch and not dropped:
            return True
        try:
            await self.link.upload_logs(batch, dropped)
        except Exception as exc:  # noqa: BLE001 - never exit on coordinator errors
            self.buffer.put_back([x.to_json() for x in batch], dropped)
            return not self.link.failed(exc, errors, "logs")
        errors.ok()
        self.uploads += 1
        return True


__all__ = ["FAILURE_TAIL_LINES", "LOG_UPLOAD_INTERVAL", "MIN_REPORT_SPACING",
           "REPORT_CHECK_INTERVAL", "REPORT_INTERVAL", "ROLLOUT_REPORT_INTERVAL", "LogUploader",
           "Reporter", "in_flight", "report_shape"]
