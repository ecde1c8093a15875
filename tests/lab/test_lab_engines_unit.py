"""The lab's supervisor, topology keys, sample-app build context and busybox root file system,
without namespaces or engines (no root needed; the real thing is in test_lab_engines.py)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from lab import TopologyError, parse_topology
from lab.engines import EnginePaths, busybox_rootfs_tar, dockerd_argv
from lab.sampleapp import context_files
from lab.sampleapp import main as sampleapp_main
from lab.supervisor import MAX_DELAY, RESTART_DELAY, next_delay, read_status


def test_backoff_is_bounded_and_resets_after_a_healthy_run() -> None:
    assert next_delay(RESTART_DELAY, ran=3600) == RESTART_DELAY
    delays = [RESTART_DELAY]
    for _ in range(10):
        delays.append(next_delay(delays[-1], ran=0.1))
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert max(delays) == MAX_DELAY == delays[-1]
    assert next_delay(MAX_DELAY, ran=60) == RESTART_DELAY


def wait_for(check, timeout: float = 20.0):  # noqa: ANN001, ANN201 - test helper
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_supervisor_restarts_a_killed_child_and_stops_on_sigterm(tmp_path: Path) -> None:
    status = tmp_path / "s.json"
    sup = subprocess.Popen([sys.executable, "-m", "lab.supervise", "--status", str(status), "--",
                            "sleep", "600"], cwd=Path(__file__).resolve().parents[2])
    try:
        first = wait_for(lambda: (read_status(status) or {}).get("pid"))
        assert read_status(status)["restarts"] == 0  # type: ignore[index]
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: (st := read_status(status) or {}).get("pid") not in (None, first)
                          and st["pid"])
        st = read_status(status)
        assert st is not None and st["restarts"] == 1 and st["last_exit"] == -signal.SIGKILL
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=20) == 0
        st = read_status(status)
        assert st is not None and st["state"] == "stopped" and st["pid"] is None
        # the child went with it and nothing restarted it
        with pytest.raises(ProcessLookupError):
            os.kill(second, 0)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


def test_supervisor_without_a_command_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "lab.supervise", "--status",
                        str(tmp_path / "s.json")], capture_output=True, text=True, timeout=30,
                       check=False, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and r.stderr.strip().startswith("supervise: no command given")


def test_topology_docker_key() -> None:
    base = {"lan": [{"name": "a"}]}
    assert parse_topology(base).agents.docker is True
    topo = parse_topology({**base, "agents": {"docker": False}})
    assert topo.agents.docker is False
    assert parse_topology(topo.to_dict()).agents == topo.agents
    with pytest.raises(TopologyError, match=r"^agents\.docker: must be true or false$"):
        parse_topology({**base, "agents": {"docker": "no"}})


def test_the_hosts_wan_address_is_never_a_nodes() -> None:
    topo = parse_topology({"wan": {"subnet": "203.0.113.0/28"},
                           "lan": [{"name": "a", "nat": "none", "devices": 3}]})
    assert str(topo.host_ipv4) == "203.0.113.14"
    assert str(topo.host_ipv4) not in {str(a) for a in topo.lans[0].wan_addresses}
    # .10 .. .13 is all a /28 has left for LANs once .14 is the host's
    with pytest.raises(TopologyError, match="too few addresses"):
        parse_topology({"wan": {"subnet": "203.0.113.0/28"},
                        "lan": [{"name": "a", "nat": "none", "devices": 5}]})


def test_engine_paths_fit_a_unix_socket_and_name_the_node() -> None:
    paths = EnginePaths("abcdefgh-200")
    assert len(str(paths.exec_root / "containerd" / "containerd-debug.sock")) <= 107
    argv = dockerd_argv(paths)
    assert argv[0] == "dockerd"
    for flag, value in (("--data-root", "/var/lib/fleetmesh-lab/docker/abcdefgh-200"),
                        ("--cgroup-parent", "/fleetmesh-lab/abcdefgh-200"),
                        ("--bridge", "none")):
        assert argv[argv.index(flag) + 1] == value
    assert "--iptables=false" in argv and "--ip-masq=false" in argv


def test_sample_versions_differ_only_in_their_small_files() -> None:
    v1, v2, bad = context_files(1), context_files(2), context_files(2, unhealthy=True)
    assert v1["assets/data.bin"] == v2["assets/data.bin"]
    assert v1["Dockerfile"] == v2["Dockerfile"]
    changed = [k for k in v1 if v1[k] != v2[k]]
    assert sorted(changed) == ["app/VERSION", "app/bin/run", "app/www/index.html"]
    assert sum(len(v2[k][0]) for k in changed) < 1000
    assert b"httpd" in v2["app/bin/run"][0] and b"httpd" not in bad["app/bin/run"][0]
    assert v2["app/www/index.html"][0] == b"fleetmesh-sample v2\n"


def test_a_payload_is_a_layer_of_new_bytes_in_every_version() -> None:
    v2, v3 = context_files(2, payload=50_000), context_files(3, payload=50_000)
    assert b"COPY payload /app/payload" in v2["Dockerfile"][0]
    assert b"payload" not in context_files(2)["Dockerfile"][0]
    assert len(v2["payload/data.bin"][0]) == 50_000
    # nothing shared between versions: the release's bytes are the payload's
    a, b = v2["payload/data.bin"][0], v3["payload/data.bin"][0]
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 50_000 // 100
    assert v2["assets/data.bin"] == v3["assets/data.bin"]


def test_sampleapp_cli_rejects_a_bad_payload(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    assert sampleapp_main(["1", "--payload", "-1"]) == 2
    assert capsys.readouterr().err.startswith("lab.sampleapp: --payload must be 0..")


@pytest.mark.parametrize("argv", [["0"], ["x"], ["-3"]])
def test_sampleapp_cli_rejects_a_bad_version(argv: list[str], capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    if argv == ["-3"]:
        argv = ["--", "-3"]
    assert sampleapp_main(argv) == 2
    assert capsys.readouterr().err.startswith("lab.sampleapp: VERSION must be an integer >= 1")


def test_sampleapp_cli_needs_an_engine(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert sampleapp_main(["1"]) == 2
    assert "DOCKER_HOST is not set" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox(-static)")
def test_busybox_rootfs_is_deterministic_and_complete() -> None:
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    a, b = busybox_rootfs_tar(busybox), busybox_rootfs_tar(busybox)
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].size == busybox.stat().st_size
    for applet in ("sh", "httpd", "wget", "sleep"):
        assert members[f"bin/{applet}"].issym() and members[f"bin/{applet}"].linkname == "busybox"
    assert all(m.mtime == 0 and m.uid == 0 for m in members.values())
