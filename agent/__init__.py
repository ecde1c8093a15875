"""fleetmesh agent: enroll, keep WireGuard reconciled with the peer map, report paths, run the
mesh node (gossip, manifests, blob exchange: agent/_gossip.py, docs/gossip.md).

Entry points for the lab and for tests:

    from agent import Agent, WireGuardGoDevice
    from ops.client import DeviceClient
    agent = Agent("/var/lib/fleetmesh", WireGuardGoDevice("fm0"), DeviceClient)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)     # after the first reconcile

The CLI is `fleetmesh-agent join …` / `fleetmesh-agent run …` (agent/_commands.py).
"""

from mesh.blobs import BlobVerifyError

from ._agent import (
    Agent,
    ApplySettings,
    BackendFactory,
    Backoff,
    ClientFactory,
    DeviceApi,
    GossipSettings,
    error_status,
    stderr_log,
)
from ._blobstore import BlobStore, verify_blob
from ._datadir import DataDir, DataDirError, Identity
from ._device import (
    DEFAULT_IFNAME,
    DEFAULT_WG_PORT,
    WireGuardGoDevice,
    lan_endpoints,
    mesh_addresses,
)
from ._gossip import (
    GOSSIP_PORT,
    GossipNode,
    GossipStats,
    TransportConfig,
    release_verifier,
    wanted_blobs,
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
    "GOSSIP_PORT",
    "KEEPALIVE",
    "PUNCH_KEEPALIVE",
    "REJECT_AFTER_TIME",
    "RELAY_PROBE_DWELL",
    "Agent",
    "Backoff",
    "BackendFactory",
    "BlobStore",
    "BlobVerifyError",
    "ClientFactory",
    "DataDir",
    "DataDirError",
    "DeviceApi",
    "GossipNode",
    "ApplySettings",
    "GossipSettings",
    "GossipStats",
    "Identity",
    "PathChange",
    "PathPlan",
    "PathSelector",
    "TransportConfig",
    "WireGuardGoDevice",
    "error_status",
    "lan_endpoints",
    "mesh_addresses",
    "release_verifier",
    "stderr_log",
    "verify_blob",
    "wanted_blobs",
]
