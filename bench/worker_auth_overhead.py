"""CPU per worker request spent before the route runs (routing, token, worker secret), per code revision.

    .venv/bin/python bench/worker_auth_overhead.py                 # this checkout
    .venv/bin/python bench/worker_auth_overhead.py /tmp/old .      # another tree (e.g. `git archive`) vs this one

Each tree runs in its own process: the real app (`api.app.create_app`, SQLite in a temp dir) called through
its ASGI callable in one event loop, no client and no server, with POST /workers/{id}/finish and a body that
fails validation, so the request stops with a 422 right after the dependencies and touches no database.
Prints the best of 7 rounds of 2,000 requests, in microseconds of process CPU. An older tree needs this
checkout's newest migration copied in when its schema is older (the script does not migrate down).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROUNDS, REQUESTS, WARMUP = 7, 2000, 500

MEASURE = r'''
import asyncio, json, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from pydantic import SecretStr
from api.app import create_app
from common.settings import Settings

tmp = tempfile.mkdtemp()
app = create_app(Settings(_env_file=None, database_url=f"sqlite:///{tmp}/db.sqlite",
                          admin_token=SecretStr("a" * 40), home=tmp))


async def call(path, body, headers):
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
             + [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": app}
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}

    out = {"body": b""}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        else:
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return out


async def main(rounds, requests, warmup):
    headers = {"Authorization": "Bearer " + "a" * 40}
    reply = json.loads((await call("/api/v1/workers/register", {"name": "w", "host": "h"}, headers))["body"])
    if "worker_secret" in reply:  # trees from before worker secrets have none
        headers["X-Gridfleet-Worker-Secret"] = reply["worker_secret"]
    path = f"/api/v1/workers/{reply['worker_id']}/finish"
    for _ in range(warmup):
        assert (await call(path, {"job_id": "x"}, headers))["status"] == 422
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(requests):
            await call(path, {"job_id": "x"}, headers)
        best = min(best, (time.process_time() - start) / requests * 1e6)
    print(f"{best:.0f}")


asyncio.run(main(*map(int, sys.argv[2:5])))
'''


def measure(tree: Path) -> str:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tree), str(ROUNDS), str(REQUESTS), str(WARMUP)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    return f"{done.stdout.strip()} us CPU per request"


def main() -> int:
    trees = [Path(p).resolve() for p in (sys.argv[1:] or ["."])]
    print(f"POST /workers/{{id}}/finish stopped by a 422 after its dependencies; best of {ROUNDS} x {REQUESTS}")
    for tree in trees:
        print(f"  {tree}: {measure(tree)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
