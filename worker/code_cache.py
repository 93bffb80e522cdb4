"""Pinned code: a grid's `code_rev` runs from a cached git worktree of that commit, <home>/code/<sha>.

Worktrees share the checkout's object store, so a cached commit costs only its files. A rev that is not
here is fetched from the remote (branches and tags into refs/gridfleet/*, then the sha itself, which
GitHub and most servers allow). `start_child` starts the job's child process so that it imports that
worktree's packages, not the agent's.
"""
from __future__ import annotations

import fcntl
import logging
import re
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from worker.gitrepo import (
    FULL_SHA,
    GitError,
    checkout_root,
    dirty_files,
    git,
    head,
    resolve,
)

log = logging.getLogger("gridfleet.worker")
HEXISH = re.compile(r"^[0-9a-f]{4,64}$")
FETCH_REFSPECS = ("+refs/heads/*:refs/gridfleet/heads/*", "+refs/tags/*:refs/gridfleet/tags/*")


class CodeUnavailable(RuntimeError):
    """This worker cannot get the pinned commit; the job's attempt ends as `error` with this message."""


class CodeCache:
    def __init__(self, repo: Path, remote: str, root: Path):
        self.repo = repo
        self.remote = remote
        self.root = root.resolve()

    @classmethod
    def open(cls, code_dir: Path, remote: str | None, home: Path) -> CodeCache | None:
        """A cache for the checkout holding `code_dir`, or None (and the worker must not claim pinned jobs)
        when there is no checkout or its remote cannot be fetched. Without `remote`, the checkout's origin."""
        repo = checkout_root(code_dir)
        if repo is None:
            log.info("not running from a git checkout: jobs with a pinned code_rev are left to other workers")
            return None
        cache = cls(repo, remote or "origin", home / "code")
        try:
            cache.fetch()
        except GitError as exc:
            log.warning("cannot fetch %s (%s): jobs with a pinned code_rev are left to other workers",
                        cache.remote, exc)
            return None
        return cache

    def fetch(self) -> None:
        git(self.repo, "fetch", "--quiet", "--no-tags", "--prune", self.remote, *FETCH_REFSPECS)

    def resolve(self, rev: str) -> str:
        """The full sha `rev` (a sha, short sha, tag or branch of the remote) names; fetches when needed."""
        if rev.startswith("-"):
            raise CodeUnavailable(f"code_rev '{rev}' is not a git revision")
        # A sha or a tag is immutable: use it when it is already here. A branch is read fresh from the remote.
        candidates = [f"refs/gridfleet/tags/{rev}", f"refs/gridfleet/heads/{rev}", rev]
        found = resolve(self.repo, rev) if HEXISH.match(rev) else resolve(self.repo, candidates[0])
        if found:
            return found
        try:
            self.fetch()
        except GitError as exc:
            raise CodeUnavailable(f"cannot fetch code_rev '{rev}' from {self.remote}: {exc}") from None
        for name in candidates:
            if found := resolve(self.repo, name):
                return found
        if FULL_SHA.match(rev):  # not on any branch or tag: ask for the commit itself
            try:
                git(self.repo, "fetch", "--quiet", "--no-tags", self.remote, rev)
            except GitError as exc:
                log.info("fetching %s by sha: %s", rev, exc)
            if found := resolve(self.repo, rev):
                return found
        raise CodeUnavailable(f"code_rev '{rev}' names no commit in {self.remote} (no such branch, tag or sha)")

    def worktree(self, rev: str) -> tuple[str, Path]:
        """(full sha, path of a clean worktree of it), made with `git worktree add --detach` when missing."""
        with self._locked():  # agents sharing a home must not fetch or build one worktree at once
            sha = self.resolve(rev)
            path = self.root / sha
            try:
                if path.exists() and not _clean_at(path, sha):
                    log.warning("cached worktree %s is not a clean checkout of %s; making it again", path, sha)
                    _remove(self.repo, path)
                if not path.exists():
                    git(self.repo, "worktree", "prune")  # forget worktrees whose folders were deleted
                    git(self.repo, "worktree", "add", "--quiet", "--detach", str(path), sha)
                    log.info("code_rev %s: worktree %s", rev, path)
            except (GitError, OSError) as exc:
                raise CodeUnavailable(f"cannot make a worktree of code_rev '{rev}' ({sha}): {exc}") from None
        return sha, path

    @contextmanager
    def _locked(self):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / ".lock", "w")  # noqa: SIM115 - closed below, after the body
        except OSError as exc:
            raise CodeUnavailable(f"cannot use the code cache {self.root}: {exc}") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def _clean_at(path: Path, sha: str) -> bool:
    if not (path / ".git").is_file():  # a worktree has a .git file; any other folder is not ours to trust
        return False
    try:
        return head(path) == sha and not dirty_files(path)
    except GitError:
        return False


def _remove(repo: Path, path: Path) -> None:
    try:
        git(repo, "worktree", "remove", "--force", str(path))
    except GitError:  # not a registered worktree (a leftover folder): delete it
        shutil.rmtree(path)


_spawn_lock = threading.Lock()


def start_child(process, code_root: Path | None) -> None:
    """Start a multiprocessing "spawn" child; with `code_root`, one that runs that worktree's code.

    A spawn child replaces its sys.path with the parent's sys.path *as it is at start()*, then imports the
    target (`worker.runner.run_job`) and the parent's main module (`cli.main`, or none for `python -m cli`) by name. Putting the worktree
    first on sys.path for the duration of start() therefore makes the child import every gridfleet package,
    and the trainers, from the worktree, while this process keeps its own modules (already imported, so
    untouched). The lock keeps two starts from interleaving their sys.path edits.
    """
    if code_root is None:
        process.start()
        return
    with _spawn_lock:
        saved = list(sys.path)
        sys.path.insert(0, str(code_root))
        try:
            process.start()
        finally:
            sys.path[:] = saved
