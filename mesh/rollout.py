"""The rollout vocabulary both sides parse the same way: tags, selectors, phases, windows,
durations, failure limits and a rollout's spec (docs/rollouts.md).

Pure: no I/O, no clock. Every parse error is a `RolloutSpecError` with one line that names the
field and what is wrong, so the CLI prints it as is and the API answers it as a 400.

- **Tags**: `key=value` per device; key `[a-z0-9][a-z0-9._-]{0,31}`, value
  `[A-Za-z0-9._:+/-]{0,63}`, at most `MAX_TAGS`.
- **Selector**: an AND of `key=value` conditions, separated by ',' or '+'. '+' is also a value
  character (`tz=UTC+01:00`), so a '+' separates conditions only where a `key=` follows it.
  `key=` matches a device whose tag is absent or empty.
- **Phases**: a comma list of counts `N`, percentages `P%` (up to three decimals) and
  selectors (written with '+'). Counts and percentages are cumulative totals, so within each
  kind they must grow; nothing may follow `100%`.
- **Window**: `HH:MM-HH:MM` or `HH:MM:SS-HH:MM:SS` in the device's local time; start == end is
  always open; end < start wraps midnight.
- **Durations**: `90`, `90s`, `5m`, `2h`, `1d`, `1m30s` (units in that order, each once).
- **MaxFailures**: `N` halts when failures exceed N; `P%` halts when failures exceed P % of the
  devices with an outcome, judged only once at least `min_devices` have one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final, Literal

TAG_KEY_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}\Z")
TAG_VALUE_RE: Final = re.compile(r"[A-Za-z0-9._:+/-]{0,63}\Z")
MAX_TAGS: Final = 32
MAX_PHASES: Final = 20
MAX_SELECTOR_TEXT: Final = 2048
MAX_PHASES_TEXT: Final = 4096
MAX_DURATION: Final = 366 * 86400.0  # a year: longer is a typo
MAX_MIN_DEVICES: Final = 1_000_000
DAY: Final = 86400

ROLLOUT_STATES: Final = ("held", "running", "paused", "halted", "aborted", "done")


class RolloutSpecError(ValueError):
    """A tag, selector, phase list, window, duration or rollout spec that is not valid."""


def _show(text: str, limit: int = 40) -> str:
    """`text` quoted for an error line, cut so one line stays one short line."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


# --------------------------------------------------------------------------- tags


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not TAG_KEY_RE.match(key):
        shown = _show(key) if isinstance(key, str) else type(key).__name__
        raise RolloutSpecError(f"{where}: key {shown} must be 1-32 of a-z 0-9 . _ - "
                               "starting with a letter or digit")
    return key


def _check_value(key: str, value: Any, where: str) -> str:
    if not isinstance(value, str) or not TAG_VALUE_RE.match(value):
        shown = _show(value) if isinstance(value, str) else type(value).__name__
        raise RolloutSpecError(f"{where}: value of {key} {shown} must be at most 63 of "
                               "A-Z a-z 0-9 . _ : + / -")
    return value


def check_tags(obj: Any, where: str = "tags") -> dict[str, str]:
    """A JSON object of tags, validated: `{key: value}` strings, at most `MAX_TAGS`."""
    if not isinstance(obj, dict):
        raise RolloutSpecError(f"{where}: must be an object of key: value strings")
    if len(obj) > MAX_TAGS:
        raise RolloutSpecError(f"{where}: more than {MAX_TAGS} tags")
    return {_check_key(k, where): _check_value(k, v, where) for k, v in obj.items()}


def parse_tag_args(args: Sequence[str]) -> dict[str, str]:
    """Command-line tags `["k=v", ...]` into a dict; a key given twice is an error."""
    out: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            raise RolloutSpecError(f"tag {_show(arg)}: must be key=value")
        _check_value(_check_key(key, "tag"), value, "tag")
        if key in out:
            raise RolloutSpecError(f"tag {key}: given twice")
        out[key] = value
    if len(out) > MAX_TAGS:
        raise RolloutSpecError(f"tags: more than {MAX_TAGS} tags")
    return out


# --------------------------------------------------------------------------- selectors

# A '+' separates two conditions only where a key and '=' follow it.
_PLUS_SPLIT: Final = re.compile(r"\+(?=\s*[a-z0-9][a-z0-9._-]{0,31}=)")


@dataclass(frozen=True, slots=True)
class Selector:
    """An AND of `key=value` conditions, sorted by key (the canonical form)."""

    conditions: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        if not isinstance(text, str):
            raise RolloutSpecError("selector: must be a string")
        if len(text) > MAX_SELECTOR_TEXT:
            raise RolloutSpecError(f"selector: longer than {MAX_SELECTOR_TEXT} characters")
        if not text.strip():
            raise RolloutSpecError("selector: empty")
        seen: dict[str, str] = {}
        for part in text.split(","):
            for raw in _PLUS_SPLIT.split(part.strip()):
                item = raw.strip()
                if not item:
                    raise RolloutSpecError(f"selector {_show(text)}: empty condition")
                key, eq, value = item.partition("=")
                if not eq:
                    raise RolloutSpecError(f"selector {_show(text)}: {_show(item)} must be "
                                           "key=value")
                _check_value(_check_key(key, "selector"), value, "selector")
                if key in seen:
                    raise RolloutSpecError(f"selector {_show(text)}: key {key} given twice")
                seen[key] = value
        return cls(tuple(sorted(seen.items())))

    def matches(self, tags: Mapping[str, str]) -> bool:
        return all(tags.get(key, "") == value for key, value in self.conditions)

    def text(self, sep: str = ",") -> str:
        return sep.join(f"{k}={v}" for k, v in self.conditions)

    def __str__(self) -> str:
        return self.text(",")


# --------------------------------------------------------------------------- phases

_COUNT_RE: Final = re.compile(r"[0-9]{1,9}\Z")
_PERCENT_RE: Final = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3})?)%\Z")


def _percent_text(percent: float) -> str:
    text = repr(percent)
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One item of PHASES: a cumulative count, a cumulative percentage, or a selector."""

    kind: Literal["count", "percent", "selector"]
    count: int = 0
    percent: float = 0.0
    selector: Selector | None = None

    def __str__(self) -> str:
        if self.kind == "count":
            return str(self.count)
        if self.kind == "percent":
            return _percent_text(self.percent) + "%"
        assert self.selector is not None
        return self.selector.text("+")


def _parse_phase(item: str) -> PhaseSpec:
    if _COUNT_RE.match(item):
        count = int(item)
        if count < 1:
            raise RolloutSpecError(f"phases: count {item} must be at least 1")
        return PhaseSpec("count", count=count)
    match = _PERCENT_RE.match(item)
    if match:
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise RolloutSpecError(f"phases: percentage {item} must be above 0% and at most "
                                   "100%")
        return PhaseSpec("percent", percent=percent)
    if "=" in item:
        return PhaseSpec("selector", selector=Selector.parse(item))
    raise RolloutSpecError(f"phases: {_show(item)} is not a count, a percentage (P%, up to "
                           "3 decimals) or a selector (key=value)")


def parse_phases(text: str) -> tuple[PhaseSpec, ...]:
    """PHASES (`1,10%,50%,100%`, `role=canary,site=berlin,100%`), checked as a whole."""
    if not isinstance(text, str):
        raise RolloutSpecError("phases: must be a string")
    if len(text) > MAX_PHASES_TEXT:
        raise RolloutSpecError(f"phases: longer than {MAX_PHASES_TEXT} characters")
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise RolloutSpecError("phases: empty")
    if len(items) > MAX_PHASES:
        raise RolloutSpecError(f"phases: more than {MAX_PHASES} phases")
    phases: list[PhaseSpec] = []
    for item in items:
        if not item:
            raise RolloutSpecError(f"phases {_show(text)}: empty item")
        phase = _parse_phase(item)
        if phases and phases[-1].kind == "percent" and phases[-1].percent == 100:
            raise RolloutSpecError(f"phases: {item} after 100% (no device is left for it)")
        for earlier in phases:
            if phase.kind == earlier.kind == "count" and phase.count <= earlier.count:
                raise RolloutSpecError(f"phases: {phase} after {earlier}: counts are "
                                       "cumulative totals and must grow")
            if phase.kind == earlier.kind == "percent" and phase.percent <= earlier.percent:
                raise RolloutSpecError(f"phases: {phase} after {earlier}: percentages are "
                                       "cumulative and must grow")
        phases.append(phase)
    return tuple(phases)


def cumulative_total(phase: PhaseSpec, eligible: int) -> int:
    """How many of `eligible` devices a count or percentage phase covers in total (capped)."""
    if phase.kind == "count":
        return min(phase.count, eligible)
    if phase.kind == "percent":
        # Exact arithmetic: 10% of 30 is 3, not ceil(3.0000000000000004) = 4.
        exact = Fraction(_percent_text(phase.percent)) * eligible / 100
        return min(math.ceil(exact), eligible)
    raise ValueError("a selector phase has no cumulative total")


# --------------------------------------------------------------------------- windows

_CLOCK_RE: Final = re.compile(r"([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?\Z")


def _second_of_day(text: str, whole: str) -> int:
    match = _CLOCK_RE.match(text)
    if not match:
        raise RolloutSpecError(f"window {_show(whole)}: {_show(text)} is not HH:MM or HH:MM:SS")
    hours, minutes = int(match.group(1)), int(match.group(2))
    seconds = int(match.group(3) or 0)
    if hours > 23 or minutes > 59 or seconds > 59:
        raise RolloutSpecError(f"window {_show(whole)}: {text} is not a time of day "
                               "(00:00:00-23:59:59)")
    return hours * 3600 + minutes * 60 + seconds


def _clock(second: int, with_seconds: bool) -> str:
    hours, rest = divmod(second, 3600)
    minutes, seconds = divmod(rest, 60)
    return (f"{hours:02d}:{minutes:02d}:{seconds:02d}" if with_seconds
            else f"{hours:02d}:{minutes:02d}")


@dataclass(frozen=True, slots=True)
class Window:
    """A daily maintenance window in the device's local time, as seconds of the day."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        if not isinstance(text, str):
            raise RolloutSpecError("window: must be a string HH:MM-HH:MM")
        if len(text) > 17:
            raise RolloutSpecError(f"window {_show(text)}: must be HH:MM-HH:MM or "
                                   "HH:MM:SS-HH:MM:SS")
        first, dash, second = text.strip().partition("-")
        if not dash:
            raise RolloutSpecError(f"window {_show(text)}: must be HH:MM-HH:MM or "
                                   "HH:MM:SS-HH:MM:SS")
        start = _second_of_day(first, text)
        end = _second_of_day(second, text)
        return cls(start, end)

    def contains(self, second_of_day: int) -> bool:
        second = second_of_day % DAY
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= second < self.end
        return second >= self.start or second < self.end

    def seconds_until_open(self, second_of_day: int) -> int:
        """0 inside the window, else the seconds until it next opens."""
        if self.contains(second_of_day):
            return 0
        return (self.start - second_of_day) % DAY

    def __str__(self) -> str:
        with_seconds = self.start % 60 != 0 or self.end % 60 != 0
        return f"{_clock(self.start, with_seconds)}-{_clock(self.end, with_seconds)}"


# --------------------------------------------------------------------------- durations

_DURATION_RE: Final = re.compile(
    r"(?:([0-9]+(?:\.[0-9]+)?)d)?(?:([0-9]+(?:\.[0-9]+)?)h)?"
    r"(?:([0-9]+(?:\.[0-9]+)?)m)?(?:([0-9]+(?:\.[0-9]+)?)s)?\Z")
_PLAIN_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `5m`, `2h`, `1d` or `1m30s` (at most a year)."""
    if not isinstance(text, str):
        raise RolloutSpecError("duration: must be a string like 90s, 5m, 2h, 1d or 1m30s")
    body = text.strip()
    if len(body) > 40:
        raise RolloutSpecError(f"duration {_show(body)}: too long")
    if _PLAIN_RE.match(body):
        seconds = float(body)
    else:
        match = _DURATION_RE.match(body)
        if not body or not match:
            raise RolloutSpecError(f"duration {_show(body)}: must be like 90, 90s, 5m, 2h, 1d "
                                   "or 1m30s")
        units = (86400.0, 3600.0, 60.0, 1.0)
        seconds = sum(float(g) * u for g, u in zip(match.groups(), units, strict=True) if g)
    if seconds > MAX_DURATION:
        raise RolloutSpecError(f"duration {_show(body)}: longer than a year")
    return seconds


# --------------------------------------------------------------------------- failure limits


@dataclass(frozen=True, slots=True)
class MaxFailures:
    """How many failures a rollout tolerates: a count, or a percentage of devices with an
    outcome. Exactly one of the two is set."""

    count: int | None
    percent: float | None

    @classmethod
    def parse(cls, text: str) -> MaxFailures:
        if not isinstance(text, str):
            raise RolloutSpecError("max-failures: must be N or P%")
        body = text.strip()
        if _COUNT_RE.match(body):
            return cls(int(body), None)
        match = _PERCENT_RE.match(body)
        if match:
            percent = float(match.group(1))
            if percent > 100:
                raise RolloutSpecError(f"max-failures: {body} is above 100%")
            return cls(None, percent)
        raise RolloutSpecError(f"max-failures: {_show(body)} must be a count N or a "
                               "percentage P%")

    def exceeded(self, failures: int, outcomes: int, min_devices: int) -> bool:
        """Whether `failures` among `outcomes` devices with an outcome is past the limit.

        A count is judged at once (failures > N); a percentage only once `outcomes` reaches
        `min_devices` (failures > P % of outcomes)."""
        if self.count is not None:
            return failures > self.count
        assert self.percent is not None
        if outcomes < max(min_devices, 1):
            return False
        return Fraction(failures * 100) > Fraction(_percent_text(self.percent)) * outcomes

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        assert self.percent is not None
        return _percent_text(self.percent) + "%"


# --------------------------------------------------------------------------- the spec

_SPEC_KEYS: Final = frozenset({"phases", "soak", "max_failures", "min_devices", "selector",
                               "window", "deadline", "rollback_pin"})


def _seconds(obj: Mapping[str, Any], key: str, default: float) -> float:
    raw = obj.get(key)
    if raw is None:
        return default
    if isinstance(raw, str):
        try:
            return parse_duration(raw)
        except RolloutSpecError as exc:
            raise RolloutSpecError(f"{key}: {exc}") from None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise RolloutSpecError(f"{key}: must be seconds (a number) or a duration like 5m")
    if raw < 0 or raw > MAX_DURATION:
        raise RolloutSpecError(f"{key}: must be between 0 and a year of seconds")
    return float(raw)


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """How a release goes out: its phases and the rules that advance or halt them."""

    phases: tuple[PhaseSpec, ...]
    soak: float = 600.0
    max_failures: MaxFailures = field(default=MaxFailures(0, None))
    min_devices: int = 1
    selector: Selector | None = None
    window: Window | None = None
    # A phase device not running the release healthily this long after its phase started
    # counts as failed ("did not report in time").
    deadline: float = 3600.0

    def to_json(self) -> dict[str, Any]:
        return {"phases": ",".join(str(p) for p in self.phases), "soak": self.soak,
                "max_failures": str(self.max_failures), "min_devices": self.min_devices,
                "selector": None if self.selector is None else str(self.selector),
                "window": None if self.window is None else str(self.window),
                "deadline": self.deadline}

    @classmethod
    def from_json(cls, obj: Any) -> RolloutSpec:
        """The API body of `POST .../rollout` (only `phases` required; `rollback_pin` is the
        route's and ignored here)."""
        if not isinstance(obj, dict):
            raise RolloutSpecError("rollout: body must be a JSON object")
        unknown = sorted(str(k) for k in obj if k not in _SPEC_KEYS)
        if unknown:
            raise RolloutSpecError(f"rollout: unknown field {_show(unknown[0])}")
        if "phases" not in obj or obj["phases"] is None:
            raise RolloutSpecError("phases: required")
        phases = parse_phases(obj["phases"])
        raw_max: Any = obj.get("max_failures")
        if isinstance(raw_max, int) and not isinstance(raw_max, bool):
            raw_max = str(raw_max)
        max_failures = MaxFailures(0, None) if raw_max is None else MaxFailures.parse(raw_max)
        raw_min = obj.get("min_devices", 1)
        if raw_min is None:
            raw_min = 1
        if isinstance(raw_min, bool) or not isinstance(raw_min, int) or not (
                1 <= raw_min <= MAX_MIN_DEVICES):
            raise RolloutSpecError(f"min_devices: must be a whole number from 1 to "
                                   f"{MAX_MIN_DEVICES}")
        raw_selector = obj.get("selector")
        raw_window = obj.get("window")
        deadline = _seconds(obj, "deadline", 3600.0)
        if deadline <= 0:
            raise RolloutSpecError("deadline: must be above 0 seconds")
        return cls(phases=phases, soak=_seconds(obj, "soak", 600.0), max_failures=max_failures,
                   min_devices=raw_min,
                   selector=None if raw_selector is None else Selector.parse(raw_selector),
                   window=None if raw_window is None else Window.parse(raw_window),
                   deadline=deadline)


__all__ = [
    "MAX_PHASES", "MAX_TAGS", "ROLLOUT_STATES", "TAG_KEY_RE", "TAG_VALUE_RE", "MaxFailures",
    "PhaseSpec", "RolloutSpec", "RolloutSpecError", "Selector", "Window", "check_tags",
    "cumulative_total", "parse_duration", "parse_phases", "parse_tag_args",
]
