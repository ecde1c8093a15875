"""The device's time zone in its report (issue 16): where the name comes from, in order, and
that the agent's report carries it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent._agent import Agent
from agent._datadir import DataDir
from agent._timezone import device_timezone, utc_offset_name
from mesh.control import DeviceReport, check_timezone

from .fakes import FakeCoordinator, FakeWireGuard, peer, peermap


@pytest.fixture
def etc(tmp_path: Path) -> tuple[Path, Path]:
    """A fake /etc/timezone (absent) and /etc/localtime (absent)."""
    return tmp_path / "timezone", tmp_path / "localtime"


def zone(env: dict[str, str], etc: tuple[Path, Path]) -> str:
    return device_timezone(env, etc[0], etc[1])


def test_tz_wins_and_is_read_as_the_c_library_reads_it(etc: tuple[Path, Path]) -> None:
    etc[0].write_text("Asia/Tokyo\n")
    assert zone({"TZ": "Europe/Berlin"}, etc) == "Europe/Berlin"
    assert zone({"TZ": ":America/New_York"}, etc) == "America/New_York"
    assert zone({"TZ": "/usr/share/zoneinfo/Australia/Lord_Howe"}, etc) == \
        "Australia/Lord_Howe"
    assert zone({"TZ": ""}, etc) == "UTC"  # empty TZ: UTC, whatever /etc says
    # a POSIX rule is what localtime follows, but no name: the offset it gives now
    rule = "CET-1CEST,M3.5.0,M10.5.0/3"
    assert zone({"TZ": rule}, etc) == utc_offset_name(time.localtime().tm_gmtoff)
    assert zone({"TZ": "/opt/zones/mine"}, etc).startswith("UTC")  # a file, not a name


def test_etc_timezone_then_the_localtime_link_then_the_offset(etc: tuple[Path, Path]) -> None:
    timezone, localtime = etc
    localtime.symlink_to("../usr/share/zoneinfo/Pacific/Chatham")
    timezone.write_text("Europe/Lisbon\n")
    assert zone({}, etc) == "Europe/Lisbon"
    timezone.write_text("not a zone; rm -rf /\n")  # refused by the codec: skipped
    assert zone({}, etc) == "Pacific/Chatham"
    timezone.unlink()
    assert zone({}, etc) == "Pacific/Chatham"
    localtime.unlink()
    localtime.write_bytes(b"TZif2")  # a copy of a zone file names nothing
    fixed = device_timezone({}, timezone, localtime, clock=lambda: 0.0)
    assert fixed == utc_offset_name(time.localtime(0.0).tm_gmtoff)


def test_offset_names_fit_the_report() -> None:
    assert utc_offset_name(0) == "UTC+00:00"
    assert utc_offset_name(3600) == "UTC+01:00"
    assert utc_offset_name(5 * 3600 + 1800) == "UTC+05:30"
    assert utc_offset_name(-(9 * 3600 + 1800)) == "UTC-09:30"
    assert utc_offset_name(12 * 3600 + 45 * 60) == "UTC+12:45"
    for offset in (-12 * 3600, 0, 14 * 3600):
        assert check_timezone(utc_offset_name(offset)) == utc_offset_name(offset)


def test_this_machine_names_a_zone_the_report_accepts() -> None:
    name = device_timezone()
    assert check_timezone(name) == name


def test_the_report_carries_the_timezone(enrolled: DataDir) -> None:
    coord = FakeCoordinator(peermap(1, peer(1)))
    names = ["Europe/Berlin"]
    agent = Agent(enrolled, FakeWireGuard().factory(), coord.factory, lan_endpoints=(),
                  agent_version="1", timezone=lambda: names[0])
    report = agent.report()
    assert report.timezone == "Europe/Berlin"
    assert report.to_json()["timezone"] == "Europe/Berlin"
    assert DeviceReport.from_json(report.to_json()) == report
    names[0] = "UTC-03:00"  # looked up with every report: a zone changed at run time shows
    assert agent.report().timezone == "UTC-03:00"
