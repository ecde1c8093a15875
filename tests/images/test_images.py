"""fleetmesh's container images (docker/, lab/fleetimage.py, scripts/build-images) on the real
Docker engine the `docker` client reaches (scripts/setup starts one): both images are built
once for the module under a version of their own, then run. Marked `lab`, skipped with the
reason when no engine answers. Everything made here (the two images, the base if this run
imported it, containers) is removed by ID in `finally`.

The first build on a machine debootstraps and downloads (minutes); with the cache
(/var/cache/fleetmesh-bench) the module takes about half a minute.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.fleetimage import base_tag, project_version
from tests.coordinator_process import free_port
from tests.release.test_release_docker import _docker, _docker_skip_reason

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
READY_SECONDS = 60.0


@dataclass(frozen=True)
class Images:
    version: str
    agent: str
    coordinator: str
    output: str  # what scripts/build-images printed


def _image_id(ref: str) -> str | None:
    r = _docker("image", "inspect", "-f", "{{.Id}}", ref, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    reason = _docker_skip_reason()
    if reason:
        pytest.skip(reason)
    version = f"test-{uuid.uuid4().hex[:10]}"
    base = base_tag()
    base_before = _image_id(base)
    made: list[str] = []
    try:
        r = subprocess.run([str(ROOT / "scripts" / "build-images"), "--version", version],
                           capture_output=True, text=True, timeout=1800, check=False)
        for kind in ("agent", "coordinator"):
            found = _image_id(f"fleetmesh/{kind}:{version}")
            if found:
                made.append(found)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        yield Images(version, f"fleetmesh/agent:{version}", f"fleetmesh/coordinator:{version}",
                     r.stdout)
    finally:
        for image in reversed(made):  # the coordinator image is the agent image's child
            _docker("rmi", "-f", image, check=False, timeout=120)
        if base_before is None and (base_id := _image_id(base)) is not None:
            _docker("rmi", base_id, check=False, timeout=120)


def test_build_prints_each_image_size(images: Images) -> None:
    for tag in (images.agent, images.coordinator):
        m = re.search(rf"^{re.escape(tag)} [0-9a-f]{{12}} ([0-9.]+) MB$", images.output, re.M)
        assert m, images.output
        size = int(json.loads(_docker("image", "inspect", tag).stdout)[0]["Size"])
        assert float(m.group(1)) == round(size / 1e6, 1)


def test_images_hold_no_pip_apt_lists_or_compiler(images: Images) -> None:
    for tag in (images.agent, images.coordinator):
        r = _docker("run", "--rm", "--network", "none", "--entrypoint", "sh", tag, "-c",
                    "for c in pip pip3 gcc cc; do command -v $c; done; "
                    "find /var/lib/apt/lists /root/.cache -mindepth 1 2>/dev/null; "
                    "for c in fleetmesh fleetmesh-agent wireguard-go wg ip iptables; do "
                    "command -v $c; done",
                    check=False)
        assert r.stdout.split() == ["/usr/local/bin/fleetmesh", "/usr/local/bin/fleetmesh-agent",
                                    "/usr/bin/wireguard-go", "/usr/bin/wg", "/usr/sbin/ip",
                                    "/usr/sbin/iptables"], (tag, r.stdout, r.stderr)


def test_agent_version_is_the_project_version(images: Images) -> None:
    r = _docker("run", "--rm", "--network", "none", images.agent, "--version")
    assert r.stdout.strip() == f"fleetmesh-agent {project_version()}"


def _doctor(images: Images, *flags: str) -> subprocess.CompletedProcess[str]:
    r = _docker("run", "--rm", "--network", "host", *flags, images.agent, "doctor", check=False)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_doctor_with_tun_and_net_admin_passes_tun_and_wireguard(images: Images) -> None:
    r = _doctor(images, "--cap-add", "NET_ADMIN", "--device", "/dev/net/tun")
    lines = r.stdout.splitlines()
    assert "ok   wireguard: wireguard-go at /usr/bin/wireguard-go" in lines, r.stdout
    assert "ok   tun: /dev/net/tun opens read-write" in lines, r.stdout


def test_doctor_without_the_device_names_tun(images: Images) -> None:
    r = _doctor(images)
    assert r.returncode == 1
    tun = [line for line in r.stdout.splitlines() if line.startswith("FAIL tun:")]
    assert tun and "--device /dev/net/tun" in tun[0], r.stdout


def test_agent_starts_wireguard_go_inside_its_container(images: Images) -> None:
    """What `run --wg-mount-namespace self` (the image's default) does, in the agent image with
    the flags of the documented `docker run` line but the container's own network namespace:
    wireguard-go started by vpn's WireGuardGo without a mount namespace of its own (a container
    has no CAP_SYS_ADMIN to make one), its interface up, its UAPI socket answering."""
    script = (
        "import subprocess\n"
        "from vpn import OWN_MOUNT_NAMESPACE, WireGuardGo\n"
        "wg = WireGuardGo().start('fmtest0', None, OWN_MOUNT_NAMESPACE)\n"
        "print(wg.socket_path)\n"
        "print(subprocess.run(['wg', 'show', 'fmtest0', 'listen-port'], capture_output=True,"
        " text=True, check=True).stdout.strip())\n"
        "print(subprocess.run(['ip', '-o', 'link', 'show', 'fmtest0'], capture_output=True,"
        " text=True, check=True).stdout.split()[1])\n"
        "wg.stop()\n")
    r = _docker("run", "--rm", "--cap-add", "NET_ADMIN", "--device", "/dev/net/tun",
                "--network", "none", "--entrypoint", "python3", images.agent, "-c", script,
                check=False)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("/root/run/wireguard/fmtest0.sock")
    assert lines[1].isdigit()
    assert lines[2] == "fmtest0:"


def test_coordinator_serves_on_a_published_loopback_port(images: Images,
                                                         tmp_path: Path) -> None:
    port = free_port()
    volume = tmp_path / "coordinator"
    volume.mkdir()
    cid = _docker("run", "-d", "-p", f"127.0.0.1:{port}:8443", "-v",
                  f"{volume}:/var/lib/fleetmesh", images.coordinator, "--listen", "0.0.0.0:8443",
                  "--hub-endpoint", "127.0.0.1:51820", "--no-hub").stdout.strip()
    try:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a self-signed certificate made at first start
        deadline = time.monotonic() + READY_SECONDS
        status, body = 0, b""
        while status != 200:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/openapi.json",
                                            timeout=5, context=context) as resp:
                    status, body = resp.status, resp.read()
            except (urllib.error.URLError, ConnectionError, ssl.SSLError):
                running = _docker("inspect", "-f", "{{.State.Running}}", cid).stdout.strip()
                if running != "true" or time.monotonic() > deadline:
                    pytest.fail("coordinator container not serving: "
                                + _docker("logs", cid, check=False).stderr[-2000:])
                time.sleep(0.2)
        assert json.loads(body)["openapi"].startswith("3.")
        assert (volume / "operator.key").is_file()
        assert (volume / "tls.crt").is_file()
    finally:
        _docker("rm", "-f", cid, check=False, timeout=120)


def test_build_images_refuses_a_bad_version() -> None:
    r = subprocess.run([sys.executable, "-m", "lab.fleetimage", "--version", "no/slash"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == ("build-images: bad --version 'no/slash': a Docker tag (letters, "
                                "digits, '.', '-', '_', at most 128)")


def _wait(what: str, ready: Callable[[], bool], cids: list[str]) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while not ready():
        if time.monotonic() > deadline:
            logs = [_docker("logs", cid, check=False).stderr[-1500:] for cid in cids]
            pytest.fail(f"{what} not within {READY_SECONDS:.0f} s: {logs}")
        time.sleep(0.5)


def _wg_listen_port(container: str) -> int | None:
    """The listen port of the container's fm0, asked of its wireguard-go over the UAPI socket
    in the container's own /run (through /proc/PID/root: `docker exec` cannot be used, as
    inside a chroot, as in a fresh-Debian box, runc's exec lands in the mount namespace's root,
    not the container's)."""
    pid = int(_docker("inspect", "-f", "{{.State.Pid}}", container).stdout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        # /run, not /var/run: that is an absolute symlink, resolved in our root, not its
        sock.connect(f"/proc/{pid}/root/run/wireguard/fm0.sock")
        sock.sendall(b"get=1\n\n")
        answer = b""
        while not answer.endswith(b"\n\n") and len(answer) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    ports = re.findall(rb"^listen_port=(\d+)$", answer, re.M)
    return int(ports[0]) if ports else None


def test_agent_container_joins_runs_and_survives_sigkill(images: Images, tmp_path: Path) -> None:
    """docs/services.md's lines (join once, then run with the restart policy) against the
    coordinator image. On the engine's bridge with IPv6 enabled in the container rather than
    `--network host`, so that the test's WireGuard interface stays out of this host's
    namespace. SIGKILL of the agent (the container's PID 1, from outside) → the engine restarts
    it and it reports again."""
    coord_data, agent_data = tmp_path / "coordinator", tmp_path / "agent"
    coord_data.mkdir()
    agent_data.mkdir()
    cids: list[str] = []
    try:
        coord = _docker("run", "-d", "-v", f"{coord_data}:/var/lib/fleetmesh", images.coordinator,
                        "--listen", "0.0.0.0:8443", "--hub-endpoint", "127.0.0.1:51820",
                        "--no-hub").stdout.strip()
        cids.append(coord)
        address = _docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", coord).stdout.strip()
        _wait("the coordinator's certificate line",
              lambda: "certificate sha256" in _docker("logs", coord).stdout, cids)
        fingerprint = _docker("logs", coord).stdout.split("certificate sha256 ")[1].split()[0]
        url = f"https://{address}:8443"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMESH_")}
        env.update(FLEETMESH_URL=url, FLEETMESH_FINGERPRINT=fingerprint, HOME=str(tmp_path),
                   FLEETMESH_API_KEY=(coord_data / "operator.key").read_text().strip())

        def operator(*argv: str) -> Any:
            r = subprocess.run([sys.executable, "-m", "ops.cli", *argv, "--json"], env=env,
                               capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        token = operator("token", "create", "--fleet", "shop")["token"]
        volume = f"{agent_data}:/var/lib/fleetmesh-agent"
        joined = _docker("run", "--rm", "-v", volume, images.agent, "join", url, "--token",
                         token, "--data", "/var/lib/fleetmesh-agent", "--name", "cam-1")
        assert "enrolled as cam-1 in fleet shop" in joined.stdout, joined.stdout
        agent = _docker("run", "-d", "--sysctl", "net.ipv6.conf.all.disable_ipv6=0",
                        "--cap-add", "NET_ADMIN", "--device", "/dev/net/tun",
                        "-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", volume,
                        "--restart", "unless-stopped", images.agent).stdout.strip()
        cids.append(agent)

        def reported_after(t: float) -> Callable[[], bool]:
            def check() -> bool:
                device = operator("devices", "show", "cam-1")
                return bool(device["online"]) and float(device["last_report"] or 0) > t
            return check

        _wait("cam-1 online", reported_after(0.0), cids)
        assert _wg_listen_port(agent) == 51820
        pid = int(_docker("inspect", "-f", "{{.State.Pid}}", agent).stdout)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)

        def restarted() -> bool:
            running, count = _docker("inspect", "-f", "{{.State.Running}} {{.RestartCount}}",
                                     agent).stdout.split()
            return running == "true" and int(count) >= 1

        _wait("the agent restarted by the engine", restarted, cids)
        _wait("cam-1 reporting again", reported_after(killed_at), cids)
        assert _wg_listen_port(agent) == 51820
    finally:
        for cid in reversed(cids):
            _docker("rm", "-f", cid, check=False, timeout=120)
