"""The hub keepalive tuner with exact times: trials climb to the NAT's binding lifetime, stop
below it, and a late answer in steady state brings the keepalive down (agent/_keepalive.py)."""

from __future__ import annotations

from agent._keepalive import (
    CEILING,
    FLOOR,
    LATE,
    MARGIN,
    QUIET_START,
    RETRY_AFTER,
    RETUNE_AFTER,
    TRIAL_SPACING,
    KeepaliveTuner,
)


def climb(tuner: KeepaliveTuner, lifetime: float, now: float, rounds: int = 30
          ) -> tuple[float, list[int]]:
    """Run every trial that comes against a NAT keeping a silent binding `lifetime` s; our
    last packet goes 10 s into each wait (the passive keepalive). Returns (time, waits)."""
    waits: list[int] = []
    for _ in range(rounds):
        now = max(now, tuner.next_trial_at())
        trial = tuner.start_trial(now)
        if trial is None:
            break
        assert tuner.hub_keepalive() == 0  # silent toward the hub during the trial
        waits.append(trial.wait)
        silent_since = now + 10
        end = now + trial.wait
        answered = end + 0.2 if end - silent_since <= lifetime else None
        now = end + (0.2 if answered else 3.5)
        tuner.trial_done(answered, silent_since, now)
        assert tuner.hub_keepalive() == tuner.keepalive
    return now, waits


def test_the_keepalive_climbs_to_just_under_the_binding_lifetime_and_stops() -> None:
    tuner = KeepaliveTuner(0.0)
    assert tuner.hub_keepalive() == FLOOR and tuner.start_trial(1.0) is None
    now, waits = climb(tuner, lifetime=120.0, now=TRIAL_SPACING)
    assert waits[:3] == [50, 80, 140]  # 2 x what got through, until one does not
    assert tuner.failed == 130.0
    assert 100.0 <= tuner.proven < 120.0
    assert tuner.keepalive == int(tuner.proven * MARGIN) and tuner.keepalive < 120 * MARGIN
    assert len(waits) <= 8  # a handful of trials, then quiet
    assert tuner.start_trial(now + 3600) is None
    # after RETUNE_AFTER it looks again (the NAT may have changed) ...
    assert tuner.start_trial(now + RETUNE_AFTER + 1) is not None


def test_a_generous_nat_reaches_the_ceiling() -> None:
    tuner = KeepaliveTuner(0.0)
    _, waits = climb(tuner, lifetime=3600.0, now=TRIAL_SPACING)
    assert waits == [50, 80, 140, 260, CEILING]
    assert tuner.keepalive == int((CEILING - 10) * MARGIN)
    assert tuner.failed is None


def test_a_strict_nat_keeps_the_floor() -> None:
    tuner = KeepaliveTuner(0.0)
    _, waits = climb(tuner, lifetime=30.0, now=TRIAL_SPACING)
    assert waits == [50] and tuner.keepalive == FLOOR and tuner.failed == 40.0


def test_our_own_traffic_during_a_trial_proves_nothing() -> None:
    tuner = KeepaliveTuner(0.0)
    trial = tuner.start_trial(TRIAL_SPACING)
    assert trial is not None
    end = trial.started + trial.wait
    tuner.trial_done(None, trial.started + QUIET_START + 5, end + 3)  # a report went up
    assert tuner.failed is None and tuner.proven == 0 and tuner.keepalive == FLOOR
    assert tuner.next_trial_at() == end + 3 + RETRY_AFTER


def test_a_late_304_in_steady_state_halves_the_keepalive_and_it_climbs_again() -> None:
    tuner = KeepaliveTuner(0.0)
    now, _ = climb(tuner, lifetime=300.0, now=TRIAL_SPACING)
    k = tuner.keepalive
    assert k > 100
    # an answer on time, or a pushed map at any time, says nothing
    assert not tuner.poll_answered(now, 1800, now + 1800 + LATE, True, now + 1800 + LATE)
    assert not tuner.poll_answered(now, 1800, now + 5000, False, now + 5000)
    # the NAT now forgets after 60 s: the 304 waited for our next keepalive
    t = now + 2000
    assert tuner.poll_answered(t, 1800, t + 1800 + 40, True, t + 1840)
    assert tuner.keepalive == FLOOR and tuner.failed == float(k)
    _, waits = climb(tuner, lifetime=60.0, now=t + 1840)
    assert FLOOR < tuner.keepalive < 60
    assert all(w < k for w in waits)


def test_a_trial_whose_request_was_never_seen_proves_nothing() -> None:
    tuner = KeepaliveTuner(0.0)
    trial = tuner.start_trial(TRIAL_SPACING)
    assert trial is not None
    tuner.trial_done(trial.started + trial.wait, trial.started - 100, trial.started + 51)
    assert tuner.proven == 0 and tuner.keepalive == FLOOR and tuner.failed is None
