"""Attack: a compromised coordinator keeps an old rollback pin the operator once signed (say
"cams/web back to v1", made while v2 had a bug) and replays it after the fleet moved on to v3,
to take devices back to v1 (the release with the known hole). Before, a pin named only fleet,
app, version and device: it was valid for ever, and every device took it again.

Expected (docs/security.md, "A rollback pin expires and is spent once the device moves on"):
a pin carries a serial (the signing time in microseconds) and an expiry; a device refuses an
expired pin, and a pin whose serial is older than the newest pin it acted on, or the same pin
after it moved past it to a release without that pin; the state survives an agent restart.
The pin in effect can be delivered again and again while its release is the target.

Real code path: the Applier on real files, real signed releases and pins (tests/apply's fake
engine), as tests/adversarial/test_apply_downgrade.py.
"""

from __future__ import annotations

import msgpack
import pytest
from nacl.signing import SigningKey

from mesh.release import (
    ManifestError,
    ReleasePin,
    decode_pin,
    encode_signed_pin,
    new_pin,
    sign_pin,
)
from tests.adversarial.test_apply_downgrade import replay, world
from tests.apply.test_applier_fake import APP, DEVICE, World, install, run_until, state

__all__ = ["world"]  # the fixture this module borrows from test_apply_downgrade


def signed(w: World, version: int, *, at: float, lifetime: int = 7 * 86400) -> bytes:
    return encode_signed_pin(sign_pin(new_pin("cams", APP, version, DEVICE, now=at,
                                              lifetime=lifetime), w.releases.key))


def test_a_spent_pin_cannot_be_replayed_after_the_fleet_moved_on(world: World) -> None:
    """v1, v2 installed; the operator pins v1 (the device goes back); then v3 is published and
    the device moves to it. The coordinator replays the v1 pin: refused, v3 stays. Also after an
    agent restart (the state is on disk)."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    now = world.clock()
    pin = signed(world, 1, at=now)
    assert a.set_target(world.release(world.releases.make(1)), ready=True, pin=pin)
    run_until(world, a, lambda: world.running() == [1] and state(a) == "running")
    # the pin in effect is delivered again on every poll: still fine
    assert a.set_target(world.release(world.releases.make(1)), ready=True, pin=pin)
    assert a.set_target(world.release(world.releases.make(3)), ready=True)
    run_until(world, a, lambda: world.running() == [3] and state(a) == "running")
    assert not replay(world, a, 1, pin)
    assert world.running() == [3]
    assert any("v1 refused" in m and "spent" in m for m in world.messages), world.messages
    b = world.applier()
    assert not replay(world, b, 1, pin)
    assert world.running() == [3]
    # a new pin the operator signs later goes back again
    assert b.set_target(world.release(world.releases.make(1)), ready=True,
                        pin=signed(world, 1, at=now + 60))


def test_an_older_pin_cannot_replace_a_newer_one(world: World) -> None:
    """Two pins: v1 (signed first) and v2 (signed later) while v3 is the newest. The device acts
    on the v2 pin; the coordinator then sends the older v1 pin: refused."""
    a = world.applier()
    for v in (1, 2, 3):
        install(world, a, v)
    now = world.clock()
    old, new = signed(world, 1, at=now), signed(world, 2, at=now + 1)
    assert a.set_target(world.release(world.releases.make(2)), ready=True, pin=new)
    run_until(world, a, lambda: world.running() == [2] and state(a) == "running")
    assert not replay(world, a, 1, old)
    assert world.running() == [2]


def test_an_expired_pin_is_refused(world: World) -> None:
    """A pin signed a week ago with a day's lifetime: refused, the device stays on v2."""
    a = world.applier()
    install(world, a, 1)
    install(world, a, 2)
    pin = signed(world, 1, at=world.clock() - 7 * 86400, lifetime=86400)
    assert not replay(world, a, 1, pin)
    assert world.running() == [2]
    assert any("expired" in m for m in world.messages), world.messages


def test_a_pin_without_expiry_or_serial_is_neither_signed_nor_read() -> None:
    """The old pin format (no serial, no expiry) is refused by the codec, so a pin signed before
    this change cannot be replayed either; a pin without them cannot be made."""
    with pytest.raises(ManifestError):
        sign_pin(ReleasePin("cams", APP, 1, DEVICE), SigningKey.generate())
    old = msgpack.packb(["fleetmesh.pin/1", "cams", APP, 1, DEVICE])
    with pytest.raises(ManifestError, match="sign the pin again"):
        decode_pin(old)
