"""Real Agents in threads of the test process (their job children are real processes), for tests that drive
the agent's own loop against a queue without `gridfleet worker` processes; tests/conftest.py's
`start_agent` fixture starts them and stops each at teardown, also when the test failed."""
from __future__ import annotations

import threading
from pathlib import Path

from worker.agent import Agent, AgentOptions


class Running:
    """An Agent on `client` (worker/client.py) in a thread, homed at `home`."""

    def __init__(self, client, home: Path, trainers: list[str], max_gang: int = 1, warm: bool = True,
                 grid_id: int | None = None):
        options = AgentOptions(name=home.name, home=home, trainers=trainers, max_gang=max_gang, warm_starts=warm,
                               grace_seconds=20.0, idle_sleep_max=0.2)
        self.agent = Agent(client, options)
        if grid_id is not None:
            self.agent.claim_filters = {"grid_id": grid_id}
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the agent did not stop"

