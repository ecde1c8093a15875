"""A fleet's reachability policy: which device may reach which, on which ports (docs/policy.md).

Pure: no I/O, no clock. `parse_policy` reads the policy file; every error is one
`PolicyError` line naming the line number, so the CLI prints it as is (exit 2) and the API
answers it as a 400. `compile_policy` applies a policy to a fleet's devices.

- **File**: one rule per line, `#` starts a comment, blank lines are ignored:
  `SRC -> DST PORTS` (SRC may reach DST) or `SRC <-> DST PORTS` (each may reach the other).
  SRC and DST are selectors of mesh.rollout (`role=cam`, `site=berlin,role=nvr`; no spaces)
  or `*` (every device). PORTS is `any` or a comma list of `tcp`, `udp`, `icmp`,
  `tcp/554`, `udp/5000-5010`.
- **Default** (always, with or without rules): a device reaches its LAN neighbours (devices of
  its fleet behind the same public address) on any port, and operators and hubs reach it and
  it reaches them, on any port. A device never needs a rule to reach itself.

The compiler never looks at device pairs. Devices are grouped by their *signature*: their values
of the tag keys the policy's selectors name (10,000 devices with a handful of roles and sites
are a few dozen groups). Each rule is matched once against each group; a device's peers are
the members of the groups its own group's rules reach, union-ed when asked (`reach`,
`reached_by`, `explain`), so compiling costs O(devices + rules x groups).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .rollout import RolloutSpecError, Selector

MAX_POLICY_BYTES: Final = 64 * 1024
MAX_RULES: Final = 1000
MAX_PORT_ITEMS: Final = 64
PROTOCOLS: Final = ("tcp", "udp", "icmp")
# fleetmesh's own traffic between two devices of a fleet (gossip and blob exchange, the agent's
# GOSSIP_PORT): always allowed between paired devices, whatever the policy says
MESH_PORTS: Final = (("tcp", 7946, 7946),)
DEFAULT_REASONS: Final = {"lan": "default: LAN neighbour (same public address)"}

_PORT_RE: Final = re.compile(r"(tcp|udp)/([0-9]{1,5})(?:-([0-9]{1,5}))?\Z")
_ARROWS: Final = ("<->", "->")


class PolicyError(ValueError):
    """A policy file that is not valid: one line naming the line number and what is wrong."""


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --------------------------------------------------------------------------- ports

Proto = Literal["any", "tcp", "udp", "icmp"]


@dataclass(frozen=True, slots=True)
class Ports:
    """A set of (protocol, first port, last port) ranges in canonical form: sorted, merged,
    a whole protocol as (proto, 0, 65535) (icmp always so), `any` (every protocol, tcp, udp
    and icmp among them) as `("any", 0, 65535)` alone. Equal sets have equal `ranges`."""

    ranges: tuple[tuple[Proto, int, int], ...]

    @classmethod
    def of(cls, ranges: Iterable[tuple[Proto, int, int]]) -> Ports:
        by_proto: dict[str, list[tuple[int, int]]] = {}
        for proto, lo, hi in ranges:
            if proto == "any":
                return ANY
            by_proto.setdefault(proto, []).append((0, 65535) if proto == "icmp" else (lo, hi))
        out: list[tuple[Proto, int, int]] = []
        for proto in PROTOCOLS:
            spans = sorted(by_proto.get(proto, ()))
            merged: list[list[int]] = []
            for lo, hi in spans:
                if merged and lo <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            if merged and merged[0][0] <= 1 and merged[0][1] == 65535:
                merged = [[0, 65535]]  # port 0 is not a port: 1-65535 is the whole protocol
            out.extend((proto, lo, hi) for lo, hi in merged)
        return cls(tuple(out))

    def __or__(self, other: Ports) -> Ports:
        if self == ANY or other == ANY:
            return ANY
        if self == other:
            return self
        return Ports.of(self.ranges + other.ranges)

    def allows(self, proto: str, port: int = 0) -> bool:
        """Whether `proto` traffic to `port` is in the set (icmp: any `port`)."""
        return any(p == "any" or (p == proto and (proto == "icmp" or lo <= port <= hi))
                   for p, lo, hi in self.ranges)

    def text(self) -> str:
        items: list[str] = []
        for proto, lo, hi in self.ranges:
            if proto == "any" or (lo, hi) == (0, 65535):
                items.append(proto)
            else:
                items.append(f"{proto}/{lo}" if lo == hi else f"{proto}/{lo}-{hi}")
        return ",".join(items)

    def __str__(self) -> str:
        return self.text()


ANY: Final = Ports((("any", 0, 65535),))


def nft_matches(ports: Ports, family: str) -> list[str]:
    """nftables matches, one per protocol, that together accept exactly `ports` for IPv4
    (`family` "4") or IPv6 ("6"); [""]: anything, []: nothing. Text only: the hub's and the
    devices' firewalls (coordinator/_hubfilter.py, agent/_devfilter.py) write them."""
    if any(proto == "any" for proto, _, _ in ports.ranges):
        return [""]
    out: list[str] = []
    for proto in ("tcp", "udp"):
        spans = [(lo, hi) for p, lo, hi in ports.ranges if p == proto]
        if spans == [(0, 65535)]:
            out.append(f"meta l4proto {proto}")
        elif spans:
            items = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in spans)
            out.append(f"{proto} dport {{ {items} }}")
    if any(p == "icmp" for p, _, _ in ports.ranges):
        out.append("meta l4proto icmp" if family == "4" else "meta l4proto ipv6-icmp")
    return out


def parse_ports(text: str, where: str = "ports") -> Ports:
    """`any` or a comma list of `tcp`, `udp`, `icmp`, `tcp/N`, `udp/N-M`."""
    items = [item.strip() for item in text.split(",")]
    if len(items) > MAX_PORT_ITEMS:
        raise PolicyError(f"{where}: more than {MAX_PORT_ITEMS} port items")
    ranges: list[tuple[Proto, int, int]] = []
    for item in items:
        if item == "any":
            ranges.append(("any", 0, 65535))
        elif item in PROTOCOLS:
            ranges.append((item, 0, 65535))  # type: ignore[arg-type]
        else:
            match = _PORT_RE.match(item)
            if not match:
                raise PolicyError(f"{where}: {_show(item)} is not any, tcp, udp, icmp, "
                                  "tcp/PORT or udp/FIRST-LAST")
            lo = int(match.group(2))
            hi = int(match.group(3)) if match.group(3) else lo
            if not 1 <= lo <= hi <= 65535:
                raise PolicyError(f"{where}: {_show(item)} must be ports 1-65535, first <= last")
            ranges.append((match.group(1), lo, hi))  # type: ignore[arg-type]
    return Ports.of(ranges)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of the policy. `src`/`dst` None: every device (`*`)."""

    line: int
    src: Selector | None
    dst: Selector | None
    ports: Ports
    both: bool = False  # `<->`: dst may reach src as well

    def text(self) -> str:
        src = "*" if self.src is None else self.src.text()
        dst = "*" if self.dst is None else self.dst.text()
        return f"{src} {'<->' if self.both else '->'} {dst} {self.ports}"

    def reason(self) -> str:
        return f"line {self.line}: {self.text()}"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "src": "*" if self.src is None else self.src.text(),
                "dst": "*" if self.dst is None else self.dst.text(),
                "both": self.both, "ports": self.ports.text(), "text": self.text()}


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    # every tag key a selector names, sorted: a device's signature is its values of these
    keys: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"rules": [r.to_json() for r in self.rules],
                "default": ["devices reach their LAN neighbours (any)",
                            "operators and hubs reach every device and are reached (any)"]}


def _selector(text: str, line: int) -> Selector | None:
    if text == "*":
        return None
    try:
        return Selector.parse(text)
    except RolloutSpecError as exc:
        raise PolicyError(f"line {line}: {exc}") from None


def _rule(raw: str, line: int) -> Rule:
    text = raw.split("#", 1)[0].strip()
    for arrow in _ARROWS:
        src, found, rest = text.partition(arrow)
        if found:
            break
    else:
        raise PolicyError(f"line {line}: {_show(text)} must be SRC -> DST PORTS "
                          "or SRC <-> DST PORTS")
    src = src.strip()
    parts = rest.split()
    if not src or " " in src or "\t" in src:
        raise PolicyError(f"line {line}: the source must be one selector (key=value,... "
                          "without spaces) or *")
    if not parts:
        raise PolicyError(f"line {line}: no destination after {arrow}")
    if len(parts) == 1:
        raise PolicyError(f"line {line}: no ports after the destination (write any, or "
                          "e.g. tcp/554)")
    return Rule(line, _selector(src, line), _selector(parts[0], line),
                parse_ports(",".join(parts[1:]), f"line {line}"), both=arrow == "<->")


def parse_policy(text: str) -> Policy:
    """The policy file, checked as a whole (docs/policy.md)."""
    if not isinstance(text, str):
        raise PolicyError("policy: must be text")
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy: larger than {MAX_POLICY_BYTES} bytes")
    rules: list[Rule] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.split("#", 1)[0].strip():
            continue
        if len(rules) == MAX_RULES:
            raise PolicyError(f"line {number}: more than {MAX_RULES} rules")
        rules.append(_rule(raw, number))
    keys = sorted({k for r in rules for sel in (r.src, r.dst) if sel is not None
                   for k, _ in sel.conditions})
    return Policy(tuple(rules), tuple(keys))


# --------------------------------------------------------------------------- compiling


@dataclass(frozen=True, slots=True)
class FleetDevice:
    """What the compiler needs of a device: its name, tags and LAN key (its public address:
    devices with the same key are LAN neighbours; None: it has none known)."""

    name: str
    tags: Mapping[str, str]
    lan: str | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """One peer a device may reach (or be reached by): the ports, and why (rule lines or the
    default)."""

    peer: str
    ports: Ports
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "ports": self.ports.text(), "why": list(self.reasons)}


@dataclass(frozen=True, slots=True)
class _Edge:
    rule: Rule
    src_groups: tuple[int, ...]
    dst_groups: tuple[int, ...]
    reason: str  # rule.reason(), written once


class CompiledPolicy:
    """A policy applied to one fleet's devices: groups and rule edges between groups. Per-device
    answers are built when asked; `explain` gives the rules behind each."""

    def __init__(self, policy: Policy, devices: Iterable[FleetDevice]) -> None:
        self.policy = policy
        keys = policy.keys
        index: dict[tuple[str, ...], int] = {}
        self._members: list[list[str]] = []
        self._group: dict[str, int] = {}
        self._lan: dict[str, str] = {}
        self._lan_members: dict[str, list[str]] = {}
        self._links_cache: dict[int, frozenset[tuple[tuple[str, ...], bool, Ports]]] = {}
        self._keys: dict[int, tuple[str, ...]] = {}
        for d in devices:
            tags = d.tags
            sig = tuple(tags.get(k, "") for k in keys)
            g = index.get(sig)
            if g is None:
                g = index[sig] = len(self._members)
                self._members.append([])
            self._members[g].append(d.name)
            self._group[d.name] = g
            if d.lan is not None:
                self._lan[d.name] = d.lan
                self._lan_members.setdefault(d.lan, []).append(d.name)
        views = [dict(zip(keys, sig, strict=True)) for sig in index]
        self._out: list[list[_Edge]] = [[] for _ in views]
        self._in: list[list[_Edge]] = [[] for _ in views]
        self._edges: list[_Edge] = []  # in the policy's order
        for rule in policy.rules:
            src = tuple(g for g, v in enumerate(views) if rule.src is None or rule.src.matches(v))
            dst = tuple(g for g, v in enumerate(views) if rule.dst is None or rule.dst.matches(v))
            if not src or not dst:
                continue
            why = rule.reason()
            edges = [_Edge(rule, src, dst, why)] + ([_Edge(rule, dst, src, why)]
                                                    if rule.both else [])
            self._edges += edges
            for edge in edges:
                for g in edge.src_groups:
                    self._out[g].append(edge)
                for g in edge.dst_groups:
                    self._in[g].append(edge)

    @property
    def groups(self) -> int:
        """How many tag signatures the fleet's devices fall into."""
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._group

    def __len__(self) -> int:
        return len(self._group)

    def _grants(self, name: str, outward: bool) -> Iterator[tuple[str, Ports, str]]:
        g = self._group[name]
        for edge in (self._out if outward else self._in)[g]:
            ports, why = edge.rule.ports, edge.reason
            for other in (edge.dst_groups if outward else edge.src_groups):
                for peer in self._members[other]:
                    if peer != name:
                        yield peer, ports, why
        lan = self._lan.get(name)
        if lan is not None:
            for peer in self._lan_members[lan]:
                if peer != name:
                    yield peer, ANY, DEFAULT_REASONS["lan"]

    def _collect(self, name: str, outward: bool) -> list[Grant]:
        if name not in self._group:
            raise KeyError(name)
        ports: dict[str, Ports] = {}
        reasons: dict[str, list[str]] = {}
        for peer, p, why in self._grants(name, outward):
            old = ports.get(peer)
            ports[peer] = p if old is None else old | p
            seen = reasons.setdefault(peer, [])
            if why not in seen:
                seen.append(why)
        return [Grant(peer, ports[peer], tuple(reasons[peer])) for peer in sorted(ports)]

    def reach(self, name: str) -> dict[str, Ports]:
        """The devices `name` may reach, with the ports on them (KeyError: not in the fleet)."""
        return {g.peer: g.ports for g in self._collect(name, True)}

    def reached_by(self, name: str) -> dict[str, Ports]:
        """The devices that may reach `name`, with the ports they may reach on it."""
        return {g.peer: g.ports for g in self._collect(name, False)}

    def peers(self, name: str) -> set[str]:
        """Every device `name` shares a WireGuard peering with: it reaches them or they it."""
        return {p for p, _, _ in self._grants(name, True)} | \
            {p for p, _, _ in self._grants(name, False)}

    def group_of(self, name: str) -> int | None:
        return self._group.get(name)

    def lan_of(self, name: str) -> str | None:
        return self._lan.get(name)

    def pair(self, a: str, b: str) -> tuple[Ports | None, Ports | None]:
        """(what `a` may send to `b`, what `b` may send to `a`); None: nothing. O(the rules
        of `a`'s group), never O(fleet): a peer map checks one peer with it."""
        ga, gb = self._group.get(a), self._group.get(b)
        if ga is None or gb is None or a == b:
            return None, None
        out: Ports | None = None
        back: Ports | None = None
        for edge in self._out[ga]:
            if gb in edge.dst_groups:
                out = edge.rule.ports if out is None else out | edge.rule.ports
        for edge in self._in[ga]:
            if gb in edge.src_groups:
                back = edge.rule.ports if back is None else back | edge.rule.ports
        lan = self._lan.get(a)
        if lan is not None and lan == self._lan.get(b):
            out, back = ANY, ANY
        return out, back

    def links(self, name: str) -> frozenset[tuple[tuple[str, ...], bool, Ports]]:
        """What decides `name`'s rule peers, besides its LAN: each rule edge of its group as
        (the other group's members, outward, ports). Equal links under two compilations mean
        equal rule peers and ports (a policy change leaves such a device's map alone)."""
        g = self._group[name]
        cache = self._links_cache.get(g)
        if cache is None:
            key = self._group_key
            cache = frozenset(
                [(key(o), True, e.rule.ports) for e in self._out[g] for o in e.dst_groups]
                + [(key(o), False, e.rule.ports) for e in self._in[g] for o in e.src_groups])
            self._links_cache[g] = cache
        return cache

    def _group_key(self, g: int) -> tuple[str, ...]:
        key = self._keys.get(g)
        if key is None:
            key = self._keys[g] = tuple(sorted(self._members[g]))
        return key

    def edges(self) -> list[tuple[list[str], list[str], Ports]]:
        """Every rule edge once, in the policy's order, as (its source devices, its destination
        devices, ports): what a firewall matches on (sets of addresses per edge: rules grow
        with the policy's rules, never with device pairs)."""
        return [([n for g in e.src_groups for n in self._members[g]],
                 [n for g in e.dst_groups for n in self._members[g]], e.rule.ports)
                for e in self._edges]

    def explain(self, name: str) -> dict[str, Any]:
        """What `name` may reach and what may reach it, each peer with its ports and the rules
        that allow them (the API's `policy/compiled` answer)."""
        return {"device": name, "operators": ANY.text(), "hubs": ANY.text(),
                "reach": [g.to_json() for g in self._collect(name, True)],
                "reached_by": [g.to_json() for g in self._collect(name, False)]}


def compile_policy(policy: Policy, devices: Iterable[FleetDevice]) -> CompiledPolicy:
    """`policy` over one fleet's devices (names unique)."""
    return CompiledPolicy(policy, devices)
