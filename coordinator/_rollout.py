"""The rollout decision core: phase membership, advance, halt, operator actions and each
device's target (docs/rollouts.md). No I/O and no clock: time comes in as `now`, the devices'
reports as `DeviceView`s; every function returns a new `Rollout`, which the coordinator stores.

How a rollout moves:

- `start` fixes the phases (`assign_phases`) and starts the first one.
- `step` runs on every report of a device of the app and at `next_deadline`. It notes when
  each device of a started phase began running the release healthily (app state "running" on
  the version, or a newer one) and which devices failed it (state "failed" working towards it,
  the version among the device's failed versions, or not running it healthily `deadline`
  seconds after its phase started). Failures are counted over the devices of every started
  phase (the phases are cumulative), against the outcomes so far (devices that failed, or ran
  healthily for the soak time); past `max_failures` the rollout halts. A phase whose devices
  all have an outcome ends the instant the last one finished its soak and the next phase starts
  then; after the last phase the rollout is done. A paused rollout still notes what devices do,
  but neither advances nor halts.
- A failed device stays failed for this rollout; a healthy (soaked) one stays healthy unless it
  later reports the version failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple

from mesh.control import AppStatus
from mesh.rollout import (
    PhaseSpec,
    RolloutSpec,
    RolloutSpecError,
    Window,
    cumulative_total,
)

# A device's state within one rollout.
PENDING: Final = "pending"  # its phase has not started
UPDATING: Final = "updating"  # its phase started; not running the release healthily (yet)
RUNNING: Final = "running"  # running it healthily since `running_since`, soak not over
HEALTHY: Final = "healthy"  # ran it healthily for the soak time
FAILED: Final = "failed"
DEVICE_STATES: Final = (PENDING, UPDATING, RUNNING, HEALTHY, FAILED)

ACTIVE: Final = ("running", "paused")  # the states in which devices take the release
BAD: Final = ("halted", "aborted")  # the release is bad: every device goes back
RESUMED: Final = "resumed by operator"  # the event; a phase never ends before it


class RolloutConflict(Exception):
    """An operator action that does not apply to the rollout in its state (one line)."""


@dataclass(frozen=True, slots=True)
class Member:
    """A device of the fleet as phase selection sees it."""

    name: str
    tags: Mapping[str, str]
    site: str | None  # its public IP as the coordinator sees it
    nat: str | None  # its NAT kind, if known
    enrolled_at: float


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What a device last reported about the app (all None when it never reported)."""

    name: str
    state: str | None = None
    running_version: int | None = None
    target_version: int | None = None
    failed_versions: tuple[int, ...] = ()
    error: str | None = None
    updated_at: float | None = None

    @classmethod
    def of(cls, name: str, status: AppStatus | None) -> DeviceView:
        if status is None:
            return cls(name)
        return cls(name, status.state, status.running, status.target, status.failed,
                   status.error, status.updated_at)


@dataclass(frozen=True, slots=True)
class PhaseRecord:
    spec: str  # the PHASES item, as typed
    devices: tuple[str, ...]
    started_at: float | None = None
    ended_at: float | None = None
    failed: tuple[str, ...] = ()  # in the order they failed
    healthy: tuple[str, ...] = ()  # in the order their soak ended


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    phase: int
    state: str  # one of DEVICE_STATES
    running_since: float | None = None
    error: str | None = None  # why it failed, one line
    # Its reports still name this version failed from an earlier try (the rollout was
    # started again): that is not a failure of this rollout until its agent acts on the retry
    # and stops naming it; the deadline still applies.
    retrying: bool = False
    # Its deadline counts from here instead of its phase's start: it joined a started phase
    # late, or was last seen waiting for its maintenance window (reporting, not late).
    deadline_from: float | None = None

    def deadline(self, phase: PhaseRecord, spec: RolloutSpec) -> float:
        assert phase.started_at is not None
        since = phase.started_at if self.deadline_from is None else self.deadline_from
        return since + spec.deadline


@dataclass(frozen=True, slots=True)
class Rollout:
    """One release's rollout in a fleet: its phases, its devices, its timeline."""

    fleet: str
    app: str
    version: int
    previous: int | None
    state: str  # one of mesh.rollout.ROLLOUT_STATES
    reason: str | None
    phase: int  # the current phase (the last one once done)
    spec: RolloutSpec | None  # None while held
    phases: tuple[PhaseRecord, ...]
    devices: Mapping[str, DeviceRecord]
    created_at: float
    updated_at: float
    events: tuple[tuple[float, str], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet, "app": self.app, "version": self.version,
            "previous": self.previous, "state": self.state, "reason": self.reason,
            "phase": self.phase, "spec": None if self.spec is None else self.spec.to_json(),
            "phases": [{"index": i, "spec": p.spec, "devices": list(p.devices),
                        "started_at": p.started_at, "ended_at": p.ended_at,
                        "failed": list(p.failed), "healthy": list(p.healthy)}
                       for i, p in enumerate(self.phases)],
            "devices": {name: {"phase": d.phase, "state": d.state,
                               "running_since": d.running_since, "error": d.error,
                               "retrying": d.retrying, "deadline_from": d.deadline_from}
                        for name, d in sorted(self.devices.items())},
            "created_at": self.created_at, "updated_at": self.updated_at,
            "events": [{"at": at, "text": text} for at, text in self.events],
        }

    @classmethod
    def from_json(cls, obj: Any) -> Rollout:
        """Back from `to_json` (the store's copy); ValueError if it is not one."""
        try:
            spec = None if obj["spec"] is None else RolloutSpec.from_json(obj["spec"])
            phases = tuple(PhaseRecord(str(p["spec"]), tuple(map(str, p["devices"])),
                                       _opt_float(p["started_at"]), _opt_float(p["ended_at"]),
                                       tuple(map(str, p["failed"])),
                                       tuple(map(str, p["healthy"])))
                           for p in obj["phases"])
            devices = {str(name): DeviceRecord(int(d["phase"]), str(d["state"]),
                                               _opt_float(d["running_since"]),
                                               None if d.get("error") is None
                                               else str(d["error"]),
                                               d.get("retrying") is True,
                                               _opt_float(d.get("deadline_from")))
                       for name, d in obj["devices"].items()}
            rollout = cls(
                fleet=str(obj["fleet"]), app=str(obj["app"]), version=int(obj["version"]),
                previous=None if obj["previous"] is None else int(obj["previous"]),
                state=str(obj["state"]),
                reason=None if obj["reason"] is None else str(obj["reason"]),
                phase=int(obj["phase"]), spec=spec, phases=phases, devices=devices,
                created_at=float(obj["created_at"]), updated_at=float(obj["updated_at"]),
                events=tuple((float(e["at"]), str(e["text"])) for e in obj["events"]))
        except (KeyError, TypeError, AttributeError, RolloutSpecError) as exc:
            raise ValueError(f"not a stored rollout: {exc}") from None
        if any(d.state not in DEVICE_STATES or not 0 <= d.phase < len(phases)
               for d in devices.values()):
            raise ValueError("not a stored rollout: a device with a bad state or phase")
        return rollout


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --------------------------------------------------------------------------- phases


def _group_key(value: str | None) -> tuple[bool, str]:
    return (value is not None, value or "")


def _interleave(lists: Sequence[Sequence[str]]) -> list[str]:
    """Round-robin: the first of each list, then the second of each, ..."""
    out: list[str] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def _spread(members: Iterable[Member]) -> list[str]:
    """Every member once, in the order count and percentage phases take them: round-robin
    over the sites (sorted, unknown first), and within a site round-robin over its NAT kinds,
    devices of a group by name."""
    sites: dict[str | None, dict[str | None, list[str]]] = {}
    for m in members:
        sites.setdefault(m.site, {}).setdefault(m.nat, []).append(m.name)
    per_site = []
    for site in sorted(sites, key=_group_key):
        groups = sites[site]
        per_site.append(_interleave([sorted(groups[nat]) for nat in sorted(groups,
                                                                          key=_group_key)]))
    return _interleave(per_site)


def _eligible(spec: RolloutSpec, member: Member) -> bool:
    return spec.selector is None or spec.selector.matches(member.tags)


def assign_phases(spec: RolloutSpec, members: Iterable[Member]
                  ) -> tuple[tuple[str, ...], ...]:
    """The devices of each phase (sorted by name). Counts and percentages are cumulative over
    the eligible devices and take at least one more device while any remain; a selector phase
    takes every eligible device it matches that no earlier phase took. A device that no phase
    takes is not part of the rollout."""
    eligible = sorted((m for m in members if _eligible(spec, m)), key=lambda m: m.name)
    order = _spread(eligible)
    taken: set[str] = set()
    out: list[tuple[str, ...]] = []
    for phase in spec.phases:
        if phase.selector is not None:
            chosen = [m.name for m in eligible
                      if m.name not in taken and phase.selector.matches(m.tags)]
        else:
            total = cumulative_total(phase, len(eligible))
            if total <= len(taken) < len(eligible):
                total = len(taken) + 1
            chosen = [name for name in order if name not in taken][:max(0, total - len(taken))]
        taken.update(chosen)
        out.append(tuple(sorted(chosen)))
    return tuple(out)


def _phase_label(index: int, record: PhaseRecord) -> str:
    return f"phase {index + 1} ({record.spec})"


def _start_phase(phases: list[PhaseRecord], devices: dict[str, DeviceRecord], index: int,
                 at: float, events: list[tuple[float, str]]) -> None:
    record = phases[index]
    phases[index] = replace(record, started_at=at)
    for name in record.devices:
        if devices[name].state == PENDING:
            devices[name] = replace(devices[name], state=UPDATING)
    names = ", ".join(record.devices) if record.devices else "no devices"
    events.append((at, f"{_phase_label(index, record)} started: {names}"))


def held(fleet: str, app: str, version: int, previous: int | None, now: float) -> Rollout:
    """A published release that targets no device until its rollout starts."""
    return Rollout(fleet, app, version, previous, "held", None, 0, None, (), {}, now, now,
                   ((now, f"v{version} published, held until a rollout starts"),))


def start(fleet: str, app: str, version: int, previous: int | None, spec: RolloutSpec,
          members: Iterable[Member], now: float,
          views: Mapping[str, DeviceView] | None = None) -> Rollout:
    """A new running rollout with its phases fixed and the first one started at `now`.

    `views` are the devices' reports at the start: a device whose report already names the
    version failed (an earlier rollout of it halted) is `retrying`, not failed."""
    assigned = assign_phases(spec, members)
    phases = [PhaseRecord(str(p), names) for p, names in zip(spec.phases, assigned, strict=True)]
    known = views or {}
    devices = {name: DeviceRecord(i, PENDING, retrying=name in known and _failure(
                   known[name], version) is not None)
               for i, names in enumerate(assigned) for name in names}
    events: list[tuple[float, str]] = [
        (now, f"rollout of v{version} started: phases {spec.to_json()['phases']}, "
              f"{len(devices)} devices")]
    _start_phase(phases, devices, 0, now, events)
    return Rollout(fleet, app, version, previous, "running", None, 0, spec, tuple(phases),
                   devices, now, now, tuple(events))


def _late_joins(spec: RolloutSpec, last: PhaseSpec, member: Member) -> bool:
    """Whether a device enrolled after the start belongs to the last phase: it would have,
    had it been there at the start (the last phase is 100%, or a selector it matches)."""
    if not _eligible(spec, member):
        return False
    if last.selector is not None:
        return last.selector.matches(member.tags)
    return last.kind == "percent" and last.percent == 100


def admit(rollout: Rollout, spec: RolloutSpec, members: Iterable[Member], now: float
          ) -> Rollout:
    """Devices enrolled after the rollout started join its last phase (see `_late_joins`)."""
    if rollout.state not in (*ACTIVE, "done") or not rollout.phases:
        return rollout
    last = len(rollout.phases) - 1
    joining = sorted(m.name for m in members
                     if m.enrolled_at > rollout.created_at and m.name not in rollout.devices
                     and _late_joins(spec, spec.phases[last], m))
    if not joining:
        return rollout
    started = rollout.phases[last].started_at is not None
    devices = dict(rollout.devices)
    for name in joining:
        devices[name] = (DeviceRecord(last, UPDATING, deadline_from=now) if started
                         else DeviceRecord(last, PENDING))
    record = rollout.phases[last]
    phases = (*rollout.phases[:last],
              replace(record, devices=tuple(sorted((*record.devices, *joining)))))
    events = (*rollout.events,
              *((now, f"{name} enrolled: joins {_phase_label(last, record)}")
                for name in joining))
    return replace(rollout, phases=phases, devices=devices, events=events, updated_at=now)


# --------------------------------------------------------------------------- step


def _failure(view: DeviceView, version: int) -> str | None:
    """Why the device failed the version, or None if it did not (yet). A device whose platform
    the release has no image for fails it at once, with the agent's line saying so: it would
    only be late by the deadline, for a reason known now."""
    if version in view.failed_versions or (
            view.state in ("failed", "no-platform") and view.target_version == version):
        return view.error or f"v{version} failed on the device"
    return None


def _healthy(view: DeviceView, version: int) -> bool:
    return view.state == "running" and view.running_version is not None and \
        view.running_version >= version


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g} s"


@dataclass
class _Work:
    """The mutable copy of a rollout that one call of `step` works on."""

    rollout: Rollout
    phases: list[PhaseRecord]
    devices: dict[str, DeviceRecord]
    events: list[tuple[float, str]]
    failed_now: set[str] = field(default_factory=set)  # failed in this call

    @classmethod
    def of(cls, rollout: Rollout) -> _Work:
        return cls(rollout, list(rollout.phases), dict(rollout.devices), list(rollout.events))

    def fail(self, name: str, error: str, now: float) -> None:
        record = self.devices[name]
        self.devices[name] = replace(record, state=FAILED, error=error)
        phase = self.phases[record.phase]
        self.phases[record.phase] = replace(
            phase, failed=(*phase.failed, name),
            healthy=tuple(n for n in phase.healthy if n != name))
        self.events.append((now, f"{name} failed: {error}"))
        self.failed_now.add(name)

    def observe(self, spec: RolloutSpec, views: Mapping[str, DeviceView], now: float) -> None:
        version = self.rollout.version
        for phase in self.phases:
            if phase.started_at is None:
                continue
            for name in phase.devices:
                record = self.devices[name]
                if record.state == FAILED:
                    continue
                view = views.get(name) or DeviceView(name)
                error = _failure(view, version)
                if record.retrying and error is None:
                    record = replace(record, retrying=False)
                    self.devices[name] = record
                if error is not None and not record.retrying:
                    self.fail(name, error, now)
                elif record.state == HEALTHY:
                    continue
                elif _healthy(view, version):
                    since = record.running_since if record.running_since is not None else now
                    if now >= since + spec.soak:
                        self.devices[name] = replace(record, state=HEALTHY, running_since=since)
                        current = self.phases[record.phase]
                        self.phases[record.phase] = replace(
                            current, healthy=(*current.healthy, name))
                    else:
                        self.devices[name] = replace(record, state=RUNNING,
                                                     running_since=since)
                elif view.state == "waiting-window" and view.target_version == version:
                    self.devices[name] = replace(record, state=UPDATING, running_since=None,
                                                 deadline_from=now)
                elif now >= record.deadline(phase, spec):
                    late = _fmt_seconds(spec.deadline)
                    self.fail(name, f"did not report v{version} running healthily within "
                                    f"{late} of its phase start", now)
                elif record.state == RUNNING:
                    self.devices[name] = replace(record, state=UPDATING, running_since=None)

    def counts(self) -> tuple[int, int]:
        """(failures, outcomes) over the devices of the started phases."""
        failures = outcomes = 0
        for phase in self.phases:
            if phase.started_at is None:
                continue
            for name in phase.devices:
                state = self.devices[name].state
                failures += state == FAILED
                outcomes += state in (FAILED, HEALTHY)
        return failures, outcomes

    def halt_reason(self, spec: RolloutSpec, index: int) -> str | None:
        failures, outcomes = self.counts()
        # A rollout of fewer devices than min-devices is judged once all have an outcome.
        least = min(spec.min_devices, len(self.devices))
        if not spec.max_failures.exceeded(failures, outcomes, least):
            return None
        current = self.phases[index]
        first = current.failed[0] if current.failed else next(
            p.failed[0] for p in self.phases if p.failed)
        return (f"phase {index + 1}: {failures} failed of {outcomes} (max-failures "
                f"{spec.max_failures}): {first} failed: {self.devices[first].error}")

    def phase_end(self, spec: RolloutSpec, index: int, now: float) -> float | None:
        """When the phase ended (every device has an outcome), else None: when the last
        device's soak ended or it failed, but not before the rollout was last resumed."""
        phase = self.phases[index]
        assert phase.started_at is not None
        ends = [phase.started_at, *(at for at, text in self.events if text == RESUMED)]
        for name in phase.devices:
            record = self.devices[name]
            if record.state == FAILED:
                if name in self.failed_now:
                    ends.append(now)
            elif record.state == HEALTHY:
                assert record.running_since is not None
                ends.append(record.running_since + spec.soak)
            else:
                return None
        return max(ends)

    def end_phase(self, index: int, at: float, how: str) -> None:
        phase = self.phases[index]
        self.phases[index] = replace(phase, ended_at=at)
        self.events.append((at, f"{_phase_label(index, phase)} {how}: {len(phase.healthy)} "
                                f"healthy, {len(phase.failed)} failed"))

    def done(self, state: str, reason: str | None, index: int, now: float) -> Rollout:
        return replace(self.rollout, state=state, reason=reason, phase=index,
                       phases=tuple(self.phases), devices=self.devices,
                       events=tuple(self.events), updated_at=now)


def step(rollout: Rollout, spec: RolloutSpec, views: Mapping[str, DeviceView], now: float
         ) -> Rollout:
    """The rollout after the devices' latest reports (`views`, by device name) at `now`."""
    if rollout.state not in ACTIVE or not rollout.phases:
        return rollout
    work = _Work.of(rollout)
    index = rollout.phase
    while True:
        work.observe(spec, views, now)
        if rollout.state == "paused":
            return work.done("paused", rollout.reason, index, now)
        reason = work.halt_reason(spec, index)
        if reason is not None:
            work.end_phase(index, now, "halted")
            work.events.append((now, f"halted: {reason}"))
            return work.done("halted", reason, index, now)
        end = work.phase_end(spec, index, now)
        if end is None:
            return work.done("running", None, index, now)
        work.end_phase(index, end, "ended")
        if index == len(work.phases) - 1:
            work.events.append((end, f"done: v{rollout.version} on "
                                     f"{sum(len(p.healthy) for p in work.phases)} devices"))
            return work.done("done", None, index, now)
        index += 1
        _start_phase(work.phases, work.devices, index, end, work.events)


def next_deadline(rollout: Rollout, spec: RolloutSpec, now: float) -> float | None:
    """When `step` must run again even if no device reports: a soak ends, or a device's
    deadline expires. None when nothing is due."""
    if rollout.state not in ACTIVE:
        return None
    due: list[float] = []
    for phase in rollout.phases:
        if phase.started_at is None:
            continue
        for name in phase.devices:
            record = rollout.devices[name]
            if record.state == RUNNING and record.running_since is not None:
                due.append(record.running_since + spec.soak)
            elif record.state == UPDATING:
                due.append(record.deadline(phase, spec))
    return min(due, default=None)


# --------------------------------------------------------------------------- actions


def _conflict(rollout: Rollout, action: str, allowed: Sequence[str]) -> RolloutConflict:
    return RolloutConflict(f"cannot {action} the rollout of {rollout.app} v{rollout.version}: "
                           f"it is {rollout.state} (only when {' or '.join(allowed)})")


def pause(rollout: Rollout, now: float) -> Rollout:
    """running -> paused: no phase advances, no halt; devices of started phases go on."""
    if rollout.state != "running":
        raise _conflict(rollout, "pause", ["running"])
    return replace(rollout, state="paused", updated_at=now,
                   events=(*rollout.events, (now, "paused by operator")))


def resume(rollout: Rollout, now: float) -> Rollout:
    if rollout.state != "paused":
        raise _conflict(rollout, "resume", ["paused"])
    return replace(rollout, state="running", updated_at=now,
                   events=(*rollout.events, (now, RESUMED)))


def abort(rollout: Rollout, now: float) -> Rollout:
    """Like a halt: the release is bad and every device goes back to the previous one."""
    if rollout.state not in ACTIVE:
        raise _conflict(rollout, "abort", ACTIVE)
    work = _Work.of(rollout)
    work.end_phase(rollout.phase, now, "aborted")
    work.events.append((now, "aborted by operator"))
    return work.done("aborted", "aborted by operator", rollout.phase, now)


def promote(rollout: Rollout, now: float) -> Rollout:
    """End the current phase now, without waiting for its soak; start the next (after the
    last: done). Devices of the ended phase that have no outcome yet are still watched."""
    if rollout.state not in ACTIVE:
        raise _conflict(rollout, "promote", ACTIVE)
    work = _Work.of(rollout)
    index = rollout.phase
    work.end_phase(index, now, "promoted by operator")
    if index == len(work.phases) - 1:
        work.events.append((now, f"done: v{rollout.version} promoted to every phase"))
        return work.done("done", None, index, now)
    _start_phase(work.phases, work.devices, index + 1, now, work.events)
    return work.done(rollout.state, rollout.reason, index + 1, now)


# --------------------------------------------------------------------------- targets


class Target(NamedTuple):
    """What one device should do about the app, as far as the rollout decides: unpacks as
    `(version, hold, window, pin_needed)`."""

    version: int | None  # None: no target for the app
    hold: bool = False  # download, do not apply (its phase has not started)
    window: str | None = None  # apply only inside this window, device-local time
    pin_needed: bool = False  # going back from a bad release: send the rollback pin


def _window(rollout: Rollout, window_tag: str | None) -> str | None:
    if rollout.spec is not None and rollout.spec.window is not None:
        return str(rollout.spec.window)
    if window_tag is None:
        return None
    try:
        return str(Window.parse(window_tag))
    except RolloutSpecError:
        return None  # a tag that is not a window does not hold the device back


def target_for(rollout: Rollout, device: str, window_tag: str | None) -> Target:
    """The rollout's target for one device: `window_tag` is its tag `window`, if any.

    held: the previous release (none if there is none). running/paused/done: the release for a
    device in a started phase, the release on hold for one in a later phase, the previous
    release for a device outside the rollout. halted/aborted: the previous release with the
    rollback pin, for every device."""
    if rollout.state in BAD:
        return Target(rollout.previous, pin_needed=rollout.previous is not None)
    record = rollout.devices.get(device)
    if rollout.state == "held" or record is None:
        return Target(rollout.previous)
    started = rollout.phases[record.phase].started_at is not None
    return Target(rollout.version, hold=not started, window=_window(rollout, window_tag))


__all__ = [
    "DEVICE_STATES", "DeviceView", "Member", "Rollout", "RolloutConflict", "Target", "abort",
    "admit", "assign_phases", "held", "next_deadline", "pause", "promote", "resume", "start",
    "step", "target_for",
]
