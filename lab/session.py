"""A lab session: `Lab.up` builds the network (lab.network) and, unless network-only, starts
the fleet on it (lab.fleet, which starts the engines); `Lab.load` finds the lab that is up;
`Lab.status` reports on every layer; `teardown_all` (`down`) removes everything any lab made.

The top of the lab's layers (docs/lab.md, "Layout"): it imports every layer below it, and only
the CLI, the demo and the lab's users import it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Final

from pyroute2 import NetlinkError, netns

from . import _host, engines, hostlink
from ._host import NETNS_DIR, STATE_DIR, STATE_FILE, LabError, LabUsageError
from .engines import memory_kib
from .fleet import API_PORT, SUPERVISOR_MODULE, agent_status, start_fleet
from .network import (
    WAN_BRIDGE,
    WAN_NETNS,
    LabNetwork,
    build,
    initial_state,
    plan,
    with_holders,
)
from .supervisor import STOP_TIMEOUT
from .topology import Topology, TopologyError, parse_topology

__all__ = ["Lab", "LabAlreadyUp", "LabNotUp", "teardown_all"]

TEARDOWN_ROUNDS: Final = 5


class LabAlreadyUp(LabUsageError):
    pass


class LabNotUp(LabError):
    pass


class Lab(LabNetwork):
    """A running lab. Get one with Lab.up(topology) or Lab.load()."""

    @staticmethod
    def is_up() -> bool:
        return STATE_FILE.exists() or bool(_host.lab_netns_names())

    @classmethod
    def up(cls, topology: Topology, *, network_only: bool = True) -> Lab:
        """Build the lab's network and, unless network_only, start the fleet on it (lab.fleet:
        coordinator, enrolled agents, operator access). Raises LabAlreadyUp, LabError (host
        overlap, build or start failure: everything made so far is removed again)."""
        _host.require_root()
        if Lab.is_up():
            raise LabAlreadyUp("a lab is already up (run `fleetmesh-lab down` first)")
        _host.check_host_overlap(topology.subnets())  # before anything is written
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with _host.state_lock():
            if Lab.is_up():  # again, under the lock: someone may have been faster
                raise LabAlreadyUp("a lab is already up (run `fleetmesh-lab down` first)")
            nodes, links = plan(topology)
            state = initial_state(topology, nodes)
            _host.write_state(state)
            try:
                nodes = build(topology, nodes, links, state)
            except BaseException as e:
                try:
                    teardown_all()
                except Exception as cleanup:  # noqa: BLE001 - the build error matters more
                    e.add_note(f"cleanup after the failed build also failed: {cleanup}")
                if isinstance(e, LabError):
                    raise
                if isinstance(e, Exception):
                    raise LabError(f"building the lab failed: {type(e).__name__}: {e}") from e
                raise
            state["phase"] = "up"
            _host.write_state(state)
        lab = cls(topology, nodes, state)
        if not network_only:
            try:
                start_fleet(lab)
            except BaseException:
                teardown_all()
                raise
        return lab

    @classmethod
    def load(cls) -> Lab:
        state = _host.read_state()
        if state is None:
            raise LabNotUp("no lab is up")
        try:
            topo = parse_topology(state["topology"], source=state.get("source"))
        except (KeyError, TypeError, TopologyError) as e:
            raise LabError(
                f"{STATE_FILE}: unreadable state ({e}); run `fleetmesh-lab down`"
            ) from None
        nodes, _ = plan(topo)
        return cls(topo, with_holders(nodes, state.get("holders", {})), state)

    def down(self) -> None:
        teardown_all()

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = self.state_now()
        fleet = state.get("fleet") if state.get("fleet", {}).get("api_key") else None
        routers = []
        for r in self.routers:
            try:
                rx, tx = self.wan_counters(r)
            except (LabError, OSError, NetlinkError):
                rx = tx = -1  # a namespace vanished under us: show the rest anyway
            routers.append({
                "name": r.name, "lan": r.lan, "netns": r.netns, "nat": r.nat, "tier": r.tier,
                "wan_if": r.wan_if, "wan_ipv4": r.wan_ipv4, "lan_ipv4": r.lan_ipv4,
                "lan_subnet": r.lan_subnet, "wan_rx_bytes": rx, "wan_tx_bytes": tx,
            })
        lans = []
        for lan in self.topology.lans:
            lans.append({
                "name": lan.name, "nat": lan.nat, "subnet": str(lan.subnet),
                "carrier_subnet": str(lan.carrier_subnet) if lan.carrier_subnet else None,
                "devices": lan.devices, "uplink": lan.shaping.rate_text,
                "uplink_bps": lan.shaping.rate_bps, "loss": lan.shaping.loss,
            })
        return {
            "phase": self._state.get("phase", "up"),
            "source": self.topology.source,
            "wan": {"subnet": str(self.topology.wan_subnet), "netns": WAN_NETNS,
                    "bridge": WAN_BRIDGE},
            "lans": lans,
            "nodes": [
                {"name": n.name, "role": n.role, "lan": n.lan, "netns": n.netns,
                 "netns_path": n.netns_path, "mountns": n.mountns_path,
                 "underlay_ipv4": n.underlay_ipv4, "iface": n.iface, "gateway": n.gateway}
                for n in self.nodes
            ],
            "routers": routers,
            "processes": [
                p for p in state.get("processes", [])
                if p.get("start") is not None and _host.proc_start_time(p["pid"]) == p["start"]
            ],
            "engines": [
                {"node": name, "pid": e["pid"], "docker_host": e["docker_host"],
                 "data_root": e["data_root"], "running": running,
                 # dockerd + containerd + shims: what one engine per device costs
                 "memory_kib": memory_kib(e["pid"]) if running else None}
                for name, e in sorted(state.get("engines", {}).items())
                for running in [_host.proc_start_time(e["pid"]) == e["start"]]
            ],
            "agents": [agent_status(self, d.name) for d in self.devices] if fleet else [],
            "dashboard_url": (f"https://{self.topology.coordinator_ipv4}:{API_PORT}/"
                              if fleet else None),
            "operator_key": fleet["api_key"] if fleet else None,
            "host_link": state.get("host_link"),
        }


# --- teardown ------------------------------------------------------------------------------


def teardown_all() -> list[str]:
    """Remove everything any lab made, with or without a state file (after a crash too).

    Returns the names of the network namespaces removed. Touches only fm-* namespaces, the
    host's fm-lab0 link and its two `fleetmesh-lab` FORWARD rules, the processes inside the lab's
    namespaces or its container cgroups, the lab's cgroups, /run/fleetmesh-lab and
    /var/lib/fleetmesh-lab (the engines' data roots).
    """
    _host.require_root()
    hostlink.unlink_host()  # first: the host stops reaching into the lab
    state = _host.read_state() or {}
    recorded = [p for p in state.get("processes", []) if isinstance(p.get("pid"), int)
                and p.get("start") is not None and _host.proc_start_time(p["pid"]) == p["start"]]
    # Supervisors first (they stop their agents, which stop their wireguard-go), so that none
    # restarts an agent the sweep below has just stopped.
    supervisors = [p["pid"] for p in recorded if SUPERVISOR_MODULE in p.get("argv", [])]
    if supervisors:
        _host.kill_pids(supervisors, timeout=STOP_TIMEOUT + 2)
    names = _host.lab_netns_names()
    inodes = [i for i in (_host.ns_inode(NETNS_DIR / ns) for ns in names) if i is not None]
    for _ in range(TEARDOWN_ROUNDS):  # a process may start while we kill: look again
        victims = {p["pid"] for p in recorded}
        for ino in inodes:
            victims.update(_host.pids_in_ns("net", ino))
        victims |= engines.cgroup_pids()  # containers with a network namespace of their own
        victims.discard(os.getpid())
        victims = {v for v in victims if _host.proc_start_time(v) is not None}
        if not victims:
            break
        _host.kill_pids(victims)
        recorded = []

    # Mounts a lab of an older layout may have left under the state directory.
    for mp in _host.mounts_under(STATE_DIR):
        _host.umount(mp)
    left = _host.mounts_under(STATE_DIR)
    if left:
        raise LabError(f"could not unmount {left[0]}; not removing {STATE_DIR}")

    for ns in names:
        try:
            netns.remove(ns)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LabError(f"could not remove network namespace {ns}: {e}") from e
    stuck = engines.remove_cgroups()
    if stuck:
        raise LabError(f"could not remove cgroup {stuck[0]}")
    engines.remove_data()
    if STATE_DIR.exists():
        shutil.rmtree(STATE_DIR)
    return names
