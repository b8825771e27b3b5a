"""The measurement schedule: fixed intervals, and the time budget of ``every="auto"``."""

import pytest

import sgdprobe
from sgdprobe.schedule import Schedule


def test_fixed_interval_measures_at_multiples():
    schedule = Schedule(every=3)
    assert [s for s in range(1, 11) if schedule.due(s)] == [3, 6, 9]


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"every": "often"}, {"every": 2.5}, {"overhead": 0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(sgdprobe.ConfigError):
        Schedule(**kwargs)


def test_auto_measures_first_then_only_when_the_next_measurement_fits_the_budget():
    schedule = Schedule(overhead=0.05)
    assert schedule.due(1)
    schedule.record(1.0)
    schedule.train_seconds = 39.0  # spent 1 s, one more costs 1 s: needs 2 / 0.05 = 40 s of training
    assert not schedule.due(2)
    schedule.train_seconds = 40.0
    assert schedule.due(3)


def simulate(schedule: Schedule, steps: int, step_seconds: float, measure_seconds: float):
    """Feed the schedule a run of ``steps`` steps; returns the measured steps and the worst value of
    (probe time − first measurement) / training time seen after any step."""
    measured, worst = [], 0.0
    for step in range(1, steps + 1):
        schedule.train_seconds += step_seconds
        if schedule.due(step):
            schedule.record(measure_seconds)
            measured.append(step)
        worst = max(worst, (schedule.measure_seconds - measure_seconds) / schedule.train_seconds)
    return measured, worst


@pytest.mark.parametrize("measure_seconds", [0.001, 0.05, 2.0])
def test_auto_keeps_the_budget_at_every_step_and_uses_it(measure_seconds):
    schedule = Schedule(overhead=0.05)
    measured, worst = simulate(schedule, 20_000, 0.01, measure_seconds)  # 200 s of training
    assert measured[0] == 1
    assert worst <= 0.05 + 1e-12  # after the first measurement the budget holds at every step
    # ... and is used: the probe time is within one measurement of the budget at the end
    assert schedule.measure_seconds >= 0.05 * schedule.train_seconds - measure_seconds


def test_state_dict_round_trip_and_older_states():
    schedule = Schedule()
    schedule.train_seconds, schedule.measure_seconds = 12.0, 0.5
    schedule.record(0.25)
    restored = Schedule()
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict() == {
        "train_seconds": 12.0,
        "measure_seconds": 0.75,
        "measurements": 1,
        "last_seconds": 0.25,
    }
    old = {"train_seconds": 1.0, "measure_seconds": 0.1, "measurements": 2}  # saved before last_seconds
    restored.load_state_dict(old)
    assert restored.last_seconds == 0.0 and restored.measurements == 2
