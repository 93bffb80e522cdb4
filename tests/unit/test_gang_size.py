"""How many jobs a gang claims (worker/gang_size.py) and how many members a CUDA device holds, with a fake
memory reading (the real CUDA path needs a GPU; worker/gang_child._fit reads torch.cuda.mem_get_info there)."""
from __future__ import annotations

from types import SimpleNamespace

from worker import gang_child, gang_size

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


sent: list = []  # what _fit told the agent


def _ctx(device: str):
    return SimpleNamespace(device=device, _gang_conn=SimpleNamespace(send=lambda message: sent.append(message)))


def test_the_gang_child_measures_one_member_on_cuda_and_keeps_what_fits():
    measured = []
    fused = SimpleNamespace(member_bytes=lambda cfg, device: measured.append((cfg, device)) or 300 * MIB)
    cfgs = [f"cfg{i}" for i in range(8)]
    sent.clear()
    fit = gang_child._fit(fused, cfgs, [_ctx("cuda:0") for _ in cfgs], free_memory=lambda: (1000 * MIB, 0))
    assert fit == 3 and measured == [("cfg0", "cuda:0")]
    assert sent == [("fit", 3, 8)]  # the agent's next claims ask for no more than 3


def test_on_a_cpu_or_without_a_measure_every_member_trains():
    cfgs = ["a", "b", "c"]
    never = lambda: (_ for _ in ()).throw(AssertionError("read no GPU memory"))  # noqa: E731
    fused = SimpleNamespace(member_bytes=lambda cfg, device: 10**12)
    assert gang_child._fit(fused, cfgs, [_ctx("cpu") for _ in cfgs], free_memory=never) == 3
    assert gang_child._fit(SimpleNamespace(), cfgs, [_ctx("cuda") for _ in cfgs], free_memory=never) == 3
    assert gang_child._fit(None, cfgs, [_ctx("cuda") for _ in cfgs], free_memory=never) == 3


def test_a_measurement_that_fails_trains_every_member():
    def broken(cfg, device):
        raise RuntimeError("CUDA out of memory")

    cfgs = ["a", "b"]
    assert gang_child._fit(SimpleNamespace(member_bytes=broken), cfgs, [_ctx("cuda") for _ in cfgs],
                           free_memory=lambda: (10, 0)) == 2
