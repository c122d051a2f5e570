import json
import math

import pytest

from engine.early_stopping import EarlyStopping


def feed(stopper: EarlyStopping, values: list[float]) -> list[bool]:
    return [stopper.update(v, step=100 * (i + 1)) for i, v in enumerate(values)]


def test_min_mode_tracks_lowest_value_and_stops_after_patience():
    stopper = EarlyStopping(mode="min", patience=2)
    assert feed(stopper, [2.0, 1.5, 1.7]) == [True, True, False]
    assert (stopper.best, stopper.best_step, stopper.bad_evals) == (1.5, 200, 1)
    assert not stopper.should_stop
    assert stopper.update(1.6) is False
    assert stopper.bad_evals == 2 and stopper.should_stop


def test_max_mode_tracks_highest_value():
    stopper = EarlyStopping(mode="max", patience=3)
    assert feed(stopper, [0.30, 0.25, 0.41, 0.41]) == [True, False, True, False]
    assert (stopper.best, stopper.best_step, stopper.bad_evals) == (0.41, 300, 1)


def test_patience_counts_consecutive_evaluations_without_improvement():
    stopper = EarlyStopping(mode="min", patience=3)
    stopper.update(1.0)
    for expected_bad in (1, 2):
        stopper.update(1.0)
        assert stopper.bad_evals == expected_bad and not stopper.should_stop
    stopper.update(1.2)
    assert stopper.bad_evals == 3 and stopper.should_stop


def test_improvement_resets_the_bad_evaluation_counter():
    stopper = EarlyStopping(mode="min", patience=3)
    feed(stopper, [1.0, 1.1, 1.2])
    assert stopper.bad_evals == 2
    assert stopper.update(0.9) is True
    assert stopper.bad_evals == 0 and stopper.best == 0.9 and not stopper.should_stop


@pytest.mark.parametrize("mode,best,exactly_delta,beyond_delta", [("min", 1.0, 0.75, 0.7), ("max", 1.0, 1.25, 1.3)])
def test_change_equal_to_min_delta_is_not_an_improvement(mode, best, exactly_delta, beyond_delta):
    stopper = EarlyStopping(mode=mode, patience=5, min_delta=0.25)
    stopper.update(best)
    assert stopper.update(exactly_delta) is False
    assert stopper.best == best and stopper.bad_evals == 1
    assert stopper.update(beyond_delta) is True
    assert stopper.best == beyond_delta and stopper.bad_evals == 0


def test_nan_and_inf_never_count_as_improvement():
    stopper = EarlyStopping(mode="min", patience=2)
    assert stopper.update(float("nan")) is False
    assert stopper.best is None and stopper.bad_evals == 1
    assert stopper.update(3.0) is True
    assert stopper.update(float("nan")) is False
    assert stopper.update(-math.inf) is False
    assert stopper.best == 3.0 and stopper.should_stop


def test_state_dict_round_trip_resumes_exactly():
    values = [2.0, 1.8, 1.9, 1.85, 1.7, 1.75, 1.72, 1.71]
    straight = EarlyStopping(mode="min", patience=3, min_delta=0.01)
    straight_results = feed(straight, values)

    first = EarlyStopping(mode="min", patience=3, min_delta=0.01)
    first_results = feed(first, values[:4])
    saved = json.loads(json.dumps(first.state_dict()))  # plain JSON-able values
    resumed = EarlyStopping(mode="min", patience=3, min_delta=0.01)
    resumed.load_state_dict(saved)
    resumed_results = [resumed.update(v, step=100 * (i + 5)) for i, v in enumerate(values[4:])]

    assert first_results + resumed_results == straight_results
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.should_stop == straight.should_stop is True


def test_load_state_dict_refuses_a_different_mode():
    saved = EarlyStopping(mode="max").state_dict()
    with pytest.raises(ValueError, match="mode 'max'"):
        EarlyStopping(mode="min").load_state_dict(saved)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="lowest")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping(min_delta=-0.1)
