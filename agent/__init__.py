"""fleetmesh agent: enroll, keep WireGuard reconciled with the peer map, report paths.

Entry points for the lab and for tests:

    from agent import Agent, WireGuardGoDevice
    from coordinator.client import DeviceClient
    agent = Agent("/var/lib/fleetmesh", WireGuardGoDevice("fm0"), DeviceClient)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)     # after the first reconcile

The CLI is `fleetmesh-agent join …` / `fleetmesh-agent run …` (agent/_commands.py).
"""

from ._agent import (
    Agent,
    BackendFactory,
    Backoff,
    ClientFactory,
    DeviceApi,
    error_status,
    stderr_log,
)
from ._datadir import DataDir, DataDirError, Identity
from ._device import (
    DEFAULT_IFNAME,
    DEFAULT_WG_PORT,
    WireGuardGoDevice,
    lan_endpoints,
    mesh_addresses,
)
from ._paths import (
    DIRECT_TIMEOUT,
    KEEPALIVE,
    PUNCH_KEEPALIVE,
    REJECT_AFTER_TIME,
    RELAY_PROBE_DWELL,
    PathChange,
    PathPlan,
    PathSelector,
)

__all__ = [
    "DEFAULT_IFNAME",
    "DEFAULT_WG_PORT",
    "DIRECT_TIMEOUT",
    "KEEPALIVE",
    "PUNCH_KEEPALIVE",
    "REJECT_AFTER_TIME",
    "RELAY_PROBE_DWELL",
    "Agent",
    "Backoff",
    "BackendFactory",
    "ClientFactory",
    "DataDir",
    "DataDirError",
    "DeviceApi",
    "Identity",
    "PathChange",
    "PathPlan",
    "PathSelector",
    "WireGuardGoDevice",
    "error_status",
    "lan_endpoints",
    "mesh_addresses",
    "stderr_log",
]
