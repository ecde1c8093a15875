"""`fleetmesh coordinator serve` as a user runs it: bad arguments are one line and exit 2; a
real start on loopback prints where the operator key is and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def serve(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetmesh"), "coordinator", "serve", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("argv, fragment", [
    ((), "--data"),
    (("--listen", "nope"), "--listen"),
    (("--listen", "127.0.0.1:99999"), "--listen"),
    (("--listen", "0.0.0.0:8443"), "--hub-endpoint"),
    (("--wg-port", "0"), "--wg-port"),
    (("--hub-endpoint", "example.com:1"), "--hub-endpoint"),
    (("--mesh-ipv4", "10.250.0.1/16"), "mesh IPv4"),
    (("--mesh-ipv6", "10.0.0.0/8"), "IPv6"),
    (("--tls-cert", "/nonexistent"), "--tls-key"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path: Path, argv: tuple[str, ...],
                                           fragment: str) -> None:
    data = () if argv == () else ("--data", str(tmp_path / "d"))
    listen = () if any(a == "--listen" for a in argv) else ("--listen", "127.0.0.1:0")
    result = serve(*data, *listen, "--no-hub", *argv)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0]


def test_serve_starts_prints_key_location_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "d"
    proc = subprocess.Popen([str(BIN / "fleetmesh"), "coordinator", "serve", "--data",
                             str(data), "--listen", "127.0.0.1:0", "--no-hub"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert str(data / "operator.key") in first
        assert "coordinator on https://127.0.0.1:" in proc.stdout.readline()  # type: ignore
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # second start: same key, nothing new printed about it
    again = subprocess.Popen([str(BIN / "fleetmesh"), "coordinator", "serve", "--data",
                              str(data), "--listen", "127.0.0.1:0", "--no-hub"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "coordinator on" in again.stdout.readline()  # type: ignore[union-attr]
        again.send_signal(signal.SIGINT)
        assert again.wait(15) == 0
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()
