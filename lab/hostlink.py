"""The host's one way into the lab: a veth from the host to a port of the WAN bridge, the WAN's
last usable address as a /32 on the host side and a /32 route to the coordinator, so that
`curl -k https://<coordinator>:8443/` (the dashboard) works from the host.

The host reaches the coordinator and nothing else: no subnet route (only /32s), and the host
never forwards to or from the link (its IPv4 `forwarding` is off, and two DROP rules in the
host's FORWARD chain, tagged with the comment `fleetmesh-lab`, keep e.g. the host's Docker
containers from reaching the lab through the host). The host's link is an end host on the WAN,
so no FORWARD ACCEPT rule is needed for it, whatever policy a host dockerd set. IPv6 is off on
both ends. `unlink_host()` removes the link (its address and route go with it) and the rules; it
is idempotent and needs no state, so a crash cleanup runs it too.
"""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Any, Final

from pyroute2 import IPRoute

from ._host import NETNS_PREFIX, LabError
from .network import write_net_sysctls

HOST_LINK: Final = f"{NETNS_PREFIX}lab0"  # carries the lab's prefix, like its namespaces
WAN_PORT: Final = "ph"  # its peer: a port of the WAN bridge in fm-wan
RULE_COMMENT: Final = "fleetmesh-lab"
MAX_RULE_DELETES: Final = 10  # bounded: a copy per failed earlier `up` at most


def _forward_rules() -> list[list[str]]:
    tag = ["-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP"]
    return [["FORWARD", "-i", HOST_LINK, *tag], ["FORWARD", "-o", HOST_LINK, *tag]]


def _iptables(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *argv], capture_output=True, text=True,
                          timeout=30, check=False)


def link_host(wan_netns: str, bridge: str, host_ipv4: ipaddress.IPv4Address,
              coordinator_ipv4: ipaddress.IPv4Address) -> dict[str, Any]:
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=HOST_LINK):
            raise LabError(f"the host already has a link {HOST_LINK} (run `fleetmesh-lab down`)")
        ipr.link("add", ifname=HOST_LINK, kind="veth",
                 peer={"ifname": WAN_PORT, "net_ns_fd": wan_netns})
        idx = ipr.link_lookup(ifname=HOST_LINK)[0]
    for key, value in ((f"ipv6/conf/{HOST_LINK}/disable_ipv6", "1"),
                       (f"ipv4/conf/{HOST_LINK}/forwarding", "0")):
        with open(f"/proc/sys/net/{key}", "w") as f:
            f.write(value)
    for rule in _forward_rules():
        r = _iptables("-I", *rule)
        if r.returncode != 0:
            raise LabError(f"iptables -I {' '.join(rule)}: {r.stderr.strip()}")
    with IPRoute(netns=wan_netns) as ipr:
        port = ipr.link_lookup(ifname=WAN_PORT)[0]
        ipr.link("set", index=port, master=ipr.link_lookup(ifname=bridge)[0])
    write_net_sysctls({wan_netns: [f"ipv6/conf/{WAN_PORT}/disable_ipv6"]})
    with IPRoute(netns=wan_netns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=WAN_PORT)[0], state="up")
    with IPRoute() as ipr:
        ipr.addr("add", index=idx, address=str(host_ipv4), prefixlen=32)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst=f"{coordinator_ipv4}/32", oif=idx, prefsrc=str(host_ipv4),
                  scope=253)  # link scope: on the segment, no gateway
    return {"link": HOST_LINK, "address": str(host_ipv4), "route": f"{coordinator_ipv4}/32"}


def unlink_host() -> bool:
    """Remove the host's link into the lab and its FORWARD rules; True if there was a link."""
    for rule in _forward_rules():
        for _ in range(MAX_RULE_DELETES):
            if _iptables("-D", *rule).returncode != 0:
                break  # no (more) such rule
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=HOST_LINK)
        if found:
            ipr.link("del", index=found[0])
    return bool(found)
