"""The fleet on a lab: the coordinator on `coordinator`, an enrolled agent on every device node
(under the node's name), and the `operator` node configured for the `fleetmesh` CLI.

Everything runs as real processes inside the nodes (`LabNetwork.spawn` records their PIDs, so `down`
stops them even after a crash); the host talks to the lab only through those processes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from . import engines, hostlink
from ._host import (
    LOG_DIR,
    STATE_DIR,
    LabError,
    LabUsageError,
    kill_pids,
    proc_start_time,
    read_state,
    state_lock,
    write_state,
)
from .network import WAN_BRIDGE, WAN_NETNS, LabNetwork, Node
from .supervisor import STOP_TIMEOUT, read_status

API_PORT: Final = 8443
WG_PORT: Final = 51820  # WireGuard's conventional port, for the hub and every agent
FLEET: Final = "lab"
READY_TIMEOUT: Final = 60.0  # wireguard-go, TLS key generation, enrollments on 2 busy cores
COORDINATOR_DIR: Final = STATE_DIR / "coordinator"
AGENTS_DIR: Final = STATE_DIR / "agents"
RELEASE_KEY: Final = STATE_DIR / "release.key"  # the lab operator's release signing key (0600)
SUPERVISE_DIR: Final = STATE_DIR / "supervise"  # one status file per device's agent supervisor
# The operator's layer cache (`release create` keeps earlier releases' layers there): on disk,
# with the engines' data, not in the operator's home.
OPERATOR_CACHE: Final = engines.DATA_DIR / "operator-cache"
SUPERVISED_START_TIMEOUT: Final = 10.0
SUPERVISOR_MODULE: Final = "lab.supervise"  # in the argv of every agent supervisor
BIN: Final = Path(sys.executable).parent  # the venv's console scripts
# [agents] mode = "container": the agent's container in its device's engine, its data directory
# (AGENTS_DIR/<device> bind-mounted there) and the image saved once from the host's engine
AGENT_CONTAINER: Final = "fleetmesh-agent"
AGENT_DATA: Final = "/var/lib/fleetmesh-agent"
AGENT_IMAGE_TAR: Final = engines.DATA_DIR / "agent-image.tar"  # on disk, not in /run
HOST_DOCKER: Final = "unix:///var/run/docker.sock"


@dataclass(frozen=True, slots=True)
class FleetAccess:
    """How a process inside the lab reaches the coordinator as the operator."""

    url: str
    api_key: str
    fingerprint: str

    def env(self) -> dict[str, str]:
        return {"FLEETMESH_URL": self.url, "FLEETMESH_API_KEY": self.api_key,
                "FLEETMESH_FINGERPRINT": self.fingerprint}


def access(lab: LabNetwork) -> FleetAccess | None:
    """The operator credentials of the lab's running fleet, None for a network-only lab."""
    f = lab.state_now().get("fleet")
    return None if f is None else FleetAccess(f["url"], f["api_key"], f["fingerprint"])


def _log(name: str) -> Any:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child process


def fleetmesh(lab: LabNetwork, node: str | Node, *argv: str, timeout: float = 30
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


def start_fleet(lab: LabNetwork, timeout: float = READY_TIMEOUT) -> FleetAccess:
    """Start the coordinator and enroll and run an agent on every device; returns once every
    device is online at the coordinator (its hub handshake is up)."""
    # Start-up time: every process the lab runs in a node imports the lab package, e.g. one
    # `python -m lab.supervise` per device (measured: 36 MB and 0.24 s with this import here,
    # 43 MB and 0.37 s with it and mesh.tlspin's at the top). Only starting a fleet needs it.
    from mesh.release import write_signing_key

    deadline = time.monotonic() + timeout
    with_engine = engines.engine_nodes(lab)
    if with_engine:
        engines.start_engines(lab, with_engine, timeout)
    acc = start_coordinator(lab, timeout)
    _route_host(lab)
    # The fleet's release key exists before any device enrolls: each pins it at enrollment.
    if not RELEASE_KEY.exists():
        write_signing_key(RELEASE_KEY)
    _remember_operator_env(lab, {
        "FLEETMESH_FLEET": FLEET, "FLEETMESH_SIGNING_KEY": str(RELEASE_KEY),
        "XDG_CACHE_HOME": str(OPERATOR_CACHE),
        # the engines are 20.10 without buildx: the classic builder, and no warning about it
        "DOCKER_BUILDKIT": "0"})
    operator = [n for n in with_engine if n.role == "operator"]
    if operator:
        engines.load_busybox(lab.node_env(operator[0])["DOCKER_HOST"])
    _checked(fleetmesh(lab, "coordinator", "release", "set-key", "--fleet", FLEET,
                       "--signing-key", str(RELEASE_KEY)), "setting the fleet's release key")
    devices = lab.devices
    if devices:
        token = json.loads(_checked(fleetmesh(
            lab, "coordinator", "token", "create", "--fleet", FLEET, "--uses", str(len(devices)),
            "--expires", "10m", "--json"), "creating an enrollment token"))["token"]
        if _in_containers(lab):
            load_agent_image(lab, devices)
        for d in devices:
            join = ["join", acc.url, "--token", token, "--name", d.name, "--wg-port", str(WG_PORT)]
            if _in_containers(lab):
                _docker_checked(lab, d, f"{d.name}: join", "run", "--rm", "--network", "host",
                                "-v", f"{AGENTS_DIR / d.name}:{AGENT_DATA}", agent_image(lab),
                                *join, "--data", AGENT_DATA)
            else:
                _checked(lab.run(d, [str(BIN / "fleetmesh-agent"), *join,
                                     "--data", str(AGENTS_DIR / d.name)],
                                 capture_output=True, text=True, timeout=60), f"{d.name}: join")
            start_agent(lab, d.name)
    wait_online(lab, [d.name for d in devices], deadline - time.monotonic())
    return acc


def _in_containers(lab: LabNetwork) -> bool:
    return lab.topology.agents.mode == "container"


def agent_image(lab: LabNetwork) -> str:
    """The agent image of container mode: the topology's, else fleetmesh/agent:<version>, as
    scripts/build-images tags it."""
    return lab.topology.agents.image or f"fleetmesh/agent:{importlib.metadata.version('fleetmesh')}"


def _docker_checked(lab: LabNetwork, node: Node, what: str, *argv: str,
                    timeout: float = 120) -> str:
    return _docker_at(lab.node_env(node)["DOCKER_HOST"], what, *argv, timeout=timeout)


def _docker_at(host: str, what: str, *argv: str, timeout: float = 120) -> str:
    """`docker ARGV` on the engine at `host`; its stdout, or LabError with its last line."""
    r = engines.docker(host, *argv, timeout=timeout)
    if r.returncode != 0:
        last = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
        raise LabError(f"{what}: {last[0]}")
    return r.stdout.decode().strip()


def load_agent_image(lab: LabNetwork, devices: Sequence[Node]) -> None:
    """`docker save` the agent image once from the host's engine (where scripts/build-images
    built it) and `docker load` it into each device's engine."""
    image, host = agent_image(lab), os.environ.get("DOCKER_HOST") or HOST_DOCKER
    AGENT_IMAGE_TAR.parent.mkdir(parents=True, exist_ok=True)
    try:
        _docker_at(host, f"the agent image {image} is not in the host's engine ({host}; build "
                   "it with scripts/build-images)", "save", "-o", str(AGENT_IMAGE_TAR), image,
                   timeout=600)
        for d in devices:
            _docker_checked(lab, d, f"{d.name}: docker load {image}", "load", "-q", "-i",
                            str(AGENT_IMAGE_TAR), timeout=600)
    finally:
        AGENT_IMAGE_TAR.unlink(missing_ok=True)


def _container_state(lab: LabNetwork, d: Node) -> dict[str, Any] | None:
    """The agent container's `docker inspect` (None: there is none)."""
    r = engines.docker(lab.node_env(d)["DOCKER_HOST"], "inspect", AGENT_CONTAINER)
    if r.returncode != 0:
        return None
    return dict(json.loads(r.stdout)[0])


def _container_status(lab: LabNetwork, d: Node) -> dict[str, Any]:
    info = _container_state(lab, d)
    if info is None:
        return {"node": d.name, "state": "stopped", "pid": None, "restarts": 0,
                "supervisor_pid": None, "container": None}
    st = info["State"]
    state = ("restarting" if st.get("Restarting") else "running" if st.get("Running")
             else "stopped")
    pid = st.get("Pid") or None
    return {"node": d.name, "state": state, "pid": pid if state == "running" else None,
            "restarts": int(info.get("RestartCount", 0)), "supervisor_pid": None,
            "container": str(info["Id"])[:12]}


def _start_container(lab: LabNetwork, d: Node, args: list[str]) -> None:
    """Run (or start again) the device's agent container, with docs/services.md's flags: the
    node's network namespace is its engine's host network."""
    if _container_state(lab, d) is not None:
        _docker_checked(lab, d, f"{d.name}: docker start", "start", AGENT_CONTAINER)
        return
    socket = lab.node_env(d)["DOCKER_HOST"].removeprefix("unix://")
    _docker_checked(lab, d, f"{d.name}: docker run {agent_image(lab)}", "run", "-d", "--name",
                    AGENT_CONTAINER, "--restart", "unless-stopped", "--network", "host",
                    "--cap-add", "NET_ADMIN", "--device", "/dev/net/tun",
                    "-v", f"{socket}:/var/run/docker.sock",
                    "-v", f"{AGENTS_DIR / d.name}:{AGENT_DATA}", agent_image(lab),
                    "run", "--data", AGENT_DATA, "--wg-mount-namespace", "self", *args)


def _device(lab: LabNetwork, device: str) -> Node:
    d = lab.node(device)  # LabUsageError for an unknown node
    if d.role != "device":
        raise LabUsageError(f"{device} is not a device (role: {d.role}): it runs no agent")
    if access(lab) is None:
        raise LabUsageError("no fleet is running in this lab (it was brought up --network-only)")
    return d


def _status_file(device: str) -> Path:
    return SUPERVISE_DIR / f"{device}.json"


def _supervisors(lab: LabNetwork, device: str) -> list[int]:
    """PIDs of the device's live agent supervisors (normally none or one)."""
    return [p["pid"] for p in lab.state_now().get("processes", [])
            if p.get("node") == device and SUPERVISOR_MODULE in p.get("argv", [])
            and p.get("start") is not None and proc_start_time(p["pid"]) == p["start"]]


def agent_status(lab: LabNetwork, device: str) -> dict[str, Any]:
    """{"node", "state" (running | restarting | stopping | stopped), "pid" (the agent's, None
    unless running), "restarts" (since its supervisor started), "supervisor_pid"}; in container
    mode the container's state, restarts by the engine and "container" (its short ID)."""
    if _in_containers(lab):
        return _container_status(lab, lab.node(device))
    sups = _supervisors(lab, device)
    st = read_status(_status_file(device)) or {}
    if not sups or st.get("supervisor_pid") not in sups:
        return {"node": device, "state": "stopped", "pid": None,
                "restarts": st.get("restarts", 0), "supervisor_pid": None}
    pid = st.get("pid")
    alive = isinstance(pid, int) and proc_start_time(pid) == st.get("start")
    state = st.get("state", "starting")
    return {"node": device, "state": "restarting" if state == "running" and not alive else state,
            "pid": pid if alive else None, "restarts": st.get("restarts", 0),
            "supervisor_pid": st["supervisor_pid"]}


def start_agent(lab: LabNetwork, device: str, program: Sequence[str] | None = None) -> int:
    """Start an enrolled device's agent under its supervisor (restarted whenever it exits, as
    systemd's Restart=always); returns the agent's PID. Already running: its current PID.
    `program` replaces the `fleetmesh-agent` executable (same arguments): a test's hostile
    agent. In container mode: its container, restarted by the engine (not with `program`)."""
    d = _device(lab, device)
    sharing = [] if lab.topology.agents.peer_sharing else ["--no-peer-sharing"]
    if lab.topology.agents.lazy_after is not None:
        sharing += ["--lazy-after", f"{lab.topology.agents.lazy_after:g}"]
    if d.lan is not None:
        sharing += lab.topology.lan(d.lan).agent_args()  # --seed-ratio, --unmetered
    if _in_containers(lab):
        if program is not None:
            raise LabUsageError("another agent program runs in [agents] mode = process only")
        if _container_status(lab, d)["state"] != "running":
            _start_container(lab, d, ["--underlay", d.iface, *sharing])
        return _wait_agent(lab, device, time.monotonic() + SUPERVISED_START_TIMEOUT)
    if _supervisors(lab, device):
        return _wait_agent(lab, device, time.monotonic() + SUPERVISED_START_TIMEOUT)
    SUPERVISE_DIR.mkdir(parents=True, exist_ok=True)
    _status_file(device).unlink(missing_ok=True)
    # wireguard-go in the node's mount namespace, so `wg show` in the node sees it
    wg_ns = ["--wg-mount-namespace", d.mountns_path] if d.mountns_path else []
    # No engine of its own ([agents] docker = false): the agent must not fall back to the
    # default socket, which is the host's engine.
    apply = [] if "DOCKER_HOST" in lab.node_env(d) else ["--no-apply"]
    lab.spawn(d, [str(BIN / "python"), "-m", SUPERVISOR_MODULE, "--status",
                  str(_status_file(device)), "--",
                  *(program or [str(BIN / "fleetmesh-agent")]), "run",
                  "--data", str(AGENTS_DIR / d.name),
                  *wg_ns, "--underlay", d.iface, *sharing, *apply],
              stdin=subprocess.DEVNULL, stdout=_log(d.name), stderr=subprocess.STDOUT)
    return _wait_agent(lab, device, time.monotonic() + SUPERVISED_START_TIMEOUT)


def _wait_agent(lab: LabNetwork, device: str, deadline: float) -> int:
    while True:
        st = agent_status(lab, device)
        if st["state"] == "running" and st["pid"]:
            return int(st["pid"])
        if time.monotonic() > deadline:
            where = (f"docker logs {AGENT_CONTAINER} in its engine" if _in_containers(lab)
                     else f"{LOG_DIR / device}.log")
            raise LabError(f"{device}: the agent did not start (see {where})")
        time.sleep(0.05)


def stop_agent(lab: LabNetwork, device: str) -> int:
    """Stop a device's agent for good: its supervisor gets SIGTERM, passes it on and waits for
    the agent (which stops its wireguard-go), without restarting it. Returns how many
    supervisors were stopped (0: it was not running). In container mode: `docker stop` (the
    restart policy leaves a stopped container alone); 1 if it was running."""
    d = _device(lab, device)
    if _in_containers(lab):
        if _container_status(lab, d)["state"] == "stopped":
            return 0
        _docker_checked(lab, d, f"{device}: docker stop", "stop", "-t", f"{STOP_TIMEOUT:g}",
                        AGENT_CONTAINER, timeout=STOP_TIMEOUT + 30)
        return 1
    sups = _supervisors(lab, device)
    kill_pids(sups, timeout=STOP_TIMEOUT + 2)
    return len(sups)


def kill_agent(lab: LabNetwork, device: str) -> int:
    """SIGKILL a device's agent (its supervisor, or in container mode its engine's restart
    policy, restarts it, as after a crash); returns the killed PID."""
    _device(lab, device)
    st = agent_status(lab, device)
    if st["pid"] is None:
        raise LabUsageError(f"{device}: the agent is not running ({st['state']})")
    os.kill(st["pid"], signal.SIGKILL)
    return int(st["pid"])


def wait_restarted(lab: LabNetwork, device: str, old_pid: int, timeout: float = 30.0) -> int:
    """The PID of the agent that replaced old_pid, once its supervisor has restarted it."""
    deadline = time.monotonic() + timeout
    while True:
        st = agent_status(lab, device)
        if st["pid"] and st["pid"] != old_pid:
            return int(st["pid"])
        if time.monotonic() > deadline:
            raise LabError(f"{device}: the agent was not restarted within {timeout:.0f} s")
        time.sleep(0.1)


def _route_host(lab: LabNetwork) -> None:
    """The host's route to the coordinator's API (the dashboard), see lab/hostlink.py."""
    topo = lab.topology
    link = hostlink.link_host(WAN_NETNS, WAN_BRIDGE, topo.host_ipv4, topo.coordinator_ipv4)
    with state_lock():
        state = read_state() or lab.state_now()
        state["host_link"] = link
        write_state(state)


def start_coordinator(lab: LabNetwork, timeout: float = READY_TIMEOUT) -> FleetAccess:
    """Start (or restart, on the same data directory) the coordinator on its node; returns once
    its API answers the operator."""
    coord = lab.node("coordinator")
    where = coord.underlay_ipv4
    lab.spawn(coord, [str(BIN / "fleetmesh"), "coordinator", "serve", "--data",
                      str(COORDINATOR_DIR), "--listen", f"{where}:{API_PORT}", "--wg-port",
                      str(WG_PORT), "--hub-endpoint", f"{where}:{WG_PORT}"],
              stdin=subprocess.DEVNULL, stdout=_log("coordinator"), stderr=subprocess.STDOUT)
    # Start-up time, as in start_fleet: mesh.tlspin brings trio, which only this needs.
    from mesh.tlspin import fingerprint

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


def stop_coordinator(lab: LabNetwork) -> int:
    """Stop the coordinator process (SIGTERM, by its recorded PID); the agents and tunnels stay.
    Returns how many coordinator processes were stopped."""
    victims = [p["pid"] for p in lab.state_now().get("processes", [])
               if p.get("node") == "coordinator" and "serve" in p.get("argv", [])
               and p.get("start") is not None and proc_start_time(p["pid"]) == p["start"]]
    kill_pids(victims, timeout=10)
    return len(victims)


def _remember(lab: LabNetwork, acc: FleetAccess) -> None:
    with state_lock():
        state = read_state() or lab.state_now()
        state["fleet"] = {**state.get("fleet", {}), "url": acc.url, "api_key": acc.api_key,
                          "fingerprint": acc.fingerprint}
        write_state(state)


def _remember_operator_env(lab: LabNetwork, env: dict[str, str]) -> None:
    with state_lock():
        state = read_state() or lab.state_now()
        state.setdefault("fleet", {})["operator_env"] = env
        write_state(state)


def devices(lab: LabNetwork) -> dict[str, dict[str, Any]]:
    """The coordinator's device list, by name."""
    out = _checked(fleetmesh(lab, "coordinator", "devices", "list", "--json"), "devices list")
    return {d["name"]: d for d in json.loads(out)["devices"]}


def wait_online(lab: LabNetwork, names: list[str], timeout: float) -> None:
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


def publish_synthetic(lab: LabNetwork, version: int, size: int, seed: int = 1) -> dict[str, Any]:
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


def join_operator_to_mesh(lab: LabNetwork) -> None:
    """The operator node joins the mesh as an operator workstation with stock wg-quick (the
    wireguard-go it starts lives in the lab's namespace and goes with the lab)."""
    conf = STATE_DIR / "operator-wg" / "fmop.conf"
    conf.parent.mkdir(mode=0o700, exist_ok=True)
    _checked(lab.run("operator", ["fleetmesh", "operator-config", "laptop", "--out", str(conf)],
                     capture_output=True, text=True, timeout=30), "operator-config")
    _checked(lab.run("operator", ["env", "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go",
                                  "wg-quick", "up", str(conf)], capture_output=True, text=True,
                     timeout=60), "wg-quick up on the operator")


def blobs_held(device: str) -> set[str]:
    """The blob ids in a device agent's store (read from the host: the data dirs live there)."""
    store = AGENTS_DIR / device / "blobs"
    return {p.name for p in store.iterdir() if len(p.name) == 64} if store.is_dir() else set()
