"""The curve trainer: its loss is the known function of its config, at every reported step; stopped, it
checkpoints; resumed, it goes on from the checkpoint's step."""
from __future__ import annotations

import pytest

from tests.trainers.harness import Harness
from worker.trainers import curve


def test_reports_the_known_curve_and_resumes_from_its_checkpoint(tmp_path):
    config = {"x": 0.8, "y": 0.1, "steps": 12, "report_every": 3, "checkpoint_every": 2}
    cfg = curve.Config.model_validate(config)
    first = Harness(tmp_path, stop_at=6)
    assert first.train(curve, config) == {"stopped_at": 6}
    assert [s for s, _ in first.reports] == [3, 6]
    assert all(v["loss"] == pytest.approx(curve.loss_at(cfg, s)) for s, v in first.reports)
    pointer = first.checkpoints[-1]
    assert pointer["step"] == 6
    second = Harness(tmp_path, checkpoint=pointer)
    result = second.train(curve, config)
    assert [s for s, _ in second.reports] == [9, 12]
    assert result == {"loss": pytest.approx(curve.loss_at(cfg, 12)), "final": pytest.approx(0.5 ** 2 + 0.3 ** 2),
                      "steps": 12, "resumed_from": 6}
    # Configs rank by `final` at every step: the curves never cross.
    worse = curve.Config(x=0.9, y=0.1)
    assert all(curve.loss_at(cfg, s) < curve.loss_at(worse, s) for s in range(0, 50))
