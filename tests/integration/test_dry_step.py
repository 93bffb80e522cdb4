"""One member's dry step (worker/dry_step.py) with every fused trainer's real `train_many` on the CPU: the
throwaway ctx stops it after a step or two of a long run, and it writes no checkpoint, report or file
anywhere. The memory reading is a fake here (CUDA cannot run on this machine); bench/gang_packing.py
--device cuda is the same measurement on a GPU."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from worker import dry_step, trainers

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. to be or not to be. "
LONG = 10_000  # steps (epochs, episodes) of each config: a dry step that did not stop would run for minutes


def _config(trainer: str, corpus: Path, log_every: int = 1) -> dict:
    """A tiny config of each fused trainer with a long run, reporting every `log_every` steps and
    checkpointing seldom."""
    return {
        "gated_rnn": {"state_size": 8, "n_layers": 1, "batch_size": 4, "history": 12, "steps": LONG,
                      "corpus": str(corpus), "log_every": log_every, "checkpoint_every": 1000},
        "sparse_rnn": {"hidden_size": 8, "max_epochs": LONG, "log_every": log_every, "checkpoint_every": 1000,
                       "density": 0.3, "data": {"dataset": "random_anomaly", "image_size": 6, "train_size": 16,
                                                "validation_size": 8, "test_size": 8, "batch_size": 8}},
        "snn_ddqn": {"env_id": "CartPole-v1", "episodes": LONG, "max_episode_steps": 10, "agents": 1,
                     "hidden_layers": [8], "snn_tSteps": 2, "batch": 4, "buffer_size": 50, "checkpoint_every": 1000},
        "perturbation": {"model": {"hidden_size": 4},
                         "training": {"gradient_computation": "spsa", "epochs": LONG, "num_directions": 2,
                                      "log_every": log_every, "checkpoint_every": 1000},
                         "data": {"length": 10}},
        "learning_rules": {"rule": "bptt", "N": 2, "trial_length": 10, "batch_size": 4, "validation_trials": 8,
                           "hidden_size": 8, "max_steps": LONG, "log_every": log_every, "checkpoint_every": 1000},
        "noop": {"steps": LONG, "checkpoint_every": 1000, "fuse_group": "a"},
        "curve": {"steps": LONG, "report_every": log_every, "checkpoint_every": 1000, "fuse_group": "a"},
    }[trainer]


class FakeMemory:
    """torch.cuda's counters as a fake: the dry step 'allocates' `step_bytes` above 5 MiB already there."""

    def __init__(self, step_bytes: int):
        self.step_bytes, self.resets, self.released = step_bytes, 0, 0

    def allocated(self) -> int:
        return 5 * 2**20

    def reset_peak(self) -> None:
        self.resets += 1

    def peak(self) -> int:
        return 5 * 2**20 + self.step_bytes

    def release(self) -> None:
        self.released += 1

    def free(self) -> tuple[int, int]:
        return 10**9, 2 * 10**9


@pytest.fixture
def quiet_dirs(tmp_path, monkeypatch):
    """The working directory and the temp directory, empty, so a test can see whatever a dry step wrote."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 50)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    return SimpleNamespace(cwd=cwd, tmp=tmp, corpus=corpus)


def _ours(tmp: Path) -> list[str]:
    """What is left in the temp directory besides torch's own compile cache (torchinductor_<user>)."""
    return [name for name in os.listdir(tmp) if not name.startswith("torchinductor_")]


def _like(seed: int = 3) -> SimpleNamespace:
    """What a member's real ctx gives the dry step: its ids, seed and device (nothing is sent on it)."""
    return SimpleNamespace(job_id=10, grid_id=1, seed=seed, attempt=1, device="cpu")


@pytest.mark.parametrize("trainer", sorted(trainers.FUSED))
def test_a_dry_step_stops_after_a_step_and_writes_nothing(trainer, quiet_dirs):
    module = trainers.load(trainer)
    cfg = module.Config.model_validate(_config(trainer, quiet_dirs.corpus))
    fused = trainers.load_fused(trainer)

    dry = dry_step.DryContext(_like(), quiet_dirs.tmp / "work")
    outcome = fused.train_many([cfg], [dry])[0]
    assert isinstance(outcome, dict) and set(outcome) == {"stopped_at"}, outcome
    assert outcome["stopped_at"] == 1 and dry.steps[:1] == [1]  # one step (snn_ddqn: one episode)

    memory = FakeMemory(step_bytes=7 * 2**20)
    assert dry_step.measure(fused.train_many, cfg, _like(), memory) == 7 * 2**20  # the peak above the baseline
    assert memory.resets == 1 and memory.released == 1
    assert os.listdir(quiet_dirs.cwd) == []
    assert _ours(quiet_dirs.tmp) == []  # its workdir is gone too


def test_a_dry_step_that_fails_measures_nothing(quiet_dirs):
    fused = trainers.load_fused("noop")
    cfg = trainers.load("noop").Config(steps=LONG, fail_at_step=0, fuse_group="a")
    memory = FakeMemory(step_bytes=1)
    with pytest.raises(dry_step.DryStepFailed, match="asked to fail at step 0") as caught:
        dry_step.measure(fused.train_many, cfg, _like(), memory)
    assert not caught.value.out_of_memory and memory.released == 1
    assert _ours(quiet_dirs.tmp) == []

    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name, as the dry step tells it
        pass

    def too_big(cfgs, ctxs):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    with pytest.raises(dry_step.DryStepFailed) as caught:
        dry_step.measure(too_big, cfg, _like(), memory)
    assert caught.value.out_of_memory


def test_a_config_that_reports_seldom_stops_after_max_asks(quiet_dirs):
    cfg = trainers.load("gated_rnn").Config.model_validate(_config("gated_rnn", quiet_dirs.corpus, log_every=5000))
    dry = dry_step.DryContext(_like(), quiet_dirs.tmp / "work")
    assert trainers.load_fused("gated_rnn").train_many([cfg], [dry]) == [{"stopped_at": dry_step.MAX_ASKS + 1}]
    assert dry.steps == []  # it never reported: it stopped on the count of its should_stop calls


def test_the_gang_after_a_dry_step_draws_what_it_would_have_drawn(quiet_dirs):
    import random

    import numpy as np

    def draws(cfgs, ctxs):  # a trainer that leaves the global generators moved
        random.random(), np.random.rand(), torch.rand(1)
        ctxs[0].report(1)
        return [{"stopped_at": 1}]

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    dry_step.measure(draws, None, _like(), FakeMemory(step_bytes=1))
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2] == expected[2]
