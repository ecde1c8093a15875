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

from ._agent import Agent, BackendFactory, Intervals, stderr_log
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
from ._link import Backoff, ClientFactory, CoordinatorLink, DeviceApi, error_status
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
from ._release_sync import ApplySettings, GossipSettings, ReleaseSync
from ._wg_sync import WireGuardSync

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
    "CoordinatorLink",
    "DataDir",
    "DataDirError",
    "DeviceApi",
    "GossipNode",
    "ApplySettings",
    "GossipSettings",
    "GossipStats",
    "Identity",
    "Intervals",
    "PathChange",
    "PathPlan",
    "PathSelector",
    "ReleaseSync",
    "TransportConfig",
    "WireGuardGoDevice",
    "WireGuardSync",
    "error_status",
    "lan_endpoints",
    "mesh_addresses",
    "release_verifier",
    "stderr_log",
    "verify_blob",
    "wanted_blobs",
]
