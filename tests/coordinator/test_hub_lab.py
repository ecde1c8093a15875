"""The coordinator with its real hub (wireguard-go `fmhub0`) in a throwaway network namespace.

The CLI runs inside `fm-t<hex>` (nsenter), so the hub, its forwarding sysctls and the API live
there; the HTTP calls run in the same namespace through a small helper process. Everything
(process by PID, namespace by name) is removed even when the test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpn import UapiClient, generate_keypair, netns_path

pytestmark = pytest.mark.lab

LAB_READY = (os.geteuid() == 0 and all(shutil.which(t) for t in ("wireguard-go", "nsenter",
                                                                  "unshare", "ip")))
BIN = Path(sys.executable).parent

HELPER = r"""
import json, sys, httpx
url, cert, method, path, auth, body = sys.argv[1:7]
headers = {"Authorization": "Bearer " + auth} if auth else {}
r = httpx.request(method, url + path, verify=cert, headers=headers,
                  json=json.loads(body) if body else None, timeout=20)
print(json.dumps({"status": r.status_code, "body": r.json() if r.content else None}))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    if not LAB_READY:
        pytest.skip("lab test: needs root, wireguard-go, nsenter, unshare and ip")
    from pyroute2 import netns as pr_netns  # type: ignore[import-untyped]

    name = f"fm-t{secrets.token_hex(3)}"
    pr_netns.create(name)
    try:
        subprocess.run(["nsenter", f"--net={netns_path(name)}", "ip", "link", "set", "lo", "up"],
                       check=True, timeout=10)
        yield name
    finally:
        if name in pr_netns.listnetns():
            pr_netns.remove(name)


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_hub_has_enrolled_device_as_peer_and_drops_it_on_revoke(netns: str,
                                                                tmp_path: Path) -> None:
    data = tmp_path / "coord"
    enter = ["nsenter", f"--net={netns_path(netns)}"]
    proc = subprocess.Popen(
        [*enter, str(BIN / "fleetmesh"), "coordinator", "serve", "--data", str(data),
         "--listen", "127.0.0.1:8443", "--hub-endpoint", "198.51.100.1:51820"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wg_pids: list[int] = []
    try:
        line = ""
        deadline = time.monotonic() + 30
        while "coordinator on" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            line = proc.stdout.readline()  # type: ignore[union-attr]
        url = "https://127.0.0.1:8443"
        wg_pids = children(proc.pid)
        assert len(wg_pids) == 1, wg_pids
        uapi = UapiClient(f"/proc/{wg_pids[0]}/root/run/wireguard/fmhub0.sock")
        op_key = (data / "operator.key").read_text().strip()

        def call(method: str, path: str, auth: str = "", body: object = None,
                 base: str = url) -> dict:
            done = subprocess.run(
                [*enter, sys.executable, "-c", HELPER, base, str(data / "tls.crt"), method, path,
                 auth, json.dumps(body) if body is not None else ""],
                capture_output=True, text=True, timeout=60, check=True)
            return json.loads(done.stdout)  # type: ignore[no-any-return]

        token = call("POST", "/api/v1/tokens", op_key, {"fleet": "lab"})["body"]["token"]
        keys = generate_keypair()
        enrolled = call("POST", "/api/v1/enroll", "", {"token": token,
                                                       "public_key": keys.public, "name": "d1"})
        assert enrolled["status"] == 201, enrolled
        status = uapi.get()
        peer = status.peer(keys.public)
        assert peer is not None
        assert sorted(str(n) for n in peer.allowed_ips) == sorted([
            f"{enrolled['body']['mesh_ipv4']}/32", f"{enrolled['body']['mesh_ipv6']}/128"])
        assert status.listen_port == 51820
        assert enrolled["body"]["hub"]["public_key"] == status.public_key
        assert enrolled["body"]["hub"]["api_url"] == "https://10.250.0.1:8443"
        sysctl = subprocess.run([*enter, "cat", "/proc/sys/net/ipv4/ip_forward"],
                                check=True, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        assert sysctl == "1"
        addrs = subprocess.run([*enter, "ip", "-o", "addr", "show", "fmhub0"],
                               check=True, capture_output=True, text=True,
                               timeout=10).stdout
        assert "10.250.0.1/16" in addrs and "fd7a:f1ee:7000::1/48" in addrs
        # the API answers through the hub address too
        assert call("GET", "/api/v1/devices", op_key,
                    base="https://10.250.0.1:8443")["status"] == 200
        revoked = call("POST", "/api/v1/devices/d1/revoke", op_key)
        assert revoked["status"] == 200
        assert uapi.get().peer(keys.public) is None  # gone at once, not at the next sync
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pid in wg_pids:  # the coordinator stops it; make sure even if it did not
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]
    assert not any(Path(f"/proc/{pid}").exists() for pid in wg_pids)
