"""A fleet actor runs one agent loop per incarnation (worker/fleet.py): a second `run` call, from a caller that
lost the first one's reply, waits for the same loop and returns its exit code instead of starting another
agent beside it."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from worker import fleet
from worker.agent import AgentOptions


class _BlockingAgent:
    """Stands in for worker.agent.Agent: its loop runs until released; every instance is recorded."""

    made: list["_BlockingAgent"] = []
    running = threading.Event()
    release = threading.Event()

    def __init__(self, _client, _options):
        _BlockingAgent.made.append(self)

    def run(self) -> int:
        _BlockingAgent.running.set()
        assert _BlockingAgent.release.wait(timeout=30)
        return 7

    @classmethod
    def reset(cls) -> None:
        cls.made.clear()
        cls.running.clear()
        cls.release.clear()


def test_a_second_run_call_waits_for_the_same_agent_loop(monkeypatch, tmp_path):
    _BlockingAgent.reset()
    monkeypatch.setattr(fleet, "Agent", _BlockingAgent)
    actor = fleet.WorkerActor(0, "http://127.0.0.1:9", "token", AgentOptions(home=tmp_path))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(actor.run)
        assert _BlockingAgent.running.wait(timeout=30)
        second = pool.submit(actor.run)
        assert not second.done()  # it waits for the loop that runs
        _BlockingAgent.release.set()
        assert (first.result(timeout=30), second.result(timeout=30)) == (7, 7)
    assert len(_BlockingAgent.made) == 1
    assert actor.run() == 7 and len(_BlockingAgent.made) == 1  # the loop ended: this incarnation is done


def test_a_stopped_actor_starts_no_agent(monkeypatch, tmp_path):
    _BlockingAgent.reset()
    monkeypatch.setattr(fleet, "Agent", _BlockingAgent)
    actor = fleet.WorkerActor(0, "http://127.0.0.1:9", "token", AgentOptions(home=tmp_path))
    actor.stop()
    assert actor.run() == 0 and _BlockingAgent.made == []
