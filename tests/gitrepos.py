"""Throwaway copies of this project as real git repositories, for the self-update and pinned-code tests.

`project_remote()` makes (once per session) a bare repository whose one commit is this project's work tree
as it is now (tracked and untracked-but-not-ignored files, so uncommitted work is tested too). A test copies
it (`Upstream`) and clones a worker checkout from the copy over file://. Commits are made in a separate
developer clone and pushed, exactly as a user would.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "gridfleet tests", "GIT_AUTHOR_EMAIL": "tests@gridfleet.invalid",
    "GIT_COMMITTER_NAME": "gridfleet tests", "GIT_COMMITTER_EMAIL": "tests@gridfleet.invalid",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    out = subprocess.run(["git", *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"git {' '.join(args)} in {cwd}: {out.stderr}"
    return out.stdout.strip()


def project_remote(base: Path) -> Path:
    """A bare repository holding this project's current work tree as the one commit of `main`."""
    src = base / "src"
    listed = git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    for rel in filter(None, listed.split("\0")):
        if (ROOT / rel).is_file():  # a file deleted but not yet committed is listed, and skipped
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    git(src, "init", "--quiet", "--initial-branch", "main")
    git(src, "add", "--all")
    git(src, "commit", "--quiet", "-m", "the project as it is")
    remote = base / "remote.git"
    git(base, "clone", "--quiet", "--bare", str(src), str(remote))
    return remote


class Upstream:
    """A private copy of the session's remote, plus a developer clone that commits and pushes to it."""

    def __init__(self, template: Path, where: Path):
        self.remote = where / "remote.git"
        shutil.copytree(template, self.remote)
        self.url = self.remote.as_uri()  # file:///...
        self.dev = where / "dev"
        git(where, "clone", "--quiet", self.url, str(self.dev))

    def clone(self, path: Path) -> Path:
        """A worker's checkout (its origin is the remote)."""
        git(path.parent, "clone", "--quiet", self.url, str(path))
        return path

    def commit(self, files: dict[str, str], message: str, branch: str = "main", push: bool = True) -> str:
        """Write `files` (path -> new text) on `branch` of the developer clone, commit, push; the new sha."""
        if git(self.dev, "branch", "--show-current") != branch:
            exists = git(self.dev, "branch", "--list", branch)
            git(self.dev, "checkout", "--quiet", *(() if exists else ("-b",)), branch)
        for rel, text in files.items():
            (self.dev / rel).write_text(text)
        git(self.dev, "add", "--all")
        git(self.dev, "commit", "--quiet", "-m", message)
        if push:
            git(self.dev, "push", "--quiet", "origin", branch)
        return git(self.dev, "rev-parse", "HEAD")

    def tag(self, name: str, sha: str) -> None:
        git(self.dev, "tag", name, sha)
        git(self.dev, "push", "--quiet", "origin", name)

    def read(self, rel: str) -> str:
        return (self.dev / rel).read_text()


NOOP = "worker/trainers/noop.py"
NOOP_RETURN = '    return {"loss": config.value}\n'


def noop_with_marker(upstream: Upstream, marker: str) -> dict[str, str]:
    """noop.py whose result also carries `marker`: a job's result proves which commit ran it."""
    text = upstream.read(NOOP)
    assert NOOP_RETURN in text, "tests/gitrepos.py expects noop.train to end with " + NOOP_RETURN
    return {NOOP: text.replace(NOOP_RETURN, f'    return {{"loss": config.value, "marker": "{marker}"}}\n')}
