"""Warm job starts (worker/warm.py) with real processes: a warm process per code root forks each job's child.

The agent-level behaviour (kill -9 of the agent, a segfault through a real worker) is in
tests/e2e/test_warm_workers.py; these drive `Launcher` directly, as Agent.run_job does.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from common.checkpoints import StoreOptions
from tests.gitrepos import NOOP, Upstream, git, noop_with_marker, project_remote
from worker.code_cache import CodeCache
from worker import warm
from worker.warm import Launcher, Started

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open") or not Path("/proc/self/task").is_dir(),
                                reason="warm starts need Linux pidfds")
PRELOAD = ["sleep", "noop", "gated_rnn"]
DEADLINE = 120.0
TINY_RNN = {"state_size": 8, "n_layers": 1, "batch_size": 4, "history": 10, "steps": 3, "log_every": 1,
            "corpus_bytes": 10_000, "checkpoint_every": 1000}


@pytest.fixture(scope="module")
def launcher():
    launcher = Launcher(PRELOAD)
    launcher.prewarm()
    yield launcher
    launcher.close()


def _job(job_id: int, trainer: str = "sleep", **config) -> dict:
    return {"id": job_id, "grid_id": 1, "seed": 0, "attempt": 1, "attempt_id": f"attempt-{job_id}",
            "trainer": trainer, "config": config, "checkpoint": None}


def _start(launcher: Launcher, tmp_path: Path, job: dict, code_root: Path | None = None) -> Started:
    args = (job, str(tmp_path / f"job-{job['id']}"), str(tmp_path / "checkpoints"), 2, StoreOptions())
    return launcher.start(args, code_root)


def _run(started: Started, stop_after_first_report: bool = False) -> list[tuple]:
    """Every message of the child until it exits, as Agent.run_job reads them."""
    messages: list[tuple] = []
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if started.receiver.poll(0.1):
            try:
                messages.append(started.receiver.recv())
            except EOFError:
                break
            if stop_after_first_report and messages[-1][0] == "report":
                started.stop.set()
        elif not started.child.is_alive():
            break
    else:
        started.child.kill()
        raise AssertionError(f"the job child did not finish in {DEADLINE:.0f} s: {messages}")
    started.child.join()
    started.close()
    return messages


def _result(messages: list[tuple]) -> dict | None:
    return next((m[1] for m in messages if m[0] == "result"), None)


def _ppid_and_name(pid: int) -> tuple[int, str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1]), Path(f"/proc/{pid}/comm").read_text().strip()


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _wait(check, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_job_child_is_forked_from_the_warm_process_which_starts_no_thread_pool(launcher, tmp_path):
    started = _start(launcher, tmp_path, _job(1, seconds=1.0, steps=4))
    assert started.warm
    warm = launcher.warm_pid()
    _wait(lambda: _ppid_and_name(started.child.pid)[1] == "gridfleet-job", "the child to name itself")
    assert _ppid_and_name(started.child.pid) == (warm, "gridfleet-job")
    assert _ppid_and_name(warm) == (os.getpid(), "gridfleet-warm")
    assert _result(_run(started)) == {"loss": 0.25, "steps": 4}
    assert started.child.exitcode == 0

    # Single-threaded once it has forked: importing numpy starts OpenBLAS's pool, whose own fork handler
    # shuts it down (nothing here uses BLAS to start it again). A tensor operation in the warm process would
    # start torch's OpenMP pool, and a child forked after that hangs on its first parallel operation.
    assert _threads(warm) == 1

    rnn = _start(launcher, tmp_path, _job(2, "gated_rnn", **TINY_RNN))  # real tensor ops in the forked child
    messages = _run(rnn)
    assert rnn.warm and rnn.child.exitcode == 0, messages
    assert [m[1] for m in messages if m[0] == "report"] == [1, 2, 3]
    assert _threads(warm) == 1  # the child's thread pools are the child's own


def test_segfault_ends_only_its_job_and_the_next_job_runs_warm(launcher, tmp_path):
    crashed = _start(launcher, tmp_path, _job(3, seconds=0.0, steps=3, segfault_at_step=1))
    warm = launcher.warm_pid()
    messages = _run(crashed)
    assert crashed.warm and crashed.child.exitcode == -signal.SIGSEGV
    assert [m[1] for m in messages if m[0] == "report"] == [1]  # it ran until the crash
    assert _result(messages) is None

    after = _start(launcher, tmp_path, _job(4, seconds=0.0, steps=2))
    assert after.warm and launcher.warm_pid() == warm  # the same warm process, still up
    assert _result(_run(after)) == {"loss": 0.5, "steps": 2}


def test_stop_flag_makes_the_warm_child_checkpoint_and_return(launcher, tmp_path):
    started = _start(launcher, tmp_path, _job(5, seconds=60.0, steps=60, checkpoint_every=1000))
    messages = _run(started, stop_after_first_report=True)
    assert started.warm and started.child.exitcode == 0
    [checkpoint] = [m[1]["step"] for m in messages if m[0] == "checkpoint"]  # only the one asked for
    assert checkpoint in (1, 2) and _result(messages) == {"stopped_at": checkpoint}  # 2: the ask came mid-step


def test_sigterm_to_the_job_child_still_preempts_it(launcher, tmp_path):
    started = _start(launcher, tmp_path, _job(6, seconds=60.0, steps=60, checkpoint_every=1000))
    _wait(lambda: started.receiver.poll(0.1), "the first report")  # the trainer's handler is in place
    os.kill(started.child.pid, signal.SIGTERM)
    messages = _run(started)
    [checkpoint] = [m[1]["step"] for m in messages if m[0] == "checkpoint"]
    assert ("stopped", "preempted") in messages and _result(messages) == {"stopped_at": checkpoint}
    assert started.child.exitcode == 0


def test_a_dead_warm_process_is_replaced(launcher, tmp_path):
    old = launcher.warm_pid()
    os.kill(old, signal.SIGKILL)  # idle
    _wait(lambda: _gone(old), "the warm process to die")
    started = _start(launcher, tmp_path, _job(7, seconds=0.0, steps=2))
    new = launcher.warm_pid()
    assert started.warm and new != old
    assert _result(_run(started)) == {"loss": 0.5, "steps": 2}

    # Killed while a job runs: the job goes with it (it must not outlive what would tell the agent its end),
    # is reported as killed, and the next job gets a new warm process.
    running = _start(launcher, tmp_path, _job(8, seconds=60.0, steps=60))
    _wait(lambda: running.receiver.poll(0.1), "the first report")
    os.kill(new, signal.SIGKILL)
    _run(running)
    assert running.child.exitcode == -signal.SIGKILL
    again = _start(launcher, tmp_path, _job(9, seconds=0.0, steps=1))
    assert again.warm and launcher.warm_pid() not in (old, new)
    assert _result(_run(again)) == {"loss": 1.0, "steps": 1}


def test_a_warm_process_that_never_gets_ready_is_replaced_and_the_job_starts_cold(tmp_path, monkeypatch):
    monkeypatch.setattr(warm, "READY_TIMEOUT", 1.0)
    launcher = Launcher(["noop"])
    try:
        launcher.prewarm()
        hung = launcher.warm_pid()
        os.kill(hung, signal.SIGSTOP)  # before it could say ready
        started = _start(launcher, tmp_path, _job(14, "noop"))
        assert not started.warm
        assert _result(_run(started)) == {"loss": 0.0}
        _wait(lambda: _gone(hung), "the hung warm process to be killed")
        monkeypatch.setattr(warm, "READY_TIMEOUT", 120.0)
        again = _start(launcher, tmp_path, _job(15, "noop"))
        assert again.warm and launcher.warm_pid() != hung  # a new one serves the next job
        assert _result(_run(again)) == {"loss": 0.0}
    finally:
        launcher.close()


def test_cold_starts_when_asked(tmp_path):
    launcher = Launcher(PRELOAD, warm=False)
    started = _start(launcher, tmp_path, _job(10, seconds=0.0, steps=1))
    assert not started.warm and launcher.warm_pid() is None
    assert _result(_run(started)) == {"loss": 1.0, "steps": 1}
    launcher.close()


# ---- pinned code_rev worktrees get their own warm process ------------------------------------------------
@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    return Upstream(project_remote(tmp_path_factory.mktemp("project")), tmp_path_factory.mktemp("upstream"))


def test_pinned_worktree_runs_its_own_code_warm_and_an_old_commit_cold(launcher, upstream, tmp_path):
    checkout = upstream.clone(tmp_path / "checkout")
    cache = CodeCache.open(checkout, None, tmp_path / "home")
    pinned = upstream.commit(noop_with_marker(upstream, "pinned"), "experiment", branch="exp")
    _, path = cache.worktree(pinned)

    started = _start(launcher, tmp_path, _job(11, "noop"), code_root=path)
    assert started.warm
    pinned_warm = launcher.warm_pid(path)
    assert pinned_warm not in (None, launcher.warm_pid())
    assert _result(_run(started)) == {"loss": 0.0, "marker": "pinned"}  # the worktree's noop.py ran
    own = _start(launcher, tmp_path, _job(12, "noop"))
    assert own.warm and _result(_run(own)) == {"loss": 0.0}  # and the agent's own code is untouched

    # A commit from before warm starts (no worker/warm.py) runs cold, from its own code.
    git(upstream.dev, "checkout", "--quiet", "main")
    (upstream.dev / "worker" / "warm.py").unlink()
    older = upstream.commit(noop_with_marker(upstream, "older"), "no warm process", branch="old")
    assert "worker/warm.py" not in git(upstream.dev, "ls-files", "worker")
    _, old_path = cache.worktree(older)
    cold = _start(launcher, tmp_path, _job(13, "noop"), code_root=old_path)
    assert not cold.warm and launcher.warm_pid(old_path) is None
    assert _result(_run(cold)) == {"loss": 0.0, "marker": "older"}
    assert (path / NOOP).read_text() != (old_path / NOOP).read_text()
