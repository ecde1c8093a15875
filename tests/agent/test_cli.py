"""`fleetmesh-agent join` and `run`: the SDK and wireguard-go replaced by fakes, errors as one
line with their exit codes; plus the installed console script for argument errors."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent import DataDir, _commands
from agent._datadir import DataDirError
from agent._release_sync import GossipSettings, host_platform
from agent.cli import main
from mesh.control import Enrollment
from mesh.release import SignedRoot
from mesh.tlspin import PinError
from ops.client import ApiError, CoordinatorUnreachable
from vpn import WireGuardGoError, public_key_from_private

from .fakes import FakeCoordinator, FakeWireGuard, enrollment, peer, peermap

TOKEN = "fm1." + "ab" * 32 + ".s3cretS3cretS3cret"
URL = "https://198.51.100.1:8443"
BIN = Path(sys.executable).parent


class FakeEnroll:
    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.private_keys: list[str | None] = []
        self.platforms: list[str] = []
        self.error = error

    async def __call__(self, url: str, token: str, public_key: str, name: str | None,
                       lan: tuple[str, ...], version: str, *, private_key: str | None = None,
                       platform: str = "") -> tuple[Enrollment, bytes, SignedRoot | None]:
        self.calls.append((url, token, public_key, name, lan, version))
        self.private_keys.append(private_key)
        self.platforms.append(platform)
        if self.error is not None:
            raise self.error
        return enrollment(name or "home-0"), b"DER", None


@pytest.fixture
def fake_enroll(monkeypatch: pytest.MonkeyPatch) -> FakeEnroll:
    fake = FakeEnroll()
    monkeypatch.setattr(_commands, "sdk_enroll", lambda: fake)
    return fake


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fleetmesh-agent: ")
    return err[0]


def test_join_enrolls_once_and_stores_0600(tmp_path: Path, fake_enroll: FakeEnroll,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d"
    assert main(["join", URL, "--token", TOKEN, "--data", str(data), "--name", "home-0",
                 "--lan-endpoint", "192.168.1.2:51820", "--wg-port", "51821"]) == 0
    assert "enrolled as home-0 in fleet cams" in capsys.readouterr().out
    dd = DataDir(data)
    for f in (dd.key_path, dd.enrollment_path):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    (url, token, public, name, lan, version) = fake_enroll.calls[0]
    assert (url, token, name, lan) == (URL, TOKEN, "home-0", ("192.168.1.2:51820",))
    assert public == public_key_from_private(dd.read_key())  # only the public key is sent
    # the SDK gets the private key in-process, only to answer a re-enrollment challenge
    assert fake_enroll.private_keys == [dd.read_key()]
    assert fake_enroll.platforms == [host_platform()]  # the device says its platform
    ident = dd.read_identity()
    assert ident.url == URL and ident.cert_der == b"DER" and ident.wg_port == 51821
    assert ident.lan_endpoints == ("192.168.1.2:51820",)
    assert dd.read_key() not in json.dumps(ident.to_json())

    # a second join is refused, without contacting anyone
    assert main(["join", URL, "--token", TOKEN, "--data", str(data)]) == 2
    assert "already enrolled as home-0 in fleet cams" in one_line(capsys)
    assert len(fake_enroll.calls) == 1


def test_join_with_device_json(tmp_path: Path, fake_enroll: FakeEnroll,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_commands, "lan_endpoints", lambda port, *a: (f"10.1.2.3:{port}",))
    conf = tmp_path / "device.json"
    conf.write_text(json.dumps({"url": URL, "token": TOKEN, "name": "cam-7", "fleet": "cams"}))
    assert main(["join", "--config", str(conf), "--data", str(tmp_path / "d")]) == 0
    assert fake_enroll.calls[0][3] == "cam-7"
    assert fake_enroll.calls[0][4] == ("10.1.2.3:51820",)  # discovered, default port
    assert DataDir(tmp_path / "d").read_identity().lan_endpoints is None  # rediscovered by run


@pytest.mark.parametrize("argv, needle", [
    (["join", URL, "--token", "nope"], "not a fleetmesh enrollment token"),
    (["join", URL], "give URL and --token T, or --config"),
    (["join", "--token", TOKEN], "give URL and --token T, or --config"),
    (["join", URL, "--token", TOKEN, "--name", "Bad_Name"], "name: must be"),
    (["join", URL, "--token", TOKEN, "--config", "x.json"], "not both"),
    (["join", "--config", "/nonexistent/device.json"], "cannot read"),
])
def test_join_bad_input_is_one_line_exit_2(tmp_path: Path, fake_enroll: FakeEnroll,
                                           capsys: pytest.CaptureFixture[str],
                                           argv: list[str], needle: str) -> None:
    assert main([*argv, "--data", str(tmp_path / "d")]) == 2
    assert needle in one_line(capsys)
    assert not fake_enroll.calls
    assert not (tmp_path / "d" / "enrollment.json").exists()


def test_join_rejects_a_malformed_device_json(tmp_path: Path, fake_enroll: FakeEnroll,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "device.json"
    for text, needle in (("{", "not JSON"), ('{"url": "x"}', "token missing")):
        conf.write_text(text)
        assert main(["join", "--config", str(conf), "--data", str(tmp_path / "d")]) == 2
        assert needle in one_line(capsys)


@pytest.mark.parametrize("error, code, needle", [
    (ApiError(401, "token expired"), 1, "coordinator refused the enrollment: token expired"),
    (ApiError(409, "name taken"), 1, "name taken (HTTP 409)"),
    (CoordinatorUnreachable("cannot reach the coordinator at x"), 3, "cannot reach"),
    (PinError("certificate sha256 ab is not the pinned cd"), 4, "not the pinned"),
])
def test_join_sdk_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str], error: Exception, code: int,
                           needle: str) -> None:
    fake = FakeEnroll(error)
    monkeypatch.setattr(_commands, "sdk_enroll", lambda: fake)
    data = tmp_path / "d"
    assert main(["join", URL, "--token", TOKEN, "--data", str(data), "--lan-endpoint",
                 "10.0.0.2:51820"]) == code
    assert needle in one_line(capsys)
    assert not DataDir(data).is_enrolled()
    # the key stays on the device and a retry reuses it
    key = DataDir(data).read_key()
    fake.error = None
    assert main(["join", URL, "--token", TOKEN, "--data", str(data), "--lan-endpoint",
                 "10.0.0.2:51820"]) == 0
    assert fake.calls[-1][2] == public_key_from_private(key)


def test_run_not_enrolled_and_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      enrolled: DataDir) -> None:
    assert main(["run", "--data", str(tmp_path / "empty")]) == 2
    assert "is not enrolled" in one_line(capsys)
    enrolled.enrollment_path.write_text("{oops")
    assert main(["run", "--data", str(enrolled.path)]) == 2
    assert "enrollment.json: corrupt (not JSON" in one_line(capsys)


def test_run_wireguard_failure_is_one_line(enrolled: DataDir, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    @asynccontextmanager
    async def broken(e: Enrollment) -> AsyncIterator[FakeWireGuard]:
        raise WireGuardGoError("wireguard-go for fm0 exited with status 1: no TUN")
        yield FakeWireGuard()  # pragma: no cover

    monkeypatch.setattr(_commands, "real_backend_factory", lambda ifname, mountns=None: broken)
    monkeypatch.setattr(_commands, "sdk_client_factory", lambda: FakeCoordinator().factory)
    assert main(["run", "--data", str(enrolled.path)]) == 6  # EXIT_WIREGUARD
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("fleetmesh-agent: cannot start WireGuard: wireguard-go for fm0 exited "
                       "with status 1: no TUN")


def test_run_stops_cleanly_on_sigterm(enrolled: DataDir, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    wg = FakeWireGuard()
    coord = FakeCoordinator(peermap(1, peer(1, "203.0.113.7:51820")))
    seen: dict[str, str] = {}

    def backend(ifname: str, mountns: str | None = None) -> Any:
        seen["ifname"] = ifname
        return wg.factory()

    monkeypatch.setattr(_commands, "real_backend_factory", backend)
    monkeypatch.setattr(_commands, "sdk_client_factory", lambda: coord.factory)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert main(["run", "--data", str(enrolled.path), "--interface", "fm9",
                     "--lan-endpoint", "10.0.0.2:51820"]) == 0
    finally:
        timer.cancel()
    err = capsys.readouterr().err
    assert seen["ifname"] == "fm9" and not wg.running
    assert "stopping (SIGTERM)" in err and "peer map v1: 1 peers" in err
    assert enrolled.read_peermap() == coord.peermap
    assert coord.reports and coord.reports[0][1].lan_endpoints == ("10.0.0.2:51820",)


@pytest.mark.parametrize(("flags", "ratio", "unmetered"), [
    ([], 0.0, False), (["--seed-ratio", "0.5"], 0.5, False), (["--seed-ratio", "2"], 2.0, False),
    (["--unmetered"], 0.0, True)])
def test_run_serving_flags_reach_the_mesh_node(enrolled: DataDir,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str],
                                              flags: list[str], ratio: float,
                                              unmetered: bool) -> None:
    seen: list[GossipSettings | None] = []

    def agent(*args: Any, gossip: GossipSettings | None = None, **kw: Any) -> Any:
        seen.append(gossip)
        raise DataDirError("stop here")  # the settings are what this test looks at

    monkeypatch.setattr(_commands, "real_backend_factory", lambda ifname, mountns=None: None)
    monkeypatch.setattr(_commands, "Agent", agent)
    assert main(["run", "--data", str(enrolled.path), *flags]) != 0
    capsys.readouterr()
    (settings,) = seen
    assert settings is not None
    assert (settings.serve.seed_ratio, settings.serve.unmetered) == (ratio, unmetered)


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "1e3", "0x1", "1_0", "", " 1", "\u0661"])
def test_run_seed_ratio_is_parsed_strictly(enrolled: DataDir, bad: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--data", str(enrolled.path), "--seed-ratio", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and "not a seed ratio" in err[-1]


@pytest.mark.parametrize(("flag", "budget"), [
    ("50MB/month", (50_000_000, "month")), ("1.5gb/day", (1_500_000_000, "day")),
    ("700B/day", (700, "day"))])
def test_run_wan_budget_reaches_the_agent(enrolled: DataDir, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], flag: str,
                                          budget: tuple[int, str]) -> None:
    seen: list[Any] = []

    def agent(*args: Any, wan_budget: Any = None, **kw: Any) -> Any:
        seen.append(wan_budget)
        raise DataDirError("stop here")  # the budget is what this test looks at

    monkeypatch.setattr(_commands, "real_backend_factory", lambda ifname, mountns=None: None)
    monkeypatch.setattr(_commands, "Agent", agent)
    assert main(["run", "--data", str(enrolled.path), "--wan-budget", flag]) != 0
    capsys.readouterr()
    assert seen == [budget]


@pytest.mark.parametrize("bad", ["50MB", "50MB/week", "0MB/day", "1.2.3MB/day", "1e3MB/day",
                                 "9" * 40 + "GB/day", "50 MB/month", ""])
def test_run_wan_budget_is_parsed_strictly(enrolled: DataDir, bad: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--data", str(enrolled.path), "--wan-budget", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and "not a WAN budget" in err[-1]


def test_console_script_argument_errors(tmp_path: Path) -> None:
    for argv in (["join"], ["run"], ["run", "--data", str(tmp_path), "--wg-port", "0"],
                 ["run", "--data", str(tmp_path), "--interface", "bad/name"],
                 ["join", URL, "--token", TOKEN, "--data", str(tmp_path),
                  "--lan-endpoint", "nohost"]):
        result = subprocess.run([str(BIN / "fleetmesh-agent"), *argv], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, argv
        assert "error:" in result.stderr.strip().splitlines()[-1]
    result = subprocess.run([str(BIN / "fleetmesh-agent"), "run", "--data", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
