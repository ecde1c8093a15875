"""`fleetmesh-agent doctor`: each check against a played broken host (injected probes), then the
real command on this host and in a mount namespace whose /dev/net/tun is /dev/null."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent import DataDir, Identity
from agent._doctor import Check, Probes, diagnose
from tests.procs import stop
from vpn import generate_keypair

from .fakes import enrollment

REPO = Path(__file__).parents[2]
NOW = 1_800_000_000.0


def _tun_stat() -> os.stat_result:
    """/dev/null's stat (a character device) with the TUN device's numbers, 10:200."""
    return os.stat_result(list(os.stat("/dev/null")[:10]), {"st_rdev": os.makedev(10, 200)})


def good() -> Probes:
    def date(identity: Identity) -> float:
        return NOW - 2.0

    return Probes(which=lambda name: f"/usr/bin/{name}", module_loaded=lambda name: False,
                  stat_tun=_tun_stat, open_tun=lambda: None, docker_version=lambda host: "24.0.9",
                  ntp_synchronized=lambda: True, coordinator_date=date,
                  resolve=lambda host: ["192.0.2.7"], disk_free=lambda path: 50 * 1024**3,
                  now=lambda: NOW)


def enroll(tmp: Path, url: str) -> Path:
    data = DataDir(tmp / "data")
    data.write_key(generate_keypair().private)
    data.write_identity(Identity(url, enrollment(), b"\x30\x82fake-der", 51820, None))
    return data.path


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_good_enrolled_host_is_all_ok(tmp_path: Path) -> None:
    data = enroll(tmp_path, "https://coord.example:8443")
    checks = by_name(diagnose(data, probes=good()))
    assert [c.name for c in checks.values()] == ["wireguard", "tun", "docker", "enrollment",
                                                 "clock", "dns", "disk"]
    assert all(c.ok for c in checks.values()), checks
    assert "coord.example is 192.0.2.7" in checks["dns"].detail
    assert "within 2 s of the coordinator's" in checks["clock"].detail
    assert "Docker Engine 24.0.9" in checks["docker"].detail


def test_not_enrolled_skips_what_needs_a_coordinator(tmp_path: Path) -> None:
    checks = by_name(diagnose(tmp_path / "none", probes=good()))
    assert checks["enrollment"].ok is None and checks["dns"].ok is None
    assert checks["clock"].ok is True and "NTP-synchronized" in checks["clock"].detail
    assert checks["disk"].ok and str(tmp_path) in checks["disk"].detail  # nearest existing


@pytest.mark.parametrize(("change", "name", "needle"), [
    ({"which": lambda name: None}, "wireguard", "apt install wireguard-go"),
    ({"which": lambda name: None, "module_loaded": lambda name: True}, "wireguard",
     "kernel module is loaded but the agent runs wireguard-go"),
    ({"stat_tun": lambda: os.stat("/dev/null")}, "tun", "char device 1:3, not the TUN device"),
    ({"stat_tun": lambda: os.stat(__file__)}, "tun", "no device"),
    ({"stat_tun": lambda: os.stat("/nonexistent/tun")}, "tun", "modprobe tun"),
    ({"open_tun": lambda: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted"))},
     "tun", "CAP_NET_ADMIN"),
    ({"docker_version": lambda host: (_ for _ in ()).throw(ConnectionRefusedError(111, "no"))},
     "docker", "systemctl start docker"),
    ({"coordinator_date": lambda identity: NOW - 300.0}, "clock", "+300 s off the coordinator"),
    ({"resolve": lambda host: (_ for _ in ()).throw(OSError(-2, "Name or service not known"))},
     "dns", "cannot resolve coord.example"),
    ({"disk_free": lambda path: 200 * 1024**2}, "disk", "only 0.2 GiB free"),
])
def test_each_broken_probe_fails_its_line_with_the_fix(
        tmp_path: Path, change: dict[str, object], name: str, needle: str) -> None:
    data = enroll(tmp_path, "https://coord.example:8443")
    checks = by_name(diagnose(data, probes=replace(good(), **change)))  # type: ignore[arg-type]
    failed = [c.name for c in checks.values() if c.ok is False]
    assert failed == [name], checks
    assert needle in checks[name].detail
    assert checks[name].line().startswith(f"FAIL {name}: ")


def test_an_unreachable_coordinator_falls_back_to_ntp(tmp_path: Path) -> None:
    data = enroll(tmp_path, "https://198.51.100.1:8443")

    def refused(identity: Identity) -> float:
        raise ConnectionRefusedError(111, "Connection refused")

    checks = by_name(diagnose(data, probes=replace(good(), coordinator_date=refused,
                                                   ntp_synchronized=lambda: False)))
    assert checks["clock"].ok is False
    assert "coordinator not asked" in checks["clock"].detail
    assert "enable systemd-timesyncd" in checks["clock"].detail
    assert checks["dns"].ok is None  # an address: nothing to resolve


def test_a_corrupt_enrollment_fails(tmp_path: Path) -> None:
    data = enroll(tmp_path, "https://coord.example:8443")
    (data / "enrollment.json").write_text("{")
    checks = by_name(diagnose(data, probes=good()))
    assert checks["enrollment"].ok is False and "join again" in checks["enrollment"].detail


# --------------------------------------------------------------------------- the real host


@pytest.fixture
def date_server() -> Iterator[str]:
    """A local HTTP server standing in for the coordinator: every answer carries Date."""
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def doctor(*argv: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*prefix, sys.executable, "-m", "agent.cli", "doctor", *argv],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def lines(out: str) -> dict[str, str]:
    return {ln.split(":", 1)[0].split()[1]: ln.split()[0] for ln in out.splitlines()}


ENGINE_DEADLINE_S = 180.0  # a generous bound for a loaded 2-core machine, not a timing


def _engine_answers(host: str) -> bool:
    done = subprocess.run(["docker", "-H", host, "version", "--format", "{{.Server.Version}}"],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode == 0 and bool(done.stdout.strip())


@pytest.fixture
def private_engine() -> Iterator[str]:
    """A dockerd of this test's own in a new network and mount namespace (no bridge, no
    iptables, its own roots and config), reached through its socket: DOCKER_HOST."""
    if os.geteuid() != 0 or None in (shutil.which("dockerd"), shutil.which("docker"),
                                     shutil.which("unshare")):
        pytest.skip("needs root, dockerd, docker and unshare (scripts/setup)")
    # short: a unix socket path has at most 107 bytes
    root = Path(tempfile.mkdtemp(prefix="fm-doctor-", dir="/run"))
    (root / "daemon.json").write_text("{}")
    host = f"unix://{root}/docker.sock"
    argv = ["unshare", "--net", "--mount", "--propagation", "private",  # execs dockerd
            "dockerd", "--config-file", str(root / "daemon.json"),
            "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
            "--pidfile", str(root / "docker.pid"), "-H", host, "--bridge", "none",
            "--iptables=false", "--ip6tables=false", "--ip-masq=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    with open(root / "dockerd.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + ENGINE_DEADLINE_S
        while not _engine_answers(host):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the test's dockerd did not answer: "
                            + (root / "dockerd.log").read_text()[-2000:])
            time.sleep(0.5)
        yield host
    finally:
        stop(proc, 60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="opening /dev/net/tun needs root")
def test_a_good_real_host_is_all_ok(tmp_path: Path, date_server: str,
                                    private_engine: str) -> None:
    if not os.path.exists("/dev/net/tun") or shutil.which("wireguard-go") is None:
        pytest.skip("this host has no /dev/net/tun or wireguard-go (scripts/setup)")
    data = enroll(tmp_path, date_server)
    done = doctor("--data", str(data), "--docker-host", private_engine)
    assert done.stderr == ""
    assert lines(done.stdout) == dict.fromkeys(
        ("wireguard", "tun", "docker", "enrollment", "clock", "dns", "disk"), "ok"), done.stdout
    assert f"at {private_engine}" in done.stdout
    assert "of the coordinator's" in done.stdout  # the clock was compared, not NTP's word
    assert done.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and bind mounts need root")
def test_without_tun_in_a_namespace_the_tun_line_fails(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs unshare and a /dev/net/tun to hide")
    # A private mount namespace (and network namespace) whose /dev/net/tun is /dev/null.
    prefix = ("unshare", "--mount", "--net", "--propagation", "private", "sh", "-c",
              'mount --bind /dev/null /dev/net/tun && exec "$@"', "sh")
    done = doctor("--data", str(tmp_path / "data"), prefix=prefix)
    assert lines(done.stdout)["tun"] == "FAIL", done.stdout + done.stderr
    assert "char device 1:3, not the TUN device" in done.stdout
    assert done.returncode == 1
    assert os.stat("/dev/net/tun").st_rdev == os.makedev(10, 200)  # the host's is untouched
