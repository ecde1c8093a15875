"""`python -m bench.policy` (scripts/bench policy): its lines and its refusals, on small fleets
(the figures themselves are the bench's, docs/policy.md)."""

from __future__ import annotations

import random
import re

import pytest

from bench.policy import POLICY, fleet, main
from mesh.policy import compile_policy, parse_policy


def test_prints_one_line_per_size_then_the_growth(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sizes", "50,200", "--repeat", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    for line, size in zip(lines, ("50", "200"), strict=False):
        assert re.fullmatch(rf" +{size} devices: compile best +[0-9.]+ ms, median +[0-9.]+ ms "
                            r"\([0-9]+ tag groups\); one device's reach +[0-9.]+ ms", line)
    assert re.fullmatch(r"growth 50 -> 200 devices: x[0-9.]+ compile time for x4 devices",
                        lines[2])
    assert lines[3].startswith("goal: < 100 ms at 10,000 devices; 200 devices: ")


def test_store_adds_the_api_view_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sizes", "30", "--repeat", "1", "--store"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r" +API view \(policy/compiled\?device=, SQLite\): median +[0-9.]+ ms, "
                        r"of it the store read +[0-9.]+ ms", lines[1])


@pytest.mark.parametrize("argv", [["--sizes", "ten"], ["--sizes", "0"], ["--repeat", "0"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.policy: ") and err.count("\n") == 1


def test_the_fleet_is_seeded_and_the_policy_names_role_site_and_channel() -> None:
    a, b = fleet(300, random.Random(7)), fleet(300, random.Random(7))
    assert a == b
    policy = parse_policy(POLICY)
    assert policy.keys == ("channel", "role", "site")
    compiled = compile_policy(policy, a)
    # the serial tag, unique per device, splits no group
    assert compiled.groups < len(a)
    assert len(compiled) == 300


def test_maps_adds_the_partial_map_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sizes", "200", "--repeat", "1", "--maps"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r" +partial maps: peers per map median [0-9]+, max [0-9]+ \(of 199 "
                        r"others\); full map median [0-9.]+ KiB", lines[1])
    for line, what in zip(lines[2:4], ("re-tag cam -> display", "join of a sensor"),
                          strict=True):
        m = re.fullmatch(rf" +{what}: publish +[0-9.]+ ms, ([0-9]+) devices marked, delta "
                         r"[0-9]+ B median \(([0-9]+) full maps\)", line)
        assert m is not None, line
        assert 0 < int(m.group(1)) < 200 and int(m.group(2)) == 1  # only the changed device
