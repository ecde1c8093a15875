"""Manifest dissemination: rumor mongering plus anti-entropy, as a state machine without I/O.

State: for each (fleet, app), the newest verified release (`mesh.release.VerifiedRelease`: the
manifest with the encoded bytes it came from). Nothing is stored or forwarded before the injected
`verify` accepted it (docs/architecture.md, principle 5); what it refuses is dropped and counted in
`stats.invalid`. Bytes are verified once, here, where they arrive: `ManifestStored` events and
`release()` hand the verified object on, so no consumer decodes or checks them again.

Demers et al., "Epidemic Algorithms for Replicated Database Maintenance" (PODC 1987):
- *Rumor mongering*: a node that learns a new manifest keeps it "hot" and pushes it to `fanout`
  random peers once per round, for at most `rumor_rounds(N)` rounds; receiving it again from
  others `cold_after_duplicates` times (evidence that it is already widespread: Demers' counter
  variant, with duplicates as the feedback) makes it cold earlier. A push to a peer that holds
  something newer makes that peer push back (the pull half of push-pull).
- *Anti-entropy*: every `anti_entropy_interval`, a `Digest` of (fleet, app, version) to one random
  peer; the receiver sends back the manifests it has newer or the sender lacks, and requests
  (`ManifestRequest`) those it lacks. The first exchange happens on the first tick, so a node that
  comes back online catches up at once, and rumor residue is repaired within one interval.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from mesh.release import ReleaseError, VerifiedRelease, verify_release
from mesh.wire import (
    MAX_BODY,
    MAX_DIGEST,
    MAX_MANIFEST_BYTES,
    MAX_MANIFESTS,
    Digest,
    ManifestRequest,
    Message,
    ReleaseKey,
    Rumor,
)

Outgoing = list[tuple[str, Message]]
Verifier = Callable[[bytes], VerifiedRelease]
AppKey = tuple[str, str]  # (fleet, app)

_SEEN_LIMIT: Final = 4096  # remembered rejected/duplicate digests before the cache is reset
_RUMOR_OVERHEAD: Final = 64  # msgpack array headers per Rumor, generously


@dataclass(frozen=True, slots=True)
class RumorConfig:
    round_interval: float = 1.0  # one mongering round (= memberlist ProbeInterval: 1 s)
    fanout: int = 3  # peers per round, as memberlist's GossipNodes = 3
    rumor_mult: int = 3  # rounds = rumor_mult x ceil(log10(N + 1)), as memberlist RetransmitMult
    # Demers' counter k: duplicates received before going cold. Tuned in mesh.sim at N = 10,000
    # (seed 1): k = 3 leaves a residue for anti-entropy (100 % after 25 s), k = 5 reaches 100 % in
    # 5.6 s with 10.8 Rumor messages per node, k = 8 in 3.4 s with 14.2.
    cold_after_duplicates: int = 5
    anti_entropy_interval: float = 30.0  # as memberlist's PushPullInterval = 30 s


LAN_RUMOR: Final = RumorConfig()
METERED_RUMOR: Final = RumorConfig(round_interval=2.0, anti_entropy_interval=120.0)


def rumor_rounds(config: RumorConfig, n: int) -> int:
    return config.rumor_mult * max(1, math.ceil(math.log10(n + 1)))


def make_verifier(pinned_public_key: bytes, *, fleet: str | None = None,
                  platform: str | None = None) -> Verifier:
    """The verifier a driver injects: the fleet's pinned operator key, any version; with
    `platform`, each release narrowed to that platform's image (`verify_release`).

    Which version may be *installed* (not older than the running one, unless pinned) is the
    agent's decision; dissemination only keeps the newest authentic one per (fleet, app).
    """
    def verify(data: bytes) -> VerifiedRelease:
        return verify_release(data, pinned_public_key, fleet=fleet, platform=platform)
    return verify


@dataclass(slots=True)
class RumorStats:
    received: int = 0  # manifests received (in Rumor messages)
    stored: int = 0  # newer manifests verified and stored
    invalid: int = 0  # refused by the verifier: dropped, never stored or forwarded
    duplicate: int = 0  # the same version we already hold
    stale: int = 0  # older than ours (we push ours back)
    too_large: int = 0  # valid but larger than one frame: stored, not gossiped
    messages_sent: int = 0


@dataclass(frozen=True, slots=True)
class ManifestStored:
    release: VerifiedRelease
    at: float

    @property
    def fleet(self) -> str:
        return self.release.manifest.fleet

    @property
    def app(self) -> str:
        return self.release.manifest.app

    @property
    def version(self) -> int:
        return self.release.manifest.version


@dataclass(slots=True)
class _Entry:
    version: int
    release: VerifiedRelease

    @property
    def data(self) -> bytes:
        return self.release.encoded


@dataclass(slots=True)
class _Hot:
    rounds_left: int
    duplicates: int = 0


@dataclass(slots=True)
class _Seen:
    """Digests of bytes already judged, so repeats cost a hash, not a signature check."""

    invalid: set[bytes] = field(default_factory=set)

    def add(self, digest: bytes) -> None:
        if len(self.invalid) >= _SEEN_LIMIT:
            self.invalid.clear()
        self.invalid.add(digest)


class Dissemination:
    def __init__(self, self_id: str, rng: random.Random, verify: Verifier,
                 peers: Callable[[], Sequence[str]], config: RumorConfig = LAN_RUMOR,
                 misbehaved: Callable[[str, str], None] | None = None) -> None:
        """`peers()` gives the current live members (e.g. `Membership.live_members`);
        `misbehaved` is told (sender, "forged_manifest") for each manifest a peer sent that
        the verifier refused (mesh.control.MISBEHAVIOURS)."""
        self.self_id = self_id
        self.rng = rng
        self.verify = verify
        self.peers = peers
        self.config = config
        self.stats = RumorStats()
        self.misbehaved: Callable[[str, str], None] = \
            misbehaved if misbehaved is not None else (lambda _sender, _reason: None)
        self.events: list[ManifestStored] = []
        self._state: dict[AppKey, _Entry] = {}
        self._hot: dict[AppKey, _Hot] = {}
        self._seen = _Seen()
        self._started = False
        self._next_round = 0.0
        self._next_ae = 0.0

    # ---- queries and API ------------------------------------------------------------------

    def newest(self, fleet: str, app: str) -> tuple[int, bytes] | None:
        e = self._state.get((fleet, app))
        return None if e is None else (e.version, e.data)

    def release(self, fleet: str, app: str) -> VerifiedRelease | None:
        """The newest verified release of (fleet, app), None if none is held."""
        e = self._state.get((fleet, app))
        return None if e is None else e.release

    def versions(self) -> dict[AppKey, int]:
        return {k: e.version for k, e in self._state.items()}

    def drain_events(self) -> list[ManifestStored]:
        out, self.events = self.events, []
        return out

    def publish(self, data: bytes, now: float) -> bool:
        """Offer a manifest from outside the mesh (the coordinator's registry, the operator).

        True if it was verified and is newer than what we hold; it is pushed from the next round.
        """
        return self._offer(data, now)[0] == "new"

    def next_deadline(self) -> float | None:
        if not self._started:
            return None
        return min(self._next_round, self._next_ae) if self._hot else self._next_ae

    def tick(self, now: float) -> Outgoing:
        out: Outgoing = []
        cfg = self.config
        if not self._started:
            self._started = True
            self._next_round = now + self.rng.random() * cfg.round_interval  # stagger phases
            self._next_ae = now  # first anti-entropy at once: catch up after being offline
        if self._hot and self._next_round <= now:
            self._round(out)
        if self._next_round <= now:  # keep the phase while idle
            skipped = math.floor((now - self._next_round) / cfg.round_interval) + 1
            self._next_round += skipped * cfg.round_interval
        if self._next_ae <= now:
            self._next_ae = now + cfg.anti_entropy_interval
            peers = self.peers()
            if peers:
                dest = peers[self.rng.randrange(len(peers))]
                out.append((dest, Digest(self._digest())))
        self.stats.messages_sent += len(out)
        return out

    def receive(self, msg: Message, sender: str, now: float) -> Outgoing:
        out: Outgoing = []
        if isinstance(msg, Rumor):
            newer_here: list[bytes] = []
            for data in msg.manifests:
                self.stats.received += 1
                result, key = self._offer(data, now, sender)
                if result == "stale" and key is not None:
                    held = self._state[key].data
                    if held not in newer_here:
                        newer_here.append(held)
            for r in _rumors(newer_here):
                out.append((sender, r))
        elif isinstance(msg, Digest):
            theirs = {(e.fleet, e.app): e.version for e in msg.entries}
            send = [e.data for k, e in self._state.items()
                    if len(e.data) <= MAX_MANIFEST_BYTES and theirs.get(k, 0) < e.version]
            want = [ReleaseKey(f, a, v) for (f, a), v in theirs.items()
                    if v > (self._state[(f, a)].version if (f, a) in self._state else 0)]
            out.extend((sender, r) for r in _rumors(send))
            if want:
                out.append((sender, ManifestRequest(tuple(want[:MAX_DIGEST]))))
        elif isinstance(msg, ManifestRequest):
            send = []
            for k in msg.keys:
                e = self._state.get((k.fleet, k.app))
                if e is not None and e.version >= k.version:
                    send.append(e.data)
            out.extend((sender, r) for r in _rumors(send))
        self.stats.messages_sent += len(out)
        return out

    # ---- internals ------------------------------------------------------------------------

    def _offer(self, data: bytes, now: float, sender: str | None = None
               ) -> tuple[str, AppKey | None]:
        """('new' | 'duplicate' | 'stale' | 'invalid', the (fleet, app) if valid); `sender`:
        the peer it came from (None: from outside the mesh)."""
        digest = hashlib.blake2b(data, digest_size=16).digest()
        refused = digest in self._seen.invalid
        if not refused:
            try:
                release = self.verify(data)
            except (ReleaseError, ValueError, TypeError):
                refused = True
                self._seen.add(digest)
        if refused:
            self.stats.invalid += 1
            if sender is not None:
                self.misbehaved(sender, "forged_manifest")
            return "invalid", None
        manifest = release.manifest
        key = (manifest.fleet, manifest.app)
        held = self._state.get(key)
        if held is not None and manifest.version <= held.version:
            if manifest.version == held.version:
                self.stats.duplicate += 1
                hot = self._hot.get(key)
                if hot is not None:
                    hot.duplicates += 1
                    if hot.duplicates >= self.config.cold_after_duplicates:
                        del self._hot[key]
                return "duplicate", key
            self.stats.stale += 1
            return "stale", key
        self._state[key] = _Entry(manifest.version, release)
        self.stats.stored += 1
        self.events.append(ManifestStored(release, now))
        if len(data) > MAX_MANIFEST_BYTES:
            self.stats.too_large += 1
            self._hot.pop(key, None)
        else:
            self._hot[key] = _Hot(rumor_rounds(self.config, len(self.peers()) + 1))
        return "new", key

    def _round(self, out: Outgoing) -> None:
        peers = self.peers()
        dests = self.rng.sample(peers, min(self.config.fanout, len(peers))) if peers else []
        datas = [self._state[k].data for k in self._hot]
        for key in list(self._hot):
            hot = self._hot[key]
            hot.rounds_left -= 1
            if hot.rounds_left <= 0:
                del self._hot[key]
        for dest in dests:
            out.extend((dest, r) for r in _rumors(datas))

    def _digest(self) -> tuple[ReleaseKey, ...]:
        entries = [ReleaseKey(f, a, e.version) for (f, a), e in self._state.items()]
        if len(entries) > MAX_DIGEST:
            entries = self.rng.sample(entries, MAX_DIGEST)
        return tuple(entries)


def _rumors(datas: Sequence[bytes]) -> list[Rumor]:
    """Rumor messages for `datas`, each within one frame."""
    out: list[Rumor] = []
    batch: list[bytes] = []
    size = _RUMOR_OVERHEAD
    for d in datas:
        if len(d) > MAX_MANIFEST_BYTES:
            continue
        cost = len(d) + 5  # bin32 header
        if batch and (size + cost > MAX_BODY or len(batch) >= MAX_MANIFESTS):
            out.append(Rumor(tuple(batch)))
            batch, size = [], _RUMOR_OVERHEAD
        batch.append(d)
        size += cost
    if batch:
        out.append(Rumor(tuple(batch)))
    return out
