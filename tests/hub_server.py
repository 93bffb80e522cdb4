"""A small Hub-compatible HTTP server for tests, spoken to by the real huggingface_hub client.

It covers what HubStore needs: create repo, repo info, refs, tree, preupload (always "regular", so no LFS
or Xet), commit (NDJSON with base64 files) and resolve (HEAD/GET). Repos live in memory with real history:
every commit has a sha and a full file snapshot, so any old revision can still be downloaded.

Test controls: `fail_next(n, status, retry_after)` answers the next n requests with an error, `set_down(True)`
answers every request with a 503 until `set_down(False)`, `drop_next(n)`
closes the next n connections without an answer (a network outage), `requests` records (method, path,
status) of everything served, and only requests with `Authorization: Bearer <token>` get through (with a
`read_token`, that one may only read: GET/HEAD; writes need `token`).
"""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    summary: str
    files: dict[str, bytes]  # the full snapshot at this commit


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def commit(self, branch: str, summary: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f"{parent}\n{summary}\n{time.time_ns()}\n".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha(files[path]).encode())
        commit = Commit(digest.hexdigest(), parent, summary, files)
        self.commits[commit.sha] = commit
        self.branches[branch] = commit.sha
        return commit


class _Drop(Exception):
    pass


class HubServer:
    def __init__(self, token: str, read_token: str | None = None):
        self.token = token
        self.read_token = read_token
        self.down = False
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._faults: list[tuple[int, str | None]] = []  # (status or 0 for "drop", retry_after)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- lifecycle and controls ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None) -> None:
        with self._lock:
            self._faults.extend([(status, None if retry_after is None else str(retry_after))] * n)

    def set_down(self, down: bool) -> None:
        """While down, every request gets a 503 (an outage of any length)."""
        self.down = down

    def drop_next(self, n: int) -> None:
        with self._lock:
            self._faults.extend([(0, None)] * n)

    def statuses(self) -> list[int]:
        return [status for _, _, status in self.requests]

    # -- request handling ------------------------------------------------------------------------------
    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server._serve(self, "GET")

            def do_HEAD(self):
                server._serve(self, "HEAD")

            def do_POST(self):
                server._serve(self, "POST")

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
        if fault is None and self.down:
            fault = (503, None)
        if fault is not None and fault[0] == 0:
            self.requests.append((method, handler.path, 0))
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None:
            status, retry_after = fault
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            self._reply(handler, method, status, {"error": f"simulated {status}"}, headers)
            return
        auth = handler.headers.get("Authorization")
        if auth != f"Bearer {self.token}":
            if self.read_token is None or auth != f"Bearer {self.read_token}":
                self._reply(handler, method, 401, {"error": "Invalid credentials in Authorization header"})
                return
            if method == "POST":
                self._reply(handler, method, 403, {"error": "This token has read access only"})
                return
        try:
            status, payload, headers = self._route(method, handler.path, body)
        except Exception as exc:  # noqa: BLE001 - a server bug should show as a 500, not a hung test
            status, payload, headers = 500, {"error": f"test server error: {exc!r}"}, {}
        self._reply(handler, method, status, payload, headers)

    def _reply(self, handler, method, status, payload, headers=None) -> None:
        self.requests.append((method, handler.path, status))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data)

    def _route(self, method: str, raw_path: str, body: bytes):
        parts = [unquote(p) for p in urlsplit(raw_path).path.strip("/").split("/")]
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create(json.loads(body))
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo = self.repos.get(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            rest = parts[4:]
            if method == "GET" and not rest:
                return self._info(repo, "main")
            if method == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self._info(repo, rest[1])
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo)
            if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1], "/".join(rest[2:]))
            if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
                return self._preupload(repo, rest[1], json.loads(body))
            if method == "POST" and rest[0] == "commit" and len(rest) == 2:
                return self._commit(repo, rest[1], body)
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return 404, {"error": f"no route for {method} {raw_path}"}, {}

    def _create(self, payload: dict):
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        repo.commit("main", "initial commit", {".gitattributes": b"*.pt filter=lfs diff=lfs merge=lfs -text\n"})
        self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _info(self, repo: Repo, revision: str):
        commit = repo.resolve(revision)
        if commit is None:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return 200, {"id": repo.repo_id, "sha": commit.sha, "private": repo.private, "siblings": siblings}, {}

    def _refs(self, repo: Repo):
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": sha} for n, sha in repo.branches.items()]
        return 200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []}, {}

    def _tree(self, repo: Repo, revision: str, prefix: str):
        commit = repo.resolve(revision)
        if commit is None:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
            for path, data in sorted(commit.files.items())
            if path.startswith(prefix)
        ]
        return 200, entries, {}

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        commit = repo.resolve(revision)
        files = commit.files if commit else {}
        return 200, {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None,
                }
                for f in payload["files"]
            ]
        }, {}

    def _commit(self, repo: Repo, branch: str, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        with self._lock:
            current = repo.resolve(branch)
            if header.get("parentCommit") and current and header["parentCommit"] != current.sha:
                return 412, {"error": "A commit has happened since. Please refresh and try again."}, {}
            files = dict(current.files) if current else {}
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] != "header":
                    return 400, {"error": f"this test server does not support '{item['key']}'"}, {}
            commit = repo.commit(branch, header.get("summary", ""), files)
        return 200, {
            "success": True,
            "commitOid": commit.sha,
            "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.sha}",
        }, {}

    def _resolve(self, repo_id: str, revision: str, path: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        commit = repo.resolve(revision)
        if commit is None:
            return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
        if path not in commit.files:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.sha}
        data = commit.files[path]
        return 200, data, {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(data)}"'}
