"""Peer maps without I/O: who each device must configure, with which endpoints, at which version.

Inputs are explicit calls (a device joined, left, was seen at an endpoint, reported LAN
candidates; the operator set changed); outputs are versions and maps. A change marks the
devices whose map it alters (at most the fleet: O(N)); maps are rendered only on request.
Marks are *pending* until `publish()`, which the server's batcher calls at most one batch window
after the first mark: every device touched by a burst gets the same new version at the same
moment, so both sides of a pair learn each other's endpoint together (simultaneous open is what
makes NAT hole punching work).

Incremental maps (docs/api.md, "Incremental peer maps"): every publish records, per fleet, the
names whose entry changed (joined, left, new key, endpoint or LAN candidates) in a bounded
journal. A device holding version B gets, instead of its whole map, the peers named since B
(upserted or removed) and the small head: O(size of the change), not O(fleet). It gets the full
map when B is older than its fleet's journal, not one of its own last versions (another run's,
another device's, from before it joined again, or too old), or when its own public IP changed
since B (then its LAN/WAN choice for every peer may flip).

Partial maps (docs/policy.md): a fleet with a stored policy gives each device only the peers it
needs: its LAN neighbours and the devices the compiled policy lets it reach or be reached by
(with the ports, `PeerEntry.send`/`accept`), a few cross-LAN gossip partners (GOSSIP_PARTNERS,
the next devices of other LANs on a consistent-hashing ring of the fleet, both ways) and the
peers it asked for (`punch`, both ways). A fleet without a stored policy keeps the full map.
The compiled policy and the ring are the *published* state: changes that may alter them (a
device joined, left, was re-tagged or moved to another public IP; the policy changed) are
collected and applied once per publish, which then marks exactly the devices whose view
changed (the changed device's old and new peers, the ring neighbourhood), so deltas stay
O(change); only a policy change or a burst touching a quarter of the fleet re-reads it all.

Endpoint rule (docs/api.md, PeerEntry): when viewer and peer share a public IP (same NAT) and the
peer has LAN candidates, the peer's LAN endpoints (`lan=True`); otherwise the peer's endpoint as
the hub saw it; otherwise none (relay only).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from mesh.control import MAX_PORTS_TEXT, HubInfo, PeerEntry, PeerMap, PeerMapDelta
from mesh.policy import CompiledPolicy, FleetDevice, Policy, Ports, compile_policy

# The journal of each fleet keeps the names changed by its last JOURNAL_PUBLISHES publishes,
# and at most JOURNAL_NAMES names in all (oldest dropped first). Publishes come at most one per
# batch window (200 ms), so 256 of them reach back at least ~50 s of continuous churn, and in a
# quiet fleet much longer: an agent's long poll answers within a batch window of a change, so it
# asks again from a version the journal still holds unless it was cut off for a while. A device
# further behind gets its full map, which costs what every answer cost before deltas.
JOURNAL_PUBLISHES: Final = 256
JOURNAL_NAMES: Final = 16_384
# The versions each device was last handed (its last DEVICE_VERSIONS publishes): a delta starts
# only from one of them, so a version this coordinator never gave the device (another run's or
# another replica's, a made-up one) gets the full map, never a delta that does not fit. A device
# whose map changed more often than this while it was away gets its full map too.
DEVICE_VERSIONS: Final = 32
# Partial maps: each device picks this many cross-LAN gossip partners (and is picked by about as
# many), among the next RING_WALK devices after it on its fleet's ring.
GOSSIP_PARTNERS: Final = 3
# Peers a device holds in its map on request (`punch`), each way: the oldest ask goes first.
# The agent asks only for peers already in its map; a device that asks for the whole fleet
# (a hostile one) neither gets the whole fleet back nor stays in every victim's map.
MAX_ASKED: Final = 32
RING_WALK: Final = 4 * GOSSIP_PARTNERS
NO_PORTS: Final = Ports(())


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    fleet: str
    public_key: str
    mesh_ipv4: str
    mesh_ipv6: str
    lan_endpoints: tuple[str, ...] = ()
    public_endpoint: str | None = None  # ip:port the hub saw its handshake come from
    public_ip: str | None = None  # the address part of that, or what else saw it (no hub)
    tags: tuple[tuple[str, str], ...] = ()  # sorted; what the fleet's policy selects on


@dataclass(slots=True)
class _Journal:
    """One fleet's publishes that changed some peer entry, oldest first: (version, names).
    Every change published after `floor` is in `entries`."""

    floor: int
    max_publishes: int
    max_names: int
    entries: collections.deque[tuple[int, frozenset[str]]] = field(
        default_factory=collections.deque)
    names: int = 0  # sum of the entries' sizes

    def record(self, version: int, names: frozenset[str]) -> None:
        self.entries.append((version, names))
        self.names += len(names)
        while len(self.entries) > self.max_publishes or self.names > self.max_names:
            dropped, gone = self.entries.popleft()
            self.names -= len(gone)
            self.floor = dropped

    def since(self, base: int) -> set[str]:
        """Names changed by publishes after `base` (base >= floor)."""
        out: set[str] = set()
        for version, names in reversed(self.entries):
            if version <= base:
                break
            out |= names
        return out


def _ring_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def _wire_ports(ports: Ports | None) -> Ports:
    """What a map entry carries: NO_PORTS for none; a set too long for the codec widened to
    its whole protocols (never narrower than the policy)."""
    if ports is None:
        return NO_PORTS
    if len(ports.text()) <= MAX_PORTS_TEXT:
        return ports
    return Ports.of((proto, 0, 65535) for proto, _, _ in ports.ranges)


def _ports_changed(old: CompiledPolicy, new: CompiledPolicy, p: str, peers: Iterable[str],
                   names: set[str]) -> list[str]:
    """The `peers` (still in `names`) whose ports with `p` differ between the two compiled
    policies. A pair's ports depend only on the two groups and whether they share a LAN, so
    they are compared once per (old group, new group, LAN) of the peer, not once per peer."""
    same: dict[tuple[int | None, int | None, bool, bool], bool] = {}
    old_lan, new_lan = old.lan_of(p), new.lan_of(p)
    out = []
    for x in peers:
        if x not in names:
            continue
        key = (old.group_of(x), new.group_of(x),
               old_lan is not None and old.lan_of(x) == old_lan,
               new_lan is not None and new.lan_of(x) == new_lan)
        differs = same.get(key)
        if differs is None:
            differs = same[key] = new.pair(x, p) != old.pair(x, p)
        if differs:
            out.append(x)
    return out


def endpoint_ip(endpoint: str) -> str:
    host = endpoint.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


class PeerMapCore:
    """All active devices; versions per device. `first_version` should exceed any version a
    previous run handed out (the server passes epoch milliseconds), so a restarted coordinator
    never answers 304 to an agent holding a stale map whose number happens to match."""

    def __init__(self, hub: HubInfo, first_version: int = 1, *, stride: int = 1,
                 journal_publishes: int = JOURNAL_PUBLISHES,
                 journal_names: int = JOURNAL_NAMES) -> None:
        if stride < 1:
            raise ValueError("stride must be at least 1")
        self.hub = hub
        # every version this core hands out is first_version modulo `stride` (a replica's tag
        # in the low bits: replicas on one database never hand out the same number)
        self._stride = stride
        self._journal_bounds = (journal_publishes, journal_names)
        self._members: dict[str, Member] = {}
        self._fleets: dict[str, set[str]] = {}
        self._by_ip: dict[tuple[str, str], set[str]] = {}  # (fleet, public ip) -> names
        self._published: dict[str, int] = {}
        self._pending: set[str] = set()
        self._seq = first_version
        self._relay_ips: tuple[str, ...] = ()
        self._fragments: dict[str, tuple[str, str | None]] = {}  # name -> (WAN json, LAN json)
        # name -> revision of what /device/target answers it; a change reaches the device in its
        # peer map, so the agent reads its targets on change instead of polling them often.
        self._targets: dict[str, int] = {}
        self._targets_seq = 0
        # viewer -> {peer that asked for a direct path to it: stamp}; bounded by the fleet
        self._punch: dict[str, dict[str, int]] = {}
        self._punch_seq = 0
        # name -> until when someone reads its app logs (epoch seconds): the agent uploads them
        # only then (docs/api.md, PeerMap)
        self._logs_wanted: dict[str, float] = {}
        self.marks = 0  # devices marked so far: the work counter the O(N) tests watch
        # incremental maps: per fleet, the names whose entry changed, published (the journal)
        # and not yet (pending); per device, the first version a delta may start from (a join
        # or a new public IP of its own changes its view of every peer), None while pending
        self._journal: dict[str, _Journal] = {}
        self._changed: dict[str, set[str]] = {}
        self._full_from: dict[str, int | None] = {}
        self._handed: dict[str, collections.deque[int]] = {}  # name -> its last versions
        # partial maps: per fleet its policy (absent: full maps), and as published: the policy
        # compiled over its members and the gossip ring ((hash, name) sorted, with the public
        # IP each member had then); changes since, applied by the next publish
        self._policies: dict[str, Policy] = {}
        self._compiled: dict[str, CompiledPolicy] = {}
        self._ring: dict[str, list[tuple[int, str]]] = {}
        self._ring_lan: dict[str, str | None] = {}
        self._touched: dict[str, set[str]] = {}  # fleet -> names joined/left/re-tagged/moved
        self._repolicy: set[str] = set()  # fleets whose policy changed
        # name -> peers in its map on request (both ways), oldest ask first; MAX_ASKED each
        self._asked: dict[str, dict[str, None]] = {}
        self.filter_version = 0  # grows whenever `filter_rules` may answer otherwise

    # -- reading ---------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __len__(self) -> int:
        return len(self._members)

    def member(self, name: str) -> Member | None:
        return self._members.get(name)

    def members(self) -> Iterable[Member]:
        return self._members.values()

    def version(self, name: str) -> int:
        """Published version of a device's map (members that joined in the current batch
        already have one: the first version)."""
        return self._published.get(name, 0)

    @property
    def pending(self) -> bool:
        return bool(self._pending or self._touched or self._repolicy)

    def policy(self, fleet: str) -> Policy | None:
        return self._policies.get(fleet)

    # -- partial maps ----------------------------------------------------------------------

    def _chosen(self, ring: list[tuple[int, str]], i: int) -> list[str]:
        """The gossip partners the device at ring position `i` picks: the next devices after it
        whose public IP differs from its own (or is unknown), at most RING_WALK steps on."""
        n = len(ring)
        name = ring[i][1]
        lan = self._ring_lan.get(name)
        out: list[str] = []
        for j in range(1, min(RING_WALK, n - 1) + 1):
            other = ring[(i + j) % n][1]
            if lan is None or self._ring_lan.get(other) != lan:
                out.append(other)
                if len(out) == GOSSIP_PARTNERS:
                    break
        return out

    def _gossip(self, fleet: str, name: str) -> set[str]:
        """`name`'s cross-LAN gossip partners on the published ring: those it picks and those
        that pick it (a WireGuard peering is both ways)."""
        ring = self._ring.get(fleet, [])
        key = (_ring_hash(name), name)
        i = bisect.bisect_left(ring, key)
        if i == len(ring) or ring[i] != key:
            return set()
        out = set(self._chosen(ring, i))
        n = len(ring)
        for j in range(1, min(RING_WALK, n - 1) + 1):
            k = (i - j) % n
            if name in self._chosen(ring, k):
                out.add(ring[k][1])
        return out

    def _ring_around(self, fleet: str, name: str) -> set[str]:
        """The devices whose gossip partners may change when `name` joins, leaves or moves:
        RING_WALK either side of where it sits (or would sit) on the ring."""
        ring = self._ring.get(fleet, [])
        n = len(ring)
        if n == 0:
            return set()
        i = bisect.bisect_left(ring, (_ring_hash(name), name))
        return {ring[(i + j) % n][1] for j in range(-RING_WALK, RING_WALK + 1)}

    def _policy_peers(self, fleet: str, name: str) -> set[str]:
        compiled = self._compiled.get(fleet)
        return compiled.peers(name) if compiled is not None and name in compiled else set()

    def _view(self, name: str) -> list[str]:
        """The names in `name`'s map, sorted: its fleet, or (with a policy) the peers it needs."""
        viewer = self._members[name]
        fleet = self._fleets[viewer.fleet]
        if viewer.fleet not in self._policies:
            return sorted(n for n in fleet if n != name)
        names = self._policy_peers(viewer.fleet, name) | self._gossip(viewer.fleet, name) \
            | set(self._asked.get(name, ()))
        return sorted(n for n in names if n in fleet and n != name)

    def _in_view(self, viewer: Member, name: str) -> bool:
        peer = self._members.get(name)
        if peer is None or peer.fleet != viewer.fleet or name == viewer.name:
            return False
        if viewer.fleet not in self._policies:
            return True
        compiled = self._compiled.get(viewer.fleet)
        if compiled is not None and compiled.pair(viewer.name, name) != (None, None):
            return True
        return name in self._asked.get(viewer.name, ()) \
            or name in self._gossip(viewer.fleet, viewer.name)

    def _ports(self, viewer: Member, peer: str) -> tuple[Ports | None, Ports | None]:
        """(send, accept) for `peer`'s entry in `viewer`'s map; (None, None): no policy."""
        if viewer.fleet not in self._policies:
            return None, None
        return self._policy_ports(viewer, peer)

    def _policy_ports(self, viewer: Member, peer: str) -> tuple[Ports, Ports]:
        compiled = self._compiled.get(viewer.fleet)
        send, accept = compiled.pair(viewer.name, peer) if compiled is not None else (None, None)
        return _wire_ports(send), _wire_ports(accept)

    def _holders(self, member: Member) -> Iterable[str]:
        """The devices whose map holds `member` (as published)."""
        if member.fleet not in self._policies:
            return self._fleet_except(member)
        return self._view(member.name) if member.name in self._members else ()

    def filter_rules(self) -> tuple[dict[str, list[Ports]], dict[str, frozenset[str]]]:
        """What the hub's filter enforces, as published: per fleet with a policy the ports of
        each rule edge (by index), and per device the edge sides it is on (`"3s"`: a source of
        edge 3, `"3d"`: a destination)."""
        rules: dict[str, list[Ports]] = {}
        sides: dict[str, set[str]] = {}
        for fleet, compiled in sorted(self._compiled.items()):
            ports = rules[fleet] = []
            for k, (src, dst, p) in enumerate(compiled.edges()):
                ports.append(p)
                for n in src:
                    sides.setdefault(n, set()).add(f"{k}s")
                for n in dst:
                    sides.setdefault(n, set()).add(f"{k}d")
        return rules, {n: frozenset(v) for n, v in sides.items()}

    def set_policy(self, fleet: str, policy: Policy | None) -> None:
        """The fleet's stored policy (None: none, full maps). Applied at the next publish: the
        devices whose peers or ports change are marked, and get their full map."""
        if policy is None and fleet not in self._policies:
            return
        if policy is not None and self._policies.get(fleet) == policy:
            return
        if policy is None:
            del self._policies[fleet]
        else:
            self._policies[fleet] = policy
        self._repolicy.add(fleet)

    def _touch(self, member: Member) -> None:
        if member.fleet in self._policies:
            self._touched.setdefault(member.fleet, set()).add(member.name)

    def _refresh(self, fleet: str) -> None:
        """Bring `fleet`'s compiled policy and ring to its members now; mark the devices whose
        view changed (publish calls it, so the marked get this publish's version)."""
        names = self._fleets.get(fleet, set())
        self.filter_version += 1
        touched = self._touched.pop(fleet, set())
        switched = fleet in self._repolicy
        self._repolicy.discard(fleet)
        policy = self._policies.get(fleet)
        old = self._compiled.pop(fleet, None)
        if policy is None or not names:
            ring = self._ring.pop(fleet, [])
            for _, n in ring:
                self._ring_lan.pop(n, None)
            if switched and old is not None:  # back to full maps: everyone's view grows
                self._everyone(names)
            return
        everyone = old is None or 4 * len(touched) > len(names)
        before_gossip: dict[str, set[str]] = {}
        before_peers: dict[str, set[str]] = {}
        if old is not None and not everyone:
            for p in touched:
                for x in self._ring_around(fleet, p):
                    if x not in before_gossip:
                        before_gossip[x] = self._gossip(fleet, x)
                before_peers[p] = old.peers(p) if p in old else set()
        new = compile_policy(policy, (FleetDevice(n, dict(self._members[n].tags),
                                                  self._members[n].public_ip) for n in names))
        self._compiled[fleet] = new
        ring = self._ring.setdefault(fleet, [])
        if old is None or everyone:
            for _, n in ring:
                self._ring_lan.pop(n, None)
            ring[:] = sorted((_ring_hash(n), n) for n in names)
            for n in names:
                self._ring_lan[n] = self._members[n].public_ip
            self._everyone(names)
            return
        for p in touched:
            key = (_ring_hash(p), p)
            i = bisect.bisect_left(ring, key)
            if i < len(ring) and ring[i] == key:
                del ring[i]
            self._ring_lan.pop(p, None)
            if p in names:
                bisect.insort(ring, key)
                self._ring_lan[p] = self._members[p].public_ip
        changed = self._changed.setdefault(fleet, set())
        if switched and old is not None:  # another policy: who has other rule peers or ports
            for n in names:
                if n not in touched and (n not in old or new.links(n) != old.links(n)):
                    self._view_changed(n)
                    self._mark((n,))
        for p in touched:
            for x in self._ring_around(fleet, p):
                before_gossip.setdefault(x, set())
        for x, was in before_gossip.items():
            if x not in names:
                continue
            now = self._gossip(fleet, x)
            if now != was:
                changed |= now ^ was
                self._mark((x,))
        for p in touched:
            changed.add(p)
            self._mark(_ports_changed(old, new, p, before_peers[p] | self._policy_peers(fleet, p),
                                      names))
            if p in names:
                self._view_changed(p)
                self._mark((p,))

    def _everyone(self, names: Iterable[str]) -> None:
        for n in names:
            self._view_changed(n)
        self._mark(names)

    @property
    def relay_ips(self) -> tuple[str, ...]:
        return self._relay_ips

    def _entry(self, viewer: Member, peer: Member) -> PeerEntry:
        send, accept = self._ports(viewer, peer.name)
        if viewer.public_ip is not None and viewer.public_ip == peer.public_ip \
                and peer.lan_endpoints:
            return PeerEntry(peer.name, peer.public_key, peer.mesh_ipv4, peer.mesh_ipv6,
                             peer.lan_endpoints, lan=True, send=send, accept=accept)
        endpoints = (peer.public_endpoint,) if peer.public_endpoint else ()
        return PeerEntry(peer.name, peer.public_key, peer.mesh_ipv4, peer.mesh_ipv6, endpoints,
                         send=send, accept=accept)

    def build(self, name: str) -> PeerMap:
        """D's map: every other member of its fleet (with a policy: the peers it needs), by
        name. O(its peers)."""
        viewer = self._members[name]
        peers = tuple(self._entry(viewer, self._members[n]) for n in self._view(name))
        return PeerMap(self.version(name), self.hub, peers, self._relay_ips,
                       self._targets.get(name, 0),
                       punch=tuple(sorted(self._punch.get(name, {}).items())),
                       logs_wanted_until=self._logs_wanted.get(name, 0.0))

    def render(self, name: str) -> bytes:
        """`build(name).to_json()` as JSON bytes, from per-member fragments that are shared by
        every viewer (a 5,000-peer map is then a join, not 5,000 dict builds)."""
        viewer = self._members[name]
        parts: list[str] = []
        partial = viewer.fleet in self._policies
        for n in self._view(name):
            peer = self._members[n]
            frag = self._fragments.get(n)
            if frag is None:
                wan = json.dumps(PeerEntry(peer.name, peer.public_key, peer.mesh_ipv4,
                                           peer.mesh_ipv6, (peer.public_endpoint,)
                                           if peer.public_endpoint else ()).to_json())
                lan = (json.dumps(PeerEntry(peer.name, peer.public_key, peer.mesh_ipv4,
                                            peer.mesh_ipv6, peer.lan_endpoints, True).to_json())
                       if peer.lan_endpoints else None)
                frag = self._fragments[n] = (wan, lan)
            same_nat = viewer.public_ip is not None and viewer.public_ip == peer.public_ip
            part = frag[1] if same_nat and frag[1] is not None else frag[0]
            if partial:
                send, accept = self._policy_ports(viewer, n)
                part = (part[:-1] + ', "send": ' + json.dumps(send.text()) + ', "accept": '
                        + json.dumps(accept.text()) + "}")
            parts.append(part)
        head: dict[str, Any] = {"version": self.version(name), "hub": self.hub.to_json(),
                                "targets": self._targets.get(name, 0),
                                "punch": dict(sorted(self._punch.get(name, {}).items())),
                                "logs_wanted_until": self._logs_wanted.get(name, 0.0)}
        return (json.dumps(head)[:-1] + ', "peers": [' + ", ".join(parts) + '], "relay_ips": '
                + json.dumps(list(self._relay_ips)) + "}").encode()

    def _delta_names(self, name: str, base: int) -> set[str] | None:
        """The names whose entry in `name`'s map may differ from its map at `base`, or None if
        only the full map will do (base unknown, older than the journal, or before the device's
        own view last changed)."""
        viewer = self._members[name]
        start = self._full_from.get(name)
        journal = self._journal.get(viewer.fleet)
        if start is None or base < start or base >= self.version(name) or journal is None \
                or base < journal.floor or base not in self._handed.get(name, ()):
            return None
        names = journal.since(base) | self._changed.get(viewer.fleet, set())
        names.discard(name)
        # beyond about the whole map, the full map is as small
        if viewer.fleet not in self._policies:
            return names if len(names) < len(self._fleets[viewer.fleet]) else None
        return names if len(names) < max(8, 2 * len(self._view(name))) else None

    def build_delta(self, name: str, base: int) -> PeerMapDelta | None:
        """What takes `name`'s map at version `base` to `build(name)`; None: send the full
        map. O(size of the change)."""
        names = self._delta_names(name, base)
        if names is None:
            return None
        viewer = self._members[name]
        upsert, remove = [], []
        for n in sorted(names):
            peer = self._members.get(n)
            if peer is None or not self._in_view(viewer, n):
                remove.append(n)
            else:
                upsert.append(self._entry(viewer, peer))
        return PeerMapDelta(self.version(name), base, self.hub, tuple(upsert), tuple(remove),
                            self._relay_ips, self._targets.get(name, 0),
                            punch=tuple(sorted(self._punch.get(name, {}).items())),
                            logs_wanted_until=self._logs_wanted.get(name, 0.0))

    def render_delta(self, name: str, base: int) -> bytes | None:
        """`build_delta(name, base).to_json()` as JSON bytes, or None (send `render(name)`)."""
        delta = self.build_delta(name, base)
        return None if delta is None else json.dumps(delta.to_json()).encode()

    # -- changes ---------------------------------------------------------------------------

    def _entry_changed(self, member: Member) -> None:
        """`member`'s entry changed (or it joined or left its fleet): the next deltas of its
        fleet name it."""
        self._changed.setdefault(member.fleet, set()).add(member.name)

    def _view_changed(self, name: str) -> None:
        """`name`'s view of every peer may have changed: its next map is a full one."""
        self._full_from[name] = None

    def _mark(self, names: Iterable[str]) -> None:
        for n in names:
            self._pending.add(n)
            self.marks += 1

    def _fleet_except(self, member: Member) -> Iterable[str]:
        return (n for n in self._fleets[member.fleet] if n != member.name)

    def _index(self, m: Member, add: bool) -> None:
        if m.public_ip is None:
            return
        key = (m.fleet, m.public_ip)
        group = self._by_ip.setdefault(key, set())
        if add:
            group.add(m.name)
        else:
            group.discard(m.name)
            if not group:
                del self._by_ip[key]

    def add(self, member: Member) -> None:
        """A device became active (or is loaded at start): everyone in its fleet changes."""
        if member.name in self._members:
            self.remove(member.name)
        self._members[member.name] = member
        if member.fleet not in self._fleets:
            self._fleets[member.fleet] = set()
            self._journal.setdefault(member.fleet, _Journal(self._seq, *self._journal_bounds))
        self._fleets[member.fleet].add(member.name)
        self._index(member, True)
        self._published.setdefault(member.name, self._seq)
        self._entry_changed(member)
        self._view_changed(member.name)
        if member.fleet in self._policies:  # the next publish marks those who see it
            self._touch(member)
            self._mark((member.name,))
        else:
            self._mark(self._fleets[member.fleet])

    def remove(self, name: str) -> None:
        member = self._members.get(name)
        if member is None:
            return
        holders = set(self._holders(member))  # as published, before it goes
        del self._members[name]
        self._index(member, False)
        fleet = self._fleets[member.fleet]
        fleet.discard(name)
        if not fleet:
            del self._fleets[member.fleet]
            self._journal.pop(member.fleet, None)
            self._changed.pop(member.fleet, None)
        else:
            self._entry_changed(member)
        self._full_from.pop(name, None)
        self._handed.pop(name, None)
        self._fragments.pop(name, None)
        self._pending.discard(name)
        self._published.pop(name, None)
        self._targets.pop(name, None)
        self._punch.pop(name, None)
        for n in fleet:
            self._punch.get(n, {}).pop(name, None)
        self._logs_wanted.pop(name, None)
        for n in self._asked.pop(name, {}):
            self._asked.get(n, {}).pop(name, None)
        if member.fleet in self._policies:
            self._touch(member)
            self._mark(holders & fleet)
        else:
            self._mark(fleet)

    def set_public(self, name: str, endpoint: str | None, ip: str | None = None) -> bool:
        """The hub saw the device at `endpoint` (its IP is the public IP unless `ip` is given).
        Others' entries for it change; its own map changes only if its public IP did."""
        old = self._members.get(name)
        if old is None:
            return False
        new_ip = ip if ip is not None else (endpoint_ip(endpoint) if endpoint else None)
        if endpoint == old.public_endpoint and new_ip == old.public_ip:
            return False
        new = replace(old, public_endpoint=endpoint, public_ip=new_ip)
        self._index(old, False)
        self._members[name] = new
        self._index(new, True)
        self._fragments.pop(name, None)
        self._entry_changed(new)
        self._mark(self._holders(new))
        if new_ip != old.public_ip:
            self._view_changed(name)
            self._mark((name,))
            self._touch(new)  # other LAN neighbours, maybe other gossip partners
        return True

    def set_tags(self, name: str, tags: Iterable[tuple[str, str]]) -> bool:
        """The device's tags changed: with a policy, its peers may change (next publish)."""
        old = self._members.get(name)
        new_tags = tuple(sorted(tags))
        if old is None or old.tags == new_tags:
            return False
        new = replace(old, tags=new_tags)
        self._members[name] = new
        self._touch(new)
        return True

    def set_lan(self, name: str, lan_endpoints: tuple[str, ...]) -> bool:
        """New LAN candidates matter only to devices behind the same public IP."""
        old = self._members.get(name)
        if old is None or old.lan_endpoints == lan_endpoints:
            return False
        new = replace(old, lan_endpoints=lan_endpoints)
        self._members[name] = new
        self._fragments.pop(name, None)
        self._entry_changed(new)
        if new.public_ip is not None:
            self._mark(n for n in self._by_ip.get((new.fleet, new.public_ip), ()) if n != name)
        return True

    def targets_changed(self, fleet: str, name: str | None = None) -> int:
        """What /device/target answers changed for one device of `fleet` (or all of them): their
        maps get a new `targets` revision. Returns how many devices were marked."""
        names = self._fleets.get(fleet, set())
        chosen = [name] if name is not None and name in names else \
            ([] if name is not None else list(names))
        if not chosen:
            return 0
        self._targets_seq += 1
        for n in chosen:
            self._targets[n] = self._targets_seq
        self._mark(chosen)
        return len(chosen)

    def punch(self, requester: str, peer: str) -> bool:
        """`requester` wants a direct path to `peer` now (its lazy path woke up, docs/
        metered.md): `peer`'s map names it with a new stamp. False if they are not two
        members of one fleet."""
        a, b = self._members.get(requester), self._members.get(peer)
        if a is None or b is None or a.fleet != b.fleet or requester == peer:
            return False
        self._punch_seq += 1
        self._punch.setdefault(peer, {})[requester] = self._punch_seq
        self._mark((peer,))
        if a.fleet in self._policies and not self._in_view(a, peer):
            # a peer it asked for: in both maps from now on (until one of them leaves, or
            # MAX_ASKED later asks of either push it out)
            self._ask(a.fleet, requester, peer)
        return True

    def _ask(self, fleet: str, requester: str, peer: str) -> None:
        changed = self._changed.setdefault(fleet, set())
        for x, y in ((requester, peer), (peer, requester)):
            held = self._asked.setdefault(x, {})
            held.pop(y, None)
            held[y] = None  # the newest ask last
            changed.update((x, y))
            self._mark((x, y))
            while len(held) > MAX_ASKED:
                oldest = next(iter(held))
                del held[oldest]
                self._asked.get(oldest, {}).pop(x, None)
                changed.add(oldest)
                self._mark((oldest,))

    def logs_wanted_until(self, name: str) -> float:
        """Until when the device's map asks it to upload its app logs (0: it does not)."""
        return self._logs_wanted.get(name, 0.0)

    def want_logs(self, name: str, until: float) -> bool:
        """Someone reads the device's app logs: its map asks for them until `until`. False
        (nothing marked) for a device that is not a member."""
        if name not in self._members:
            return False
        self._logs_wanted[name] = until
        self._mark([name])
        return True

    def set_relay_ips(self, relay_ips: Iterable[str]) -> bool:
        ips = tuple(relay_ips)
        if ips == self._relay_ips:
            return False
        self._relay_ips = ips
        self._mark(self._members)
        return True

    def publish(self, floor: int = 0) -> set[str]:
        """Give every pending device one new version (one per batch); returns their names.
        The new version is the next one (`stride` on) or, when that is below `floor` (the
        server passes its clock), the highest at most `floor` with the same low bits."""
        for fleet in sorted(set(self._touched) | self._repolicy):
            self._refresh(fleet)
        if not self._pending:
            return set()
        nxt = self._seq + self._stride
        if floor > nxt:
            nxt = floor - (floor - nxt) % self._stride
        self._seq = nxt
        done, self._pending = self._pending, set()
        for n in done:
            self._published[n] = self._seq
            self._handed.setdefault(n, collections.deque(maxlen=DEVICE_VERSIONS)).append(
                self._seq)
            if self._full_from.get(n, 0) is None:
                self._full_from[n] = self._seq
        for fleet, names in self._changed.items():
            self._journal[fleet].record(self._seq, frozenset(names))
        self._changed = {}
        return done
