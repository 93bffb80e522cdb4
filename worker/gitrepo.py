"""The few git commands self-update and pinned code need, run through the real `git` binary.

Every call has a timeout and raises `GitError` with git's own message, so a hung or failing remote never
blocks or crashes the agent; callers decide whether that means "keep serving" or "fail this job".
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

GIT_TIMEOUT = 120.0  # a fetch over a slow link; local commands take milliseconds
FULL_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")  # sha-1, or sha-256 repositories
# "owner/repo" as seed 002's `.env` key `code_base_link` holds it (a GitHub repository id)
GITHUB_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


class GitError(RuntimeError):
    pass


def git(repo: Path, *args: str, timeout: float = GIT_TIMEOUT) -> str:
    """Run `git args...` in `repo`; its stdout without trailing newlines (leading blanks carry meaning in
    `git status --porcelain`). GitError on failure, with git's message."""
    try:
        out = subprocess.run(["git", *args], check=False, cwd=repo, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"git {' '.join(args)}: {exc}") from None
    if out.returncode != 0:
        message = (out.stderr or out.stdout).strip() or f"exit code {out.returncode}"
        raise GitError(f"git {' '.join(args)}: {message}")
    return out.stdout.rstrip("\n")


def checkout_root(path: Path) -> Path | None:
    """The top of the git work tree that holds `path`, or None when it is not in one (or git is missing)."""
    try:
        return Path(git(path, "rev-parse", "--show-toplevel", timeout=10))
    except GitError:
        return None


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD")


def resolve(repo: Path, rev: str) -> str | None:
    """The full sha of the commit `rev` names in `repo`, or None when it names none here."""
    if rev.startswith("-"):  # never let a rev from a grid spec become a git option
        return None
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}") or None
    except GitError:
        return None


def dirty_files(repo: Path) -> list[str]:
    """Tracked files with uncommitted changes. Untracked files do not count: `git checkout` itself refuses
    to overwrite one, and ignored state (.venv, .gridfleet) lives in most checkouts."""
    out = git(repo, "status", "--porcelain", "--untracked-files=no")
    return [line[3:] for line in out.splitlines() if line.strip()]


def changed_files(repo: Path, old: str, new: str) -> list[str]:
    """Paths that differ between two commits."""
    out = git(repo, "diff", "--name-only", "--no-renames", old, new, "--")
    return [line for line in out.splitlines() if line]


def remote_url(value: str | None) -> str | None:
    """A remote as the user wrote it: a URL, a path, a remote name ("origin"), or seed 002's
    `code_base_link` GitHub id ("owner/repo", made a GitHub https URL)."""
    if not value:
        return None
    value = value.strip()
    if GITHUB_ID.match(value) and not Path(value).exists():
        return f"https://github.com/{value}.git"
    return value
