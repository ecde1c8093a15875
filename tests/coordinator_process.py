"""A real `fleetmesh coordinator serve --no-hub` on loopback, as a child process, for the
end-to-end tests of the CLI, the SDK and publishing. Always stopped by PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh.tlspin import CertificateFetchError, fetch_certificate, fingerprint
from tests.procs import stop

FLEETMESH = str(Path(sys.executable).parent / "fleetmesh")
READY_SECONDS = 30.0


@dataclass(frozen=True)
class RunningCoordinator:
    url: str
    api_key: str
    der: bytes
    data: Path
    pid: int = 0  # the serve process (a test may SIGKILL it; it is reaped at the end)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.der)

    def cli(self, home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
        """`fleetmesh ARGV` as the operator whose home is `home` runs it against us."""
        return subprocess.run([FLEETMESH, *argv], capture_output=True, text=True, timeout=60,
                              env=self.operator_env(home), check=False)

    def cli_ok(self, home: Path, *argv: str) -> str:
        """`cli`'s output, once it exited 0."""
        result = self.cli(home, *argv)
        assert result.returncode == 0, (argv, result.stderr)
        return result.stdout

    def operator_env(self, home: Path) -> dict[str, str]:
        """This process's environment with the operator configured for this coordinator."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FLEETMESH_") and k not in ("XDG_CONFIG_HOME",
                                                              "XDG_CACHE_HOME")}
        env.update(HOME=str(home), FLEETMESH_URL=self.url, FLEETMESH_API_KEY=self.api_key,
                   FLEETMESH_FINGERPRINT=self.fingerprint)
        return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_coordinator(data: Path, log_path: Path, *extra: str, fleetmesh: str = FLEETMESH
                        ) -> Iterator[RunningCoordinator]:
    """`extra`: more arguments of `serve` (e.g. `--store URL`); `fleetmesh`: the console script
    to run (another installation's, e.g. a venv the wheel went into)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMESH_")}
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [fleetmesh, "coordinator", "serve", "--data", str(data), "--listen",
             f"127.0.0.1:{port}", "--no-hub", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=clean)
        try:
            deadline = time.monotonic() + READY_SECONDS
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"coordinator exited with {proc.returncode}: "
                                f"{log.read()[-2000:]}")
                if (data / "operator.key").exists():
                    try:
                        der = fetch_certificate("127.0.0.1", port, timeout=2)
                        break
                    except CertificateFetchError:
                        pass
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"coordinator not ready in {READY_SECONDS:.0f} s: "
                                f"{log.read()[-2000:]}")
                time.sleep(0.1)
            yield RunningCoordinator(f"https://127.0.0.1:{port}",
                                     (data / "operator.key").read_text().strip(), der, data,
                                     proc.pid)
        finally:
            stop(proc, 10)
