"""Where each blob of a release comes from, on one device: the pure core of blob exchange.

No I/O, no clock, no randomness (docs/architecture.md, principle 1). The caller (a trio driver)
feeds it API calls with an explicit `now` and carries out the actions it returns: `Fetch` a blob
from a peer or from the coordinator, `Cancel` a fetch that timed out, `Announce` what we now hold.
It asks `next_deadline()` when to call `tick` next. docs/blob-exchange.md describes the policy:

1. a blob a LAN neighbour holds comes from a LAN neighbour (the least loaded one);
2. otherwise exactly one LAN member, chosen by rendezvous hashing over the LAN members (self
   included) and the blob id, fetches it across the WAN: from a WAN peer that holds it, else from
   the coordinator; everyone else waits for it to appear on the LAN and fetches it across the WAN
   only after `lan_wait` without progress from the responsible member;
3. rarest first, ties broken by a per-device hash;
4. a peer that serves bad bytes is banned for the release;
5. `peer_sharing=False`: everything from the coordinator;
6. bounded requests in flight (per source, across the WAN, in total), each failing when it
   stalls: no bytes for a time derived from the measured rate of its link (`LinkRates`).

So a LAN pulls each byte across its WAN link once, and the work is spread over its members.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from mesh.blobs import BLOB_ID_LEN

# The blob seed on the coordinator. Device names are DNS labels (mesh.control.NAME_RE), so no
# peer can be called this.
COORDINATOR: Final = "@coordinator"

# Requests in flight to one source. A small pipeline keeps a link busy across request round
# trips while one slow or dead peer holds few blobs hostage (BitTorrent clients likewise keep a
# short request queue per peer; 4 is the brief's figure, not a measurement).
MAX_IN_FLIGHT_PER_PEER: Final = 4
# Across all sources: what one device downloads at once (4 LAN peers' worth of pipelines).
MAX_IN_FLIGHT_TOTAL: Final = 16
# Across the WAN (coordinator and non-LAN peers). A LAN's members share one link: together they
# keep about LAN_WAN_FLOWS bulk fetches on it, enough to keep it full while some wait for their
# request's round trip, few enough that each gets a usable share (issue 12: 4 per device on a
# 3-device LAN starved 12 flows on a 4 Mbit/s link). So a device of a LAN of n members (itself
# included) keeps ceil(LAN_WAN_FLOWS / n) in flight, at least 1 and at most MAX_WAN_IN_FLIGHT
# (`wan_bound`): 4 alone, 2 on a LAN of 3, 1 from 6 members on. Chosen, not measured beyond the
# simulation (docs/blob-exchange.md).
MAX_WAN_IN_FLIGHT: Final = 4
LAN_WAN_FLOWS: Final = 6

# Per-transfer rates the timers assume, bytes/s. Conservative defaults: 100 Mbit/s Ethernet/Wi-Fi
# at ~80 %, and a 1 Mbit/s cellular link; a deployment configures its own (SchedConfig).
DEFAULT_LAN_RATE: Final = 10_000_000.0
DEFAULT_WAN_RATE: Final = 125_000.0

# A non-responsible member waits LAN_WAIT_FACTOR x the time the responsible member needs (one WAN
# transfer, then one LAN transfer) before crossing the WAN itself (the brief: 2x), never less
# than LAN_WAIT_FLOOR_S, which covers gossip latency for small blobs.
LAN_WAIT_FACTOR: Final = 2.0
LAN_WAIT_FLOOR_S: Final = 5.0

# Static timers (SchedConfig(follow_rates=False), the behaviour before issue 12): a fetch that
# takes FETCH_TIMEOUT_FACTOR x its expected time at the configured rate (at least the floor:
# connection set-up over a relay) has failed.
FETCH_TIMEOUT_FACTOR: Final = 4.0
FETCH_TIMEOUT_FLOOR_S: Final = 10.0

# Rate-following timers (the default): a fetch fails when it *stalls*, i.e. no bytes for
# STALL_FACTOR x the time one PROGRESS_UNIT takes at the measured per-transfer rate of its link
# class (LAN or WAN), never less than the floor. The rate is an EWMA (weight RATE_EWMA_WEIGHT for
# a new sample) of what transfers of that class got; the configured rate stands in until the
# first sample, and a transfer that stalls before its first byte while nothing is measured
# halves it (the link is slower than configured). MIN_RATE bounds the timers: ~70 min per unit.
STALL_FACTOR: Final = 4.0
STALL_FLOOR_S: Final = 10.0
PROGRESS_UNIT: Final = 1 << 20  # mesh.wire.MAX_PIECE: a peer's largest piece arrives at once
RATE_EWMA_WEIGHT: Final = 0.25
MIN_RATE: Final = 1_000.0

# After a failure a source rests, with capped exponential backoff: gRPC's connection backoff
# (grpc/doc/connection-backoff.md: initial 1 s, multiplier 1.6, max 120 s, jitter left out here
# because the rest period is per device and nothing synchronises the devices' failures).
BACKOFF_INITIAL_S: Final = 1.0
BACKOFF_MULTIPLIER: Final = 1.6
BACKOFF_MAX_S: Final = 120.0

# Blob ids remembered per peer: 64 Ki ids of 4 MiB chunks (mesh.release.CHUNK_SIZE) is a 256 GiB
# release. Bounds what one peer's announcements can make us store.
MAX_HAVE_IDS_PER_PEER: Final = 65_536


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Fetch:
    """Download `blob_id` (`size` bytes, at most) from `source`: a peer name or COORDINATOR.

    The caller verifies the bytes and reports `on_received(source, blob_id, ok, now)` or
    `on_failed(source, blob_id, now)`.
    """

    blob_id: bytes
    source: str
    size: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """Abandon the fetch of `blob_id` from `source` (timed out, banned source, not wanted)."""

    blob_id: bytes
    source: str


@dataclass(frozen=True, slots=True)
class Announce:
    """Tell peers we hold `blob_ids`; `complete`: this is everything we hold (a snapshot)."""

    blob_ids: tuple[bytes, ...]
    complete: bool = False


Action = Fetch | Cancel | Announce


@dataclass(frozen=True, slots=True)
class SchedConfig:
    lan_rate: float = DEFAULT_LAN_RATE  # bytes/s one LAN transfer gets
    wan_rate: float = DEFAULT_WAN_RATE  # bytes/s one WAN transfer gets
    peer_sharing: bool = True  # False: every blob from the coordinator (the baseline)
    max_per_peer: int = MAX_IN_FLIGHT_PER_PEER
    max_total: int = MAX_IN_FLIGHT_TOTAL
    max_wan: int = MAX_WAN_IN_FLIGHT
    # True: timers follow the measured rates (stall timeouts, lan_wait); False: the static
    # timers from the configured rates (fetch_timeout), for comparison with the old policy
    follow_rates: bool = True
    # bulk WAN fetches a LAN's members keep in flight together (`wan_bound`); None: every
    # device keeps max_wan, whatever its LAN (the behaviour before issue 12)
    lan_wan_flows: int | None = LAN_WAN_FLOWS

    def __post_init__(self) -> None:
        if not (self.lan_rate > 0 and self.wan_rate > 0):
            raise ValueError("rates must be positive")
        if min(self.max_per_peer, self.max_total, self.max_wan,
               1 if self.lan_wan_flows is None else self.lan_wan_flows) < 1:
            raise ValueError("in-flight bounds must be at least 1")


def lan_wait(size: int, config: SchedConfig, rates: LinkRates | None = None) -> float:
    """How long a non-responsible member waits for a blob of `size` bytes to appear on its LAN:
    at the configured rates, or at the measured ones (`rates`)."""
    wan = rates.get(True) if rates is not None else config.wan_rate
    lan = rates.get(False) if rates is not None else config.lan_rate
    return max(LAN_WAIT_FLOOR_S, LAN_WAIT_FACTOR * (size / wan + size / lan))


def wan_bound(lan_members: int, config: SchedConfig) -> int:
    """WAN fetches one device keeps in flight on a LAN of `lan_members` (itself included)."""
    if config.lan_wan_flows is None:
        return config.max_wan
    share = -(-config.lan_wan_flows // max(1, lan_members))
    return max(1, min(config.max_wan, share))


def stall_timeout(rate: float) -> float:
    """No bytes for this long at a per-transfer `rate` (bytes/s): the fetch has stalled."""
    return max(STALL_FLOOR_S, STALL_FACTOR * PROGRESS_UNIT / rate)


class LinkRates:
    """The per-transfer rate of each link class (LAN, WAN), measured: one per device, shared by
    the schedulers of its releases. Pure: samples come with their durations."""

    def __init__(self, config: SchedConfig) -> None:
        self._rate = {False: config.lan_rate, True: config.wan_rate}
        self._measured = {False: False, True: False}

    def get(self, wan: bool) -> float:
        return self._rate[wan]

    def measured(self, wan: bool) -> bool:
        return self._measured[wan]

    def sample(self, wan: bool, nbytes: int, seconds: float) -> None:
        """`nbytes` of one transfer arrived over `seconds`."""
        if nbytes <= 0 or seconds <= 0:
            return
        rate = max(MIN_RATE, nbytes / seconds)
        if self._measured[wan]:
            rate = (1 - RATE_EWMA_WEIGHT) * self._rate[wan] + RATE_EWMA_WEIGHT * rate
        self._rate[wan] = rate
        self._measured[wan] = True

    def stalled_unmeasured(self, wan: bool) -> None:
        """A transfer got no byte within its stall timeout and nothing is measured yet: the
        configured rate is too high."""
        if not self._measured[wan]:
            self._rate[wan] = max(MIN_RATE, self._rate[wan] / 2)


def fetch_timeout(size: int, wan: bool, config: SchedConfig) -> float:
    """When a fetch of `size` bytes across the WAN (or the LAN) counts as failed."""
    rate = config.wan_rate if wan else config.lan_rate
    return max(FETCH_TIMEOUT_FLOOR_S, FETCH_TIMEOUT_FACTOR * size / rate)


def _hrw_weight(member: str, blob_id: bytes) -> int:
    # blob ids have a fixed length, so blob_id + name is unambiguous. Every device must compute
    # the same weights: this function is part of the protocol.
    digest = hashlib.blake2b(blob_id + member.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(members: Iterable[str], blob_id: bytes) -> str:
    """The member responsible for `blob_id`: highest random weight (Thaler & Ravishankar 1998).

    When a member leaves, only the blobs it owned move (each to its runner-up); ties, which need
    a 64-bit collision, go to the greater name.
    """
    best: tuple[int, str] | None = None
    for m in members:
        key = (_hrw_weight(m, blob_id), m)
        if best is None or key > best:
            best = key
    if best is None:
        raise ValueError("no members")
    return best[1]


@dataclass(slots=True)
class _Flight:
    source: str
    deadline: float
    wan: bool
    last: float  # when it started, or last brought bytes
    got: int = 0  # bytes it brought
    unsampled: int = 0  # bytes that arrived at `last` and are not in a rate sample yet


class BlobScheduler:
    """Decides, for one device and one release, which blob to fetch from where, and when."""

    def __init__(self, name: str, *, have: Iterable[bytes] = (),
                 config: SchedConfig | None = None, rates: LinkRates | None = None) -> None:
        """`rates`: the device's measured link rates, shared with its other schedulers."""
        if name == COORDINATOR:
            raise ValueError("a device cannot be called the coordinator")
        self.name: Final = name
        self.config: Final = config if config is not None else SchedConfig()
        self.rates: Final = rates if rates is not None else LinkRates(self.config)
        self._have: set[bytes] = set(have)
        self._wanted: dict[bytes, int] = {}
        self._pending: set[bytes] = set()  # wanted, not held, not in flight
        self._order_key: dict[bytes, bytes] = {}  # per-device tie-break among equally rare
        self._largest = 0  # the largest wanted blob (the owner-progress wait)
        self._lan: frozenset[str] = frozenset()
        self._wan: frozenset[str] = frozenset()
        self._banned: set[str] = set()
        self._peer_have: dict[str, set[bytes]] = {}
        self._holders: dict[bytes, set[str]] = {}  # current, unbanned members only
        self._flights: dict[bytes, _Flight] = {}
        self._load: dict[str, int] = {}
        self._wan_load = 0
        self._strikes: dict[str, int] = {}
        self._rest_until: dict[str, float] = {}
        self._owner: dict[bytes, str] = {}  # cache of rendezvous_owner over the LAN
        self._waiting: dict[bytes, tuple[str, float]] = {}  # blob -> (owner, waiting since)
        self._progress: dict[str, float] = {}  # LAN member -> last time it brought an owned blob
        self._now = float("-inf")

    # ------------------------------------------------------------------ read-only views

    @property
    def have(self) -> frozenset[bytes]:
        return frozenset(self._have)

    @property
    def wanted(self) -> Mapping[bytes, int]:
        return dict(self._wanted)

    def holders(self, blob_id: bytes) -> frozenset[str]:
        """The peers that announced `blob_id`."""
        return frozenset(self._holders.get(blob_id, ()))

    @property
    def missing(self) -> frozenset[bytes]:
        return frozenset(b for b in self._wanted if b not in self._have)

    @property
    def complete(self) -> bool:
        return all(b in self._have for b in self._wanted)

    @property
    def banned(self) -> frozenset[str]:
        return frozenset(self._banned)

    def in_flight(self) -> dict[bytes, str]:
        """blob id -> the source it is being fetched from."""
        return {b: f.source for b, f in self._flights.items()}

    def responsible(self, blob_id: bytes) -> str:
        """The LAN member (maybe us) that fetches `blob_id` across the WAN, in our view."""
        owner = self._owner.get(blob_id)
        if owner is None:
            owner = rendezvous_owner(self._rendezvous_members(), blob_id)
            self._owner[blob_id] = owner
        return owner

    def _rendezvous_members(self) -> list[str]:
        """Who the rendezvous runs over: the unbanned LAN members and us."""
        return [*(p for p in self._lan if p not in self._banned), self.name]

    def wan_reason(self, blob_id: bytes, now: float) -> str:
        """Why `blob_id` is fetched across the WAN now (for the log): ours by rendezvous, or
        how long we waited for the member whose it is."""
        if not self._lan:
            return "no LAN neighbour"
        owner = self.responsible(blob_id)
        if owner == self.name:
            return f"ours to fetch among {len(self._rendezvous_members())} LAN members"
        waiting = self._waiting.get(blob_id)
        if waiting is None:
            return f"{owner}'s to fetch"
        return (f"{owner}'s to fetch, waited {now - waiting[1]:.1f} s for it (limit "
                f"{self._wait_deadline(blob_id) - waiting[1]:.1f} s)")

    def next_deadline(self) -> float | None:
        """When to call `tick` next (None: nothing is timed; wait for an event)."""
        times = [f.deadline for f in self._flights.values() if f.deadline < float("inf")]
        times.extend(t for t in self._rest_until.values() if t > self._now)
        if self.config.peer_sharing:
            for b in self._waiting:
                if b in self._pending:
                    t = self._wait_deadline(b)
                    if t > self._now:
                        times.append(t)
        return min(times, default=None)

    # ------------------------------------------------------------------ inputs

    def want(self, blobs: Mapping[bytes, int], now: float) -> list[Action]:
        """The blobs (id -> size) this device needs for the release; replaces an earlier want."""
        out = self._advance(now)
        for b, size in blobs.items():
            if not isinstance(b, bytes) or len(b) != BLOB_ID_LEN:
                raise ValueError("blob ids are 32 bytes")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError("blob sizes are non-negative integers")
        for b in [b for b in self._flights if b not in blobs]:
            out.append(self._drop_flight(b))
        self._wanted = dict(blobs)
        self._order_key = {b: hashlib.blake2b(self.name.encode(), digest_size=8,
                                              key=b).digest() for b in blobs}
        self._largest = max(blobs.values(), default=0)
        self._pending = {b for b in blobs if b not in self._have and b not in self._flights}
        self._waiting = {b: w for b, w in self._waiting.items()
                         if b in blobs and b not in self._have}
        self._refresh_waiting(now)
        if self._have:
            out.append(Announce(tuple(sorted(self._have)), complete=True))
        out.extend(self._schedule(now))
        return out

    def set_peers(self, lan: Iterable[str], wan: Iterable[str], now: float) -> list[Action]:
        """The current members: LAN neighbours, and the other mesh peers."""
        out = self._advance(now)
        skip = {self.name, COORDINATOR}
        new_lan = frozenset(lan) - skip
        new_wan = frozenset(wan) - skip - new_lan
        if new_lan != self._lan:
            self._owner.clear()
        self._lan, self._wan = new_lan, new_wan
        self._rebuild_holders()
        self._refresh_waiting(now)
        out.extend(self._schedule(now))
        return out

    def on_have(self, peer: str, blob_ids: Iterable[bytes], complete: bool,
                now: float) -> list[Action]:
        """`peer` holds `blob_ids`; `complete`: that is all it holds (replaces what we knew)."""
        out = self._advance(now)
        if (not self.config.peer_sharing or peer in self._banned
                or peer in (self.name, COORDINATOR)):
            return out + self._schedule(now)
        known = self._peer_have.setdefault(peer, set())
        member = peer in self._lan or peer in self._wan
        if complete:
            for b in known:
                if member:
                    self._unhold(b, peer)
            known.clear()
        for b in blob_ids:
            if b in known or len(known) >= MAX_HAVE_IDS_PER_PEER:
                continue
            if not isinstance(b, bytes) or len(b) != BLOB_ID_LEN:
                continue
            known.add(b)
            if member:
                self._holders.setdefault(b, set()).add(peer)
                if (peer in self._lan and b in self._wanted and b not in self._have
                        and self.responsible(b) == peer):
                    self._progress[peer] = now
        out.extend(self._schedule(now))
        return out

    def on_received(self, source: str, blob_id: bytes, ok: bool, now: float) -> list[Action]:
        """A download from `source` ended; `ok`: its bytes matched the manifest and are stored."""
        out = self._advance(now)
        flight = self._flights.get(blob_id)
        if flight is not None and flight.source == source:
            self._end_flight(blob_id)
        if ok:
            self._strikes.pop(source, None)
            self._rest_until.pop(source, None)
            if blob_id not in self._have:
                self._have.add(blob_id)
                self._pending.discard(blob_id)
                self._waiting.pop(blob_id, None)
                if blob_id in self._flights:  # still coming from another source: not needed
                    out.append(self._drop_flight(blob_id))
                out.append(Announce((blob_id,)))
        elif source == COORDINATOR:
            # Not bannable (it may be the only source): corruption in transit. Rest, retry.
            self._strike(source, now)
        else:
            out.extend(self._ban(source, now))
        out.extend(self._schedule(now))
        return out

    def on_failed(self, source: str, blob_id: bytes, now: float) -> list[Action]:
        """A fetch from `source` timed out or its connection failed."""
        out = self._advance(now)
        flight = self._flights.get(blob_id)
        if flight is not None and flight.source == source:
            self._end_flight(blob_id)
            self._after_failure(source, blob_id, now)
        else:
            self._strike(source, now)
        out.extend(self._schedule(now))
        return out

    def on_progress(self, source: str, blob_id: bytes, nbytes: int, now: float
                    ) -> list[Action]:
        """`nbytes` more of the fetch of `blob_id` from `source` arrived: it is not stalled
        (its deadline moves on), and the bytes are a sample of its link's rate."""
        out = self._advance(now)
        flight = self._flights.get(blob_id)
        if flight is None or flight.source != source or nbytes <= 0:
            return out
        flight.got += nbytes
        if not self.config.follow_rates:
            return out
        flight.unsampled += nbytes
        if now > flight.last:
            self.rates.sample(flight.wan, flight.unsampled, now - flight.last)
            flight.unsampled = 0
            flight.last = now
        flight.deadline = now + stall_timeout(self.rates.get(flight.wan))
        return out

    def on_fetched(self, source: str, blob_id: bytes) -> None:
        """All bytes of the fetch of `blob_id` from `source` are in; what is left (verify and
        store, on the device) is not the link's to time: `on_received` follows."""
        flight = self._flights.get(blob_id)
        if flight is not None and flight.source == source:
            flight.deadline = float("inf")

    def fetch_limit(self, size: int, wan: bool) -> float:
        """How long a fetch starting now may go without progress (`follow_rates`), or in all
        (static timers), before it counts as failed."""
        if self.config.follow_rates:
            return stall_timeout(self.rates.get(wan))
        return fetch_timeout(size, wan, self.config)

    def lan_wait(self, size: int) -> float:
        """The wait for a blob of `size` to appear on the LAN, at the rates the timers use."""
        return lan_wait(size, self.config, self.rates if self.config.follow_rates else None)

    def tick(self, now: float) -> list[Action]:
        out = self._advance(now)
        out.extend(self._schedule(now))
        return out

    # ------------------------------------------------------------------ internals

    def _advance(self, now: float) -> list[Action]:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now
        out: list[Action] = []
        for b in [b for b, f in self._flights.items() if f.deadline <= now]:
            flight = self._flights[b]
            source = flight.source
            if flight.got == 0 and self.config.follow_rates:
                self.rates.stalled_unmeasured(flight.wan)
            out.append(self._drop_flight(b))
            self._after_failure(source, b, now)
        return out

    def _after_failure(self, source: str, blob_id: bytes, now: float) -> None:
        self._strike(source, now)
        if source in self._lan and blob_id in self._waiting:
            # The blob is on the LAN; give it another lan_wait before crossing the WAN for it.
            owner, _ = self._waiting[blob_id]
            self._waiting[blob_id] = (owner, now)

    def _strike(self, source: str, now: float) -> None:
        n = self._strikes.get(source, 0) + 1
        self._strikes[source] = n
        rest = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * BACKOFF_MULTIPLIER ** (n - 1))
        self._rest_until[source] = now + rest

    def _ban(self, peer: str, now: float) -> list[Action]:
        out: list[Action] = []
        if peer in self._banned:
            return out
        self._banned.add(peer)
        for b in self._peer_have.pop(peer, set()):
            self._unhold(b, peer)
        for b in [b for b, f in self._flights.items() if f.source == peer]:
            out.append(self._drop_flight(b))
        if peer in self._lan:
            self._owner.clear()
            self._refresh_waiting(now)
        return out

    def _unhold(self, blob_id: bytes, peer: str) -> None:
        holders = self._holders.get(blob_id)
        if holders is not None:
            holders.discard(peer)
            if not holders:
                del self._holders[blob_id]

    def _rebuild_holders(self) -> None:
        self._holders = {}
        for peer, blobs in self._peer_have.items():
            if peer in self._lan or peer in self._wan:
                for b in blobs:
                    self._holders.setdefault(b, set()).add(peer)

    def _refresh_waiting(self, now: float) -> None:
        """Start (or restart) the wait on every missing blob whose owner is someone else."""
        for b in self._wanted:
            if b in self._have:
                continue
            owner = self.responsible(b)
            current = self._waiting.get(b)
            if owner == self.name:
                if current is not None:
                    del self._waiting[b]
            elif current is None or current[0] != owner:
                self._waiting[b] = (owner, now)

    def _wait_deadline(self, blob_id: bytes) -> float:
        owner, since = self._waiting[blob_id]
        deadline = since + self.lan_wait(self._wanted[blob_id])
        progress = self._progress.get(owner)
        if progress is not None:
            # The owner brought another blob it owns: it is alive and working through its queue
            # (a quarter of the release on a LAN of four), so keep waiting while it makes
            # progress at least once per lan_wait of the largest blob (its transfers in flight
            # may all be large ones).
            deadline = max(deadline, progress + self.lan_wait(self._largest))
        return deadline

    def _start(self, blob_id: bytes, source: str, now: float) -> Fetch:
        wan = source not in self._lan
        size = self._wanted[blob_id]
        self._flights[blob_id] = _Flight(source, now + self.fetch_limit(size, wan), wan, now)
        self._load[source] = self._load.get(source, 0) + 1
        if wan:
            self._wan_load += 1
        self._pending.discard(blob_id)
        return Fetch(blob_id, source, size)

    def _end_flight(self, blob_id: bytes) -> _Flight:
        flight = self._flights.pop(blob_id)
        n = self._load[flight.source] - 1
        if n:
            self._load[flight.source] = n
        else:
            del self._load[flight.source]
        if flight.wan:
            self._wan_load -= 1
        if blob_id in self._wanted and blob_id not in self._have:
            self._pending.add(blob_id)
        return flight

    def _drop_flight(self, blob_id: bytes) -> Cancel:
        flight = self._end_flight(blob_id)
        return Cancel(blob_id, flight.source)

    def _wan_bound(self) -> int:
        return wan_bound(len(self._lan) + 1, self.config)

    def _usable(self, source: str, now: float) -> bool:
        return (self._load.get(source, 0) < self.config.max_per_peer
                and self._rest_until.get(source, now) <= now)

    def _least_loaded(self, peers: Iterable[str], blob_id: bytes) -> str:
        # Among equals, the HRW weight spreads different blobs over different peers.
        return min(peers, key=lambda p: (self._load.get(p, 0), -_hrw_weight(p, blob_id), p))

    def _pick_source(self, blob_id: bytes, now: float) -> str | None:
        cfg = self.config
        if not cfg.peer_sharing:
            ok = self._wan_load < self._wan_bound() and self._usable(COORDINATOR, now)
            return COORDINATOR if ok else None
        holders = self._holders.get(blob_id, ())
        lan = [p for p in holders
               if p in self._lan and self._rest_until.get(p, now) <= now]
        if lan:
            free = [p for p in lan if self._load.get(p, 0) < cfg.max_per_peer]
            return self._least_loaded(free, blob_id) if free else None
        if blob_id in self._waiting and now < self._wait_deadline(blob_id):
            return None
        if self._wan_load >= self._wan_bound():
            return None
        wan = [p for p in holders if p in self._wan and self._usable(p, now)]
        if wan:
            return self._least_loaded(wan, blob_id)
        return COORDINATOR if self._usable(COORDINATOR, now) else None

    def _schedule(self, now: float) -> list[Action]:
        out: list[Action] = []
        cfg = self.config
        if not self._pending or len(self._flights) >= cfg.max_total:
            return out
        # Cheap filter first (this runs on every input): a blob is a candidate if a LAN
        # neighbour holds it, or if the WAN has room and we need not wait for the LAN.
        wan_open = self._wan_load < self._wan_bound()
        if not cfg.peer_sharing:
            if not (wan_open and self._usable(COORDINATOR, now)):
                return out
            candidates = list(self._pending)
        else:
            lan, holders, waiting = self._lan, self._holders, self._waiting
            candidates = []
            for b in self._pending:
                h = holders.get(b)
                if h is not None and not lan.isdisjoint(h):
                    candidates.append(b)
                elif wan_open and (b not in waiting or now >= self._wait_deadline(b)):
                    candidates.append(b)
        holders = self._holders
        candidates.sort(key=lambda b: (len(holders.get(b, ())), self._order_key[b]))
        for b in candidates:
            if len(self._flights) >= cfg.max_total:
                break
            source = self._pick_source(b, now)
            if source is not None:
                out.append(self._start(b, source, now))
        return out
