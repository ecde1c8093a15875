"""The comparison case for tests/lab/test_rollout.py: with `peer_sharing = false` every device
fetches the release from the coordinator, so each LAN's WAN carries about one copy per device."""

from __future__ import annotations

import pytest

from lab.rollout import rollout

from .conftest import lab_skip_reason, lab_up
from .test_rollout import LANS, RELEASE_BYTES, settle, topology

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or ""),
]


def test_without_peer_sharing_each_device_pulls_its_own_copy() -> None:
    with lab_up(topology(False), network_only=False) as lab:
        settle(lab)
        r = rollout(lab, version=1, size=RELEASE_BYTES)
    for lan in LANS:
        print(f"peer_sharing=false {lan}: x{r.ratio(lan):.2f}")
        assert 3.5 <= r.ratio(lan) <= 4.6, lan
