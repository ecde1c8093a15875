"""`fleetmesh release status|watch|retry` and `devices logs|update|list|show` (apps, and who
reports whom misbehaving: docs/security.md "Misbehaving peers") as an operator runs them: real
CLI processes against a real coordinator process, with fake devices reporting app status and
uploading logs through the device SDK."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from nacl.signing import SigningKey
from rich.console import Console

from mesh.control import AppStatus, DeviceReport, LinkState, LogLine, PeerMisbehaviour
from ops._cli_release import PlainWatch, RichWatch, watch_outcome
from ops.client import DeviceClient, OperatorClient, enroll
from tests.coordinator.releasekit import build
from tests.coordinator_process import FLEETMESH, RunningCoordinator, running_coordinator
from vpn import generate_keypair

FLEET = "fleet"


@dataclass
class Fleet:
    coord: RunningCoordinator
    home: Path
    creds: dict[str, str]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLEETMESH, *argv], capture_output=True, text=True,
                              timeout=timeout, env=self.coord.operator_env(self.home),
                              check=False)

    def ok(self, *argv: str) -> str:
        result = self.run(*argv)
        assert result.returncode == 0, (argv, result.stderr)
        return result.stdout

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """The CLI in the background, Ctrl-C-able: a child inherits an *ignored* SIGINT (what a
        run started in the background without job control has: `cmd &` in a script), and
        Python then installs no KeyboardInterrupt handler; a *handled* SIGINT is reset to the
        default at exec, so we handle it around the start."""
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return subprocess.Popen([FLEETMESH, *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    env=self.coord.operator_env(self.home))
        finally:
            signal.signal(signal.SIGINT, previous)

    def report(self, device: str, *apps: AppStatus,
               misbehaving: tuple[PeerMisbehaviour, ...] = (),
               link: LinkState | None = None) -> None:
        async def go() -> None:
            async with DeviceClient(self.coord.url, self.creds[device], self.coord.der) as c:
                await c.report(DeviceReport(agent_version="fake", apps=apps,
                                            misbehaving_peers=misbehaving, link=link))
        trio.run(go)

    def logs(self, device: str, *lines: str, dropped: int = 0) -> None:
        async def go() -> None:
            async with DeviceClient(self.coord.url, self.creds[device], self.coord.der) as c:
                await c.upload_logs([LogLine(time.time(), "app", "stdout", x) for x in lines],
                                    dropped)
        trio.run(go)


def status(app: str, state: str, running: int | None, target: int | None = 1, done: int = 0,
           total: int = 0, **kw: Any) -> AppStatus:
    return AppStatus(app, state, running, target, done, total, updated_at=time.time(), **kw)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data = tmp_path_factory.mktemp("coord")
    home = tmp_path_factory.mktemp("home")
    with running_coordinator(data, data.parent / f"{data.name}.log") as coord:
        op = OperatorClient(coord.url, coord.api_key, cert_der=coord.der)
        key = SigningKey.generate()
        for app in ("app", "bad", "slow"):
            built = build(key, fleet=FLEET, app=app, version=1)
            for blob_id, (blob, kind) in built.blobs.items():
                op.put_blob(blob_id, blob, kind)
            op.publish_release(built.signed)
            op.set_target(FLEET, app, 1)
        token = op.create_token(FLEET, uses=2)["token"]

        async def join() -> dict[str, str]:
            out = {}
            for name in ("d1", "d2"):
                e, _ = await enroll(coord.url, token, generate_keypair().public, name=name)
                out[name] = e.credential
            return out

        creds = trio.run(join)
        op.close()
        yield Fleet(coord, home, creds)


def test_status_json_table_and_devices_views(fleet: Fleet) -> None:
    fleet.report("d1", status("app", "downloading", None, done=300, total=1000,
                              lock_since=time.time() - 7300))
    fleet.report("d2", status("app", "running", 1, done=1000, total=1000))
    # no --fleet: the one fleet with devices that has the release
    out = json.loads(fleet.ok("release", "status", "1", "--app", "app", "--json"))
    assert (out["fleet"], out["app"], out["version"]) == (FLEET, "app", 1)
    rows = {d["device"]: d for d in out["devices"]}
    assert (rows["d1"]["state"], rows["d1"]["bytes_done"], rows["d1"]["bytes_total"]) == (
        "downloading", 300, 1000)
    assert rows["d1"]["lock_stale"] is True and rows["d2"]["state"] == "running"
    assert out["summary"]["total"] == 2 and out["summary"]["running"] == 1
    table = fleet.ok("release", "status", "1", "--app", "app", "--fleet", FLEET)
    assert "downloading" in table and "300 B / 1.0 KB (30 %)" in table and "stale" in table

    listed = json.loads(fleet.ok("devices", "list", "--json"))["devices"]
    by_name = {d["name"]: d for d in listed}
    assert by_name["d2"]["release"] == 1 and by_name["d1"]["release"] is None
    assert by_name["d1"]["apps"][0]["state"] == "downloading"
    assert "RELEASE" in fleet.ok("devices", "list")
    shown = fleet.ok("devices", "show", "d1")
    assert "downloading" in shown and "(stale)" in shown


def _drain(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def _watch(fleet: Fleet, app: str, steps: list[tuple[str, AppStatus]]
           ) -> tuple[int, str, str]:
    fleet.report("d1", status(app, "idle", None, target=None))
    fleet.report("d2", status(app, "idle", None, target=None))
    proc = fleet.popen("release", "watch", "1", "--app", app, "--interval", "0.2",
                       "--timeout", "30")
    try:
        time.sleep(0.5)  # the watch sees the starting point first
        for device, step in steps:
            fleet.report(device, step)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode, out, err


def test_watch_exits_0_once_every_device_runs_it(fleet: Fleet) -> None:
    code, out, err = _watch(fleet, "app", [
        ("d1", status("app", "downloading", None, done=10, total=100)),
        ("d2", status("app", "checking-health", None, done=100, total=100)),
        ("d1", status("app", "running", 1, done=100, total=100)),
        ("d2", status("app", "running", 1, done=100, total=100))])
    assert code == 0, (out, err)
    assert "Traceback" not in err
    # not a terminal: plain lines, no progress bars
    lines = out.splitlines()
    assert any(line.split()[1:3] == ["d1", "running"] for line in lines), out
    assert "\x1b[" not in out
    assert lines[-1].startswith("app version 1 in fleet fleet: 2 devices (2 running")


def test_watch_exits_1_when_a_device_failed(fleet: Fleet) -> None:
    code, out, err = _watch(fleet, "bad", [
        ("d1", status("bad", "running", 1)),
        ("d2", status("bad", "failed", None, failed=(1,), error="health check failed"))])
    assert code == 1, (out, err)
    assert "error: health check failed" in out and "1 failed" in out.splitlines()[-1]


def test_watch_times_out_with_exit_5(fleet: Fleet) -> None:
    result = fleet.run("release", "watch", "1", "--app", "slow", "--interval", "0.2",
                       "--timeout", "0.5")
    assert result.returncode == 5, result
    assert "timed out" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_logs_follow_prints_new_lines_and_stops_on_ctrl_c(fleet: Fleet) -> None:
    fleet.logs("d2", "before 1", "before 2", dropped=3)
    plain = fleet.ok("devices", "logs", "d2")
    assert [x.split(" ", 3)[1:] for x in plain.splitlines()] == [
        ["app", "stdout", "before 1"], ["app", "stdout", "before 2"]]
    page = json.loads(fleet.ok("devices", "logs", "d2", "--json", "--tail", "1"))
    assert [x["line"] for x in page["lines"]] == ["before 2"] and page["dropped"] == 3

    proc = fleet.popen("devices", "logs", "d2", "-f")
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True)
    reader.start()

    def next_line() -> str:
        return lines.get(timeout=15).rstrip("\n")

    try:
        assert next_line().endswith("before 1")
        assert next_line().endswith("before 2")
        fleet.logs("d2", "live one", "live\ttwo\nlines")
        assert next_line().endswith("app stdout live one")
        assert next_line().endswith("live\ttwo\\nlines")  # one line stays one line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "Traceback" not in err and "dropped 3" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_logs_without_follow_asks_an_online_device_for_what_it_kept(fleet: Fleet) -> None:
    """Issue 14: devices keep their app logs until someone reads them. `devices logs` asks
    the device (its peer map's `logs_wanted_until`) and waits a few seconds for its upload:
    the line the device kept is shown by the same command."""
    fleet.report("d1")  # online: it reported just now

    def device() -> None:  # the agent's side: upload only once the map asks for it
        async def go() -> None:
            async with DeviceClient(fleet.coord.url, fleet.creds["d1"], fleet.coord.der) as c:
                m = await c.peermap(0, 0)
                assert m is not None
                with trio.fail_after(25):
                    while not m.logs_wanted_until > time.time():
                        m = await c.peermap(m.version, 20) or m
                await c.upload_logs([LogLine(time.time(), "app", "stdout", "kept line")])
        trio.run(go)

    watcher = threading.Thread(target=device, daemon=True)
    watcher.start()
    out = fleet.ok("devices", "logs", "d1")
    watcher.join(timeout=30)
    assert out.splitlines()[-1].endswith("app stdout kept line")


def test_update_force_retry_and_bad_arguments(fleet: Fleet) -> None:
    out = json.loads(fleet.ok("devices", "update", "d1", "--app", "app", "--force", "--json"))
    assert out == {"device": "d1", "app": "app", "version": 1, "force": True}
    assert "waits for its update lock" in fleet.ok("devices", "update", "d1", "--app", "app",
                                                   "--no-force")
    fleet.report("d2", status("bad", "failed", None, failed=(1,)))
    retried = json.loads(fleet.ok("release", "retry", "1", "--app", "bad", "--json"))
    assert [d["device"] for d in retried["devices"]] == ["d2"]
    assert "retry 1" in fleet.ok("release", "retry", "1", "--app", "app", "--device", "d1")

    for argv, code, words in (
            (["release", "status", "0", "--app", "app"], 2, "VERSION"),
            (["release", "status", "1", "--app", "no such"], 2, "--app"),
            (["release", "status", "7", "--app", "app"], 1, "no fleet"),
            (["release", "status", "7", "--app", "app", "--fleet", FLEET], 1, "no release"),
            (["release", "watch", "1", "--app", "app", "--interval", "0"], 2, "--interval"),
            (["release", "watch", "1", "--app", "app", "--timeout", "-1"], 2, "--timeout"),
            (["devices", "update", "d1", "--app", "app"], 2, "--force"),
            (["devices", "update", "nobody", "--app", "app", "--force"], 1, "nobody"),
            (["devices", "logs", "d1", "--tail", "0"], 2, "--tail"),
            (["devices", "logs", "nobody"], 1, "nobody")):
        result = fleet.run(*argv)
        assert result.returncode == code, (argv, result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (argv, result.stderr)
        assert words in lines[0], (argv, lines)
    env = {k: v for k, v in fleet.coord.operator_env(fleet.home).items()}
    env["FLEETMESH_URL"] = "https://127.0.0.1:1"
    unreachable = subprocess.run([FLEETMESH, "release", "status", "1", "--app", "app",
                                  "--fleet", FLEET], capture_output=True, text=True,
                                 timeout=30, env=env, check=False)
    assert unreachable.returncode == 3, unreachable


def _status(*rows: tuple[str, str, int, int]) -> dict[str, Any]:
    devices = [{"device": d, "state": s, "bytes_done": done, "bytes_total": total,
                "lock_stale": False} for d, s, done, total in rows]
    return {"fleet": FLEET, "app": "app", "version": 1, "devices": devices,
            "summary": {"total": len(devices),
                        "running": sum(1 for x in devices if x["state"] == "running")}}


def test_show_and_list_name_the_accused_and_the_accusers(fleet: Fleet) -> None:
    fleet.report("d1", misbehaving=(
        PeerMisbehaviour("d2", {"corrupt_blob": 4, "ghost_member": 12}),))
    # the accused accuses back: the operator sees who says what
    fleet.report("d2", misbehaving=(PeerMisbehaviour("d1", {"forged_manifest": 2}),))
    try:
        shown = fleet.ok("devices", "show", "d2")
        assert "reported misbehaving by d1: corrupt_blob 4, ghost_member 12" in shown
        assert "reports misbehaving d1: forged_manifest 2" in shown
        as_json = json.loads(fleet.ok("devices", "show", "d2", "--json"))
        assert as_json["reported_by"] == [
            {"reporter": "d1", "counts": {"corrupt_blob": 4, "ghost_member": 12}}]
        assert as_json["reports_about"] == [{"name": "d1", "counts": {"forged_manifest": 2}}]
        listed = {d["name"]: d["reported_misbehaving"]
                  for d in json.loads(fleet.ok("devices", "list", "--json"))["devices"]}
        assert listed == {"d1": 1, "d2": 1}

        fleet.report("d2")  # d2 takes it back: d1 is reported by nobody now
        shown = fleet.ok("devices", "show", "d1")
        assert "reports misbehaving d2: corrupt_blob 4, ghost_member 12" in shown
        assert "reported misbehaving by" not in shown
        rows = {line.split()[0]: line for line in fleet.ok("devices", "list").splitlines()
                if line.split() and line.split()[0] in ("d1", "d2")}
        assert "! by 1" in rows["d2"] and "!" not in rows["d1"]
    finally:
        fleet.report("d1")  # the other tests' views stay as they were
        fleet.report("d2")


def test_show_tells_how_the_device_holds_its_nat_binding(fleet: Fleet) -> None:
    def nat_line() -> str:
        return next(line for line in fleet.ok("devices", "show", "d1").splitlines()
                    if line.startswith("NAT")).rstrip()
    assert nat_line().split(None, 1)[1] == "-"  # nothing reported yet
    fleet.report("d1", link=LinkState(25))
    assert nat_line().split(None, 1)[1] == "keepalive 25 s; binding not measured yet"
    fleet.report("d1", link=LinkState(84, 105.4, 130.0))
    assert nat_line().split(None, 1)[1] == "keepalive 84 s; binding >= 105 s, < 130 s"
    shown = json.loads(fleet.ok("devices", "show", "d1", "--json"))
    assert shown["link"] == {"hub_keepalive": 84, "binding_survived": 105.4,
                             "binding_lost": 130.0}


def test_watch_views_and_outcome() -> None:
    assert watch_outcome(_status()) is None
    assert watch_outcome(_status(("a", "running", 1, 1), ("b", "waiting-lock", 5, 5))) is None
    assert watch_outcome(_status(("a", "running", 1, 1), ("b", "superseded", 0, 0))) == 0
    assert watch_outcome(_status(("a", "running", 1, 1), ("b", "failed", 0, 0))) == 1

    buf = io.StringIO()
    view = RichWatch(Console(file=buf, force_terminal=True, width=100))
    view.update(_status(("cam-1", "downloading", 250, 1000), ("cam-2", "running", 0, 0)))
    view.stop()
    text = buf.getvalue()
    assert "cam-1" in text and "cam-2" in text and "total" in text and "1/2 running" in text
    assert "250 B / 1.0 KB (25 %)" in text and "\x1b[" in text  # bars and colours

    plain = io.StringIO()
    pw = PlainWatch(plain)
    pw.update(_status(("cam-1", "downloading", 250, 1000)))
    pw.update(_status(("cam-1", "downloading", 260, 1000)))  # same decile: no new line
    pw.update(_status(("cam-1", "downloading", 900, 1000)))
    assert len(plain.getvalue().splitlines()) == 2
    assert os.linesep not in "".join(plain.getvalue().splitlines())
