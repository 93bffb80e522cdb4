"""HubStore against a local Hub-compatible server (tests/hub_server.py), through the real huggingface_hub client."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from pydantic import SecretStr

from common.hub_store import HubStore, HubStoreError, parse_hf_uri

TOKEN = "hf_test_SECRET_token_4b1d9e"
REPO = "hf://alice/ckpts"


@pytest.fixture
def hub(start_hub):
    return start_hub(TOKEN)


def make_store(hub, root, token=TOKEN, **kwargs) -> HubStore:
    kwargs.setdefault("backoff_base", 0.05)
    secret = SecretStr(token) if token is not None else None
    return HubStore(REPO, root, write_token=secret, endpoint=hub.url, **kwargs)


def make_state(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "model": {"weight": torch.randn(4, 3, generator=generator)},
        "rng": torch.get_rng_state(),
        "replay": [(i, float(i) / 3) for i in range(5)],
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert torch.equal(a["model"]["weight"], b["model"]["weight"])
    assert torch.equal(a["rng"], b["rng"])
    assert a["replay"] == b["replay"]


def test_parse_hf_uri():
    assert parse_hf_uri("hf://alice/ckpts") == ("alice/ckpts", "main")
    assert parse_hf_uri("hf://alice/ckpts@runs") == ("alice/ckpts", "runs")
    with pytest.raises(ValueError):
        parse_hf_uri("hf://alice")


def test_save_on_one_machine_load_on_another(hub, tmp_path):
    machine_a = make_store(hub, tmp_path / "a")
    state = make_state(10)
    pointer = machine_a.save(1, 2, 10, state)

    assert pointer["uri"] == "hf://alice/ckpts/grid-1/job-2/ckpt-000000000010.pt"
    assert pointer["step"] == 10 and pointer["time"] > 0
    repo = hub.repos["alice/ckpts"]
    assert repo.private
    assert pointer["revision"] == repo.branches["main"]
    # local first: machine A still has its own copy
    assert (tmp_path / "a" / "grid-1" / "job-2" / "ckpt-000000000010.pt").exists()

    machine_b = make_store(hub, tmp_path / "b")
    assert not (tmp_path / "b" / "grid-1").exists()
    assert_same_state(machine_b.load(pointer), state)
    assert any(method == "GET" and "/resolve/" in path for method, path, _ in hub.requests)


def test_pointer_revision_is_the_commit_and_old_revisions_stay_downloadable(hub, tmp_path):
    store = make_store(hub, tmp_path / "a")
    first = store.save(1, 1, 5, make_state(5))
    # later commits overwrite the same path on the branch; the first pointer must still get the first bytes
    store.save(1, 1, 5, make_state(6))
    later = store.save(1, 1, 7, make_state(7))
    assert len({first["revision"], later["revision"]}) == 2
    assert first["revision"] in hub.repos["alice/ckpts"].commits

    reader = make_store(hub, tmp_path / "b")
    assert_same_state(reader.load(first), make_state(5))
    assert_same_state(reader.load(later), make_state(7))

    # the client's own calls see the history too
    api = store._api(SecretStr(TOKEN))
    assert api.repo_info("alice/ckpts").sha == later["revision"]
    assert [b.target_commit for b in api.list_repo_refs("alice/ckpts").branches] == [later["revision"]]
    files = {f.path for f in api.list_repo_tree("alice/ckpts", revision=first["revision"], recursive=True)}
    assert "grid-1/job-1/ckpt-000000000005.pt" in files
    assert "grid-1/job-1/ckpt-000000000007.pt" not in files


def test_rate_limit_is_retried_after_retry_after(hub, tmp_path):
    store = make_store(hub, tmp_path / "a")
    hub.fail_next(1, status=429, retry_after=1)
    started = time.monotonic()
    pointer = store.save(3, 4, 1, make_state(1))
    assert time.monotonic() - started >= 1.0  # waited as told, not our 0.05s backoff
    assert hub.requests[0][1:] == ("/api/repos/create", 429)  # a call the client itself does not retry
    assert_same_state(make_store(hub, tmp_path / "b").load(pointer), make_state(1))


def test_outage_is_retried_with_backoff(hub, tmp_path):
    store = make_store(hub, tmp_path / "a")
    hub.fail_next(3, status=503)
    pointer = store.save(1, 1, 1, make_state(1))
    assert hub.statuses()[:3] == [503, 503, 503]
    hub.fail_next(2, status=503)  # the download is retried too
    assert_same_state(make_store(hub, tmp_path / "r").load(pointer), make_state(1))

    # refused/dropped connections on upload and on download are retried as well
    hub.drop_next(2)
    pointer = store.save(1, 1, 2, make_state(2))
    reader = make_store(hub, tmp_path / "b")
    hub.drop_next(2)
    assert_same_state(reader.load(pointer), make_state(2))
    assert hub.statuses().count(0) == 4


def test_outage_longer_than_the_budget_fails_cleanly(hub, tmp_path):
    store = make_store(hub, tmp_path / "a", max_attempts=3)
    hub.fail_next(3, status=503)
    with pytest.raises(HubStoreError, match="failed after 3 attempt"):
        store.save(1, 1, 1, make_state(1))
    # the local copy is kept for a later upload
    assert (tmp_path / "a" / "grid-1" / "job-1" / "ckpt-000000000001.pt").exists()


def test_no_request_without_the_token_succeeds(hub, tmp_path):
    with pytest.raises(HubStoreError, match="HTTP 401"):
        make_store(hub, tmp_path / "a", token=None).save(1, 1, 1, make_state(1))
    with pytest.raises(HubStoreError, match="HTTP 401"):
        make_store(hub, tmp_path / "a2", token="hf_wrong").save(1, 1, 1, make_state(1))
    assert "alice/ckpts" not in hub.repos

    pointer = make_store(hub, tmp_path / "b").save(1, 1, 1, make_state(1))
    with pytest.raises(HubStoreError, match="HTTP 401"):
        make_store(hub, tmp_path / "c", token=None).load(pointer)
    assert all(status == 401 for method, path, status in hub.requests if "/resolve/" in path)


def test_token_never_in_errors_or_logs(hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    store = make_store(hub, tmp_path / "a", max_attempts=2)
    pointer = store.save(1, 1, 1, make_state(1))

    failures = []
    hub.fail_next(2, status=503)
    with pytest.raises(HubStoreError) as err:
        make_store(hub, tmp_path / "b", max_attempts=2).save(1, 1, 2, make_state(2))
    failures.append(err.value)
    hub.fail_next(1, status=403)
    with pytest.raises(HubStoreError) as err:
        make_store(hub, tmp_path / "c").load(pointer)
    failures.append(err.value)
    with pytest.raises(HubStoreError) as err:
        make_store(hub, tmp_path / "d", token=TOKEN + "x").save(1, 1, 3, make_state(3))
    failures.append(err.value)
    hub.fail_next(20, status=429, retry_after=0)
    with pytest.raises(HubStoreError) as err:
        make_store(hub, tmp_path / "e", max_attempts=2).save(1, 1, 4, make_state(4))
    failures.append(err.value)

    for failure in failures:
        text = f"{failure!s} {failure!r} {failure.__cause__!r} {failure.__context__!r}"
        assert TOKEN not in text
        assert failure.__cause__ is None and failure.__context__ is None
    assert caplog.records, "expected retry warnings to be logged"
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(store)


def test_uploader_batches_pending_checkpoints_into_one_commit(hub, tmp_path):
    from common.hub_store import Uploader

    store = make_store(hub, tmp_path / "a", keep=5)
    uploaded = []
    uploader = Uploader(store, interval=0.2, on_uploaded=lambda pointer, meta: uploaded.append(pointer))
    for step in (1, 2, 3):
        local = uploader.save(1, 1, step, make_state(step))
        assert local["uri"].startswith("local:")
    uploader.save(1, 2, 1, make_state(100))
    assert "alice/ckpts" not in hub.repos and not uploaded  # nothing goes out before the first interval

    uploader.start()
    deadline = time.monotonic() + 10
    while len(uploaded) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    uploader.stop()
    # Job 1's step 3 superseded its pending steps 1 and 2: only the newest checkpoint of each job goes out.
    assert sorted((p["uri"].split("/")[-2], p["step"]) for p in uploaded) == [("job-1", 3), ("job-2", 1)]
    assert uploader.pending() == 0
    assert len({p["revision"] for p in uploaded}) == 1  # one commit for the batch
    repo = hub.repos["alice/ckpts"]
    assert len(repo.commits) == 2  # the initial commit, then the batch
    assert not any(path.endswith("job-1/ckpt-000000000001.pt") for path in repo.resolve("main").files)

    reader = make_store(hub, tmp_path / "b")
    by_step = {(p["uri"].split("/")[-2], p["step"]): p for p in uploaded}
    assert_same_state(reader.load(by_step[("job-1", 3)]), make_state(3))
    assert_same_state(reader.load(by_step[("job-2", 1)]), make_state(100))


def test_uploader_keeps_a_failed_batch_for_the_next_flush(hub, tmp_path):
    from common.hub_store import Uploader

    store = make_store(hub, tmp_path / "a", max_attempts=2)
    uploader = Uploader(store, interval=3600)
    uploader.save(1, 1, 1, make_state(1))
    hub.fail_next(2, status=503)
    with pytest.raises(HubStoreError):
        uploader.flush()
    assert uploader.pending() == 1
    [pointer] = uploader.flush()
    assert uploader.pending() == 0
    assert_same_state(make_store(hub, tmp_path / "b").load(pointer), make_state(1))


def test_upload_leaves_out_a_checkpoint_pruned_while_it_waited(hub, tmp_path):
    """The job's child prunes old checkpoints while an upload waits on the Hub (an outage, retries): the
    commit holds what is still there, and says so, instead of failing (it killed the uploader thread)."""
    store = make_store(hub, tmp_path / "a", keep=5)
    old = store.local.save(1, 1, 1, make_state(1))
    new = store.local.save(1, 1, 2, make_state(2))
    files = {store.path_in_repo(1, 1, step): Path(p["uri"][len("local:"):]) for step, p in ((1, old), (2, new))}
    files[store.path_in_repo(1, 1, 1)].unlink()  # pruned after it was queued
    sha = store.upload(files, "two checkpoints, one left")
    assert list(files) == [store.path_in_repo(1, 1, 2)]
    tree = hub.repos["alice/ckpts"].resolve("main").files
    assert store.path_in_repo(1, 1, 2) in tree and store.path_in_repo(1, 1, 1) not in tree
    assert_same_state(make_store(hub, tmp_path / "b").load(store.pointer(store.path_in_repo(1, 1, 2), sha, 2, 0.0)),
                      make_state(2))
    gone = {store.path_in_repo(1, 1, 3): tmp_path / "never-written.pt"}
    assert store.upload(gone, "nothing left") is None and gone == {}
