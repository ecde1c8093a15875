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

Endpoint rule (docs/api.md, PeerEntry): when viewer and peer share a public IP (same NAT) and the
peer has LAN candidates, the peer's LAN endpoints (`lan=True`); otherwise the peer's endpoint as
the hub saw it; otherwise none (relay only).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from mesh.control import HubInfo, PeerEntry, PeerMap, PeerMapDelta

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


def endpoint_ip(endpoint: str) -> str:
    host = endpoint.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


class PeerMapCore:
    """All active devices; versions per device. `first_version` should exceed any version a
    previous run handed out (the server passes epoch milliseconds), so a restarted coordinator
    never answers 304 to an agent holding a stale map whose number happens to match."""

    def __init__(self, hub: HubInfo, first_version: int = 1, *,
                 journal_publishes: int = JOURNAL_PUBLISHES,
                 journal_names: int = JOURNAL_NAMES) -> None:
        self.hub = hub
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
        return bool(self._pending)

    @property
    def relay_ips(self) -> tuple[str, ...]:
        return self._relay_ips

    def _entry(self, viewer: Member, peer: Member) -> PeerEntry:
        if viewer.public_ip is not None and viewer.public_ip == peer.public_ip \
                and peer.lan_endpoints:
            return PeerEntry(peer.name, peer.public_key, peer.mesh_ipv4, peer.mesh_ipv6,
                             peer.lan_endpoints, lan=True)
        endpoints = (peer.public_endpoint,) if peer.public_endpoint else ()
        return PeerEntry(peer.name, peer.public_key, peer.mesh_ipv4, peer.mesh_ipv6, endpoints)

    def build(self, name: str) -> PeerMap:
        """D's map: every other member of its fleet, by name. O(fleet size)."""
        viewer = self._members[name]
        peers = tuple(self._entry(viewer, self._members[n])
                      for n in sorted(self._fleets[viewer.fleet]) if n != name)
        return PeerMap(self.version(name), self.hub, peers, self._relay_ips,
                       self._targets.get(name, 0),
                       punch=tuple(sorted(self._punch.get(name, {}).items())),
                       logs_wanted_until=self._logs_wanted.get(name, 0.0))

    def render(self, name: str) -> bytes:
        """`build(name).to_json()` as JSON bytes, from per-member fragments that are shared by
        every viewer (a 5,000-peer map is then a join, not 5,000 dict builds)."""
        viewer = self._members[name]
        parts: list[str] = []
        for n in sorted(self._fleets[viewer.fleet]):
            if n == name:
                continue
            peer = self._members[n]
            frag = self._fragments.get(n)
            if frag is None:
                wan = json.dumps(self._entry(replace(peer, public_ip=None), peer).to_json())
                lan = (json.dumps(PeerEntry(peer.name, peer.public_key, peer.mesh_ipv4,
                                            peer.mesh_ipv6, peer.lan_endpoints, True).to_json())
                       if peer.lan_endpoints else None)
                frag = self._fragments[n] = (wan, lan)
            same_nat = viewer.public_ip is not None and viewer.public_ip == peer.public_ip
            parts.append(frag[1] if same_nat and frag[1] is not None else frag[0])
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
        # beyond about the whole fleet, the full map is as small
        return names if len(names) < len(self._fleets[viewer.fleet]) else None

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
            if peer is None or peer.fleet != viewer.fleet:
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
        self._mark(self._fleets[member.fleet])

    def remove(self, name: str) -> None:
        member = self._members.pop(name, None)
        if member is None:
            return
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
        self._mark(self._fleet_except(new))
        if new_ip != old.public_ip:
            self._view_changed(name)
            self._mark((name,))
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
        return True

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

    def publish(self) -> set[str]:
        """Give every pending device one new version (one per batch); returns their names."""
        if not self._pending:
            return set()
        self._seq += 1
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
