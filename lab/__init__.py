"""The network-namespace fleet lab: topology files, NAT routers, WAN shaping, nodes.

Public surface::

    from lab import Lab, load_topology
    lab = Lab.up(load_topology("examples/lab/nat-kinds.toml"))
    try:
        lab.run("home-1", ["busybox", "ping", "-c1", str(lab.topology.coordinator_ipv4)])
    finally:
        lab.down()

See docs/lab.md.
"""

from ._host import LabError, LabUsageError
from .core import WAN_BRIDGE, WAN_NETNS, Lab, LabAlreadyUp, LabNotUp, Node, Router, teardown_all
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
    "NAT_KINDS",
    "WAN_BRIDGE",
    "WAN_NETNS",
    "Lab",
    "LabAlreadyUp",
    "LabError",
    "LabNotUp",
    "LabUsageError",
    "LanSpec",
    "Node",
    "OperatorSpec",
    "Router",
    "Shaping",
    "Topology",
    "TopologyError",
    "load_topology",
    "parse_topology",
    "teardown_all",
]
