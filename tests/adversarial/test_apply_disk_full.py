"""A full disk while the agent rebuilds a release (issue 13, item 4, the applier's half).

Attack: the device's disk fills up (its own logs, another app, an attacker who can write to
it). The release's blobs are held and verified, but rebuilding the image into the apply work
directory fails with ENOSPC. That OSError escaped the applier's step and took the agent down
(WireGuard with it), over and over. Expected: a clear app state ("error: disk full"), the
applier keeps running (and so does the agent), nothing is half-loaded, and the release goes
in by itself once there is room again. Real applier and real files on a real, tiny tmpfs; the
Docker engine is the fake one (Docker is not the point here).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent._apply_driver import Applier
from tests.adversarial.test_gossip_disk_full import tiny_fs
from tests.apply._fake import Clock, FakeEngine, Releases

__all__ = ["tiny_fs"]  # the fixture this module borrows


def test_a_full_disk_is_an_app_error_and_the_release_goes_in_when_space_returns(
        tiny_fs: Path, tmp_path: Path) -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    releases = Releases(tmp_path)  # the blob store is elsewhere: the rebuild is what fills up
    messages: list[str] = []
    applier = Applier(device="cam-1", fleet="cams", data_dir=tiny_fs / "data", engine=engine,
                      store=releases.store, release_key_hex=releases.key_hex,
                      log=messages.append, clock=clock, follow_logs=False)
    # one layer of 1 MiB of incompressible bytes: twice what the 512 KiB disk holds
    release = releases.verified(releases.make(1, payload=1 << 20))
    assert applier.set_target(release, ready=True)
    for _ in range(3):  # rounds of the applier: none raises
        wake = applier.reconcile_all()
        clock.t = max(clock.t + 0.001, wake)
    status = applier.status("web")
    assert status is not None and status.error is not None
    assert "disk full" in status.error, status
    assert sum("disk full" in m for m in messages) == 1  # said once, not every round
    assert engine.running("cam-1", "web") == []
    assert not (tiny_fs / "data" / "apply" / ".work").exists() or not any(
        (tiny_fs / "data" / "apply" / ".work").iterdir())  # nothing half-built left behind
    # room again: the release goes in without anyone's help
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_fs)], check=True)
    for _ in range(10):
        wake = applier.reconcile_all()
        status = applier.status("web")
        assert status is not None
        if status.state == "running":
            break
        clock.t = max(clock.t + 0.001, wake)
    assert status.state == "running" and status.error is None, status
    assert [c.version for c in engine.running("cam-1", "web")] == [1]
