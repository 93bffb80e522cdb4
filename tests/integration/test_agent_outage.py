"""An agent whose API stays away longer than its client retries (ApiClient.retry_for) goes on serving: the
between-jobs calls that are not a job's own (the self-update report) are logged, never fatal.

A real ApiClient aimed at a port nobody listens on stands for the API outage.
"""
from __future__ import annotations

import logging

from tests.integration.test_pointers import closed_port
from worker.agent import Agent, AgentOptions
from worker.client import ApiClient


def test_a_self_update_report_the_api_cannot_take_is_logged_and_the_agent_goes_on(tmp_path, caplog):
    client = ApiClient(f"http://127.0.0.1:{closed_port()}", "gf_token", retry_for=0.3)
    agent = Agent(client, AgentOptions(home=tmp_path, trainers=["noop"]))
    agent.worker_id, agent.code_rev = "w", None  # as Agent.run sets them before its loop
    agent.update_report = {"state": "rolled_back", "message": "the new commit did not import"}
    with caplog.at_level(logging.WARNING, logger="gridfleet.worker"):
        agent._report_update()  # raised ServerUnavailable out of Agent.run before
    assert "self-update rolled_back not reported" in caplog.text
    assert "cannot reach the server" in caplog.text
    client.close()
