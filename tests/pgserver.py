"""A private PostgreSQL server for tests: Debian's binaries, a cluster made by `initdb` in a
temporary directory, listening on 127.0.0.1 at a free port and on a unix socket in that
directory, stopped by PID. PostgreSQL refuses to run as root, so the cluster belongs to the
`postgres` system user (created by Debian's package) and runs as it (`runuser`)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import psycopg


def _newest_bin() -> Path:
    """Debian's server binaries (15 on Debian 12), the newest major version if several."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN: Final = _newest_bin()
USER: Final = "fleetmesh"  # the cluster's superuser (initdb -U), trusted on loopback only
STOP_SECONDS: Final = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


class PgServer:
    """`start()`, then `new_database()` per test, `stop()` at the end (also on failure)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fleetmesh-pg-"))
        self.port = 0
        self.pid: int | None = None
        self._names = itertools.count(1)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"no PostgreSQL in {PG_BIN}: run scripts/setup (Debian package "
                               "postgresql)")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        subprocess.run(_as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust",
                                    "-U", USER, "-E", "UTF8", "--no-sync"),
                       check=True, capture_output=True, timeout=120)
        self.port = _free_port()
        self.start_again()

    def start_again(self) -> None:
        """Start the cluster `start()` made (after `stop_server()`), on the same port."""
        data, log = self.dir / "data", self.dir / "server.log"
        # fsync off: a test cluster is thrown away, and fsyncs on a shared disk are slow
        options = f"-k {self.dir} -h 127.0.0.1 -p {self.port} -c fsync=off"
        done = subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o",
                                           options, "-l", str(log), "-w", "-t", "60", "start"),
                              capture_output=True, text=True, timeout=90, check=False)
        pidfile = data / "postmaster.pid"
        if pidfile.exists():
            self.pid = int(pidfile.read_text().split("\n", 1)[0])
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else done.stderr
            raise RuntimeError(f"PostgreSQL did not start: {tail}")

    def new_database(self) -> str:
        """An empty database of its own → its URL."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """The server stopped and its directory gone."""
        self.stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop_server(self) -> None:
        """SIGINT (PostgreSQL's fast shutdown) to the postmaster, SIGKILL after a grace."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGINT)
                deadline = time.monotonic() + STOP_SECONDS
                while time.monotonic() < deadline and _alive(self.pid):
                    time.sleep(0.05)
                if _alive(self.pid):
                    os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None


@contextmanager
def running_server() -> Iterator[PgServer]:
    """A started server, stopped by PID (its directory gone) at the end, also on failure."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    """Still running (the postmaster is not our child: pg_ctl started it, so no wait)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie is gone in every way that matters here
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
