"""The network-namespace fleet lab: topology files, NAT routers, WAN shaping, nodes, engines and
the fleet on them.

Public surface::

    from lab import Lab, load_topology
    lab = Lab.up(load_topology("examples/lab/nat-kinds.toml"))
    try:
        lab.run("home-1", ["busybox", "ping", "-c1", str(lab.topology.coordinator_ipv4)])
    finally:
        lab.down()

This package names the lab (the session, its network's nodes, the topology model, the errors)
and the fleet operations on a running lab. Tools that work on a lab (lab.rollout, lab.wgmesh,
lab.sampleapp, lab.demo) and the processes the lab starts (lab.supervise, lab.release) are used
by their module names. See docs/lab.md ("Layout": which module imports which).
"""

from ._host import LOG_DIR, LabError, LabUsageError
from .engines import BUSYBOX_IMAGE
from .fleet import (
    AGENTS_DIR,
    API_PORT,
    FLEET,
    WG_PORT,
    FleetAccess,
    access,
    agent_status,
    blobs_held,
    devices,
    fleetmesh,
    join_operator_to_mesh,
    kill_agent,
    publish_synthetic,
    start_agent,
    start_coordinator,
    stop_agent,
    stop_coordinator,
    wait_online,
    wait_restarted,
)
from .network import WAN_BRIDGE, WAN_NETNS, LabNetwork, Node, Router
from .session import Lab, LabAlreadyUp, LabNotUp, teardown_all
from .topology import (
    NAT_KINDS,
    LanSpec,
    OperatorSpec,
    Shaping,
    Topology,
    TopologyError,
    load_topology,
    parse_topology,
)

__all__ = [
    "AGENTS_DIR",
    "API_PORT",
    "BUSYBOX_IMAGE",
    "FLEET",
    "LOG_DIR",
    "NAT_KINDS",
    "WAN_BRIDGE",
    "WAN_NETNS",
    "WG_PORT",
    "FleetAccess",
    "Lab",
    "LabAlreadyUp",
    "LabError",
    "LabNetwork",
    "LabNotUp",
    "LabUsageError",
    "LanSpec",
    "Node",
    "OperatorSpec",
    "Router",
    "Shaping",
    "Topology",
    "TopologyError",
    "access",
    "agent_status",
    "blobs_held",
    "devices",
    "fleetmesh",
    "join_operator_to_mesh",
    "kill_agent",
    "load_topology",
    "parse_topology",
    "publish_synthetic",
    "start_agent",
    "start_coordinator",
    "stop_agent",
    "stop_coordinator",
    "teardown_all",
    "wait_online",
    "wait_restarted",
]
