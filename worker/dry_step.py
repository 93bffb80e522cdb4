"""One member's dry step: how much device memory one member of a gang needs, measured, for any fused trainer.

Read `measure` first: it runs the trainer's own `train_many([cfg], [DryContext])` for one training step on a
throwaway ctx and returns the peak memory that step allocated above what was allocated before. `DryContext`
is that ctx: its workdir is a temporary directory (removed after), it loads no checkpoint, it discards
reports, progress, events and checkpoints, and its `should_stop()` turns true once the member said anything
(its first report, progress or checkpoint: one step of a trainer that reports every step, one episode of
snn_ddqn), or after MAX_ASKS calls (a config that reports every 1,000 steps does not run 1,000). A trainer
whose first step is not its heaviest (snn_ddqn learns only once its replay buffer holds a batch) is measured
short of that; its own `member_bytes(cfg, device)` hook, when it has one, is used instead. `CudaMemory` reads torch's allocator; tests give `measure` a fake with the same methods.

Runs in a gang's child (worker/gang_child.py), never in the agent or the warm process: touching CUDA there
would make a context that every forked child inherits broken. docs/gang_claims.md "Packing by memory".
"""
from __future__ import annotations

import contextlib
import gc
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

MAX_ASKS = 100  # should_stop calls before a dry step stops without having said anything


class DryStepFailed(RuntimeError):
    """The dry step raised, or the member came back with an exception: nothing was measured.
    `out_of_memory`: it was the device's memory (one member alone does not fit)."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.out_of_memory = type(cause).__name__ == "OutOfMemoryError"  # torch.cuda's, without importing torch


class Memory(Protocol):
    """What `measure` reads of a device; CudaMemory on a GPU, a fake in tests."""

    def allocated(self) -> int: ...  # bytes allocated now (torch.cuda.memory_allocated)

    def reset_peak(self) -> None: ...  # torch.cuda.reset_peak_memory_stats

    def peak(self) -> int: ...  # torch.cuda.max_memory_allocated since reset_peak

    def release(self) -> None: ...  # give cached blocks back, so free() sees them

    def free(self) -> tuple[int, int]: ...  # (free, total) bytes of the device: torch.cuda.mem_get_info


class CudaMemory:
    def __init__(self, device: Any):
        import torch

        self._cuda, self._device = torch.cuda, torch.device(device)

    def allocated(self) -> int:
        self._cuda.synchronize(self._device)
        return int(self._cuda.memory_allocated(self._device))

    def reset_peak(self) -> None:
        self._cuda.reset_peak_memory_stats(self._device)

    def peak(self) -> int:
        self._cuda.synchronize(self._device)
        return int(self._cuda.max_memory_allocated(self._device))

    def release(self) -> None:
        gc.collect()  # the dry member's tensors, held in reference cycles of its trainer's objects
        self._cuda.empty_cache()

    def free(self) -> tuple[int, int]:
        free, total = self._cuda.mem_get_info(self._device)
        return int(free), int(total)


class DryContext:
    """A member's ctx for one step that goes nowhere (see the module docstring)."""

    def __init__(self, like: Any, workdir: Path):
        self.job_id, self.grid_id = like.job_id, like.grid_id
        self.seed, self.attempt = like.seed, like.attempt  # the member's own seed: the same model and data
        self.workdir = workdir
        self.device = like.device
        self.said = False  # reported, posted progress or checkpointed: one step is done
        self.asked = 0  # should_stop calls
        self.steps: list[int] = []  # the steps it reported (tests read them)
        self.outcome: Any = None  # what the trainer left with, when it calls leave

    def report(self, step: int, **_metrics: Any) -> None:
        self.said = True
        self.steps.append(int(step))

    def progress(self, _done: float, _total: float) -> None:
        self.said = True

    def event(self, _kind: str, _message: str) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        self.said = True
        return {"uri": None, "step": int(state.get("step", 0) if step is None else step)}  # written nowhere

    def load_checkpoint(self) -> None:
        return None  # a dry step starts fresh: the memory of step 1 is the memory of any step of this shape

    def should_stop(self) -> bool:
        self.asked += 1
        return self.said or self.asked > MAX_ASKS

    def leave(self, outcome: Any) -> None:
        self.outcome = outcome


def measure(train_many, cfg: Any, like: Any, memory: Memory) -> int:
    """Peak bytes one member's step allocates on `memory`'s device above the allocation before it.
    `like`: the member's real ctx (its seed and device; nothing is sent on it). Raises DryStepFailed."""
    with tempfile.TemporaryDirectory(prefix="gridfleet-dry-") as tmp:
        dry = DryContext(like, Path(tmp))
        base = memory.allocated()
        memory.reset_peak()
        try:
            with same_random_state(like.device):
                outcome = train_many([cfg], [dry])[0]
            peak = memory.peak()
        except Exception as exc:  # noqa: BLE001 - the caller decides; the real run will say it again
            raise DryStepFailed(exc) from exc
        finally:
            memory.release()
    if isinstance(outcome, BaseException):
        raise DryStepFailed(outcome) from outcome
    return max(0, peak - base)


@contextlib.contextmanager
def same_random_state(device: Any = "cpu"):
    """The global generators (Python's, numpy's, torch's CPU and CUDA ones) as they were before: the gang
    trained after a dry step draws what it would have drawn without one (its members equal their solo runs)."""
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    kept = random.getstate(), numpy.random.get_state() if numpy else None
    # is_available: tests fake a "cuda" ctx on a CPU
    cuda = str(device).startswith("cuda") and torch is not None and torch.cuda.is_available()
    devices = [torch.device(device).index or 0] if cuda else []  # the gang's device only
    with torch.random.fork_rng(devices=devices, device_type="cuda") if torch else contextlib.nullcontext():
        try:
            yield
        finally:
            random.setstate(kept[0])
            if numpy:
                numpy.random.set_state(kept[1])


def cache_key(trainer: str, fuse_key: str | None) -> str:
    """What the agent keeps a measurement under: one dry step per trainer and shape (its fuse key)."""
    return f"{trainer}|{fuse_key}"
