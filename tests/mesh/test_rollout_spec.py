"""mesh.rollout: the rollout vocabulary - tags, selectors, phases, windows, durations,
failure limits and the spec's JSON - and one clear error line for every bad input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.rollout import (
    MAX_TAGS,
    MaxFailures,
    PhaseSpec,
    RolloutSpec,
    RolloutSpecError,
    Selector,
    Window,
    check_tags,
    cumulative_total,
    parse_duration,
    parse_phases,
    parse_tag_args,
)

# --------------------------------------------------------------------------- tags


def test_tags_from_json_and_from_the_command_line() -> None:
    assert check_tags({"site": "berlin", "window": "02:00-04:00", "empty": ""}) == {
        "site": "berlin", "window": "02:00-04:00", "empty": ""}
    assert parse_tag_args(["site=berlin", "tz=UTC+01:00", "role="]) == {
        "site": "berlin", "tz": "UTC+01:00", "role": ""}
    assert parse_tag_args([]) == {}


@pytest.mark.parametrize(("obj", "message"), [
    (["site=berlin"], "tags: must be an object"),
    ({"Site": "x"}, "tags: key 'Site' must be"),
    ({"-site": "x"}, "tags: key '-site' must be"),
    ({"k" * 33: "x"}, "must be 1-32"),
    ({"site": "a b"}, "tags: value of site 'a b' must be"),
    ({"site": "x" * 64}, "value of site"),
    ({"site": 3}, "value of site int must be"),
    ({f"k{i}": "" for i in range(MAX_TAGS + 1)}, f"more than {MAX_TAGS} tags"),
])
def test_bad_tags_give_one_line(obj: Any, message: str) -> None:
    with pytest.raises(RolloutSpecError, match="^[^\n]*$") as info:
        check_tags(obj)
    assert message in str(info.value)


@pytest.mark.parametrize(("args", "message"), [
    (["site"], "tag 'site': must be key=value"),
    (["Site=x"], "tag: key 'Site'"),
    (["site=a=b"], "value of site 'a=b'"),
    (["site=a", "site=b"], "tag site: given twice"),
    ([f"k{i}=" for i in range(MAX_TAGS + 1)], f"more than {MAX_TAGS} tags"),
])
def test_bad_tag_args(args: list[str], message: str) -> None:
    with pytest.raises(RolloutSpecError) as info:
        parse_tag_args(args)
    assert message in str(info.value)


# --------------------------------------------------------------------------- selectors


def test_selector_accepts_both_separators_and_prints_canonically() -> None:
    by_comma = Selector.parse("site=berlin,role=cam")
    by_plus = Selector.parse(" role=cam + site=berlin ")
    assert by_comma == by_plus
    assert str(by_comma) == "role=cam,site=berlin"
    assert by_comma.text("+") == "role=cam+site=berlin"
    assert Selector.parse(str(by_comma)) == by_comma


def test_selector_matches_every_condition() -> None:
    sel = Selector.parse("site=berlin,role=cam")
    assert sel.matches({"site": "berlin", "role": "cam", "extra": "x"})
    assert not sel.matches({"site": "berlin"})
    assert not sel.matches({"site": "paris", "role": "cam"})


def test_empty_value_matches_absent_or_empty_tag() -> None:
    sel = Selector.parse("role=")
    assert sel.matches({})
    assert sel.matches({"role": ""})
    assert not sel.matches({"role": "cam"})


def test_plus_inside_a_value_is_not_a_separator() -> None:
    sel = Selector.parse("tz=UTC+01:00+site=b")
    assert sel.conditions == (("site", "b"), ("tz", "UTC+01:00"))
    assert sel.matches({"tz": "UTC+01:00", "site": "b"})


@pytest.mark.parametrize(("text", "message"), [
    ("", "selector: empty"),
    ("   ", "selector: empty"),
    ("site", "'site' must be key=value"),
    ("site=a,role", "'role' must be key=value"),
    ("site=a,,role=b", "empty condition"),
    ("site=a,+role=b", "empty condition"),
    ("Site=a", "selector: key 'Site'"),
    ("site=a b", "value of site"),
    ("site=a,site=b", "key site given twice"),
    ("x=" + "a," * 2000, "longer than"),
])
def test_bad_selectors(text: str, message: str) -> None:
    with pytest.raises(RolloutSpecError, match="^[^\n]*$") as info:
        Selector.parse(text)
    assert message in str(info.value)


def test_selector_must_be_text() -> None:
    with pytest.raises(RolloutSpecError, match="selector: must be a string"):
        Selector.parse(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- phases


def test_phases_parse_and_print_back() -> None:
    phases = parse_phases("1, 10%,50% ,100%")
    assert [p.kind for p in phases] == ["count", "percent", "percent", "percent"]
    assert phases[0].count == 1 and phases[1].percent == 10.0
    assert ",".join(str(p) for p in phases) == "1,10%,50%,100%"


def test_fractional_percent_and_selector_phases() -> None:
    phases = parse_phases("role=canary,site=berlin+role=cam,2.5%,12.125%,100%")
    assert phases[0] == PhaseSpec("selector", selector=Selector.parse("role=canary"))
    assert phases[1].selector == Selector.parse("role=cam,site=berlin")
    assert phases[2].percent == 2.5 and phases[3].percent == 12.125
    assert ",".join(map(str, phases)) == "role=canary,role=cam+site=berlin,2.5%,12.125%,100%"


def test_cumulative_totals_are_exact() -> None:
    percent = parse_phases("10%")[0]
    assert cumulative_total(percent, 30) == 3  # not ceil(3.0000000000000004)
    assert cumulative_total(percent, 31) == 4
    assert cumulative_total(parse_phases("2.5%")[0], 40) == 1
    assert cumulative_total(parse_phases("2.5%")[0], 41) == 2
    assert cumulative_total(parse_phases("5")[0], 3) == 3
    assert cumulative_total(parse_phases("100%")[0], 7) == 7
    with pytest.raises(ValueError):
        cumulative_total(parse_phases("a=b")[0], 7)


@pytest.mark.parametrize(("text", "message"), [
    ("", "phases: empty"),
    ("1,,100%", "empty item"),
    ("0", "count 0 must be at least 1"),
    ("0%", "percentage 0% must be above 0%"),
    ("100.5%", "percentage 100.5% must be"),
    ("2.3456%", "is not a count, a percentage"),
    ("-1", "is not a count, a percentage"),
    ("abc", "'abc' is not a count"),
    ("1,site", "'site' is not a count"),
    ("5,3", "3 after 5: counts are cumulative"),
    ("50%,10%", "10% after 50%: percentages are cumulative"),
    ("10%,10%", "10% after 10%"),
    ("100%,5", "5 after 100%"),
    ("100%,role=x", "role=x after 100%"),
    (",".join(str(i) for i in range(1, 22)), "more than 20 phases"),
    ("1," * 3000, "longer than"),
    ("Role=x", "selector: key 'Role'"),
])
def test_bad_phases(text: str, message: str) -> None:
    with pytest.raises(RolloutSpecError, match="^[^\n]*$") as info:
        parse_phases(text)
    assert message in str(info.value)


def test_phases_must_be_text() -> None:
    with pytest.raises(RolloutSpecError, match="phases: must be a string"):
        parse_phases(1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- windows


def test_window_inside_and_until_open() -> None:
    window = Window.parse("02:00-04:00")
    assert (window.start, window.end) == (7200, 14400)
    assert str(window) == "02:00-04:00"
    assert not window.contains(7199) and window.contains(7200)
    assert window.contains(14399) and not window.contains(14400)
    assert window.seconds_until_open(7200) == 0
    assert window.seconds_until_open(3600) == 3600
    assert window.seconds_until_open(14400) == 86400 - 7200


def test_window_wraps_midnight() -> None:
    window = Window.parse("22:30-01:15")
    assert window.contains(22 * 3600 + 1800) and window.contains(0)
    assert window.contains(3600 + 899) and not window.contains(3600 + 900)
    assert not window.contains(12 * 3600)
    assert window.seconds_until_open(12 * 3600) == 10 * 3600 + 1800
    assert window.seconds_until_open(23 * 3600) == 0


def test_window_with_seconds_and_always_open() -> None:
    window = Window.parse("01:02:03-01:02:09")
    assert (window.start, window.end) == (3723, 3729)
    assert str(window) == "01:02:03-01:02:09"
    assert Window.parse(str(window)) == window
    always = Window.parse("05:00-05:00")
    assert all(always.contains(s) for s in (0, 18000, 86399))
    assert always.seconds_until_open(3) == 0


@pytest.mark.parametrize(("text", "message"), [
    ("02:00", "must be HH:MM-HH:MM"),
    ("2:00-04:00", "'2:00' is not HH:MM"),
    ("02:00-4", "'4' is not HH:MM"),
    ("24:00-01:00", "24:00 is not a time of day"),
    ("02:60-03:00", "02:60 is not a time of day"),
    ("02:00:61-03:00", "02:00:61 is not a time of day"),
    ("02:00-03:00-04:00", "'03:00-04:00' is not HH:MM"),
])
def test_bad_windows(text: str, message: str) -> None:
    with pytest.raises(RolloutSpecError, match="^[^\n]*$") as info:
        Window.parse(text)
    assert message in str(info.value)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0),
    ("1m30s", 90.0), ("1d2h3m4s", 93784.0), ("1.5h", 5400.0), ("0", 0.0), ("2.5", 2.5),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "message"), [
    ("", "must be like 90"), ("5x", "must be like 90"), ("30s1m", "must be like 90"),
    ("m", "must be like 90"), ("-5s", "must be like 90"), ("400d", "longer than a year"),
    ("1" * 50, "too long"),
])
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(RolloutSpecError, match="^[^\n]*$") as info:
        parse_duration(text)
    assert message in str(info.value)


# --------------------------------------------------------------------------- max-failures


def test_max_failures_count_is_judged_at_once() -> None:
    zero = MaxFailures.parse("0")
    assert zero == MaxFailures(0, None) and str(zero) == "0"
    assert not zero.exceeded(0, 1, 10)
    assert zero.exceeded(1, 1, 10)  # min-devices gates percentages only
    two = MaxFailures.parse("2")
    assert not two.exceeded(2, 2, 1) and two.exceeded(3, 3, 1)


def test_max_failures_percent_waits_for_min_devices() -> None:
    limit = MaxFailures.parse("10%")
    assert limit == MaxFailures(None, 10.0) and str(limit) == "10%"
    assert not limit.exceeded(3, 4, 5)  # 75 % failed, but only 4 outcomes of the 5 needed
    assert limit.exceeded(3, 5, 5)
    assert not limit.exceeded(1, 10, 5)  # exactly 10 %: not above the limit
    assert limit.exceeded(2, 10, 5)
    fractional = MaxFailures.parse("12.5%")
    assert not fractional.exceeded(1, 8, 1) and fractional.exceeded(2, 8, 1)
    assert str(fractional) == "12.5%"


@pytest.mark.parametrize(("text", "message"), [
    ("", "must be a count N or a percentage"), ("-1", "must be a count"),
    ("ten", "must be a count"), ("101%", "101% is above 100%"),
])
def test_bad_max_failures(text: str, message: str) -> None:
    with pytest.raises(RolloutSpecError, match="^[^\n]*$") as info:
        MaxFailures.parse(text)
    assert message in str(info.value)


# --------------------------------------------------------------------------- the spec


def test_spec_defaults_from_phases_alone() -> None:
    spec = RolloutSpec.from_json({"phases": "1,10%,50%,100%"})
    assert spec.soak == 600.0 and spec.deadline == 3600.0 and spec.min_devices == 1
    assert spec.max_failures == MaxFailures(0, None)
    assert spec.selector is None and spec.window is None
    assert spec.to_json() == {"phases": "1,10%,50%,100%", "soak": 600.0, "max_failures": "0",
                              "min_devices": 1, "selector": None, "window": None,
                              "deadline": 3600.0}


def test_spec_round_trip_with_everything() -> None:
    body = {"phases": "role=canary,2.5%,100%", "soak": "1m30s", "max_failures": "10%",
            "min_devices": 5, "selector": "site=berlin+role=cam", "window": "22:00-02:00",
            "deadline": 120, "rollback_pin": "00ff"}
    spec = RolloutSpec.from_json(body)
    assert spec.soak == 90.0 and spec.deadline == 120.0
    assert spec.selector == Selector.parse("role=cam,site=berlin")
    assert spec.window == Window.parse("22:00-02:00")
    out = spec.to_json()
    assert out == {"phases": "role=canary,2.5%,100%", "soak": 90.0, "max_failures": "10%",
                   "min_devices": 5, "selector": "role=cam,site=berlin",
                   "window": "22:00-02:00", "deadline": 120.0}
    assert RolloutSpec.from_json(out) == spec


def test_spec_takes_a_count_of_failures_as_a_number() -> None:
    assert RolloutSpec.from_json({"phases": "1", "max_failures": 2}).max_failures == \
        MaxFailures(2, None)


@pytest.mark.parametrize(("body", "message"), [
    ([], "rollout: body must be a JSON object"),
    ({}, "phases: required"),
    ({"phases": None}, "phases: required"),
    ({"phases": "1", "phase": "2"}, "unknown field 'phase'"),
    ({"phases": "0"}, "count 0"),
    ({"phases": "1", "soak": -1}, "soak: must be between 0"),
    ({"phases": "1", "soak": True}, "soak: must be seconds"),
    ({"phases": "1", "soak": float("nan")}, "soak: must be seconds"),
    ({"phases": "1", "soak": "soon"}, "soak: duration 'soon'"),
    ({"phases": "1", "deadline": 0}, "deadline: must be above 0"),
    ({"phases": "1", "max_failures": "x"}, "max-failures"),
    ({"phases": "1", "max_failures": True}, "max-failures: must be N or P%"),
    ({"phases": "1", "min_devices": 0}, "min_devices: must be a whole number"),
    ({"phases": "1", "min_devices": 2.0}, "min_devices: must be a whole number"),
    ({"phases": "1", "selector": "site"}, "must be key=value"),
    ({"phases": "1", "window": "25:00-01:00"}, "not a time of day"),
    ({"phases": "1", "window": 3}, "window: must be a string"),
])
def test_bad_spec_bodies(body: Any, message: str) -> None:
    with pytest.raises(RolloutSpecError, match="^[^\n]*$") as info:
        RolloutSpec.from_json(body)
    assert message in str(info.value)


# --------------------------------------------------------------------------- any input


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789%.,+=:-abcsmhd ", max_size=40))
def test_any_text_parses_or_gives_one_error_line(text: str) -> None:
    for parse in (parse_phases, Selector.parse, Window.parse, parse_duration,
                  MaxFailures.parse):
        try:
            value = parse(text)
        except RolloutSpecError as exc:
            assert "\n" not in str(exc)
            continue
        if parse is parse_phases:  # what parses prints back to the same phases
            assert isinstance(value, tuple)
            assert parse_phases(",".join(map(str, value))) == value
        elif parse is not parse_duration:
            assert type(value).parse(str(value)) == value  # type: ignore[attr-defined]
