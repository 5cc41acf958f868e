"""Injection schedule: tau counts steps in exact arithmetic, from the noisiest."""

from __future__ import annotations

import pytest

from diffferv_cli.editing.features import InjectionSchedule, injected_steps

TABLE = {  # (tau, T) -> injected steps = round(tau * T)
    (0.0, 10): 0, (0.1, 10): 1, (0.7, 10): 7, (0.8, 10): 8, (0.9, 10): 9, (1.0, 10): 10,
    (0.0, 50): 0, (0.1, 50): 5, (0.7, 50): 35, (0.8, 50): 40, (0.9, 50): 45, (1.0, 50): 50,
}


@pytest.mark.parametrize("tau, steps", sorted(TABLE))
def test_injected_steps_table(tau, steps):
    expected = TABLE[(tau, steps)]
    assert injected_steps(tau, steps) == expected
    for kind in ("app", "motion", "cross"):
        schedule = InjectionSchedule(steps, **{f"tau_{kind}": tau})
        active = [schedule.active(kind, step) for step in range(steps)]
        assert active == [True] * expected + [False] * (steps - expected)  # the noisiest steps first


def test_kinds_follow_their_own_tau():
    schedule = InjectionSchedule(10, tau_app=0.3, tau_motion=0.6, tau_cross=0.0)
    assert [sum(schedule.active(kind, step) for step in range(10)) for kind in ("app", "motion", "cross")] == [3, 6, 0]


def test_halves_round_up():
    assert injected_steps(0.25, 10) == 3 and injected_steps(0.05, 10) == 1 and injected_steps(0.04, 10) == 0
