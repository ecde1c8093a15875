"""Issue 12 on a real image: 3 `firewall` LANs x 3 devices behind 4 Mbit/s uplinks; the operator
publishes lab/realimage.py's image (Debian + python3, numpy and requests wheels, an HTTP app)
with `fleetmesh release create`, v1 and then v2 (numpy one patch release up). For each version,
until every device RUNS it: each LAN's WAN carries at most 1.05 x B + the control allowance in
and at most the allowance out, and all devices run it within 1.3 x the fluid bound (B over the
uplink) + 30 s.

Marked `realistic` as well as `lab`: it fails on today's rollout policy (issue 12's bug), so
scripts/test deselects it until the core fix lands. Run it on purpose with
`.venv/bin/python -m pytest tests/lab/test_rollout_realistic.py -m realistic -s`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lab import Lab, wait_online
from lab.realimage import APP_NAME, PORT, Built, build_in_lab
from lab.rollout import image_topology, rollout_image

from .conftest import lab_skip_reason, lab_up

pytestmark = [
    pytest.mark.lab,
    pytest.mark.realistic,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]

UPLINK = "4mbit"
# Per version: well past the acceptance bound (1.3 x ~150 s + 30 s at 4 Mbit/s for v1) so a
# miss shows how far off it is, and short enough to keep the test near 8 minutes once it passes.
CAP_SECONDS = 480.0


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Lab, list[Built]]]:
    topo = image_topology(UPLINK, source="tests/lab/test_rollout_realistic.py")
    with lab_up(topo, network_only=False) as lab:
        wait_online(lab, [d.name for d in lab.devices], 120)
        built = [build_in_lab(lab, v) for v in (1, 2)]
        time.sleep(10)  # LAN discovery (mDNS answers within seconds)
        yield lab, built


def test_v1_then_v2_reach_every_device_within_issue_12_bounds(
        fleet: tuple[Lab, list[Built]]) -> None:
    lab, built = fleet
    for image in built:
        print(f"{image.tag}: layers {' '.join(d[7:19] for d in image.diff_ids)}")
    assert built[0].diff_ids[:-2] == built[1].diff_ids[:-2], "v2 changes only the wheels layer"
    assert built[0].diff_ids[-1] == built[1].diff_ids[-1], "the app layer is the same in v2"
    failures: list[str] = []
    for version, image in enumerate(built, start=1):
        r = rollout_image(lab, image.tag, APP_NAME, version, health_port=PORT,
                          image_bytes=image.unpacked_bytes, timeout=CAP_SECONDS)
        for line in r.lines() + r.ratio_lines():
            print(f"{UPLINK} {line}")
        failures += r.failures()
        if not r.complete:
            break  # v2 on top of a fleet that never ran v1 measures nothing
    assert not failures, "\n".join(failures)
