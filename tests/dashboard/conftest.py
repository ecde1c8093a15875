"""A real coordinator process with enrolled fake devices and published releases, and a real
Chromium (Debian's, driven by Playwright; no browser download) for the dashboard tests.

Without /usr/bin/chromium or the playwright package the browser tests skip, saying why; with
CI=true they fail instead, so CI never passes by skipping them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import pytest
import trio
from nacl.signing import SigningKey

from mesh.control import (
    AppStatus,
    DeviceReport,
    LogLine,
    LogUpload,
    PeerMisbehaviour,
    PeerPath,
    SourceBytes,
    WanBytes,
)
from mesh.tlspin import pinned_ssl_context
from ops.client import DeviceClient, OperatorClient, enroll
from tests.coordinator import releasekit
from tests.coordinator_process import FLEETMESH, RunningCoordinator, running_coordinator
from vpn import generate_keypair

CHROMIUM: Final = Path(os.environ.get("FLEETMESH_CHROMIUM", "/usr/bin/chromium"))
# docs/architecture.md "Platform facts": what Debian's chromium needs to run headless as root with
# no network.
CHROMIUM_ARGS: Final = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO: Final = Path(__file__).resolve().parents[2]
FLEET: Final = "cams"
APP: Final = "web"
# Long enough for the dashboard's 2 s polls plus a slow machine; a wait, not a timing claim.
UI_TIMEOUT_MS: Final = 15_000

T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """One trio call from these synchronous (Playwright) tests."""
    return trio.run(fn, *args)


def artifacts_dir() -> Path:
    base = os.environ.get("FLEETMESH_TEST_ARTIFACTS")
    out = Path(base) / "dashboard" if base else REPO / "test-artifacts" / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: browser tests must run; scripts/setup installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")  # closed before the rest of the suite runs
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class FakeDevice:
    name: str
    public_key: str
    credential: str = ""
    mesh_ipv4: str = ""
    der: bytes = b""
    peers: tuple[PeerPath, ...] = ()


@dataclass
class Fleet:
    coord: RunningCoordinator
    home: Path
    devices: dict[str, FakeDevice] = field(default_factory=dict)
    versions: list[int] = field(default_factory=list)
    key: SigningKey | None = None  # the fleet's release key, once _publish signed with it

    @property
    def url(self) -> str:
        return self.coord.url

    def operator(self) -> OperatorClient:
        return OperatorClient(self.coord.url, self.coord.api_key, cert_der=self.coord.der)

    def cli_json(self, *args: str) -> Any:
        out = subprocess.run([FLEETMESH, *args, "--json"], check=False, capture_output=True,
                             env=self.coord.operator_env(self.home), text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def report(self, name: str, *apps: AppStatus, peers: tuple[PeerPath, ...] | None = None,
               misbehaving: tuple[PeerMisbehaviour, ...] = (),
               wan_bytes: WanBytes | None = None) -> None:
        """The device reports its peers (as last given), the state of its apps, the peers
        its mesh node counted misbehaving and its WAN byte account."""
        dev = self.devices[name]
        if peers is not None:
            dev.peers = peers

        async def send() -> None:
            async with DeviceClient(self.url, dev.credential, dev.der) as client:
                await client.report(DeviceReport((), "dashboard-test", dev.peers, apps,
                                                 misbehaving, wan_bytes=wan_bytes))
        run(send)

    def upload_logs(self, name: str, *lines: tuple[str, str]) -> None:
        """(stream, text) lines of app APP, as the agent uploads them."""
        body = LogUpload(tuple(LogLine(time.time(), APP, stream, text)
                               for stream, text in lines)).to_json()
        r = self.device_call(name, "POST", "/api/v1/device/logs", body)
        assert r.status_code == 204, r.text

    def device_call(self, name: str, method: str, path: str, body: Any = None
                    ) -> httpx.Response:
        """A device endpoint with the device's own credential, over the pinned certificate."""
        dev = self.devices[name]
        with httpx.Client(base_url=self.url, verify=pinned_ssl_context(dev.der),
                          headers={"Authorization": f"Bearer {dev.credential}"},
                          timeout=30) as http:
            return http.request(method, path, json=body)

    def target_entries(self, name: str) -> dict[str, dict[str, Any]]:
        """app -> target entry ({"version", "force", "retry", ...}) as the device reads it."""
        r = self.device_call(name, "GET", "/api/v1/device/target")
        assert r.status_code == 200, r.text
        return {t["app"]: t for t in r.json()["targets"]}

    def device_targets(self, name: str) -> dict[str, int]:
        """app -> version, as the device reads its targets."""
        return {app: t["version"] for app, t in self.target_entries(name).items()}


async def _enroll_all(fleet: Fleet, names: list[str]) -> None:
    with fleet.operator() as op:
        tokens = {n: op.create_token(FLEET, name=n)["token"] for n in names}
    for name in names:
        keys = generate_keypair()
        enrollment, der = await enroll(fleet.url, tokens[name], keys.public, name=name,
                                       agent_version="dashboard-test")
        fleet.devices[name] = FakeDevice(name, keys.public, enrollment.credential,
                                         enrollment.mesh_ipv4, der)


def app_status(state: str, *, running: int | None = 1, target: int | None = 2,
               done: int = 0, total: int = 0, lan: int = 0, coordinator: int = 0,
               lock_since: float | None = None, error: str | None = None,
               failed: tuple[int, ...] = ()) -> AppStatus:
    return AppStatus(APP, state, running, target, done, total,
                     SourceBytes(lan=lan, coordinator=coordinator), lock_since, error, failed,
                     0, time.time())


def _publish(fleet: Fleet) -> None:
    key = fleet.key = SigningKey.generate()
    base = os.urandom(48_000)
    with fleet.operator() as op:
        two = [base[:40_000] + os.urandom(8_000), os.urandom(20_000)]
        for version, layers, delta in ((1, [base], None), (2, two, os.urandom(3_000)),
                                       (3, [two[0], os.urandom(20_000)], os.urandom(2_000))):
            built = releasekit.build(key, fleet=FLEET, app=APP, version=version, layers=layers,
                                     delta=delta)
            for blob_id, (data, kind) in built.blobs.items():
                op.put_blob(blob_id, data, kind)
            op.publish_release(built.signed)
            fleet.versions.append(version)
            if version == 2:
                op.set_target(FLEET, APP, 2)  # before v3: an older target would need a pin


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """cam-1 (downloading web v2 over v1) and cam-2 (running v2) report: online; cam-3
    enrolled but silent (offline), cam-4 only provisioned. Releases web v1, v2 and v3 (v2 and
    v3 with a delta) published, v2 the fleet's target."""
    tmp = tmp_path_factory.mktemp("dashboard")
    with running_coordinator(tmp / "coord", tmp / "coord.log") as coord:
        f = Fleet(coord, tmp / "home")
        f.home.mkdir()
        run(_enroll_all, f, ["cam-1", "cam-2", "cam-3"])
        with f.operator() as op:
            op.provision("cam-4", FLEET)
        _publish(f)
        one, two, three = (f.devices[n] for n in ("cam-1", "cam-2", "cam-3"))
        f.report("cam-1", app_status("downloading", total=60_000), peers=(
            PeerPath(two.public_key, "direct", "127.0.0.1:51820", 1_800_000_000.0),
            PeerPath(three.public_key, "relay")))
        f.report("cam-2", app_status("running", running=2),
                 peers=(PeerPath(one.public_key, "direct", "127.0.0.1:51821"),))
        yield f
