"""SWIM membership with Lifeguard-style suspicion, as a state machine without I/O.

Das, Gupta, Motivala, "SWIM: Scalable Weakly-consistent Infection-style Process Group
Membership Protocol" (DSN 2002): one random probe per protocol period, indirect probes through
`indirect_checks` members when the direct one times out, suspicion before death, incarnation
numbers so a suspected member can refute, and membership updates piggybacked on probe traffic.
Dadgar, Phillips, Currey, "Lifeguard: Local Health Awareness for More Accurate Failure
Detection" (2018) and HashiCorp memberlist (state.go, suspicion.go): the suspicion timeout starts
at `suspicion_max_timeout_mult` x the minimum and shrinks logarithmically with independent
confirmations. Periodic push-pull anti-entropy with one random member repairs what gossip lost,
and a reconnect push-pull to a random dead member (Serf's reconnect) heals partitions.

Node ids are device names; the driver maps them to addresses (`address_of`). `receive` and
`tick` return `(destination node id, message)` pairs; time is passed in; randomness comes from
the injected `random.Random` only.

A *scope* (`set_scope`) narrows whom we probe, ask for indirect probes, push-pull and gossip
with to a subset of the members (a device's LAN neighbours while the coordinator answers:
`MembershipConfig.idle_scope`, applied by mesh.node); the others stay in the table, held
alive (their liveness is the peer map's word), and are neither probed nor suspected by us.
"""

from __future__ import annotations

import collections
import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from mesh.wire import (
    MAX_MEMBERS,
    MAX_UINT,
    MAX_UPDATES,
    Ack,
    Gossip,
    MemberState,
    Message,
    Ping,
    PingReq,
    PushPull,
    Status,
)

if TYPE_CHECKING:
    from mesh.control import PeerMap

Outgoing = list[tuple[str, Message]]
EventKind = Literal["joined", "suspect", "dead", "alive", "left"]
Scope = Literal["fleet", "lan"]

PUSH_PULL_SCALE_THRESHOLD: Final = 32  # memberlist util.go pushPullScaleThreshold
# Incarnations live in the codec's range [0, MAX_INCARNATION]; we never produce one above it.
MAX_INCARNATION: Final = MAX_UINT
# An honest incarnation grows by one per refutation, so a claim about a member more than this
# far above what we know of it is implausible: a third party's such claim is dropped, and a
# claim about ourselves moves us up by at most this much. Reaching the top then takes 2^48
# accepted frames (docs/security.md, "Gossip frames cannot take a node down").
MAX_INCARNATION_STEP: Final = 1 << 16
# A member we hear of only through relays may run more than a step ahead of what we hold (an
# attacker's lies made it refute a step up each, and we missed one): we drop those relays and
# tell the member what we hold of it, at most once per this many seconds per member; a member
# held at an incarnation it has left behind answers with its own state (`_catch_up`).
RESYNC_INTERVAL: Final = 10.0


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    probe_interval: float = 1.0  # memberlist DefaultLANConfig ProbeInterval = 1 s
    probe_timeout: float = 0.5  # ProbeTimeout = 500 ms (RTT bound on a LAN)
    indirect_checks: int = 3  # IndirectChecks = 3
    suspicion_mult: int = 4  # SuspicionMult = 4
    suspicion_max_timeout_mult: int = 6  # SuspicionMaxTimeoutMult = 6 (Lifeguard)
    retransmit_mult: int = 4  # RetransmitMult = 4
    push_pull_interval: float = 30.0  # PushPullInterval = 30 s
    gossip_nodes: int = 3  # GossipNodes = 3
    gossip_interval: float = 0.2  # GossipInterval = 200 ms
    reconnect_interval: float = 30.0  # Serf DefaultConfig ReconnectInterval = 30 s
    max_piggyback: int = 8  # ~1 KB of updates worst case: stays inside memberlist's 1400 B UDP
    # Whom a mesh.node.MeshNode gossips with (membership and manifest rumors) while the
    # coordinator answers: "fleet", every member; "lan", its LAN neighbours only, the whole
    # fleet again during a coordinator outage (issue 14: an idle device's WAN cost).
    idle_scope: Scope = "fleet"


LAN: Final = MembershipConfig()
# For metered (cellular) links, idle cost is what matters: memberlist's DefaultWANConfig timings
# (ProbeInterval 5 s, ProbeTimeout 3 s, SuspicionMult 6, GossipInterval 500 ms, GossipNodes 4)
# with push-pull every 120 s instead of WAN's 60 s; and gossip with the LAN only while the
# coordinator answers (releases come from it then). docs/gossip.md gives the idle bytes/hour.
METERED: Final = MembershipConfig(
    probe_interval=5.0, probe_timeout=3.0, suspicion_mult=6, push_pull_interval=120.0,
    gossip_nodes=4, gossip_interval=0.5, reconnect_interval=300.0, idle_scope="lan")


@dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: EventKind
    node_id: str
    incarnation: int
    at: float


def suspicion_timeout(config: MembershipConfig, n: int) -> float:
    """memberlist util.go suspicionTimeout: SuspicionMult x max(1, log10(N)) x ProbeInterval."""
    scale = max(1.0, math.log10(max(1, n)))
    return config.suspicion_mult * scale * config.probe_interval


def retransmit_limit(config: MembershipConfig, n: int) -> int:
    """memberlist util.go retransmitLimit: RetransmitMult x ceil(log10(N + 1))."""
    return config.retransmit_mult * math.ceil(math.log10(n + 1))


def push_pull_interval(config: MembershipConfig, n: int) -> float:
    """memberlist util.go pushPullScale: the interval grows with log2(N) beyond 32 nodes."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return config.push_pull_interval
    mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return mult * config.push_pull_interval


def seeds_from_peer_map(peer_map: PeerMap) -> list[tuple[str, str]]:
    """(node id, address) pairs from the coordinator's peer map: device name and mesh IPv4."""
    return [(p.name, p.mesh_ipv4) for p in peer_map.peers]


@dataclass(slots=True)
class _Suspicion:
    """Lifeguard's suspicion timer (memberlist suspicion.go)."""

    start: float
    k: int  # confirmations that bring the timeout down to `low`
    low: float
    high: float
    confirmers: set[str] = field(default_factory=set)

    def deadline(self) -> float:
        if self.k < 1:
            return self.start + self.low
        frac = math.log(len(self.confirmers) + 1.0) / math.log(self.k + 1.0)
        return self.start + max(self.low, self.high - (self.high - self.low) * frac)


@dataclass(slots=True)
class _Member:
    node_id: str
    address: str
    incarnation: int
    status: Status
    since: float
    suspicion: _Suspicion | None = None

    def state(self) -> MemberState:
        return MemberState(self.node_id, self.incarnation, self.status, self.address)


@dataclass(slots=True)
class _Broadcast:
    state: MemberState
    sent: int = 0  # transmissions so far; dropped at retransmit_limit


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    indirect_at: float | None  # None once the indirect probes went out
    acked: bool = False


class Membership:
    def __init__(self, self_id: str, address: str, rng: random.Random,
                 config: MembershipConfig = LAN,
                 counters: collections.Counter[str] | None = None,
                 misbehaved: Callable[[str, str], None] | None = None) -> None:
        """`counters`: where dropped updates are counted (the node's stats); `misbehaved`:
        told (sender, reason) for each update dropped because of what its sender claimed
        (`ghost_member`, `implausible_incarnation`: mesh.control.MISBEHAVIOURS)."""
        self.self_id = self_id
        self.address = address
        self.rng = rng
        self.config = config
        self.incarnation = 0
        self.events: list[MemberEvent] = []
        self.counters = counters if counters is not None else collections.Counter()
        self.misbehaved: Callable[[str, str], None] = \
            misbehaved if misbehaved is not None else (lambda _sender, _reason: None)
        self._members: dict[str, _Member] = {}
        self._live: list[str] = []  # alive or suspect, for O(1) random choice
        self._live_idx: dict[str, int] = {}
        self._scope: frozenset[str] | None = None  # None: every member (set_scope)
        self._scoped: list[str] | None = None  # live members in scope, sorted; None: stale
        self._suspects: set[str] = set()
        self._dead_count = 0
        self._broadcasts: dict[str, _Broadcast] = {}
        self._probe_order: list[str] = []
        self._probe: _Probe | None = None
        self._seq = 0
        self._relays: dict[int, tuple[str, int, float]] = {}  # our seq -> requester, seq, expiry
        self._resync: set[str] = set()  # members we may be out of step with: ask them
        self._resynced: dict[str, float] = {}  # member -> when we last asked it
        self._answer: set[str] = set()  # senders of a stale view of us: tell them
        self._started = False
        self._join = False
        self._next_probe = 0.0
        self._next_gossip = 0.0
        self._next_push_pull = 0.0
        self._next_reconnect = 0.0

    # ---- queries --------------------------------------------------------------------------

    def live_members(self) -> list[str]:
        """Members believed alive or suspect (not self). The returned list is shared: copy it."""
        return self._live

    def member(self, node_id: str) -> MemberState | None:
        if node_id == self.self_id:
            return self._self_state()
        m = self._members.get(node_id)
        return None if m is None else m.state()

    def address_of(self, node_id: str) -> str | None:
        m = self._members.get(node_id)
        return None if m is None else m.address

    def gossip_peers(self) -> list[str]:
        """The live members in scope: whom we probe and gossip with (all live members
        without a scope). The returned list is shared: copy it."""
        if self._scope is None:
            return self._live
        if self._scoped is None:
            self._scoped = [n for n in sorted(self._scope)
                            if (m := self._members.get(n)) is not None and m.status != Status.DEAD]
        return self._scoped

    def in_scope(self, node_id: str) -> bool:
        return self._scope is None or node_id in self._scope

    def cluster_size(self) -> int:
        """memberlist's estNumNodes: known, not dead, plus self; of the members in scope, as
        those are the ones that probe and confirm each other."""
        return len(self.gossip_peers()) + 1

    def drain_events(self) -> list[MemberEvent]:
        out, self.events = self.events, []
        return out

    # ---- API ------------------------------------------------------------------------------

    def seed(self, members: Iterable[tuple[str, str]], *, join: bool = False) -> None:
        """The members (the coordinator's peer map): exactly these, nobody else, ever.

        Updates about any other node id are dropped and counted (`unknown_members`): a peer
        cannot invent members. A member no longer listed leaves (event "left"). New ones
        start alive at incarnation 0: one that is not really there is probed, suspected
        and declared dead like any failure. Every device gets the same map, so by default the
        first push-pull waits for its (random) phase: a fleet that starts at once must not
        flood its uplinks with full-state exchanges. `join=True` (a node that restarts, or
        one that knows only a few seeds) push-pulls with one of them on the next tick and
        announces itself, like memberlist's Join.
        """
        listed = {node_id: address for node_id, address in members
                  if node_id != self.self_id}
        for node_id in [n for n in self._members if n not in listed]:
            self._remove(node_id)
        for node_id, address in listed.items():
            m = self._members.get(node_id)
            if m is None:
                self._add(node_id, address, 0, Status.ALIVE, 0.0)
            else:
                m.address = address
        if join:
            self._join = True
            self._queue(self._self_state())

    def set_scope(self, members: Iterable[str] | None, now: float) -> None:
        """Probe, ask for indirect probes, push-pull, gossip and reconnect with `members`
        only (None: every member, the default). The others stay in the table and keep
        answering: a ping from any member is acked, a push-pull answered, its updates checked
        (and misbehaviour reported) as ever. We neither probe nor suspect them: an accusation
        about one of them only moves its incarnation, and one we held suspect or dead when
        it leaves the scope is held alive again at its incarnation (event "alive", a local
        view, not gossiped): a member out of scope is alive while it is in the peer map. If
        the scope opens again, our own probes judge it afresh."""
        scope = None if members is None else frozenset(members) - {self.self_id}
        if scope == self._scope:
            return
        self._scope = scope
        self._scoped = None
        self._probe_order = []  # the next pass is over the new scope
        if scope is None:
            return
        if self._probe is not None and self._probe.target not in scope:
            self._probe = None
        for m in self._members.values():
            if m.node_id not in scope and m.status != Status.ALIVE:
                self._broadcasts.pop(m.node_id, None)  # we no longer vouch for its state
                self._set_status(m, Status.ALIVE, now)
                self.events.append(MemberEvent("alive", m.node_id, m.incarnation, now))

    def next_deadline(self) -> float | None:
        if not self._started:
            return None
        t = self._next_probe
        if self._probe is not None and not self._probe.acked and self._probe.indirect_at:
            t = min(t, self._probe.indirect_at)
        if self._broadcasts or self._join:
            t = min(t, self._next_gossip)
        t = min(t, self._next_push_pull)
        if self._dead_count:
            t = min(t, self._next_reconnect)
        for s in self._suspects:
            susp = self._members[s].suspicion
            if susp is not None:
                t = min(t, susp.deadline())
        return t

    def tick(self, now: float) -> Outgoing:
        out: Outgoing = []
        cfg = self.config
        if not self._started:
            self._started = True
            self._next_probe = now + self.rng.random() * cfg.probe_interval  # stagger starts
            self._next_gossip = now
            self._next_push_pull = now + self.rng.random() * push_pull_interval(
                cfg, self.cluster_size())
            self._next_reconnect = now + cfg.reconnect_interval
        if self._join:
            self._join = False
            self._push_pull_to_random(self.gossip_peers(), out)
        if self._relays:
            for seq in [s for s, (_, _, exp) in self._relays.items() if exp <= now]:
                del self._relays[seq]
        for node_id in list(self._suspects):
            m = self._members[node_id]
            if m.suspicion is not None and m.suspicion.deadline() <= now:
                self._declare_dead(m, m.incarnation, now)
        probe = self._probe
        if (probe is not None and not probe.acked and probe.indirect_at is not None
                and probe.indirect_at <= now):
            probe.indirect_at = None
            helpers = [h for h in self._sample(self.gossip_peers(), cfg.indirect_checks + 1)
                       if h != probe.target][:cfg.indirect_checks]
            for h in helpers:
                out.append((h, PingReq(probe.seq, self.self_id, probe.target, self._piggyback())))
        if self._next_probe <= now:
            if probe is not None and not probe.acked:
                tm = self._members.get(probe.target)
                if tm is not None and tm.status == Status.ALIVE:
                    self._on_suspect(MemberState(tm.node_id, tm.incarnation, Status.SUSPECT,
                                                 tm.address), self.self_id, now)
            self._probe = None
            self._next_probe += cfg.probe_interval
            if self._next_probe <= now:
                self._next_probe = now + cfg.probe_interval
            target = self._next_target()
            if target is not None:
                self._seq += 1
                self._probe = _Probe(target, self._seq, now + cfg.probe_timeout)
                out.append((target, Ping(self._seq, self.self_id, self._piggyback())))
        if self._broadcasts and self._next_gossip <= now:
            self._next_gossip = now + cfg.gossip_interval
            for dest in self._sample(self.gossip_peers(), cfg.gossip_nodes):
                updates = self._piggyback()
                if updates:
                    out.append((dest, Gossip(self.self_id, updates)))
        elif self._next_gossip <= now:
            self._next_gossip = now + cfg.gossip_interval
        if self._next_push_pull <= now:
            self._next_push_pull = now + push_pull_interval(cfg, self.cluster_size())
            self._push_pull_to_random(self.gossip_peers(), out)
        if self._next_reconnect <= now:
            self._next_reconnect = now + cfg.reconnect_interval
            if self._dead_count:
                dead = [m.node_id for m in self._members.values()
                        if m.status == Status.DEAD and self.in_scope(m.node_id)]
                self._push_pull_to_random(dead, out)
        return out

    def receive(self, msg: Message, sender: str, now: float) -> Outgoing:
        out: Outgoing = []
        if isinstance(msg, Ping):
            self._apply(msg.updates, sender, now)
            out.append((sender, Ack(msg.seq, self.self_id, self._piggyback())))
        elif isinstance(msg, PingReq):
            self._apply(msg.updates, sender, now)
            if msg.target_id not in self._members:
                self.counters["unknown_members"] += 1
                self.misbehaved(sender, "ghost_member")
            elif not self.in_scope(msg.target_id):
                # a probe of a member we do not probe (the requester's scope is wider: its
                # coordinator outage, not ours); its other helpers may
                self.counters["relays_out_of_scope"] += 1
            elif msg.target_id != self.self_id:
                self._seq += 1
                self._relays[self._seq] = (sender, msg.seq, now + self.config.probe_timeout)
                out.append((msg.target_id, Ping(self._seq, self.self_id, self._piggyback())))
        elif isinstance(msg, Ack):
            self._apply(msg.updates, sender, now)
            relay = self._relays.pop(msg.seq, None)
            probe = self._probe
            if relay is not None and msg.from_id != self.self_id:
                requester, seq, _ = relay
                out.append((requester, Ack(seq, msg.from_id, self._piggyback())))
            elif probe is not None and msg.seq == probe.seq and msg.from_id == probe.target:
                probe.acked = True
        elif isinstance(msg, Gossip):
            self._apply(msg.updates, sender, now)
        elif isinstance(msg, PushPull):
            # memberlist mergeState: a remote "dead" is merged as "suspect", so a live node
            # always gets the chance to refute before it is declared dead here.
            for u in msg.members:
                if u.status == Status.ALIVE:
                    self._on_alive(u, sender, now)
                else:
                    self._on_suspect(MemberState(u.node_id, u.incarnation, Status.SUSPECT,
                                                 u.address), sender, now)
            if not msg.is_reply:
                out.append((sender, PushPull(self.self_id, self._states(), True)))
                self._answer.discard(sender)  # the reply carries our state
        return self._catch_up(out, now)

    def _catch_up(self, out: Outgoing, now: float) -> Outgoing:
        """What `receive` found stale. A member we may be out of step with is told what we
        hold of it (one state, a small frame); a sender that holds us at an incarnation we
        have left behind, accusing or not, gets our current state (one state), which it takes
        from us at any value, so its suspicion clears rather than times out (memberlist ignores
        a stale accusation, which is safe only while every refutation reaches everyone).
        Together: one round trip to bring a member that missed a refutation back in step."""
        for node_id in sorted(self._resync):
            m = self._members.get(node_id)
            if m is not None:
                self._resynced[node_id] = now
                out.append((node_id, Gossip(self.self_id, (m.state(),))))
        self._resync.clear()
        for sender in sorted(self._answer):
            if sender in self._members:
                out.append((sender, Gossip(self.self_id, (self._self_state(),))))
        self._answer.clear()
        return out

    # ---- state changes --------------------------------------------------------------------

    def _apply(self, updates: tuple[MemberState, ...], sender: str, now: float) -> None:
        for u in updates:
            if u.status == Status.ALIVE:
                self._on_alive(u, sender, now)
            elif u.status == Status.SUSPECT:
                self._on_suspect(u, sender, now)
            else:
                self._on_dead(u, sender, now)

    def _known(self, u: MemberState, sender: str, now: float) -> _Member | None:
        """The member an update about someone else is about, if we take it: a member of the
        peer map, and an incarnation within MAX_INCARNATION_STEP of what we know of it unless
        the member says so itself (it is the authority on its own incarnation: its frames come
        over its own connection, and that is how a member whose count ran ahead of ours, an
        attacker's doing, brings us back in step)."""
        m = self._members.get(u.node_id)
        if m is None:
            self.counters["unknown_members"] += 1
            self.misbehaved(sender, "ghost_member")
            return None
        if sender != u.node_id and u.incarnation > m.incarnation + MAX_INCARNATION_STEP:
            self.counters["implausible_incarnation"] += 1
            if self.in_scope(u.node_id) and \
                    now >= self._resynced.get(u.node_id, float("-inf")) + RESYNC_INTERVAL:
                self._resync.add(u.node_id)  # maybe we are the one out of step: ask it
            if u.status != Status.ALIVE:
                # Only an accusation counts against its sender. A too-high "alive" is what an
                # honest relay of a victim's refutations looks like to a member that missed
                # some: under an incarnation attack the victim climbs a step per lie (the
                # hostile-device lab test had an honest device named for it).
                self.misbehaved(sender, "implausible_incarnation")
            return None
        return m

    def _on_alive(self, u: MemberState, sender: str, now: float) -> None:
        if u.node_id == self.self_id:
            if u.incarnation > self.incarnation:  # an earlier life of ours got further
                self._refute(u.incarnation, sender)
            elif u.incarnation < self.incarnation and sender != self.self_id:
                self._answer.add(sender)  # it holds us behind: tell it
            return
        m = self._known(u, sender, now)
        if m is None or u.incarnation <= m.incarnation:
            return
        was = m.status
        m.incarnation = u.incarnation  # the address is the peer map's, not a peer's word
        self._set_status(m, Status.ALIVE, now)
        if was != Status.ALIVE:
            self.events.append(MemberEvent("alive", m.node_id, m.incarnation, now))
        self._queue(m.state())

    def _on_suspect(self, u: MemberState, sender: str, now: float) -> None:
        if u.node_id == self.self_id:
            self._about_us(u, sender)
            return
        m = self._known(u, sender, now)
        if m is None or u.incarnation < m.incarnation or m.status == Status.DEAD:
            return
        if not self.in_scope(m.node_id):
            m.incarnation = u.incarnation  # what a refutation must beat, if it comes to us
            return
        if m.status == Status.SUSPECT:
            # Lifeguard: each independent suspicion brings the timeout closer to the minimum.
            # Our MemberState carries no accuser, so the sender stands in for it (docs/gossip.md).
            if m.suspicion is not None and sender != self.self_id \
                    and sender not in m.suspicion.confirmers:
                m.suspicion.confirmers.add(sender)
                self._queue(m.state())
            m.incarnation = u.incarnation
            return
        n = self.cluster_size()
        k = self.config.suspicion_mult - 2
        if n - 2 < k:  # memberlist: too few nodes to expect any confirmation
            k = 0
        low = suspicion_timeout(self.config, n)
        m.incarnation = u.incarnation
        self._set_status(m, Status.SUSPECT, now)
        m.suspicion = _Suspicion(now, k, low, self.config.suspicion_max_timeout_mult * low)
        self.events.append(MemberEvent("suspect", m.node_id, m.incarnation, now))
        self._queue(m.state())

    def _on_dead(self, u: MemberState, sender: str, now: float) -> None:
        if u.node_id == self.self_id:
            self._about_us(u, sender)
            return
        m = self._known(u, sender, now)
        if m is None or u.incarnation < m.incarnation or m.status == Status.DEAD:
            return
        if not self.in_scope(m.node_id):
            m.incarnation = u.incarnation
            return
        self._declare_dead(m, u.incarnation, now)

    def _about_us(self, u: MemberState, sender: str) -> None:
        """An accusation about us: refute it, or if it is older than our incarnation, tell its
        sender where we are (`_catch_up`); not a third party's doing to refute (it missed our
        refutations, or asks whether it did)."""
        if u.incarnation >= self.incarnation:
            self._refute(u.incarnation, sender)
        elif sender != self.self_id:
            self._answer.add(sender)

    def _declare_dead(self, m: _Member, incarnation: int, now: float) -> None:
        m.incarnation = incarnation
        self._set_status(m, Status.DEAD, now)
        self.events.append(MemberEvent("dead", m.node_id, m.incarnation, now))
        self._queue(m.state())

    def _refute(self, claimed: int, sender: str) -> None:
        """Beat a claim about us at incarnation `claimed` (an accusation, or an earlier life
        of ours). A claim more than MAX_INCARNATION_STEP ahead is counted and moves us up by
        that step only: a restarted node catches up with what its peers hold a step at a
        time, and an attacker needs 2^48 frames to reach the top. At the top we stay there
        (counted): no incarnation outside the codec's range is ever produced."""
        if claimed > self.incarnation + MAX_INCARNATION_STEP:
            self.counters["implausible_incarnation"] += 1
            if sender != self.self_id:
                self.misbehaved(sender, "implausible_incarnation")
            claimed = self.incarnation + MAX_INCARNATION_STEP - 1
        if claimed >= MAX_INCARNATION:
            self.counters["incarnation_exhausted"] += 1
        self.incarnation = min(max(self.incarnation, claimed) + 1, MAX_INCARNATION)
        self._queue(self._self_state())

    def _add(self, node_id: str, address: str, inc: int, status: Status, now: float) -> _Member:
        m = _Member(node_id, address, inc, Status.DEAD, now)
        self._members[node_id] = m
        self._dead_count += 1
        self._set_status(m, status, now)
        self.events.append(MemberEvent("joined", node_id, inc, now))
        return m

    def connected(self, node_id: str) -> Outgoing:
        """`node_id` opened a connection to us. If we hold it dead, it is back from a stop or
        a partition and does not know it was declared dead: our state goes to it (a
        push-pull), so it refutes now rather than when a periodic push-pull or reconnect
        happens to pick it (up to a push-pull interval; memberlist has its joiner push-pull
        with a seed, which a device's first pick among all members may not reach). Once per
        connection, so as often as the driver's connection backoff allows."""
        m = self._members.get(node_id)
        if m is None or m.status != Status.DEAD:
            return []
        return [(node_id, PushPull(self.self_id, self._states(), False))]

    def _remove(self, node_id: str) -> None:
        """`node_id` left the peer map: forget it."""
        m = self._members[node_id]
        if m.status != Status.DEAD:
            self._set_status(m, Status.DEAD, m.since)  # out of the live list
        del self._members[node_id]
        self._dead_count -= 1
        self._broadcasts.pop(node_id, None)
        self._resynced.pop(node_id, None)
        if self._probe is not None and self._probe.target == node_id:
            self._probe = None
        self.events.append(MemberEvent("left", node_id, m.incarnation, m.since))

    def _set_status(self, m: _Member, status: Status, now: float) -> None:
        was_live = m.status != Status.DEAD
        m.status, m.since = status, now
        self._scoped = None
        if status != Status.SUSPECT:
            m.suspicion = None
            self._suspects.discard(m.node_id)
        else:
            self._suspects.add(m.node_id)
        is_live = status != Status.DEAD
        if is_live and not was_live:
            self._live_idx[m.node_id] = len(self._live)
            self._live.append(m.node_id)
            self._dead_count -= 1
        elif was_live and not is_live:
            i = self._live_idx.pop(m.node_id)
            last = self._live.pop()
            if last != m.node_id:
                self._live[i] = last
                self._live_idx[last] = i
            self._dead_count += 1

    # ---- messages -------------------------------------------------------------------------

    def _self_state(self) -> MemberState:
        return MemberState(self.self_id, self.incarnation, Status.ALIVE, self.address)

    def _states(self) -> tuple[MemberState, ...]:
        """Ours and the members' in scope: the state of a member nobody in the scope judges
        would cross a LAN for nothing (with a LAN scope of 10 in a fleet of 100, a push-pull
        is a tenth of the size)."""
        if self._scope is None:
            others = list(self._members.values())
        else:
            others = [m for n in sorted(self._scope) if (m := self._members.get(n)) is not None]
        if len(others) >= MAX_MEMBERS:  # a random subset: successive exchanges cover the rest
            others = self.rng.sample(others, MAX_MEMBERS - 1)
        return (self._self_state(), *(m.state() for m in others))

    def _queue(self, state: MemberState) -> None:
        """A newer update about a node replaces the queued one (memberlist's invalidation)."""
        self._broadcasts[state.node_id] = _Broadcast(state)

    def _piggyback(self) -> tuple[MemberState, ...]:
        if not self._broadcasts:
            return ()
        limit = retransmit_limit(self.config, self.cluster_size())
        n = min(self.config.max_piggyback, MAX_UPDATES)
        chosen = heapq.nsmallest(n, self._broadcasts.values(), key=lambda b: b.sent)
        for b in chosen:
            b.sent += 1
            if b.sent >= limit:
                del self._broadcasts[b.state.node_id]
        return tuple(b.state for b in chosen)

    def _push_pull_to_random(self, candidates: list[str], out: Outgoing) -> None:
        if candidates:
            dest = candidates[self.rng.randrange(len(candidates))]
            out.append((dest, PushPull(self.self_id, self._states(), False)))

    def _sample(self, pool: list[str], k: int) -> list[str]:
        return self.rng.sample(pool, min(k, len(pool)))

    def _next_target(self) -> str | None:
        """memberlist probeNode: round-robin over a shuffled list, reshuffled after each pass."""
        for _ in range(2):
            while self._probe_order:
                node_id = self._probe_order.pop()
                m = self._members.get(node_id)
                if m is not None and m.status != Status.DEAD:
                    return node_id
            pool = self.gossip_peers()
            if not pool:
                return None
            self._probe_order = list(pool)
            self.rng.shuffle(self._probe_order)
        return None
