"""The agent's checkpoint sync on a real queue (SQLite and Postgres) and the local Hub-compatible server:
what gets recorded when, for local and hf:// stores; and the Hub settings as users write them."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from common import schema as t
from common.checkpoints import LocalStore, StoreOptions
from common.stores import load_checkpoint
from common.settings import Settings
from scheduler.grids import submit_grid
from scheduler.spec import GridSpec
from tests.hub_server import HubServer
from worker.checkpoint_sync import CheckpointSync
from worker.client import DirectClient
from worker.trainers import validate_config

TOKEN = "hf_sync_SECRET_write_7a1c"
REPO = "alice/sync-ckpts"


@pytest.fixture
def hub(start_hub):
    return start_hub(TOKEN)


def options(hub: HubServer, **overrides) -> StoreOptions:
    values = dict(hub_endpoint=hub.url, hub_write_token=SecretStr(TOKEN), upload_interval=3600.0)
    return StoreOptions(**{**values, **overrides})


def claim_one(queue, store: str | None) -> tuple[DirectClient, dict]:
    spec = {"name": "g", "trainer": "sleep", **({"store": store} if store else {})}
    submit_grid(queue.engine, GridSpec.model_validate(spec), validate_config)
    client = DirectClient(queue, heartbeat_seconds=1.0)
    worker_id = client.register({"name": "w", "host": "h", "gpus": [], "trainers": ["sleep"],
                                 "resources": {}, "code_rev": None})["worker_id"]
    return client, {**client.claim(worker_id), "worker_id": worker_id}


def recorded(queue, job_id: int):
    with queue.engine.connect() as conn:
        return conn.execute(select(t.jobs.c.checkpoint).where(t.jobs.c.id == job_id)).scalar()


def started(client, job: dict, hub: HubServer, root) -> CheckpointSync:
    """The agent's sync for `job`, as the agent has it once the job's child starts."""
    sync = CheckpointSync(client, options(hub), root)
    sync.worker_id = job["worker_id"]
    sync.job_started(job)
    return sync


def succeed(sync: CheckpointSync, client, job: dict, root, step: int, loss: float) -> None:
    """The job saves a checkpoint at `step` and succeeds, as agent and child report it."""
    sync.checkpoint_saved(job, LocalStore(root).save(job["grid_id"], job["id"], step, {"step": step}))
    sync.job_finished(job, "succeeded", {"loss": loss}, step)
    client.finish(job["worker_id"], job_id=job["id"], attempt_id=job["attempt_id"], outcome="succeeded",
                  result={"loss": loss})


def test_local_store_records_the_local_pointer_at_once(queue, hub, tmp_path):
    client, job = claim_one(queue, None)
    sync = started(client, job, hub, tmp_path)
    pointer = LocalStore(tmp_path).save(job["grid_id"], job["id"], 3, {"step": 3})
    assert sync.checkpoint_saved(job, pointer)["ok"]
    sync.wait_recorded(job)  # recorded from the sync's own thread, so the child never waits on the server
    assert recorded(queue, job["id"]) == pointer
    assert (tmp_path / f"grid-{job['grid_id']}" / f"job-{job['id']}" / "config.json").exists()
    assert not hub.requests  # a local store never talks to the Hub


def test_hub_store_records_only_after_the_commit_and_uploads_before_a_preempted_job_is_released(queue, hub, tmp_path):
    client, job = claim_one(queue, f"hf://{REPO}")
    sync = started(client, job, hub, tmp_path / "machine-a")
    local = LocalStore(tmp_path / "machine-a")
    for step in (1, 2):
        assert sync.checkpoint_saved(job, local.save(job["grid_id"], job["id"], step, {"step": step}))["ok"]
    assert recorded(queue, job["id"]) is None and not hub.requests  # nothing before the interval

    sync.job_finished(job, "preempted", None, 2)  # the agent calls this before it releases the job
    pointer = recorded(queue, job["id"])
    assert pointer["uri"] == f"hf://{REPO}/grid-{job['grid_id']}/job-{job['id']}/ckpt-000000000002.pt"
    assert pointer["revision"] == hub.repos[REPO].branches["main"]
    files = hub.repos[REPO].resolve("main").files
    assert f"grid-{job['grid_id']}/job-{job['id']}/config.json" in files
    assert f"grid-{job['grid_id']}/job-{job['id']}/ckpt-000000000001.pt" not in files  # superseded, never sent
    # Another machine (empty directory) reads it from the Hub.
    assert load_checkpoint(pointer, tmp_path / "machine-b", options(hub)) == {"step": 2}
    sync.close()


def test_final_files_go_with_the_next_batch_and_the_pointer_lands_after_success(queue, hub, tmp_path):
    client, job = claim_one(queue, f"hf://{REPO}")
    sync = started(client, job, hub, tmp_path)
    succeed(sync, client, job, tmp_path, step=5, loss=0.5)
    assert not hub.requests  # success costs no commit of its own
    sync.close()  # the worker stops: what is pending goes up in one commit
    assert len(hub.repos[REPO].commits) == 2  # the repo's initial commit, then one batch
    prefix = f"grid-{job['grid_id']}/job-{job['id']}/"
    files = hub.repos[REPO].resolve("main").files
    assert {prefix + n for n in ("config.json", "ckpt-000000000005.pt", "result.json", "README.md")} <= set(files)
    assert recorded(queue, job["id"])["uri"].endswith("ckpt-000000000005.pt")  # accepted after success
    assert "| `loss` | `0.5` |" in files[prefix + "README.md"].decode()


def test_hub_settings_from_dotenv_keep_read_and_write_tokens_apart(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HF_ENDPOINT", "GRIDFLEET_HF_TOKEN", "GRIDFLEET_CHECKPOINT_STORE"):
        monkeypatch.delenv(name, raising=False)
    env = tmp_path / ".env"
    env.write_text("huggingface_read=hf_READ\nhuggingface_write=hf_WRITE\nGRIDFLEET_CHECKPOINT_STORE=hf://a/b\n")
    stores = Settings(_env_file=env).store_options()
    assert stores.hub_read_token.get_secret_value() == "hf_READ"
    assert stores.hub_write_token.get_secret_value() == "hf_WRITE"
    assert stores.default_store == "hf://a/b"
    assert "hf_READ" not in repr(stores) and "hf_WRITE" not in repr(stores)

    monkeypatch.setenv("HF_TOKEN", "hf_BOTH")
    both = Settings(_env_file=None).store_options()
    assert both.hub_read_token.get_secret_value() == both.hub_write_token.get_secret_value() == "hf_BOTH"


def test_a_bad_deployment_store_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDFLEET_CHECKPOINT_STORE", "s3://bucket")
    with pytest.raises(ValueError, match="checkpoint_store"):
        Settings(_env_file=None)


def test_pointer_to_another_repo_is_refused(tmp_path):
    from common.hub_store import HubStore

    store = HubStore("hf://alice/one", tmp_path)
    with pytest.raises(ValueError, match="not in this store's repo"):
        store.load({"uri": "hf://bob/two/grid-1/job-1/ckpt-000000000001.pt", "revision": "x", "step": 1})


def test_checkpoints_dir_layout_matches_the_repo_layout(tmp_path):
    pointer = LocalStore(tmp_path).save(4, 9, 12, {"step": 12})
    assert Path(pointer["uri"][len("local:"):]).relative_to(tmp_path.resolve()).as_posix() == \
        "grid-4/job-9/ckpt-000000000012.pt"


def test_uploads_left_by_a_killed_agent_go_up_at_the_next_start_on_that_machine(queue, hub, tmp_path):
    client, job = claim_one(queue, f"hf://{REPO}")
    first = started(client, job, hub, tmp_path)
    succeed(first, client, job, tmp_path, step=7, loss=0.1)
    # kill -9: `first` never flushes (its thread waits an hour); only its journal and files are on disk.
    assert not hub.requests and any((tmp_path / ".uploads").iterdir())

    second = CheckpointSync(client, options(hub), tmp_path)
    second.worker_id = "a-new-worker-id"
    assert second.resume_pending() == 4  # config.json, the checkpoint, result.json, README.md
    second.close()
    prefix = f"grid-{job['grid_id']}/job-{job['id']}/"
    files = hub.repos[REPO].resolve("main").files
    assert {prefix + n for n in ("config.json", "ckpt-000000000007.pt", "result.json", "README.md")} <= set(files)
    assert recorded(queue, job["id"])["uri"].endswith(prefix + "ckpt-000000000007.pt")  # the final model
    assert CheckpointSync(client, options(hub), tmp_path).resume_pending() == 0  # nothing is uploaded twice


def test_a_killed_agents_uploads_are_recorded_through_the_api_by_the_registration_that_wrote_them(
        queue, fleet, hub, tmp_path):
    """With a real API: the agent that finds the journal has registered anew (another worker id and secret),
    yet the final pointer is recorded, by the registration that ran the attempt, whose secret the journal
    keeps (readable by its owner only)."""
    from worker.client import ApiClient

    server = fleet.start_server(queue.engine.url.render_as_string(hide_password=False))
    submit_grid(queue.engine, GridSpec.model_validate({"name": "g", "trainer": "sleep", "store": f"hf://{REPO}"}),
                validate_config)
    info = {"name": "w", "host": "h", "trainers": ["sleep"]}

    def agent() -> tuple[ApiClient, CheckpointSync]:
        client = ApiClient(server.url, server.worker_token, retry_for=5.0)
        reply = client.register(info)
        sync = CheckpointSync(client, options(hub), tmp_path)
        sync.worker_id, sync.worker_secret = reply["worker_id"], reply["worker_secret"]
        return client, sync

    client, first = agent()
    job = client.claim(first.worker_id, trainers=["sleep"])
    first.job_started(job)
    succeed(first, client, job, tmp_path, step=7, loss=0.1)
    [journal] = (tmp_path / ".uploads").rglob("*.json")
    assert journal.stat().st_mode & 0o777 == 0o600
    client.close()  # kill -9: the registration's secret is gone from memory

    client, second = agent()
    assert second.worker_id != first.worker_id
    assert second.resume_pending() == 4
    second.close()
    client.close()
    assert recorded(queue, job["id"])["uri"].endswith(f"job-{job['id']}/ckpt-000000000007.pt")
