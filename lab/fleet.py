"""The fleet on a lab: the coordinator on `coordinator`, an enrolled agent on every device node
(under the node's name), and the `operator` node configured for the `fleetmesh` CLI.

Everything runs as real processes inside the nodes (`Lab.spawn` records their PIDs, so `down`
stops them even after a crash); the host talks to the lab only through those processes.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from mesh.release import write_signing_key
from mesh.tlspin import fingerprint

from ._host import (
    STATE_DIR,
    LabError,
    kill_pids,
    proc_start_time,
    read_state,
    state_lock,
    write_state,
)
from .core import Lab, Node

API_PORT: Final = 8443
WG_PORT: Final = 51820  # WireGuard's conventional port, for the hub and every agent
FLEET: Final = "lab"
READY_TIMEOUT: Final = 60.0  # wireguard-go, TLS key generation, enrollments on 2 busy cores
COORDINATOR_DIR: Final = STATE_DIR / "coordinator"
AGENTS_DIR: Final = STATE_DIR / "agents"
LOG_DIR: Final = STATE_DIR / "logs"
RELEASE_KEY: Final = STATE_DIR / "release.key"  # the lab operator's release signing key (0600)
BIN: Final = Path(sys.executable).parent  # the venv's console scripts


@dataclass(frozen=True, slots=True)
class FleetAccess:
    """How a process inside the lab reaches the coordinator as the operator."""

    url: str
    api_key: str
    fingerprint: str

    def env(self) -> dict[str, str]:
        return {"FLEETMESH_URL": self.url, "FLEETMESH_API_KEY": self.api_key,
                "FLEETMESH_FINGERPRINT": self.fingerprint}


def access(lab: Lab) -> FleetAccess | None:
    """The operator credentials of the lab's running fleet, None for a network-only lab."""
    f = lab.state_now().get("fleet")
    return None if f is None else FleetAccess(f["url"], f["api_key"], f["fingerprint"])


def _log(name: str) -> Any:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child process


def fleetmesh(lab: Lab, node: str | Node, *argv: str, timeout: float = 30
              ) -> subprocess.CompletedProcess[str]:
    """`fleetmesh ARGV` as the operator, run inside a node (the host is not on the lab's WAN)."""
    acc = access(lab)
    if acc is None:
        raise LabError("no fleet is running in this lab (it was brought up --network-only)")
    env = [f"{k}={v}" for k, v in acc.env().items()]
    return lab.run(node, ["env", *env, str(BIN / "fleetmesh"), *argv], capture_output=True,
                   text=True, timeout=timeout)


def _checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise LabError(f"{what} failed: {detail[-1] if detail else f'exit {result.returncode}'}")
    return result.stdout


def start_fleet(lab: Lab, timeout: float = READY_TIMEOUT) -> FleetAccess:
    """Start the coordinator and enroll and run an agent on every device; returns once every
    device is online at the coordinator (its hub handshake is up)."""
    deadline = time.monotonic() + timeout
    acc = start_coordinator(lab, timeout)
    # The fleet's release key exists before any device enrolls: each pins it at enrollment.
    if not RELEASE_KEY.exists():
        write_signing_key(RELEASE_KEY)
    _checked(fleetmesh(lab, "coordinator", "release", "set-key", "--fleet", FLEET,
                       "--signing-key", str(RELEASE_KEY)), "setting the fleet's release key")
    devices = lab.devices
    if devices:
        token = json.loads(_checked(fleetmesh(
            lab, "coordinator", "token", "create", "--fleet", FLEET, "--uses", str(len(devices)),
            "--expires", "10m", "--json"), "creating an enrollment token"))["token"]
        for d in devices:
            _checked(lab.run(d, [str(BIN / "fleetmesh-agent"), "join", acc.url, "--token", token,
                                 "--data", str(AGENTS_DIR / d.name), "--name", d.name,
                                 "--wg-port", str(WG_PORT)],
                             capture_output=True, text=True, timeout=60), f"{d.name}: join")
            start_agent(lab, d.name)
    wait_online(lab, [d.name for d in devices], deadline - time.monotonic())
    return acc


def start_agent(lab: Lab, device: str) -> int:
    """Start (or restart) an enrolled device's agent; returns its PID."""
    d = lab.node(device)
    # wireguard-go in the node's mount namespace, so `wg show` in the node sees it
    wg_ns = ["--wg-mount-namespace", d.mountns_path] if d.mountns_path else []
    sharing = [] if lab.topology.agents.peer_sharing else ["--no-peer-sharing"]
    p = lab.spawn(d, [str(BIN / "fleetmesh-agent"), "run", "--data", str(AGENTS_DIR / d.name),
                      *wg_ns, "--underlay", d.iface, *sharing],
                  stdin=subprocess.DEVNULL, stdout=_log(d.name), stderr=subprocess.STDOUT)
    return p.pid


def stop_agent(lab: Lab, device: str) -> int:
    """Stop a device's agent (SIGTERM by its recorded PID; it stops its wireguard-go too).
    Returns how many agent processes were stopped."""
    victims = [p["pid"] for p in lab.state_now().get("processes", [])
               if p.get("node") == device and "run" in p.get("argv", [])
               and p.get("start") is not None and proc_start_time(p["pid"]) == p["start"]]
    kill_pids(victims, timeout=10)
    return len(victims)


def start_coordinator(lab: Lab, timeout: float = READY_TIMEOUT) -> FleetAccess:
    """Start (or restart, on the same data directory) the coordinator on its node; returns once
    its API answers the operator."""
    coord = lab.node("coordinator")
    where = coord.underlay_ipv4
    lab.spawn(coord, [str(BIN / "fleetmesh"), "coordinator", "serve", "--data",
                      str(COORDINATOR_DIR), "--listen", f"{where}:{API_PORT}", "--wg-port",
                      str(WG_PORT), "--hub-endpoint", f"{where}:{WG_PORT}"],
              stdin=subprocess.DEVNULL, stdout=_log("coordinator"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    key_file, cert_file = COORDINATOR_DIR / "operator.key", COORDINATOR_DIR / "tls.crt"
    while True:
        if key_file.exists() and cert_file.exists():
            acc = FleetAccess(f"https://{where}:{API_PORT}", key_file.read_text().strip(),
                              fingerprint(ssl.PEM_cert_to_DER_cert(cert_file.read_text())))
            _remember(lab, acc)
            if fleetmesh(lab, coord, "devices", "list", "--json", timeout=15).returncode == 0:
                return acc
        if time.monotonic() > deadline:
            raise LabError(f"the coordinator did not answer within {timeout:.0f} s "
                           f"(see {LOG_DIR / 'coordinator.log'})")
        time.sleep(0.2)


def stop_coordinator(lab: Lab) -> int:
    """Stop the coordinator process (SIGTERM, by its recorded PID); the agents and tunnels stay.
    Returns how many coordinator processes were stopped."""
    victims = [p["pid"] for p in lab.state_now().get("processes", [])
               if p.get("node") == "coordinator" and "serve" in p.get("argv", [])
               and p.get("start") is not None and proc_start_time(p["pid"]) == p["start"]]
    kill_pids(victims, timeout=10)
    return len(victims)


def _remember(lab: Lab, acc: FleetAccess) -> None:
    with state_lock():
        state = read_state() or lab.state_now()
        state["fleet"] = {"url": acc.url, "api_key": acc.api_key,
                          "fingerprint": acc.fingerprint}
        write_state(state)


def devices(lab: Lab) -> dict[str, dict[str, Any]]:
    """The coordinator's device list, by name."""
    out = _checked(fleetmesh(lab, "coordinator", "devices", "list", "--json"), "devices list")
    return {d["name"]: d for d in json.loads(out)["devices"]}


def wait_online(lab: Lab, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + max(timeout, 1.0)
    while True:
        listed = devices(lab)
        offline = [n for n in names if not listed.get(n, {}).get("online")]
        if not offline:
            return
        if time.monotonic() > deadline:
            raise LabError(f"not online at the coordinator: {', '.join(offline)} "
                           f"(see {LOG_DIR}/<node>.log)")
        time.sleep(0.5)


def publish_synthetic(lab: Lab, version: int, size: int, seed: int = 1) -> dict[str, Any]:
    """Publish lab.release's synthetic release from the coordinator node and make it the
    fleet's target; returns its blob ids and the bytes a device must fetch (lab/release.py)."""
    acc = access(lab)
    if acc is None:
        raise LabError("no fleet is running in this lab (it was brought up --network-only)")
    env = [f"{k}={v}" for k, v in acc.env().items()]
    out = _checked(lab.run("coordinator", [
        "env", *env, str(BIN / "python"), "-m", "lab.release", "--fleet", FLEET, "--version",
        str(version), "--size", str(size), "--seed", str(seed), "--signing-key",
        str(RELEASE_KEY)], capture_output=True, text=True, timeout=300),
        f"publishing synthetic release v{version}")
    result: dict[str, Any] = json.loads(out)
    return result


def blobs_held(device: str) -> set[str]:
    """The blob ids in a device agent's store (read from the host: the data dirs live there)."""
    store = AGENTS_DIR / device / "blobs"
    return {p.name for p in store.iterdir() if len(p.name) == 64} if store.is_dir() else set()
