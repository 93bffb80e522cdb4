"""How many jobs a gang claims (worker/gang_size.py) and how many members a CUDA device holds, with a fake
memory reading (the real CUDA path needs a GPU; worker/gang_child._fit reads torch.cuda.mem_get_info there)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker import dry_step, gang_child, gang_run, gang_size
from worker.trainers import noop

MIB = 2**20


def test_k_is_the_setting_capped_by_the_server_the_jobs_left_and_the_device():
    assert gang_size.claim_size(8) == 8
    assert gang_size.claim_size(8, server_limit=64) == 8
    assert gang_size.claim_size(64, server_limit=16) == 16
    assert gang_size.claim_size(8, jobs_left=3) == 3  # --max-jobs 3 never claims a fourth
    assert gang_size.claim_size(8, device_fit=5) == 5
    assert gang_size.claim_size(8, server_limit=6, jobs_left=7, device_fit=20) == 6
    assert gang_size.claim_size(1, server_limit=64) == 1  # 1: one job at a time
    assert gang_size.claim_size(8, jobs_left=0) == 1  # never a claim of none


def test_members_that_fit_in_free_memory_less_the_reserve():
    assert gang_size.fit_on_device(16, member_bytes=100 * MIB, free_bytes=1000 * MIB) == 9  # 900 MiB usable
    assert gang_size.fit_on_device(4, member_bytes=100 * MIB, free_bytes=1000 * MIB) == 4  # all fit
    assert gang_size.fit_on_device(16, member_bytes=2000 * MIB, free_bytes=1000 * MIB) == 1  # one, as solo
    assert gang_size.fit_on_device(16, member_bytes=0, free_bytes=1000 * MIB) == 16  # nothing measured


def test_a_workers_share_of_the_device_caps_the_budget():
    assert gang_size.budget(1000 * MIB, 2000 * MIB) == 1000 * MIB  # the whole device: what is free
    assert gang_size.budget(1000 * MIB, 2000 * MIB, share=0.25) == 500 * MIB  # a Ray actor of num_gpus=0.25
    assert gang_size.budget(300 * MIB, 2000 * MIB, share=0.25) == 300 * MIB  # never more than is free
    assert gang_size.gpu_share(0.25) == 0.25
    assert gang_size.gpu_share(None) is None and gang_size.gpu_share(1.0) is None and gang_size.gpu_share(2) is None
    assert gang_size.gpu_share(0) is None  # 0 offered: no cap from it (the claim's filter already decides)


sent: list = []  # what _fit told the agent


class FakeMemory:
    """A fake torch.cuda (max_memory_allocated above memory_allocated, mem_get_info): a dry step 'allocates'
    `step` bytes above the `base` already allocated; the device has `free` of `total` bytes free."""

    def __init__(self, step: int, free: int, total: int = 80_000 * MIB, base: int = 40 * MIB):
        self.step, self._free, self.total, self.base = step, free, total, base
        self.dry_steps = 0

    def allocated(self) -> int:
        return self.base

    def reset_peak(self) -> None:
        self.dry_steps += 1

    def peak(self) -> int:
        return self.base + self.step

    def release(self) -> None:
        pass

    def free(self) -> tuple[int, int]:
        return self._free, self.total


def _ctx(device: str):
    return SimpleNamespace(device=device, job_id=1, grid_id=1, seed=0, attempt=1,
                           _gang_conn=SimpleNamespace(send=lambda message: sent.append(message)))


def _noop(n: int) -> list:
    return [noop.Config(steps=1000, fuse_group="a") for _ in range(n)]


def test_the_gang_child_dry_steps_one_member_on_cuda_and_keeps_what_fits():
    memory = FakeMemory(step=300 * MIB, free=1000 * MIB)
    cfgs = _noop(8)
    sent.clear()
    fit = gang_child._fit(noop, cfgs, [_ctx("cuda:0") for _ in cfgs], "noop|noop:a", {}, memory)
    assert fit == 3 and memory.dry_steps == 1  # 900 MiB usable // 300 MiB: noop's real train_many, one step
    assert sent == [("measured", "noop|noop:a", 300 * MIB), ("fit", 3, 8)]  # the agent keeps the 300 MiB


def test_a_known_measurement_skips_the_dry_step_and_a_trainers_hook_wins():
    never = SimpleNamespace(train_many=lambda cfgs, ctxs: pytest.fail("no dry step when the bytes are known"))
    memory = FakeMemory(step=1, free=1000 * MIB)
    cfgs = _noop(16)
    sent.clear()
    packing = {"member_bytes": {"noop|noop:a": 100 * MIB, "noop|noop:b": 1}, "gpu_share": None}
    assert gang_child._fit(never, cfgs, [_ctx("cuda") for _ in cfgs], "noop|noop:a", packing, memory) == 9
    assert memory.dry_steps == 0 and sent == [("fit", 9, 16)]  # nothing new to keep

    measured = []
    hooked = SimpleNamespace(train_many=never.train_many,
                             member_bytes=lambda cfg, device: measured.append((cfg, device)) or 450 * MIB)
    sent.clear()
    assert gang_child._fit(hooked, cfgs, [_ctx("cuda:0") for _ in cfgs], "noop|noop:a", packing, memory) == 2
    assert measured == [(cfgs[0], "cuda:0")] and memory.dry_steps == 0 and sent == [("fit", 2, 16)]


def test_the_gpu_share_caps_what_fits():
    memory = FakeMemory(step=100 * MIB, free=2000 * MIB, total=2000 * MIB)
    cfgs = _noop(16)
    ctxs = [_ctx("cuda") for _ in cfgs]
    assert gang_child._fit(noop, cfgs, ctxs, "noop|noop:a", {"gpu_share": 0.25}, memory) == 4  # 450 MiB usable
    assert gang_child._fit(noop, cfgs, ctxs, "noop|noop:a", {"gpu_share": None}, memory) == 16


def test_on_a_cpu_or_without_a_fused_module_every_member_trains():
    cfgs = ["a", "b", "c"]
    never = SimpleNamespace(allocated=lambda: pytest.fail("read no GPU memory"))
    hooked = SimpleNamespace(member_bytes=lambda cfg, device: 10**12)
    assert gang_child._fit(hooked, cfgs, [_ctx("cpu") for _ in cfgs], "k", {}, never) == 3
    assert gang_child._fit(noop, cfgs, [_ctx("cpu") for _ in cfgs], "k", {}, never) == 3  # no dry step on a CPU
    assert gang_child._fit(None, cfgs, [_ctx("cuda") for _ in cfgs], "k", {}, never) == 3


def test_a_measurement_that_fails_trains_every_member_and_one_too_big_trains_alone():
    def broken(cfg, device):
        raise RuntimeError("driver error")

    cfgs = _noop(4)
    ctxs = [_ctx("cuda") for _ in cfgs]
    memory = FakeMemory(step=1, free=10)
    assert gang_child._fit(SimpleNamespace(member_bytes=broken), cfgs, ctxs, "k", {}, memory) == 4
    failing = [noop.Config(steps=1000, fuse_group="a", fail_at_step=0)] * 4
    assert gang_child._fit(noop, failing, ctxs, "k", {}, memory) == 4  # the real run says why, per member

    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
        pass

    def too_big(cfgs, ctxs):
        raise OutOfMemoryError("CUDA out of memory")

    sent.clear()
    assert gang_child._fit(SimpleNamespace(train_many=too_big), cfgs, ctxs, "k", {}, memory) == 1
    assert sent == [("fit", 1, 4)]


def test_the_agent_keeps_measurements_by_trainer_and_fuse_key_for_its_next_gangs(tmp_path):
    assert dry_step.cache_key("gated_rnn", "L1/S32") != dry_step.cache_key("gated_rnn", "L1/S256")
    assert dry_step.cache_key("gated_rnn", "k") != dry_step.cache_key("sparse_rnn", "k")
    agent = SimpleNamespace(options=SimpleNamespace(home=tmp_path, gpus=None), member_bytes={}, device_fit=None)
    jobs = [{"id": 1}, {"id": 2}]
    runner = gang_run.GangRunner(agent, jobs)
    runner._handle(("measured", "gated_rnn|L1/S32", 12 * MIB))
    runner._handle(("fit", 2, 2))
    assert agent.member_bytes == {"gated_rnn|L1/S32": 12 * MIB} and agent.device_fit is None

    handed = []  # the next gang's child gets the cache in its first job, beside the jobs as claimed
    agent.launcher = SimpleNamespace(start_gang=lambda args, code_root: handed.append(args) or _stop())
    agent.current, agent._pinned_code = None, lambda job: None
    agent.sync = SimpleNamespace(job_started=lambda job: None)
    agent.options.stores, agent.options.keep_checkpoints = None, 3
    jobs = [{"id": 3, "trainer": "noop", "attempt": 1}, {"id": 4, "trainer": "noop", "attempt": 1}]
    with pytest.raises(_Started):
        gang_run.GangRunner(agent, jobs).run()
    first = handed[0][0][0]
    assert first[gang_size.PACKING] == {"member_bytes": {"gated_rnn|L1/S32": 12 * MIB}, "gpu_share": None}
    assert gang_size.PACKING not in jobs[0]  # the agent's own job record is unchanged


class _Started(Exception):
    pass


def _stop():
    raise _Started  # the test needs only what the child was handed
