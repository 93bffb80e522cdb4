"""Checkpoint pointers while the API is away (worker/pointers.py) and the local checkpoints they name.

The recorder talks to a real ApiClient aimed at a port nobody listens on (the API is down), or through a
DirectClient to a real queue; LocalStore prunes real files.
"""
from __future__ import annotations

import socket

from common.checkpoints import LocalStore, StoreOptions, pin_checkpoints
from tests.integration.test_checkpoint_sync import claim_one, recorded
from worker.checkpoint_sync import CheckpointSync
from worker.client import ApiClient
from worker.pointers import PointerRecorder


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when this returns: connections are refused


def test_while_the_api_is_down_only_the_newest_pointer_waits_and_nothing_blocks(tmp_path):
    client = ApiClient(f"http://127.0.0.1:{closed_port()}", "gf_token", retry_for=300.0)
    recorder = PointerRecorder(client, retry_max=0.2)
    recorder.worker_id = "w"
    for step in (2, 4, 6):  # each returns at once although no server answers
        recorder.record(1, "attempt-a", {"uri": f"local:/x/ckpt-{step:012d}.pt", "step": step})
    recorder.record(2, "attempt-b", {"uri": "local:/y/ckpt-000000000001.pt", "step": 1})
    assert recorder.pending(1, "attempt-a")["step"] == 6
    assert recorder.pending(2, "attempt-b")["step"] == 1
    assert not recorder.wait(1, "attempt-a", timeout=1.0)  # still pending after retries: the server is away
    recorder.drop(1, "attempt-a")  # a stale attempt writes nothing
    assert recorder.pending(1, "attempt-a") is None and recorder.wait(1, "attempt-a", timeout=0)
    recorder.close(timeout=0.5)  # gives up on job 2's pointer after the timeout and stops its thread
    assert recorder.pending(2, "attempt-b")["step"] == 1
    client.close()


def test_pruning_keeps_the_pinned_checkpoint_beyond_the_newest_ones(tmp_path):
    store = LocalStore(tmp_path, keep=2)
    first = store.save(1, 1, 1, {"step": 1})
    pin_checkpoints([first])
    for step in range(2, 6):
        store.save(1, 1, step, {"step": step})
    folder = store.job_dir(1, 1)
    assert sorted(p.name for p in folder.glob("ckpt-*.pt")) == [
        "ckpt-000000000001.pt", "ckpt-000000000004.pt", "ckpt-000000000005.pt"]
    assert store.load(first) == {"step": 1}
    pin_checkpoints([store.save(1, 1, 6, {"step": 6})])  # a newer one is recorded: the old pin goes
    store.save(1, 1, 7, {"step": 7})
    assert sorted(p.name for p in folder.glob("ckpt-*.pt")) == ["ckpt-000000000006.pt", "ckpt-000000000007.pt"]


def test_the_recorded_local_checkpoint_outlives_newer_saves(queue, tmp_path):
    client, job = claim_one(queue, None)
    sync = CheckpointSync(client, StoreOptions(), tmp_path)
    sync.worker_id = job["worker_id"]
    store = LocalStore(tmp_path, keep=2)  # as the job's child has it
    pointer = store.save(job["grid_id"], job["id"], 2, {"step": 2})
    assert sync.checkpoint_saved(job, pointer)["ok"]
    sync.wait_recorded(job)
    assert recorded(queue, job["id"]) == pointer
    for step in (3, 4, 5):  # the child goes on saving; these pointers are not recorded (yet)
        store.save(job["grid_id"], job["id"], step, {"step": step})
    assert store.load(recorded(queue, job["id"])) == {"step": 2}  # what another worker would resume from
    sync.close()
