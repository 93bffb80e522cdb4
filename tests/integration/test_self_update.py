"""Self-update and pinned code against real git: a bare remote over file://, a worker checkout cloned from
it, commits pushed from a developer clone (tests/gitrepos.py). No git call is mocked; only `pip install` is
replaced (by a recorder) where a test is about *whether* and *when* it runs.

The agent-level behaviour (re-exec, rollback while serving, pinned jobs through the API) is in
tests/e2e/test_self_update_workers.py.
"""
from __future__ import annotations

import multiprocessing
import runpy

import pytest
from sqlalchemy import select

from common import schema as t
from scheduler.grids import submit_grid
from scheduler.spec import GridSpec
from tests.gitrepos import NOOP, Upstream, git, noop_with_marker, project_remote
from worker.code_cache import CodeCache, CodeUnavailable, start_child
from worker.self_update import (
    SelfUpdater,
    UpdateFailed,
    dependency_changes,
    dependency_files,
)
from worker.trainers import validate_config


@pytest.fixture(scope="session")
def remote_template(tmp_path_factory):
    return project_remote(tmp_path_factory.mktemp("project"))


@pytest.fixture
def upstream(remote_template, tmp_path):
    return Upstream(remote_template, tmp_path)


@pytest.fixture
def checkout(upstream, tmp_path):
    return upstream.clone(tmp_path / "checkout")


class Installs:
    """Stands in for pip: records each call; fails when told to."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[str, list[str]]] = []
        self.fail = fail

    def __call__(self, python, repo, changed):
        self.calls.append((git(repo, "rev-parse", "HEAD"), list(changed)))
        if self.fail:
            raise UpdateFailed("pip install -r requirements.txt failed: no such package")


def updater(checkout, install=None, trainers=("noop",)):
    return SelfUpdater(checkout, "origin", "main", list(trainers), interval=0.0, install=install or Installs())


# ---- which files mean "reinstall" ----------------------------------------------------------------------
def test_dependency_files_are_the_package_metadata_and_requirements_files():
    paths = ["README.md", "pyproject.toml", "requirements.txt", "requirements-dev.txt", "deploy/requirements-gpu.txt",
             "docs/pyproject.toml", "setup.cfg", "worker/agent.py", "requirements.in"]
    assert dependency_files(paths) == ["pyproject.toml", "requirements.txt", "requirements-dev.txt",
                                       "deploy/requirements-gpu.txt", "setup.cfg"]


def test_dependency_changes_between_two_commits(upstream):
    first = git(upstream.dev, "rev-parse", "HEAD")
    docs_only = upstream.commit({"README.md": upstream.read("README.md") + "\nmore words\n"}, "docs", push=False)
    assert dependency_changes(upstream.dev, first, docs_only) == []
    deps = upstream.commit({"requirements.txt": "tqdm\n",
                            "pyproject.toml": upstream.read("pyproject.toml") + "\n# touched\n"}, "deps", push=False)
    assert sorted(dependency_changes(upstream.dev, docs_only, deps)) == ["pyproject.toml", "requirements.txt"]
    assert sorted(dependency_changes(upstream.dev, first, deps)) == ["pyproject.toml", "requirements.txt"]
    assert dependency_changes(upstream.dev, deps, deps) == []


# ---- SelfUpdater.check ---------------------------------------------------------------------------------
def test_new_commit_is_checked_out_without_reinstall_when_no_dependency_changed(upstream, checkout):
    installs = Installs()
    up = updater(checkout, installs)
    old = git(checkout, "rev-parse", "HEAD")
    assert up.check().state == "current"
    new = upstream.commit(noop_with_marker(upstream, "v2"), "noop says v2")

    result = up.check()
    assert (result.state, result.old, result.new, result.reinstalled) == ("updated", old, new, [])
    assert git(checkout, "rev-parse", "HEAD") == new
    assert '"marker": "v2"' in (checkout / NOOP).read_text()
    assert installs.calls == []
    assert up.check().state == "updated"  # this process still runs the old code until it re-execs
    assert updater(checkout).check().state == "current"  # the re-exec'd agent is current


def test_agents_sharing_a_checkout_update_it_once_and_all_reexec(upstream, checkout):
    first, second = updater(checkout), updater(checkout)  # e.g. one agent per GPU, one checkout
    old = git(checkout, "rev-parse", "HEAD")
    new = upstream.commit(noop_with_marker(upstream, "v2"), "noop says v2")
    assert first.check().state == "updated"
    result = second.check()  # HEAD is already there: this agent only has to re-exec
    assert (result.state, result.old, result.new) == ("updated", old, new)
    assert "another agent" in result.message
    assert git(checkout, "rev-parse", "HEAD") == new


def test_changed_requirements_reinstall_and_a_failed_install_rolls_back(upstream, checkout):
    installs = Installs(fail=True)
    up = updater(checkout, installs)
    old = git(checkout, "rev-parse", "HEAD")
    new = upstream.commit({"requirements.txt": "gridfleet-no-such-package==0\n"}, "add a requirement")

    result = up.due()
    assert (result.state, result.old, result.new) == ("rolled_back", old, new)
    assert "no such package" in result.message and new in result.message
    assert git(checkout, "rev-parse", "HEAD") == old
    assert git(checkout, "symbolic-ref", "--short", "HEAD") == "main"  # back on the branch it was on
    assert git(checkout, "status", "--porcelain") == ""
    # pip ran for the new commit, then once more for the old one (the failed install may have changed packages)
    assert installs.calls == [(new, ["requirements.txt"]), (old, ["requirements.txt"])]
    assert up.due() is None  # reported once; tried again only when the ref moves


def test_commit_that_fails_to_import_is_rolled_back(upstream, checkout):
    up = updater(checkout, trainers=("noop", "sleep"))
    old = git(checkout, "rev-parse", "HEAD")
    broken = upstream.commit({NOOP: upstream.read(NOOP) + "import gridfleet_no_such_module\n"}, "broken noop")

    result = up.check()
    assert (result.state, result.old, result.new) == ("rolled_back", old, broken)
    assert "gridfleet_no_such_module" in result.message
    assert git(checkout, "rev-parse", "HEAD") == old
    assert "gridfleet_no_such_module" not in (checkout / NOOP).read_text()

    fixed = upstream.commit({NOOP: upstream.read(NOOP).replace("import gridfleet_no_such_module\n", "")}, "fix")
    assert up.check().state == "updated" and git(checkout, "rev-parse", "HEAD") == fixed


def test_dirty_work_tree_is_never_overwritten(upstream, checkout):
    up = updater(checkout)
    old = git(checkout, "rev-parse", "HEAD")
    local_edit = (checkout / "README.md").read_text() + "\nan edit nobody committed\n"
    (checkout / "README.md").write_text(local_edit)
    new = upstream.commit(noop_with_marker(upstream, "v2"), "noop says v2")

    result = up.due()
    assert (result.state, result.old, result.new) == ("dirty", old, new)
    assert "README.md" in result.message
    assert up.due() is None  # said once
    assert git(checkout, "rev-parse", "HEAD") == old
    assert (checkout / "README.md").read_text() == local_edit

    git(checkout, "checkout", "--", "README.md")  # clean again: the update goes ahead
    assert up.due().state == "updated" and git(checkout, "rev-parse", "HEAD") == new


def test_unreachable_remote_keeps_serving(checkout, tmp_path):
    up = SelfUpdater(checkout, (tmp_path / "gone.git").as_uri(), "main", ["noop"], interval=0.0)
    old = git(checkout, "rev-parse", "HEAD")
    assert up.check().state == "fetch_failed"
    assert git(checkout, "rev-parse", "HEAD") == old


# ---- pinned code: CodeCache ----------------------------------------------------------------------------
def test_worktree_of_a_commit_fetched_after_start(upstream, checkout, tmp_path):
    home = tmp_path / "home"
    cache = CodeCache.open(checkout / "worker", None, home)  # no remote given: the checkout's origin
    assert cache is not None
    pinned = upstream.commit(noop_with_marker(upstream, "pinned"), "experiment", branch="exp")
    upstream.tag("exp-1", pinned)

    sha, path = cache.worktree("exp-1")  # a tag the checkout has never seen
    assert (sha, path) == (pinned, (home / "code" / pinned).resolve())
    assert git(path, "rev-parse", "HEAD") == pinned
    assert '"marker": "pinned"' in (path / NOOP).read_text()
    assert '"marker"' not in (checkout / NOOP).read_text()  # the checkout itself is untouched
    assert cache.worktree(pinned[:10]) == (pinned, path)  # a short sha, and the cached worktree is reused
    assert cache.worktree(pinned) == (pinned, path)

    (path / NOOP).write_text("garbage\n")  # a damaged cache entry is made again
    assert cache.worktree(pinned) == (pinned, path)
    assert '"marker": "pinned"' in (path / NOOP).read_text()


def test_unknown_rev_names_the_rev(checkout, tmp_path):
    cache = CodeCache.open(checkout, None, tmp_path / "home")
    for rev in ("0123abcd", "no-such-tag", "0" * 40):
        with pytest.raises(CodeUnavailable, match=rev):
            cache.worktree(rev)
    with pytest.raises(CodeUnavailable, match="not a git revision"):
        cache.worktree("--upload-pack=touch")


def test_no_checkout_or_no_remote_means_no_pinned_jobs(checkout, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert CodeCache.open(plain, None, tmp_path / "home") is None
    assert CodeCache.open(checkout, (tmp_path / "gone.git").as_uri(), tmp_path / "home") is None


def test_start_child_runs_the_worktrees_code(upstream, checkout, tmp_path):
    """The spawn child imports gridfleet's packages from the worktree given, not from the parent's path."""
    pinned = upstream.commit(noop_with_marker(upstream, "pinned"), "experiment", branch="exp")
    _, path = CodeCache.open(checkout, None, tmp_path / "home").worktree(pinned)
    script = tmp_path / "which.py"
    out = tmp_path / "which.txt"
    script.write_text("import worker.runner, worker.trainers.noop as m\n"
                      f"open({str(out)!r}, 'w').write(m.__file__ + '\\n' + worker.runner.__file__)\n")
    child = multiprocessing.get_context("spawn").Process(target=runpy.run_path, args=(str(script),))
    start_child(child, path)
    child.join(60)
    assert child.exitcode == 0
    assert out.read_text().splitlines() == [str(path / NOOP), str(path / "worker" / "runner.py")]


# ---- the attempt records the full sha (Queue.record_code_rev, both databases) --------------------------
def test_record_code_rev_is_fenced(engine, queue):
    spec = GridSpec.model_validate({"name": "pinned", "trainer": "noop", "code_rev": "exp-1"})
    submit_grid(engine, spec, validate_config)
    worker = queue.register_worker("w", "h", ["noop"])
    assert queue.claim(worker, can_pin_code=False) is None  # a worker that cannot pin never gets it
    job = queue.claim(worker, can_pin_code=True, code_rev="f" * 40)
    assert job.code_rev == "exp-1"
    sha = "a" * 40

    def attempt_rev():
        with engine.connect() as conn:
            return conn.execute(select(t.attempts.c.code_rev).where(t.attempts.c.id == job.attempt_id)).scalar_one()

    assert attempt_rev() == "exp-1"  # as the grid wrote it, until the worker resolves it
    assert queue.record_code_rev(job.id, job.attempt_id, sha, worker_id=worker).ok
    assert attempt_rev() == sha
    with engine.connect() as conn:
        events = conn.execute(select(t.events.c.kind, t.events.c.message).where(t.events.c.job_id == job.id)).all()
    assert ("code_rev", f"running commit {sha}") in [tuple(e) for e in events]

    assert not queue.record_code_rev(job.id, "not-the-attempt", "b" * 40, worker_id=worker).ok
    assert queue.finish(job.id, job.attempt_id, "succeeded", result={}, worker_id=worker).ok
    assert not queue.record_code_rev(job.id, job.attempt_id, "b" * 40, worker_id=worker).ok  # no longer running
    assert attempt_rev() == sha
