"""Checkpoints on the Hub, end to end: real `gridfleet serve` and `gridfleet worker` processes, each worker with
its own empty local directory, talking to a local Hub-compatible server (tests/hub_server.py) through the
real huggingface_hub client. Hub settings reach the workers the way users give them: a `.env` file with
seed 002's `huggingface_read` / `huggingface_write` keys.
"""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.e2e.processes import (
    DEADLINE,
    Fleet,
    Server,
    attempt_steps,
    gridfleet_cmd,
    job,
    ok,
    worker_names,
)
from tests.hub_server import HubServer

WRITE_TOKEN = "hf_e2eWRITEtoken0123456789abcdef"
READ_TOKEN = "hf_e2eREADtoken0123456789abcdef"
REPO = "alice/gridfleet-ckpts"
UPLOAD_INTERVAL = 1.0


@pytest.fixture
def hub(start_hub):
    return start_hub(WRITE_TOKEN, read_token=READ_TOKEN)


def hub_env(fleet: Fleet, name: str, hub: HubServer, **values: str) -> tuple[dict[str, str], Path]:
    """Environment and working directory (holding a .env with the Hub keys) of one process."""
    cwd = fleet.tmp / f"{name}-cwd"
    cwd.mkdir()
    (cwd / ".env").write_text(
        f"huggingface_write={WRITE_TOKEN}\nhuggingface_read={READ_TOKEN}\n"
        f"GRIDFLEET_HUB_ENDPOINT={hub.url}\nGRIDFLEET_HUB_UPLOAD_INTERVAL={UPLOAD_INTERVAL}\n"
    )
    env = fleet.env(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_HOME=str(cwd / "hf-home"),
                    GRIDFLEET_HOME=str(fleet.tmp / f"{name}-home"), **values)
    return env, cwd


def start_hub_worker(fleet: Fleet, server: Server, name: str, hub: HubServer):
    env, cwd = hub_env(fleet, name, hub, GRIDFLEET_TOKEN=server.worker_token)
    return fleet.spawn(name, [*gridfleet_cmd(), "worker", "--server", server.url, "--name", name], env, cwd=cwd)


def submit_one(api, name: str, config: dict) -> tuple[int, int]:
    ok(api.post("/grids", json={"name": name, "trainer": "sleep", "config": config, "store": f"hf://{REPO}"}))
    [row] = ok(api.get(f"/grids/{name}/results"))["results"]
    return ok(api.get(f"/grids/{name}"))["id"], row["job_id"]


def hub_files(hub: HubServer) -> dict[str, bytes]:
    repo = hub.repos.get(REPO)
    return dict(repo.resolve("main").files) if repo else {}


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_killed_worker_job_resumes_on_another_machine_from_the_hub(db_url, fleet, hub):
    server = fleet.start_server(db_url)
    api = server.api
    steps = 40
    grid_id, job_id = submit_one(api, "hub-e2e", {"seconds": 8.0, "steps": steps, "checkpoint_every": 1})
    a = start_hub_worker(fleet, server, "a", hub)

    def uploaded_running(min_step: int):
        detail = job(api, job_id)
        pointer = detail["checkpoint"] or {}
        return (detail["state"] == "running" and pointer.get("uri", "").startswith("hf://")
                and pointer["step"] >= min_step and detail)

    before = fleet.wait_for(lambda: uploaded_running(3), "worker a to upload a checkpoint to the Hub")
    pointer = before["checkpoint"]
    assert pointer["uri"] == f"hf://{REPO}/grid-{grid_id}/job-{job_id}/ckpt-{pointer['step']:012d}.pt"
    assert pointer["revision"] in hub.repos[REPO].commits  # the commit that holds it, not a branch name
    assert f"grid-{grid_id}/job-{job_id}/config.json" in hub_files(hub)
    commits_before_kill = len(hub.repos[REPO].commits)

    b = start_hub_worker(fleet, server, "b", hub)  # an empty local directory of its own
    a.send_group(signal.SIGKILL)
    fleet.wait_for(lambda: not a.group(), "worker a's processes to be gone")

    done = fleet.wait_for(lambda: (d := job(api, job_id))["state"] not in ("queued", "running") and d,
                          "worker b to resume the job from the Hub and finish it")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "succeeded" and done["result"] == {"loss": 1.0 / steps, "steps": steps}, context
    first, second = done["attempt_history"]
    assert (first["outcome"], second["outcome"]) == ("lost", "succeeded"), context
    assert worker_names(api)[second["worker_id"]] == "b", context
    resumed = attempt_steps(api, job_id, second["id"])
    assert resumed and resumed[0] >= pointer["step"] + 1, (resumed, pointer, context)
    assert resumed == list(range(resumed[0], steps + 1)), (resumed, context)
    # b had no local copy: it downloaded the pointed revision of the checkpoint it resumed from.
    downloads = [p for m, p, s in hub.requests if m == "GET" and "/resolve/" in p and p.endswith(".pt") and s == 200]
    assert downloads and all(f"/job-{job_id}/ckpt-" in p for p in downloads), hub.requests[-20:]

    # After success: the final checkpoint pointer, result.json and the model card reach the Hub in b's next
    # batch; the job row records the final checkpoint's commit.
    final = fleet.wait_for(lambda: (d := job(api, job_id))["checkpoint"]["step"] == steps and d,
                           "the final checkpoint's Hub pointer to be recorded")
    assert final["checkpoint"]["uri"].startswith(f"hf://{REPO}/") and final["state"] == "succeeded"
    prefix = f"grid-{grid_id}/job-{job_id}/"
    fleet.wait_for(lambda: {prefix + n for n in ("config.json", "result.json", "README.md")} <= set(hub_files(hub)),
                   "result.json and README.md to be uploaded")
    files = hub_files(hub)
    assert b'"loss": 0.025' in files[prefix + "result.json"]
    card = files[prefix + "README.md"].decode()
    assert "gridfleet" in card and "| `loss` | `0.025` |" in card and "| `steps` | `40` |" in card
    # Batched: about one commit per interval while uploading, not one per checkpoint (40 were saved).
    assert len(hub.repos[REPO].commits) - commits_before_kill < steps / 2, len(hub.repos[REPO].commits)

    # `gridfleet pull` gets the results and the final model with the read token.
    env, cwd = hub_env(fleet, "puller", hub, GRIDFLEET_TOKEN=server.admin_token)
    dest = fleet.tmp / "pulled"
    pull = subprocess.run([*gridfleet_cmd(), "pull", "hub-e2e", "--server", server.url, "--dest", str(dest)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=DEADLINE)
    (fleet.logs / "pull.log").write_text(pull.stdout + pull.stderr)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    pulled = {p.name for p in (dest / f"job-{job_id}").iterdir()}
    assert pulled == {"config.json", "result.json", "README.md", f"ckpt-{steps:012d}.pt"}, pulled
    assert (dest / "results.csv").read_text().count("\n") == 2

    assert_no_token_anywhere(fleet, api, db_url, job_id)
    b.send(signal.SIGTERM)
    assert b.wait(DEADLINE) == 0, fleet.explain()
    fleet.assert_clean()


def assert_no_token_anywhere(fleet: Fleet, api, db_url: str, job_id: int) -> None:
    """The Hub tokens appear in no log, no file a process wrote, no API reply and no database row."""
    from common import schema
    from common.db import make_engine

    tokens = [WRITE_TOKEN, READ_TOKEN]
    replies = [api.get(path).text for path in (
        "/grids", "/grids/hub-e2e", "/grids/hub-e2e/results", "/grids/hub-e2e/results?format=csv",
        f"/jobs/{job_id}", f"/jobs/{job_id}/events", f"/jobs/{job_id}/metrics", "/workers")]
    replies.append(api.get("/openapi.json").text)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = [str(row) for table in schema.metadata.sorted_tables for row in conn.execute(select(table))]
    finally:
        engine.dispose()
    files = [p for p in fleet.tmp.rglob("*") if p.is_file() and p.name != ".env"]
    assert any(p.name == "output.log" for p in files) and any(p.suffix == ".log" for p in files)
    for token in tokens:
        assert not any(token in reply for reply in replies), "a token in an API reply"
        assert not any(token in row for row in rows), "a token in the database"
        leaked = [str(p) for p in files if token.encode() in p.read_bytes()]
        assert not leaked, f"a token in {leaked}"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_hub_outage_training_goes_on_and_uploads_catch_up(db_url, fleet, hub):
    server = fleet.start_server(db_url)
    api = server.api
    hub.set_down(True)
    steps = 20
    grid_id, job_id = submit_one(api, "hub-outage", {"seconds": 6.0, "steps": steps, "checkpoint_every": 2})
    start_hub_worker(fleet, server, "w", hub)

    # Training goes on while every Hub request fails: steps advance, no Hub pointer is recorded yet.
    fleet.wait_for(lambda: (job(api, job_id)["step"] or 0) >= steps // 2, "training to go on during the outage")
    detail = job(api, job_id)
    assert detail["checkpoint"] is None and detail["state"] == "running", detail
    assert any(s == 503 for s in hub.statuses()), "the worker never tried the Hub during the outage"
    assert REPO not in hub.repos

    hub.set_down(False)
    final = fleet.wait_for(lambda: (d := job(api, job_id))["state"] == "succeeded"
                           and (d["checkpoint"] or {}).get("step") == steps and d,
                           "the job to finish and its final checkpoint to reach the Hub")
    assert final["errors"] == 0 and final["attempts"] == 1, final
    prefix = f"grid-{grid_id}/job-{job_id}/"
    fleet.wait_for(lambda: {prefix + n for n in ("config.json", "result.json", "README.md",
                                                  f"ckpt-{steps:012d}.pt")} <= set(hub_files(hub)),
                   "everything written during the outage to be uploaded")
    # Nothing lost: every step was reported once, in order.
    assert attempt_steps(api, job_id, final["attempt_history"][0]["id"]) == list(range(1, steps + 1))
    fleet.assert_clean()
