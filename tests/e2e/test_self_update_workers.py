"""Self-update and pinned code with real processes: `gridfleet serve`, and `gridfleet worker` agents that run
from a throwaway git checkout of this project (cloned over file:// from a bare remote; tests/gitrepos.py).

The agent runs as `python -m cli` with the checkout as cwd and as PYTHONPATH, so every gridfleet module
it and its job children import comes from the checkout, not from the editable install of the main tree: its
registration's code_rev (the checkout's HEAD) and the `marker` a commit adds to the noop trainer's result
prove which code ran. Commits are pushed from a developer clone while the agent serves.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.processes import Fleet, Proc, Server, job, ok, submit
from tests.gitrepos import NOOP, Upstream, git, noop_with_marker, project_remote

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # git is the subject, not the database
UPDATE_INTERVAL = "0.2"


@pytest.fixture(scope="session")
def remote_template(tmp_path_factory):
    return project_remote(tmp_path_factory.mktemp("project"))


@pytest.fixture
def upstream(remote_template, tmp_path):
    return Upstream(remote_template, tmp_path / "upstream")


def start_agent(fleet: Fleet, server: Server, checkout: Path, name: str, *flags: str) -> Proc:
    env = fleet.env(GRIDFLEET_HOME=str(fleet.tmp / f"{name}-home"), GRIDFLEET_TOKEN=server.worker_token,
                    PYTHONPATH=str(checkout))
    return fleet.spawn(name, [sys.executable, "-m", "cli", "worker", "--server", server.url, "--name", name,
                              "--trainers", "noop,sleep", *flags], env, cwd=checkout)


def self_updating(fleet, server, upstream, checkout, name):
    return start_agent(fleet, server, checkout, name, "--self-update", "--git-remote", upstream.url,
                       "--git-ref", "main", "--update-interval", UPDATE_INTERVAL)


def registrations(server: Server, name: str) -> list[dict[str, Any]]:
    return [w for w in ok(server.api.get("/workers"))["workers"] if w["name"] == name]


def registered(fleet: Fleet, server: Server, name: str, code_rev: str, state: str | None = None) -> dict[str, Any]:
    """Wait for the newest registration of `name` to show `code_rev` (and that self-update state)."""
    def newest():
        regs = registrations(server, name)
        last = regs[-1] if regs else {}
        report = last.get("resources", {}).get("self_update") or {}
        return last if last.get("code_rev") == code_rev and report.get("state") == state else None

    return fleet.wait_for(newest, f"{name} to register on {code_rev[:12]} (self-update: {state})")


def finished(fleet: Fleet, server: Server, job_id: int) -> dict[str, Any]:
    return fleet.wait_for(lambda: (d := job(server.api, job_id))["state"] not in ("queued", "running") and d,
                          f"job {job_id} to finish")


def head(checkout: Path) -> str:
    return git(checkout, "rev-parse", "HEAD")


def test_new_commit_is_picked_up_between_jobs_and_the_agent_reexecs(db_url, fleet, upstream, tmp_path):
    checkout = upstream.clone(tmp_path / "checkout")
    old = head(checkout)
    server = fleet.start_server(db_url)
    agent = self_updating(fleet, server, upstream, checkout, "su")
    registered(fleet, server, "su", old)  # the checkout's code runs, not the main tree's

    long_job = submit(server.api, "su-long", {"seconds": 1.2, "steps": 4})
    fleet.wait_for(lambda: job(server.api, long_job)["state"] == "running", "the sleep job to run")
    new = upstream.commit(noop_with_marker(upstream, "v2"), "noop says v2")  # pushed while the job runs

    done = finished(fleet, server, long_job)
    assert done["state"] == "succeeded" and done["result"] == {"loss": 0.25, "steps": 4}, fleet.explain()
    assert done["attempt_history"][0]["code_rev"] == old
    again = registered(fleet, server, "su", new, "updated")
    assert again["registered_at"] >= done["finished_at"]  # between jobs: never under a running job
    report = again["resources"]["self_update"]
    assert (report["old"], report["new"], report["reinstalled"]) == (old, new, [])  # no dependency file changed
    assert head(checkout) == new

    after = finished(fleet, server, submit(server.api, "su-after", {"value": 0.5}, trainer="noop"))
    assert after["result"] == {"loss": 0.5, "marker": "v2"}, fleet.explain()  # the new commit's trainer ran
    assert after["attempt_history"][0]["code_rev"] == new
    # os.execv: the same process (pid) came back on the new code; nothing else was started
    assert agent.alive() and len(registrations(server, "su")) == 2
    kinds = [e["kind"] for e in ok(server.api.get(f"/workers/{again['id']}/events"))["events"]]
    assert kinds == ["self_update_updated"], kinds
    assert "self-update: now running " + new in agent.tail(200)
    fleet.assert_clean()


def test_commit_that_fails_to_import_is_rolled_back_and_the_worker_keeps_serving(db_url, fleet, upstream, tmp_path):
    checkout = upstream.clone(tmp_path / "checkout")
    old = head(checkout)
    server = fleet.start_server(db_url)
    agent = self_updating(fleet, server, upstream, checkout, "su")
    registered(fleet, server, "su", old)

    broken = upstream.commit({NOOP: upstream.read(NOOP) + "import gridfleet_no_such_module\n"}, "broken noop")
    report = registered(fleet, server, "su", old, "rolled_back")["resources"]["self_update"]
    assert report["new"] == broken and "gridfleet_no_such_module" in report["message"]
    assert head(checkout) == old and git(checkout, "status", "--porcelain") == ""

    served = finished(fleet, server, submit(server.api, "after-broken", {"value": 1.0}, trainer="noop"))
    assert served["state"] == "succeeded" and served["result"] == {"loss": 1.0}, fleet.explain()
    assert served["attempt_history"][0]["code_rev"] == old
    assert agent.alive() and "rolled back" in agent.tail(200)
    [worker] = registrations(server, "su")  # no re-exec, no new registration
    events = ok(server.api.get(f"/workers/{worker['id']}/events"))["events"]
    assert [e["kind"] for e in events] == ["self_update_rolled_back"], events
    assert "gridfleet_no_such_module" in events[0]["message"]


def test_dirty_tree_is_refused_and_the_worker_keeps_serving(db_url, fleet, upstream, tmp_path):
    checkout = upstream.clone(tmp_path / "checkout")
    old = head(checkout)
    local_edit = (checkout / "README.md").read_text() + "\na local edit nobody committed\n"
    (checkout / "README.md").write_text(local_edit)
    server = fleet.start_server(db_url)
    agent = self_updating(fleet, server, upstream, checkout, "su")
    registered(fleet, server, "su", old)

    new = upstream.commit(noop_with_marker(upstream, "v2"), "noop says v2")
    report = registered(fleet, server, "su", old, "dirty")["resources"]["self_update"]
    assert report["new"] == new and "README.md" in report["message"]
    assert head(checkout) == old and (checkout / "README.md").read_text() == local_edit

    served = finished(fleet, server, submit(server.api, "after-dirty", {"value": 1.0}, trainer="noop"))
    assert served["state"] == "succeeded" and served["result"] == {"loss": 1.0}, fleet.explain()
    assert agent.alive() and "refusing to update" in agent.tail(200)
    [worker] = registrations(server, "su")
    assert [e["kind"] for e in ok(server.api.get(f"/workers/{worker['id']}/events"))["events"]] == ["self_update_dirty"]
    fleet.assert_clean()


def test_pinned_grid_runs_the_pinned_commit_from_a_worktree(db_url, fleet, upstream, tmp_path):
    checkout = upstream.clone(tmp_path / "checkout")
    own = head(checkout)
    server = fleet.start_server(db_url)
    agent = start_agent(fleet, server, checkout, "pin")  # no --self-update, no --git-remote: origin
    registered(fleet, server, "pin", own)
    # Pushed after the worker started: it has never seen this commit and must fetch it.
    pinned = upstream.commit(noop_with_marker(upstream, "pinned"), "an experiment", branch="exp")
    upstream.tag("exp-1", pinned)

    done = finished(fleet, server, submit(server.api, "pinned", {"value": 2.0}, trainer="noop", code_rev="exp-1"))
    assert done["state"] == "succeeded", fleet.explain()
    assert done["result"] == {"loss": 2.0, "marker": "pinned"}  # the pinned commit's trainer ran
    assert done["attempt_history"][0]["code_rev"] == pinned  # the full sha, not the tag
    events = ok(server.api.get(f"/jobs/{done['id']}/events"))["events"]
    assert any(e["kind"] == "code_rev" and pinned in e["message"] for e in events)
    worktree = fleet.tmp / "pin-home" / "code" / pinned
    assert head(worktree) == pinned and head(checkout) == own

    unpinned = finished(fleet, server, submit(server.api, "unpinned", {"value": 3.0}, trainer="noop"))
    assert unpinned["result"] == {"loss": 3.0} and unpinned["attempt_history"][0]["code_rev"] == own

    missing = finished(fleet, server, submit(server.api, "pinned-missing", {"value": 4.0}, trainer="noop",
                                             code_rev="0123abcd", max_attempts=1))
    assert missing["state"] == "failed" and "'0123abcd'" in missing["last_error"], missing
    assert missing["attempt_history"][0]["outcome"] == "error"
    assert agent.alive()
    fleet.assert_clean()
