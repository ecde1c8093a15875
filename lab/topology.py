"""Topology files: parse and validate a TOML lab description into frozen dataclasses.

Everything a lab needs to know before it touches the kernel is decided here, including the
addressing plan, so that a bad file fails with one line and nothing is created.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CARRIER_SPACE",
    "DEFAULT_WAN_SUBNET",
    "NAT_KINDS",
    "LanSpec",
    "AgentsSpec",
    "OperatorSpec",
    "Shaping",
    "Topology",
    "TopologyError",
    "load_topology",
    "parse_rate",
    "parse_topology",
]

NAT_KINDS: Final = ("firewall", "hard", "symmetric", "double", "none")
# RFC 5737 TEST-NET-2; TEST-NET-1 (192.0.2.0/24) is these machines' own uplink.
DEFAULT_WAN_SUBNET: Final = ipaddress.IPv4Network("198.51.100.0/24")
# RFC 6598 shared address space, the range real carrier-grade NATs use.
CARRIER_SPACE: Final = ipaddress.IPv4Network("100.64.0.0/10")
MAX_LANS: Final = 64
MAX_DEVICES: Final = 200
# Host offsets inside a LAN subnet: router .1, operator (when on the LAN) .10, devices .11...
LAN_ROUTER_HOST: Final = 1
LAN_OPERATOR_HOST: Final = 10
LAN_FIRST_DEVICE_HOST: Final = 11
# Host offsets on the WAN: coordinator .1, operator .2, then LAN uplinks from .10 in file order;
# the last usable address is the host's own (its route to the coordinator, see lab/hostlink.py).
WAN_COORDINATOR_HOST: Final = 1
WAN_OPERATOR_HOST: Final = 2
WAN_FIRST_LAN_HOST: Final = 10

_NAME_RE: Final = re.compile(r"[a-z0-9]{1,8}")
_RATE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)")
_RATE_UNITS: Final = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}
_MIN_RATE: Final = 8_000  # 1 kB/s; below that tbf's burst arithmetic stops making sense
_MAX_RATE: Final = 100_000_000_000
MAX_SEED_RATIO: Final = 1000.0  # copies of a release a LAN may upload; beyond is a typo
MIN_UDP_TIMEOUT: Final = 5  # lab routers' UDP binding lifetime (udp_timeout), seconds
MAX_UDP_TIMEOUT: Final = 3600


class TopologyError(ValueError):
    """A topology file is unusable; str() is one line naming the offending field."""


@dataclass(frozen=True, slots=True)
class Shaping:
    """WAN link impairment of one LAN: tbf rate (bit/s) and random drop probability."""

    rate_bps: int | None = None
    rate_text: str | None = None
    loss: float = 0.0

    @property
    def active(self) -> bool:
        return self.rate_bps is not None or self.loss > 0.0


@dataclass(frozen=True, slots=True)
class LanSpec:
    name: str
    nat: str
    devices: int
    subnet: ipaddress.IPv4Network  # the WAN subnet for nat == "none"
    shaping: Shaping
    # Filled in by the addressing plan:
    carrier_subnet: ipaddress.IPv4Network | None  # only for nat == "double"
    wan_addresses: tuple[ipaddress.IPv4Address, ...]  # router/cgnat, or each device for "none"
    # Cross-LAN serving by this LAN's agents (`--seed-ratio R`, `--unmetered`): how many copies
    # of a release's bytes they may upload across the WAN (None: the agent's default), and
    # whether their WAN link is unmetered (so serving other LANs costs nothing).
    seed_ratio: float | None = None
    metered: bool = True
    # The routers' UDP binding lifetime in seconds (conntrack's udp timeouts, unreplied and
    # stream); None: the kernel's (30 s unreplied, 120 s once both ways have been seen).
    udp_timeout: int | None = None

    def agent_args(self) -> list[str]:
        """The agent flags this LAN's settings give its devices."""
        ratio = [] if self.seed_ratio is None else ["--seed-ratio", f"{self.seed_ratio:g}"]
        return ratio + ([] if self.metered else ["--unmetered"])

    @property
    def router_lan_ipv4(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + LAN_ROUTER_HOST

    def device_name(self, n: int) -> str:
        return f"{self.name}-{n}"

    def device_ipv4(self, n: int) -> ipaddress.IPv4Address:
        """Underlay address of device n (1-based)."""
        if self.nat == "none":
            return self.wan_addresses[n - 1]
        return self.subnet.network_address + LAN_FIRST_DEVICE_HOST + n - 1

    @property
    def operator_ipv4(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + LAN_OPERATOR_HOST


@dataclass(frozen=True, slots=True)
class OperatorSpec:
    on: str  # "wan" or a LAN name


AGENT_MODES: Final = ("process", "container")
# repository[:tag]: lower-case path components, an optional tag (Docker's reference grammar,
# without registry ports and digests)
_IMAGE_REF: Final = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                               r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?")


@dataclass(frozen=True, slots=True)
class AgentsSpec:
    """How `up` runs the agents. peer_sharing = false: every device fetches release blobs only
    from the coordinator (the comparison case for LAN-first sharing). docker = false: no Docker
    engine per device and operator (saves ~0.1 GB of memory per node where no test needs one).
    lazy_after: the agents' `--lazy-after` (None: their default). mode = "container": each
    agent runs from the agent image (`image`, default fleetmesh/agent:<this version>) as a
    container of its device's own engine, as on a real device (docs/services.md); "process"
    (the default): as a process under a supervisor."""

    peer_sharing: bool = True
    docker: bool = True
    lazy_after: float | None = None
    mode: str = "process"
    image: str | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    wan_subnet: ipaddress.IPv4Network
    lans: tuple[LanSpec, ...]
    operator: OperatorSpec | None
    source: str | None = None
    agents: AgentsSpec = AgentsSpec()

    @property
    def coordinator_ipv4(self) -> ipaddress.IPv4Address:
        return self.wan_subnet.network_address + WAN_COORDINATOR_HOST

    @property
    def operator_wan_ipv4(self) -> ipaddress.IPv4Address:
        return self.wan_subnet.network_address + WAN_OPERATOR_HOST

    @property
    def host_ipv4(self) -> ipaddress.IPv4Address:
        """The host's own address on the lab's WAN (a /32 on its link into the lab, used only
        to reach the coordinator's API): the WAN's last usable address, never given to a node."""
        return self.wan_subnet.broadcast_address - 1

    def lan(self, name: str) -> LanSpec:
        for lan in self.lans:
            if lan.name == name:
                return lan
        raise KeyError(name)

    def subnets(self) -> list[tuple[str, ipaddress.IPv4Network]]:
        """Every subnet the lab would create, labelled by the field it came from."""
        out = [("wan.subnet", self.wan_subnet)]
        for i, lan in enumerate(self.lans):
            if lan.nat != "none":
                out.append((f"lan[{i}].subnet", lan.subnet))
            if lan.carrier_subnet is not None:
                out.append((f"lan[{i}] carrier subnet", lan.carrier_subnet))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The file form (round-trips through parse_topology)."""
        d: dict[str, Any] = {"wan": {"subnet": str(self.wan_subnet)}}
        if self.operator is not None:
            d["operator"] = {"on": self.operator.on}
        if self.agents != AgentsSpec():
            d["agents"] = {"peer_sharing": self.agents.peer_sharing,
                           "docker": self.agents.docker}
            if self.agents.lazy_after is not None:
                d["agents"]["lazy_after"] = self.agents.lazy_after
            if self.agents.mode != "process":
                d["agents"]["mode"] = self.agents.mode
            if self.agents.image is not None:
                d["agents"]["image"] = self.agents.image
        lans = []
        for lan in self.lans:
            e: dict[str, Any] = {"name": lan.name, "nat": lan.nat, "devices": lan.devices}
            if lan.nat != "none":
                e["subnet"] = str(lan.subnet)
            if lan.shaping.rate_text is not None:
                e["uplink"] = lan.shaping.rate_text
            if lan.shaping.loss:
                e["loss"] = lan.shaping.loss
            if lan.seed_ratio is not None:
                e["seed_ratio"] = lan.seed_ratio
            if not lan.metered:
                e["metered"] = False
            if lan.udp_timeout is not None:
                e["udp_timeout"] = lan.udp_timeout
            lans.append(e)
        d["lan"] = lans
        return d


def parse_rate(text: str) -> int:
    """'4mbit' -> 4_000_000 (bit/s, tc's decimal units). Raises ValueError."""
    m = _RATE_RE.fullmatch(text.strip().lower())
    if not m:
        raise ValueError("must be a rate like 512kbit, 4mbit or 1gbit")
    bps = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if not _MIN_RATE <= bps <= _MAX_RATE:
        raise ValueError("must be between 8kbit and 100gbit")
    return bps


def load_topology(path: str | Path) -> Topology:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise TopologyError(f"{p}: no such file") from None
    except OSError as e:
        raise TopologyError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise TopologyError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(f"{p}: TOML syntax error: {e}") from None
    return parse_topology(data, source=str(p))


def _check_keys(where: str, table: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise TopologyError(f"{where}: must be a table")
    for key in table:
        if key not in allowed:
            raise TopologyError(
                f"{where}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})"
            )
    return table


def _subnet(where: str, value: Any) -> ipaddress.IPv4Network:
    if not isinstance(value, str):
        raise TopologyError(f"{where}: must be a string like \"10.201.1.0/24\"")
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise TopologyError(f"{where}: not an IPv4 network ({e})") from None
    if net.prefixlen > 28:
        raise TopologyError(f"{where}: /{net.prefixlen} is too small (at most /28)")
    if net.is_loopback or net.is_multicast or net.is_link_local or net.is_reserved:
        raise TopologyError(f"{where}: {net} is not a usable unicast range")
    return net


def parse_topology(data: dict[str, Any], source: str | None = None) -> Topology:
    _check_keys("topology", data, {"wan", "operator", "lan", "agents"})

    wan = _check_keys("wan", data.get("wan", {}), {"subnet"})
    wan_subnet = _subnet("wan.subnet", wan["subnet"]) if "subnet" in wan else DEFAULT_WAN_SUBNET

    raw_lans = data.get("lan")
    if raw_lans is None:
        raise TopologyError("lan: at least one [[lan]] is required")
    if not isinstance(raw_lans, list):
        raise TopologyError("lan: must be an array of tables ([[lan]])")
    if not 1 <= len(raw_lans) <= MAX_LANS:
        raise TopologyError(f"lan: between 1 and {MAX_LANS} LANs, got {len(raw_lans)}")

    seen: set[str] = set()
    parsed: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_lans):
        where = f"lan[{i}]"
        lan = _check_keys(where, raw, {"name", "nat", "devices", "uplink", "loss", "subnet",
                                       "seed_ratio", "metered", "udp_timeout"})
        name = lan.get("name")
        if name is None:
            raise TopologyError(f"{where}.name: required")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise TopologyError(f"{where}.name: must be 1-8 characters of [a-z0-9]")
        if name in seen:
            raise TopologyError(f"{where}.name: duplicate LAN name {name!r}")
        if name == "wan":
            raise TopologyError(f"{where}.name: 'wan' is reserved")
        seen.add(name)

        nat = lan.get("nat", "firewall")
        if nat not in NAT_KINDS:
            raise TopologyError(f"{where}.nat: must be one of {', '.join(NAT_KINDS)}")

        devices = lan.get("devices", 1)
        if isinstance(devices, bool) or not isinstance(devices, int):
            raise TopologyError(f"{where}.devices: must be an integer")
        if not 1 <= devices <= MAX_DEVICES:
            raise TopologyError(f"{where}.devices: must be between 1 and {MAX_DEVICES}")

        rate_bps = rate_text = None
        if "uplink" in lan:
            if not isinstance(lan["uplink"], str):
                raise TopologyError(f"{where}.uplink: must be a string like \"4mbit\"")
            try:
                rate_bps = parse_rate(lan["uplink"])
            except ValueError as e:
                raise TopologyError(f"{where}.uplink: {e}") from None
            rate_text = lan["uplink"].strip().lower()

        loss = lan.get("loss", 0.0)
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TopologyError(f"{where}.loss: must be a number in [0, 1)")
        loss = float(loss)
        if not 0.0 <= loss < 1.0:
            raise TopologyError(f"{where}.loss: must be in [0, 1)")

        seed_ratio = lan.get("seed_ratio")
        if seed_ratio is not None:
            if isinstance(seed_ratio, bool) or not isinstance(seed_ratio, (int, float)):
                raise TopologyError(f"{where}.seed_ratio: must be a number >= 0")
            seed_ratio = float(seed_ratio)
            if not 0.0 <= seed_ratio <= MAX_SEED_RATIO:
                raise TopologyError(f"{where}.seed_ratio: must be between 0 and {MAX_SEED_RATIO:g}")
        metered = lan.get("metered", True)
        if not isinstance(metered, bool):
            raise TopologyError(f"{where}.metered: must be true or false")

        udp_timeout = lan.get("udp_timeout")
        if udp_timeout is not None:
            if isinstance(udp_timeout, bool) or not isinstance(udp_timeout, int) \
                    or not MIN_UDP_TIMEOUT <= udp_timeout <= MAX_UDP_TIMEOUT:
                raise TopologyError(f"{where}.udp_timeout: must be whole seconds from "
                                    f"{MIN_UDP_TIMEOUT} to {MAX_UDP_TIMEOUT}")
            if nat == "none":
                raise TopologyError(f"{where}.udp_timeout: a nat=\"none\" LAN has no router")

        if "subnet" in lan:
            if nat == "none":
                raise TopologyError(f"{where}.subnet: a nat=\"none\" LAN has no subnet of its own")
            subnet = _subnet(f"{where}.subnet", lan["subnet"])
        elif nat == "none":
            subnet = wan_subnet  # its devices live on the WAN
        else:
            if i + 1 > 255:
                raise TopologyError(f"{where}.subnet: no default subnet, give one")
            subnet = ipaddress.IPv4Network(f"10.201.{i + 1}.0/24")
        if nat != "none" and subnet.num_addresses - 2 < LAN_FIRST_DEVICE_HOST - 1 + devices:
            raise TopologyError(f"{where}.subnet: {subnet} is too small for {devices} devices")
        parsed.append(
            {
                "name": name,
                "nat": nat,
                "devices": devices,
                "subnet": subnet,
                "shaping": Shaping(rate_bps=rate_bps, rate_text=rate_text, loss=loss),
                "seed_ratio": seed_ratio,
                "metered": metered,
                "udp_timeout": udp_timeout,
            }
        )

    operator: OperatorSpec | None = None
    if "operator" in data:
        op = _check_keys("operator", data["operator"], {"on"})
        on = op.get("on", "wan")
        if not isinstance(on, str):
            raise TopologyError("operator.on: must be \"wan\" or a LAN's name")
        if on != "wan":
            match = [p for p in parsed if p["name"] == on]
            if not match:
                raise TopologyError(f"operator.on: no LAN named {on!r} (use \"wan\" or a LAN name)")
            if match[0]["nat"] == "none":
                raise TopologyError(
                    f"operator.on: LAN {on!r} has nat=\"none\" (no LAN of its own); use \"wan\""
                )
        operator = OperatorSpec(on=on)

    # Addressing plan: WAN hosts in file order from .10; carrier /24s from 100.64.1.0.
    next_wan = WAN_FIRST_LAN_HOST
    next_carrier = 1
    wan_last_host = wan_subnet.num_addresses - 3  # the last usable one is the host's
    lans: list[LanSpec] = []
    for i, p in enumerate(parsed):
        count = p["devices"] if p["nat"] == "none" else 1
        if next_wan + count - 1 > wan_last_host:
            raise TopologyError(f"wan.subnet: {wan_subnet} has too few addresses for lan[{i}]")
        wan_addrs = tuple(wan_subnet.network_address + next_wan + k for k in range(count))
        next_wan += count
        carrier = None
        if p["nat"] == "double":
            carrier = ipaddress.IPv4Network(f"100.64.{next_carrier}.0/24")
            next_carrier += 1
        lans.append(
            LanSpec(
                name=p["name"],
                nat=p["nat"],
                devices=p["devices"],
                subnet=p["subnet"],
                shaping=p["shaping"],
                carrier_subnet=carrier,
                wan_addresses=wan_addrs,
                seed_ratio=p["seed_ratio"],
                metered=p["metered"],
                udp_timeout=p["udp_timeout"],
            )
        )

    agents = AgentsSpec()
    if "agents" in data:
        ag = _check_keys("agents", data["agents"],
                         {"peer_sharing", "docker", "lazy_after", "mode", "image"})
        for key in ("peer_sharing", "docker"):
            if not isinstance(ag.get(key, True), bool):
                raise TopologyError(f"agents.{key}: must be true or false")
        lazy = ag.get("lazy_after")
        if lazy is not None and (isinstance(lazy, bool) or not isinstance(lazy, (int, float))
                                 or not 0 <= lazy <= 86400):
            raise TopologyError("agents.lazy_after: must be seconds from 0 to 86400")
        mode = ag.get("mode", "process")
        if mode not in AGENT_MODES:
            raise TopologyError(f"agents.mode: must be one of {', '.join(AGENT_MODES)}")
        if mode == "container" and ag.get("docker", True) is False:
            raise TopologyError("agents.mode = container: needs each device's engine "
                                "(agents.docker = true)")
        image = ag.get("image")
        if image is not None and (mode != "container" or not isinstance(image, str)
                                  or not _IMAGE_REF.fullmatch(image)):
            raise TopologyError("agents.image: an image reference (repository:tag), with "
                                "mode = container only")
        agents = AgentsSpec(peer_sharing=ag.get("peer_sharing", True),
                            docker=ag.get("docker", True),
                            lazy_after=None if lazy is None else float(lazy),
                            mode=mode, image=image)

    topo = Topology(wan_subnet=wan_subnet, lans=tuple(lans), operator=operator, source=source,
                    agents=agents)
    nets = topo.subnets()
    for a in range(len(nets)):
        for b in range(a + 1, len(nets)):
            if nets[a][1].overlaps(nets[b][1]):
                # Name the later field: that is the one the user most likely just added.
                raise TopologyError(
                    f"{nets[b][0]}: {nets[b][1]} overlaps {nets[a][0]} {nets[a][1]}"
                )
    return topo
