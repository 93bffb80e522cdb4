"""The objective trainer (searches' known function, docs/searches.md) with a real TrainerContext: its value at
the known optima, the report and result it gives, and a slow trial that stops when asked."""
from __future__ import annotations

import math

import harness  # tests/trainers/harness.py
import pytest

from worker.trainers import objective


def test_known_optima():
    assert objective.value(objective.Config(x=1.5, y=-2.5)) == 0.0
    assert objective.value(objective.Config(x=1.5, y=-2.5, kind="bump", level=4, offset=0.5)) == 2.5
    for x, y in ((-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475)):
        assert objective.value(objective.Config(function="branin", x=x, y=y)) == pytest.approx(0.397887, abs=1e-5)


def test_train_reports_and_returns_the_value(tmp_path):
    h = harness.Harness(tmp_path)
    result = h.train(objective, {"x": 0.5, "y": -2.5})
    assert result == {"loss": 1.0}
    assert h.reports == [(0, {"loss": 1.0})]


def test_a_slow_trial_stops_when_asked(tmp_path):
    h = harness.Harness(tmp_path)
    h.stop_event.set()  # as a preemption does: the trial gives up at once, without a result
    assert h.train(objective, {"x": 0.0, "seconds": 30.0}) == {"stopped": True}  # not its loss: it stopped
    assert h.reports == []
