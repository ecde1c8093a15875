"""bench.peermap on a small fleet: the incremental answer is the smaller one, its size does not
follow the fleet's, and the maps the sampled devices keep by deltas stay the full maps (the
bench asserts that itself after every change)."""

from __future__ import annotations

import pytest

from bench import peermap


def test_incremental_bytesper_device_do_not_follow_the_fleet() -> None:
    small, large = peermap.run_size(16, 2, 4), peermap.run_size(64, 2, 4)
    for kind in peermap.KINDS:
        for tallies in (small, large):
            full, incr = peermap.per_device(tallies[kind])
            assert 0 < incr < full, kind
        full_small, incr_small = peermap.per_device(small[kind])
        full_large, incr_large = peermap.per_device(large[kind])
        assert full_large > 3 * full_small  # a full map follows the fleet (x4 devices)
        assert incr_large < 1.1 * incr_small, kind  # a delta does not
    # only the device that moved behind another public IP gets its full map
    assert small["move"].fallbacks == 2 and small["endpoint"].fallbacks == 0


def test_bad_sizes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        peermap.main(["--sizes", "ten"])
    assert exc.value.code == 2
    assert "--sizes" in capsys.readouterr().err
