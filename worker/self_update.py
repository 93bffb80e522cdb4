"""Self-update (`gridfleet worker --self-update`): between jobs, move this checkout to the newest commit of a
remote ref, and re-exec the agent on it.

One check (`SelfUpdater.check`): fetch the ref into `refs/gridfleet/self-update`; when it moved, refuse a
dirty work tree; check the new commit out (detached: the checkout follows the remote ref, force-pushes
included); reinstall only when dependency files changed; import the agent and the trainers it serves in a
fresh interpreter. Any failure checks the old commit out again, and the agent keeps serving on it. Only on
success does the agent `os.execv` itself (same pid, same command line), so a running job is never touched
and a broken commit never takes a worker down.
"""
from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from worker.code_cache import CodeCache
from worker.gitrepo import (
    GitError,
    changed_files,
    checkout_root,
    dirty_files,
    git,
    head,
    remote_url,
)

log = logging.getLogger("gridfleet.worker")

UPDATE_REF = "refs/gridfleet/self-update"
HANDOFF_FILE = "self_update.json"
IMPORT_TIMEOUT = 300.0  # importing torch-based trainers on a slow disk
INSTALL_TIMEOUT = 1800.0
# What the re-exec'd agent imports first; a commit where these (or a served trainer) fail is rolled back.
ENTRY_MODULES = ("cli.main", "worker.agent", "worker.runner")
_IMPORT_CHECK = """
import importlib, sys
sys.path.insert(0, sys.argv[1])  # the checkout first: never the copy an editable install maps elsewhere
for name in sys.argv[2].split(","):
    importlib.import_module(name)
from worker import trainers
for name in filter(None, sys.argv[3].split(",")):
    trainers.load(name)
"""


class UpdateFailed(RuntimeError):
    pass


# ---- which files mean "reinstall" ----------------------------------------------------------------
PACKAGE_FILES = ("pyproject.toml", "setup.py", "setup.cfg")  # at the top of the checkout
REQUIREMENTS = "requirements*.txt"  # anywhere (requirements/gpu.txt style folders are not matched)


def dependency_files(paths: list[str]) -> list[str]:
    """The paths among `paths` (relative to the checkout) that change what must be installed."""
    return [p for p in paths if p in PACKAGE_FILES or fnmatch.fnmatch(Path(p).name, REQUIREMENTS)]


def dependency_changes(repo: Path, old: str, new: str) -> list[str]:
    """Dependency files that differ between two commits: empty means no reinstall is needed."""
    return dependency_files(changed_files(repo, old, new))


def pip_install(python: str, repo: Path, changed: list[str]) -> None:
    """Reinstall what changed: the package itself (editable, so the checkout stays what runs) when its
    metadata changed, and each changed requirements file that still exists."""
    commands = []
    if any(p in PACKAGE_FILES for p in changed):
        commands.append([python, "-m", "pip", "install", "--quiet", "-e", str(repo)])
    for path in changed:
        if path not in PACKAGE_FILES and (repo / path).exists():
            commands.append([python, "-m", "pip", "install", "--quiet", "-r", str(repo / path)])
    for command in commands:
        try:
            out = subprocess.run(command, check=False, cwd=repo, capture_output=True, text=True,
                                 timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpdateFailed(f"{' '.join(command[2:])}: {exc}") from None
        if out.returncode != 0:
            raise UpdateFailed(f"{' '.join(command[2:])} failed: {_tail(out.stdout + out.stderr)}")


# ---- one check -----------------------------------------------------------------------------------
@dataclass
class UpdateResult:
    state: str  # current | updated | dirty | rolled_back | fetch_failed
    old: str | None = None
    new: str | None = None
    message: str = ""
    reinstalled: list[str] = field(default_factory=list)
    time: float = field(default_factory=time.time)

    def report(self) -> dict[str, Any]:
        """What the agent shows in its registration (GET /api/v1/workers -> resources.self_update)."""
        return asdict(self)


class SelfUpdater:
    def __init__(self, repo: Path, remote: str, ref: str, trainers: list[str], interval: float = 60.0,
                 python: str = sys.executable,
                 install: Callable[[str, Path, list[str]], None] = pip_install):
        self.repo = repo
        self.remote = remote
        self.ref = ref
        self.trainers = trainers
        self.interval = interval
        self.python = python
        self.install = install
        self.running = head(repo)  # the commit this process loaded (HEAD may move under it: see check)
        common_dir = git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir")
        self._lock = Path(common_dir) / "gridfleet-self-update.lock"
        self._next_check = 0.0
        self._refused: dict[str, str] = {}  # "sha:state" of refusals already reported

    def due(self) -> UpdateResult | None:
        """`check()` at most every `interval` seconds; None when not due, or when there is nothing new to
        report (already current, or a target already refused)."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self.interval
        result = self.check()
        if result.state == "current":
            return None
        if result.state in ("dirty", "rolled_back", "fetch_failed"):
            key = f"{result.new}:{result.state}"
            if self._refused.get(key):
                return None  # said once for this commit; say again only when the ref moves
            self._refused[key] = result.state
        return result

    def check(self) -> UpdateResult:
        # Several agents may share one checkout (one per GPU): one updates it at a time, and the others
        # then find HEAD already at the target and only re-exec.
        with _locked(self._lock):
            return self._check()

    def _check(self) -> UpdateResult:
        try:
            git(self.repo, "fetch", "--quiet", "--no-tags", self.remote, f"+{self.ref}:{UPDATE_REF}")
            target = git(self.repo, "rev-parse", f"{UPDATE_REF}^{{commit}}")
            old = head(self.repo)
            dirty = dirty_files(self.repo)
        except GitError as exc:
            log.warning("self-update: fetching %s of %s failed: %s; keep serving", self.ref, self.remote, exc)
            return UpdateResult("fetch_failed", message=str(exc))
        if target == self.running:
            return UpdateResult("current", old, target)
        if target == old:  # another agent on this checkout moved it there, and checked it (under the lock)
            return UpdateResult("updated", self.running, target,
                                f"updated {self.running[:12]} -> {target[:12]} (checked out by another agent)")
        if self._refused.get(f"{target}:rolled_back"):
            return UpdateResult("rolled_back", old, target, "already rolled back once")
        if dirty:
            shown = ", ".join(dirty[:5]) + (" ..." if len(dirty) > 5 else "")
            message = (f"refusing to update {old[:12]} -> {target[:12]}: the work tree has uncommitted changes "
                       f"({shown}); commit or discard them")
            log.warning("self-update: %s; keep serving %s", message, old[:12])
            return UpdateResult("dirty", old, target, message)
        return self._move(old, target)

    def _move(self, old: str, target: str) -> UpdateResult:
        branch = _current_branch(self.repo)
        changed: list[str] = []
        installed = False
        log.info("self-update: %s -> %s (%s %s)", old[:12], target[:12], self.remote, self.ref)
        try:
            changed = dependency_changes(self.repo, old, target)
            git(self.repo, "checkout", "--quiet", "--detach", target)
            if changed:
                log.info("self-update: dependency files changed (%s); reinstalling", ", ".join(changed))
                installed = True
                self.install(self.python, self.repo, changed)
            self._import_check()
        except (GitError, UpdateFailed) as exc:
            self._roll_back(old, branch, changed if installed else [])
            message = f"commit {target} rolled back: {exc}"
            log.error("self-update: %s; keep serving %s", message, old[:12])
            return UpdateResult("rolled_back", old, target, message, changed)
        return UpdateResult("updated", old, target, f"updated {old[:12]} -> {target[:12]}", changed)

    def _import_check(self) -> None:
        command = [self.python, "-c", _IMPORT_CHECK, str(self.repo), ",".join(ENTRY_MODULES), ",".join(self.trainers)]
        try:
            out = subprocess.run(command, check=False, cwd=self.repo, capture_output=True, text=True,
                                 timeout=IMPORT_TIMEOUT, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpdateFailed(f"import check: {exc}") from None
        if out.returncode != 0:
            raise UpdateFailed(f"import check failed: {_tail(out.stderr or out.stdout)}")

    def _roll_back(self, old: str, branch: str | None, reinstall: list[str]) -> None:
        try:
            # Back to the branch when we were on one that still points at the old commit, else detached.
            if branch and git(self.repo, "rev-parse", f"refs/heads/{branch}") == old:
                git(self.repo, "checkout", "--quiet", branch)
            else:
                git(self.repo, "checkout", "--quiet", "--detach", old)
        except GitError as exc:
            log.error("self-update: cannot check %s out again: %s", old[:12], exc)
            return
        if reinstall:  # the failed commit's install may have changed packages: install the old ones again
            try:
                self.install(self.python, self.repo, reinstall)
            except UpdateFailed as exc:
                log.error("self-update: reinstalling %s's dependencies failed: %s", old[:12], exc)


@contextmanager
def _locked(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _current_branch(repo: Path) -> str | None:
    try:
        return git(repo, "symbolic-ref", "--quiet", "--short", "HEAD") or None
    except GitError:
        return None  # detached


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---- wiring (the CLI passes settings in) ---------------------------------------------------------
def prepare(code_dir: Path, home: Path, remote: str | None, ref: str, enabled: bool, interval: float,
            trainers: list[str] | None) -> tuple[CodeCache | None, SelfUpdater | None]:
    """(cache for pinned code_revs or None, self-updater or None) for the checkout holding `code_dir`.

    The cache is None when there is no checkout or its remote cannot be fetched now: such a worker does not
    claim pinned jobs. Self-update without a checkout is an error (UpdateFailed); an unreachable remote is
    not (each later check tries again, and the worker serves meanwhile)."""
    from worker import trainers as known

    remote = remote_url(remote)
    cache = CodeCache.open(code_dir, remote, home)
    if not enabled:
        return cache, None
    repo = checkout_root(code_dir)
    if repo is None:
        raise UpdateFailed(f"--self-update needs the worker to run from a git checkout; {code_dir} is not in one")
    updater = SelfUpdater(repo, remote or "origin", ref, trainers or known.known_trainers(), interval=interval)
    log.info("self-update: following %s of %s every %g s (between jobs), from %s at %s",
             ref, updater.remote, interval, repo, head(repo)[:12])
    return cache, updater


# ---- re-exec, and what survives it ---------------------------------------------------------------
def write_handoff(home: Path, started: float, jobs_done: int, report: dict[str, Any]) -> None:
    """What the re-exec'd agent (same pid) carries on with: its --max-run-time clock (time.monotonic is
    system-wide, so it survives exec), --max-jobs count, and the update to report."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / HANDOFF_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "started": started, "jobs_done": jobs_done,
                               "last": report}))
    os.replace(tmp, path)


def read_handoff(home: Path) -> dict[str, Any] | None:
    """The handoff this very process (same pid: we were exec'd) wrote before its re-exec, else None."""
    path = home / HANDOFF_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("pid") != os.getpid():
        return None  # an older agent's: this is a fresh start
    path.unlink(missing_ok=True)
    return data


def reexec() -> NoReturn:
    """Replace this process with a fresh interpreter running the same command line (same pid, so a
    supervisor and the process group see one long-lived worker). sys.orig_argv keeps `-m cli` or
    the console script exactly as started; sys.executable makes argv[0] an absolute path."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
