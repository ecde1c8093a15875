"""`fleetmesh coordinator install` and `fleetmesh-agent install`: units written under --root with
this installation's console scripts, hardened, capabilities exactly what each needs, accepted by
`systemd-analyze verify` (scripts/setup installs systemd for it). No systemctl is ever run."""

from __future__ import annotations

import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent import cli as agent_cli
from mesh.services import console_script
from ops import cli as ops_cli

HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
             "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK", "Restart=always",
             # ProtectClock's implied DeviceAllow would otherwise shut out the TUN device
             "ProtectClock=yes", "DevicePolicy=closed", "DeviceAllow=/dev/net/tun rw")


def unit_file(root: Path, name: str) -> Path:
    return root / "etc" / "systemd" / "system" / name


def options(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ln in text.splitlines():
        if ln and not ln.startswith(("#", "[")):
            key, _, value = ln.partition("=")
            out.setdefault(key, []).append(value)
    return out


def caps(text: str) -> set[str]:
    return set(options(text)["CapabilityBoundingSet"][0].split())


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: run scripts/setup (it installs systemd)")
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_coordinator_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = ops_cli.main(["coordinator", "install", "--root", str(tmp_path),
                         "--hub-endpoint", "203.0.113.10:51820"])
    out = capsys.readouterr().out
    path = unit_file(tmp_path, "fleetmesh-coordinator.service")
    assert code == 0 and f"wrote {path}" in out
    assert "systemctl enable --now fleetmesh-coordinator.service" in out
    assert "  systemctl daemon-reload" in out
    text = path.read_text()
    for line in HARDENING:
        assert line in text.splitlines()
    argv = options(text)["ExecStart"][0].split()
    assert Path(argv[0]) == console_script("fleetmesh") and Path(argv[0]).is_file()
    assert argv[1:] == ["coordinator", "serve", "--data", "/var/lib/fleetmesh", "--listen",
                        "0.0.0.0:8443", "--wg-port", "51820", "--mesh-ipv4", "10.250.0.0/16",
                        "--mesh-ipv6", "fd7a:f1ee:7000::/48", "--lock-stale-after", "1h",
                        "--hub-endpoint", "203.0.113.10:51820"]
    assert caps(text) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    assert options(text)["StateDirectory"] == ["fleetmesh"]
    assert "ReadWritePaths=/proc/sys/net" in text  # the hub's forwarding sysctls
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    done = verify(path)
    assert done.returncode == 0, done.stderr


def test_coordinator_unit_capabilities_follow_its_options(tmp_path: Path) -> None:
    assert ops_cli.main(["coordinator", "install", "--root", str(tmp_path), "--listen",
                         "0.0.0.0:443", "--hub-endpoint", "203.0.113.10:51820"]) == 0
    path = unit_file(tmp_path, "fleetmesh-coordinator.service")
    assert caps(path.read_text()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert ops_cli.main(["coordinator", "install", "--root", str(tmp_path), "--no-hub",
                         "--listen", "192.0.2.4:8443", "--data", str(tmp_path),
                         "--store", "postgresql://fm:pw@db/fm"]) == 0
    text = path.read_text()
    assert caps(text) == set() and "ProtectKernelTunables=yes" in text
    assert options(text)["ReadWritePaths"] == [str(tmp_path)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the store URL may carry a password
    done = verify(path)
    assert done.returncode == 0, done.stderr


def test_coordinator_unit_keeps_blobs_in_s3(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    url = "s3://fleet-blobs/prod?endpoint=http://192.0.2.9:8333&region=eu-1"
    assert ops_cli.main(["coordinator", "install", "--root", str(tmp_path), "--no-hub",
                         "--listen", "192.0.2.4:8443", "--blobs", url,
                         "--blobs-credentials-file", "/etc/fleetmesh/s3.credentials"]) == 0
    path = unit_file(tmp_path, "fleetmesh-coordinator.service")
    argv = shlex.split(options(path.read_text())["ExecStart"][0])  # systemd's quoting
    at = argv.index("--blobs")
    assert argv[at:at + 4] == ["--blobs", url, "--blobs-credentials-file",
                               "/etc/fleetmesh/s3.credentials"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # no secret in it: the file holds them
    done = verify(path)
    assert done.returncode == 0, done.stderr
    capsys.readouterr()
    # a unit whose service would refuse to start is not written
    assert ops_cli.main(["coordinator", "install", "--root", str(tmp_path / "2"), "--no-hub",
                         "--listen", "192.0.2.4:8443", "--blobs", "s3://Bad_Bucket"]) == 2
    err = capsys.readouterr().err
    assert "not an S3 bucket name" in err and err.count("\n") == 1
    assert ops_cli.main(["coordinator", "install", "--root", str(tmp_path / "2"), "--no-hub",
                         "--listen", "192.0.2.4:8443", "--blobs-credentials-file", "f"]) == 2
    assert "goes with --blobs" in capsys.readouterr().err


def test_agent_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = agent_cli.main(["install", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    path = unit_file(tmp_path, "fleetmesh-agent.service")
    assert code == 0 and "systemctl enable --now fleetmesh-agent.service" in out
    text = path.read_text()
    for line in (*HARDENING, "ProtectKernelTunables=yes", "RuntimeDirectory=wireguard"):
        assert line in text.splitlines()
    argv = options(text)["ExecStart"][0].split()
    assert Path(argv[0]) == console_script("fleetmesh-agent") and Path(argv[0]).is_file()
    assert argv[1:] == ["run", "--data", "/var/lib/fleetmesh-agent"]
    assert caps(text) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    done = verify(path)
    assert done.returncode == 0, done.stderr
    assert agent_cli.main(["install", "--root", str(tmp_path), "--underlay", "eth0"]) == 0
    text = path.read_text()
    assert caps(text) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_NET_BIND_SERVICE"}  # mDNS
    assert options(text)["ExecStart"][0].endswith("--underlay eth0")


def test_verify_rejects_a_missing_exec_start(tmp_path: Path) -> None:
    """The verification above means something: a unit whose program is absent fails it."""
    assert agent_cli.main(["install", "--root", str(tmp_path)]) == 0
    path = unit_file(tmp_path, "fleetmesh-agent.service")
    text = path.read_text()
    missing = tmp_path / "nowhere" / "fleetmesh-agent"
    path.write_text(text.replace(str(console_script("fleetmesh-agent")), str(missing)))
    assert verify(path).returncode != 0


@pytest.mark.parametrize(("argv", "needle"), [
    (["coordinator", "install", "--listen", "nope"], "--listen: must be HOST:PORT"),
    (["coordinator", "install", "--wg-port", "0"], "--wg-port: must be a port"),
    (["coordinator", "install", "--data", "relative/dir", "--hub-endpoint", "192.0.2.4:51820"],
     "absolute path"),
    (["coordinator", "install", "--tls-cert", "/c.pem", "--hub-endpoint", "192.0.2.4:51820"],
     "--tls-cert and --tls-key go together"),
    # the server's own check: a service that would refuse to start is not installed
    (["coordinator", "install"], "--hub-endpoint HOST:PORT is required when listening on 0.0.0.0"),
    (["coordinator", "install", "--hub-endpoint", "x", "--lock-stale-after", "soon"],
     "bad duration 'soon'"),
])
def test_bad_install_options_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          argv: list[str], needle: str) -> None:
    assert ops_cli.main([*argv, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not unit_file(tmp_path, "fleetmesh-coordinator.service").exists()


def test_agent_install_into_an_unwritable_root_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert agent_cli.main(["install", "--root", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and len(err.strip().splitlines()) == 1


def test_a_data_path_with_spaces_and_percent_is_quoted(tmp_path: Path) -> None:
    data = "/srv/fleet mesh/100%$"
    assert agent_cli.main(["install", "--root", str(tmp_path), "--data", data]) == 0
    path = unit_file(tmp_path, "fleetmesh-agent.service")
    text = path.read_text()
    assert options(text)["ExecStart"][0].endswith(' run --data "/srv/fleet mesh/100%%$$"')
    assert options(text)["ReadWritePaths"] == ['"/srv/fleet mesh/100%%$"']  # no $ expansion
    done = verify(path)
    assert done.returncode == 0, done.stderr
