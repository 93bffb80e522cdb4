"""The studio launcher (worker/studios.py) against a real gridfleet API over HTTP and an injected studio client.

The API is the real app (api.app:create_app, SQLite in tmp_path) served by uvicorn in a thread. The fake
client plays Lightning: starting a studio "boots" a worker that registers with the API under the name the
launcher exported (GRIDFLEET_WORKER_NAME), as deploy/studio_bootstrap.sh does. Time is a fake clock that
the launcher's sleep advances, so hours of batch delays take milliseconds.
"""
from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from api import tokens
from api.app import create_app
from common.db import make_engine
from common.settings import Settings
from worker.studios import Launcher, QueueApi, StudioSpec, UpOptions, load_studios

SEED002_STUDIOS = """{
    "studio_1": {"user": "testName", "apiKey": "%s", "userID": "uid-1", "teamspaceName": "Vision-model",
                 "studioName": "paper_no.6", "commandToRun": "python /teamspace/studios/this_studio/run.py"},
    "studio_2": {"user": "testName", "apiKey": "%s", "userID": "uid-1", "teamspaceName": "Vision-model",
                 "studioName": "paper_no.7", "commandToRun": "python /teamspace/studios/this_studio/run.py"}
}"""


# ---- a real API server -----------------------------------------------------------------------------------
class ApiServer:
    def __init__(self, tmp_path: Path):
        self.admin_token = "gf_test_admin_" + secrets.token_hex(16)
        settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'api.db'}",
                            admin_token=SecretStr(self.admin_token), home=tmp_path / "home")
        self.app = create_app(settings)
        engine = make_engine(settings.database_url)
        try:
            _, self.worker_token = tokens.create_token(engine, "worker", "studio workers")
        finally:
            engine.dispose()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the API server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.admin = httpx.Client(base_url=self.url + "/api/v1", timeout=30,
                                  headers={"Authorization": f"Bearer {self.admin_token}"})
        self.as_worker = httpx.Client(base_url=self.url + "/api/v1", timeout=30,
                                      headers={"Authorization": f"Bearer {self.worker_token}"})
        self.secrets: dict[str, str] = {}  # worker id -> the worker_secret its registration returned

    def call(self, client: httpx.Client, method: str, path: str, **kwargs) -> dict:
        response = client.request(method, path, **kwargs)
        assert response.status_code < 400, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def submit(self, name: str, jobs: int) -> None:
        self.call(self.admin, "POST", "/grids", json={"name": name, "trainer": "sleep", "config": {"seconds": 0},
                                                      "axes": {"steps": list(range(1, jobs + 1))}})

    def register(self, name: str) -> str:
        reply = self.call(self.as_worker, "POST", "/workers/register",
                          json={"name": name, "host": f"{name}-host", "trainers": ["sleep"]})
        self.secrets[reply["worker_id"]] = reply["worker_secret"]
        return reply["worker_id"]

    def as_(self, worker_id: str) -> dict[str, str]:
        """The headers of a call under /workers/{worker_id}/: that registration's secret."""
        return {"X-Gridfleet-Worker-Secret": self.secrets[worker_id]}

    def run_all(self, worker_id: str) -> int:
        """Claim and finish every queued job as `worker_id`; returns how many."""
        done = 0
        while (job := self.call(self.as_worker, "POST", f"/workers/{worker_id}/claim", headers=self.as_(worker_id),
                                json={"trainers": ["sleep"]})["job"]) is not None:
            self.call(self.as_worker, "POST", f"/workers/{worker_id}/finish", headers=self.as_(worker_id),
                      json={"job_id": job["id"], "attempt_id": job["attempt_id"], "outcome": "succeeded",
                            "result": {"loss": 1.0}})
            done += 1
        return done

    def close(self) -> None:
        self.admin.close()
        self.as_worker.close()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def api_server(tmp_path):
    server = ApiServer(tmp_path)
    yield server
    server.close()


# ---- a fake Lightning and a fake clock ---------------------------------------------------------------------
class FakeStudios:
    """StudioClient that records calls; a started studio's worker registers with the real API at once."""

    def __init__(self, server: ApiServer | None, clock: Callable[[], float], fail_start: set[str] = frozenset()):
        self.server, self.clock, self.fail_start = server, clock, fail_start
        self.calls: list[tuple] = []
        self.state: dict[str, str] = {}
        self.worker_ids: dict[str, str] = {}

    def start(self, name, machine, command, max_runtime=None):
        self.calls.append(("start", name, machine, command, max_runtime, self.clock()))
        if name in self.fail_start:
            raise RuntimeError(f"Requested machine is not available for {name}")
        self.state[name] = "Running"
        exported = re.match(r"export GRIDFLEET_WORKER_NAME=([^;\s]+)", command)
        if self.server is not None and exported:
            self.worker_ids[name] = self.server.register(exported.group(1).strip("'"))

    def stop(self, name):
        self.calls.append(("stop", name, self.clock()))
        self.state[name] = "Stopped"

    def status(self, name):
        return self.state.get(name, "Stopped")

    def starts(self) -> list[tuple[str, float]]:
        return [(c[1], c[5]) for c in self.calls if c[0] == "start"]

    def stops(self) -> dict[str, float]:
        return {c[1]: c[2] for c in self.calls if c[0] == "stop"}


class FakeTime:
    """clock() and sleep(); `at(t, action)` runs `action` once the clock has passed t."""

    def __init__(self):
        self.now = 0.0
        self.actions: list[tuple[float, Callable[[], None]]] = []

    def clock(self) -> float:
        return self.now

    def at(self, when: float, action: Callable[[], None]) -> None:
        self.actions.append((when, action))

    def sleep(self, seconds: float) -> None:
        assert self.now < 1e6, "the launcher never ended"
        self.now += seconds
        for item in [a for a in self.actions if a[0] <= self.now]:
            self.actions.remove(item)
            item[1]()


def spec(name: str, machine: str | None = "L4") -> StudioSpec:
    return StudioSpec(name=name, entry=name, teamspace="me/ts", api_key=SecretStr("lk_secret_" + name),
                      user_id="uid", command="bash boot.sh", machine=machine)


def launcher(server: ApiServer, fake_time: FakeTime, client: FakeStudios, lines: list[str], **options) -> Launcher:
    api = QueueApi(server.url, server.admin_token)
    return Launcher(client, api, UpOptions(**options), clock=fake_time.clock, sleep=fake_time.sleep,
                    echo=lines.append)


# ---- tests -------------------------------------------------------------------------------------------------
def test_batches_start_with_delays_and_all_stop_when_the_queue_drains(api_server):
    api_server.submit("grid-a", jobs=4)
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock)
    # At t=250 s the first studio's worker trains everything.
    fake_time.at(250, lambda: api_server.run_all(client.worker_ids["s1"]))
    studios = [spec(f"s{i}") for i in range(1, 6)]
    outcome = launcher(api_server, fake_time, client, lines, batch_size=2, batch_delay=100, poll_seconds=10).up(studios)

    assert client.starts() == [("s1", 0), ("s2", 0), ("s3", 100), ("s4", 100), ("s5", 200)], lines
    assert outcome.drained and outcome.started == ["s1", "s2", "s3", "s4", "s5"] and not outcome.failed
    stops = client.stops()
    assert set(stops) == {"s1", "s2", "s3", "s4", "s5"}, lines
    assert all(250 <= t <= 260 for t in stops.values()), (stops, lines)  # the first poll after the drain
    assert all(state == "Stopped" for state in client.state.values())
    # It heard back: every studio's worker registered, and the output says so.
    assert outcome.reported == ["s1", "s2", "s3", "s4", "s5"]
    assert sum("reported in" in line for line in lines) == 5, lines
    assert "queue drained: nothing queued or running" in lines
    # The command exports the worker's name; the machine is passed as given.
    first = next(c for c in client.calls if c[0] == "start")
    assert first[2] == "L4" and first[3] == "export GRIDFLEET_WORKER_NAME=s1; bash boot.sh" and first[4] is None


def test_later_batches_are_not_started_once_the_queue_is_drained(api_server):
    api_server.submit("grid-b", jobs=2)
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock)
    fake_time.at(150, lambda: api_server.run_all(client.worker_ids["s2"]))
    outcome = launcher(api_server, fake_time, client, lines, batch_size=1, batch_delay=100, poll_seconds=30).up(
        [spec("s1"), spec("s2"), spec("s3")])
    assert [name for name, _ in client.starts()] == ["s1", "s2"], lines
    assert outcome.drained and outcome.not_started == ["s3"]
    assert set(client.stops()) == {"s1", "s2"}


def test_nothing_queued_starts_nothing(api_server):
    api_server.submit("grid-c", jobs=1)
    api_server.run_all(api_server.register("elsewhere"))
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock)
    outcome = launcher(api_server, fake_time, client, lines).up([spec("s1")])
    assert outcome.drained and client.calls == [] and outcome.not_started == ["s1"]


def test_a_paused_grid_does_not_keep_studios_running(api_server):
    api_server.submit("grid-p", jobs=3)
    api_server.call(api_server.admin, "POST", "/grids/grid-p/pause")
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock)
    outcome = launcher(api_server, fake_time, client, lines).up([spec("s1")])
    assert outcome.drained and client.calls == []


def test_running_jobs_keep_studios_up_until_they_finish(api_server):
    api_server.submit("grid-r", jobs=1)
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock)
    claimed: dict = {}

    def claim():  # the job runs from t=20 ...
        worker_id = client.worker_ids["s1"]
        claimed.update(api_server.call(api_server.as_worker, "POST", f"/workers/{worker_id}/claim",
                                       headers=api_server.as_(worker_id), json={"trainers": ["sleep"]})["job"])

    def finish():  # ... to t=500
        worker_id = client.worker_ids["s1"]
        api_server.call(api_server.as_worker, "POST", f"/workers/{worker_id}/finish", headers=api_server.as_(worker_id),
                        json={"job_id": claimed["id"], "attempt_id": claimed["attempt_id"], "outcome": "succeeded",
                              "result": {"loss": 0.5}})

    fake_time.at(20, claim)
    fake_time.at(500, finish)
    outcome = launcher(api_server, fake_time, client, lines, poll_seconds=10).up([spec("s1")])
    assert outcome.drained and 500 <= client.stops()["s1"] <= 510, lines


def test_max_run_time_stops_each_studio_after_its_budget_then_the_next_batch_runs(api_server):
    api_server.submit("grid-m", jobs=5)  # never trained here: the budgets run out first
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock)
    outcome = launcher(api_server, fake_time, client, lines, batch_size=1, batch_delay=3600, poll_seconds=60,
                       max_run_time=3300, stop_margin=300).up([spec("s1"), spec("s2")])
    assert client.starts() == [("s1", 0), ("s2", 3600)]
    assert client.stops() == {"s1": 3600, "s2": 7200}, lines
    assert not outcome.drained and not outcome.failed
    start = next(c for c in client.calls if c[0] == "start")
    assert start[3] == "export GRIDFLEET_WORKER_NAME=s1 GRIDFLEET_MAX_RUN_TIME=3300; bash boot.sh"
    assert start[4] == 3600  # Lightning's own allocation ends with our budget too
    assert any("run `gridfleet studios up` again" in line for line in lines)


def test_a_studio_that_fails_to_start_does_not_stop_the_others_and_no_secret_is_shown(api_server):
    api_server.submit("grid-f", jobs=1)
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock, fail_start={"s1"})
    fake_time.at(40, lambda: api_server.run_all(client.worker_ids["s2"]))
    outcome = launcher(api_server, fake_time, client, lines, batch_size=2, poll_seconds=20).up(
        [spec("s1"), spec("s2")])
    assert outcome.drained and outcome.started == ["s2"]
    assert "not available" in outcome.failed["s1"]
    assert client.stops() == {"s1": 0, "s2": 40}  # a failed start may still have left the machine up
    assert "lk_secret" not in "\n".join(lines) + repr(outcome) + repr(spec("s1"))


def test_workers_not_started_by_this_run_are_not_counted(api_server):
    api_server.submit("grid-w", jobs=1)
    api_server.register("s1")  # an old worker with the same name, registered before `up`
    fake_time, lines = FakeTime(), []
    client = FakeStudios(None, fake_time.clock)  # these studios' workers never report in
    fake_time.at(100, lambda: api_server.run_all(api_server.register("someone-else")))
    outcome = launcher(api_server, fake_time, client, lines, poll_seconds=10, report_timeout=50).up([spec("s1")])
    assert outcome.drained and outcome.reported == []
    assert any("s1: no worker reported in after 50 s" in line for line in lines), lines


def test_interrupt_stops_the_studios_it_started(api_server):
    api_server.submit("grid-i", jobs=1)
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock)

    def interrupt():
        raise KeyboardInterrupt

    fake_time.at(30, interrupt)
    with pytest.raises(KeyboardInterrupt):
        launcher(api_server, fake_time, client, lines, batch_size=1, batch_delay=20, poll_seconds=10).up(
            [spec("s1"), spec("s2"), spec("s3")])
    assert set(client.stops()) == {"s1", "s2"}


def test_seed002_studios_json_drives_the_launcher(api_server, tmp_path):
    path = tmp_path / "studios.json"
    path.write_text(SEED002_STUDIOS % ("key-one", "key-two"))
    studios = load_studios(path)
    api_server.submit("grid-s", jobs=1)
    fake_time, lines = FakeTime(), []
    client = FakeStudios(api_server, fake_time.clock)
    fake_time.at(10, lambda: api_server.run_all(client.worker_ids["paper_no.6"]))
    outcome = launcher(api_server, fake_time, client, lines, batch_size=2).up(studios)
    assert outcome.drained and outcome.reported == ["paper_no.6", "paper_no.7"]
    command = next(c for c in client.calls if c[0] == "start")[3]
    assert command == "export GRIDFLEET_WORKER_NAME=paper_no.6; python /teamspace/studios/this_studio/run.py"


def test_queue_api_errors_are_clear(api_server):
    bad = QueueApi(api_server.url, "gf_wrong_token")
    with pytest.raises(RuntimeError, match="401"):
        bad.pending()
    bad.close()


def test_cli_up_end_to_end_with_an_injected_client(api_server, tmp_path, monkeypatch):
    """`gridfleet studios up` over HTTP: the studio's worker reports in, trains the queue, the studio is stopped."""
    from typer.testing import CliRunner

    from cli.main import app
    from worker import studios

    clients = []

    class Injected(FakeStudios):
        def __init__(self, specs):
            super().__init__(api_server, time.monotonic)
            clients.append(self)

        def start(self, name, machine, command, max_runtime=None):
            super().start(name, machine, command, max_runtime)
            api_server.run_all(self.worker_ids[name])  # a fast worker

    monkeypatch.setattr(studios, "LightningStudios", Injected)
    path = tmp_path / "studios.json"
    path.write_text(SEED002_STUDIOS % ("key-one", "key-two"))
    api_server.submit("grid-cli", jobs=2)
    result = CliRunner().invoke(app, ["studios", "up", str(path), "--server", api_server.url, "--token",
                                      api_server.admin_token, "--poll", "1", "--max-run-time", "1h"])
    assert result.exit_code == 0, result.output
    assert "queue: 2 queued, 0 running; 2 studios" in result.output
    assert "studio paper_no.6: worker" in result.output and "reported in" in result.output
    assert "workers reported in from: paper_no.6" in result.output
    assert [name for name, _ in clients[0].starts()] == ["paper_no.6"]  # the queue drained before batch 2
    assert clients[0].stops().keys() == {"paper_no.6"}
    assert api_server.admin_token not in result.output and "key-one" not in result.output
