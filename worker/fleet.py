"""gridfleet on a Ray cluster: Ray places worker actors on GPUs, gridfleet's queue keeps the jobs.

Each actor runs the same agent loop as `gridfleet worker` (claim over HTTP, train in a child process,
heartbeat from a side thread). Ray gives an actor `num_gpus=F` (fractions let several small RNN jobs share a
GPU) and sets its CUDA_VISIBLE_DEVICES, which the job's child process inherits, so a job sees only its GPU.
The agent offers F as its capacity, so it claims only jobs whose `resources.gpus` fit its share.

`RayFleet.supervise()` is the driver's loop: an actor that dies (kill -9, node lost) is restarted by Ray
(`max_restarts=-1`) and the driver starts its agent loop again; the dead actor's job comes back through its
lease and resumes from its last checkpoint. `drain()` asks every agent to stop: running jobs checkpoint and
are released as `preempted`, then the actors are killed.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from worker.agent import Agent, AgentOptions

log = logging.getLogger("gridfleet.fleet")
NAMESPACE = "gridfleet"
ACTOR_PREFIX = "gridfleet-worker-"
ACTOR_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


class FleetError(RuntimeError):
    pass


class WorkerActor:
    """One gridfleet agent inside a Ray actor. Threaded (max_concurrency > 1) so `stop` and `info` are
    answered while `run` is busy with the agent loop."""

    def __init__(self, index: int, server_url: str, token: str, options: AgentOptions):
        self.index = index
        self.server_url = server_url
        self.token = token
        self.options = options
        self.agent: Agent | None = None
        self.stop_requested = False
        self.exit_code: int | None = None
        self.one_loop = threading.Lock()

    def run(self) -> int:
        """The agent loop, once per incarnation: a second call (its caller lost the first one's reply to a
        moment's unreachability) waits for the same loop instead of starting another agent beside it."""
        from worker.client import ApiClient

        with self.one_loop:
            if self.stop_requested or self.exit_code is not None:
                return self.exit_code or 0
            self.agent = Agent(ApiClient(self.server_url, self.token), self.options)
            self.exit_code = self.agent.run()
            return self.exit_code

    def stop(self) -> None:
        self.stop_requested = True
        if self.agent is not None:
            self.agent.stop()

    def info(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        agent = self.agent
        current = agent.current.job if agent is not None and agent.current is not None else None
        return {
            "index": self.index, "name": self.options.name, "pid": os.getpid(),
            "node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "gpus": self.options.gpus,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "worker_id": agent.worker_id if agent is not None else None,
            "job_id": current["id"] if current else None, "jobs_done": agent.jobs_done if agent is not None else 0,
        }


@dataclass
class FleetOptions:
    server_url: str
    token: str
    workers: int | None = None  # None: "auto", fill the cluster's GPUs
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    agent: AgentOptions = field(default_factory=AgentOptions)  # template for every actor's agent
    name: str = "fleet"


def worker_count(requested: int | None, gpus_per_worker: float, cluster_gpus: float) -> int:
    """How many actors to start: the number asked for, or for "auto" as many as the cluster's GPUs hold."""
    if requested is not None:
        if requested < 1:
            raise FleetError(f"--workers must be at least 1, got {requested}")
        return requested
    if gpus_per_worker <= 0:
        raise FleetError("--workers auto fills the cluster's GPUs, so it needs --gpus-per-worker > 0; "
                         "give --workers N for CPU workers")
    count = math.floor(cluster_gpus / gpus_per_worker + 1e-9)
    if count < 1:
        raise FleetError(f"--workers auto: the cluster has {cluster_gpus:g} GPU(s), not enough for one worker "
                         f"of {gpus_per_worker:g}")
    return count


class RayFleet:
    def __init__(self, options: FleetOptions):
        self.options = options
        self.actors: list[Any] = []
        self.runs: dict[int, Any] = {}  # actor index -> ObjectRef of its running agent loop
        # actor index -> ObjectRef of an `info` call to a restarting actor: its loop starts when that answers
        self.reviving: dict[int, Any] = {}
        self.restarts = 0
        self.draining = threading.Event()

    def start(self) -> "RayFleet":
        opts = self.options
        count = worker_count(opts.workers, opts.gpus_per_worker, ray.cluster_resources().get("GPU", 0.0))
        remote_class = ray.remote(WorkerActor)
        for index in range(count):
            agent = dataclasses.replace(
                opts.agent, name=f"{opts.name}-{index}", gpus=opts.gpus_per_worker,
                home=opts.agent.home.resolve() / f"ray-worker-{index}",  # agents on one node keep files apart
            )
            actor = remote_class.options(
                name=f"{ACTOR_PREFIX}{index}", namespace=NAMESPACE, num_gpus=opts.gpus_per_worker,
                num_cpus=opts.cpus_per_worker, max_restarts=-1, max_task_retries=0, max_concurrency=4,
            ).remote(index, opts.server_url, opts.token, agent)
            self.actors.append(actor)
            self.runs[index] = actor.run.remote()
        log.info("fleet: %d worker actor(s), %g GPU and %g CPU each", count, opts.gpus_per_worker,
                 opts.cpus_per_worker)
        return self

    def supervise_once(self, timeout: float = 1.0) -> None:
        """Wait up to `timeout` for an agent loop to end or a restarted actor to answer; restart the loop of
        any actor that died once its new incarnation answers."""
        if not self.runs and not self.reviving:
            time.sleep(timeout)
            return
        waiting = {ref: ("run", index) for index, ref in self.runs.items()}
        waiting.update({ref: ("revive", index) for index, ref in self.reviving.items()})
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
        for ref in ready:
            kind, index = waiting[ref]
            if kind == "revive":
                self._revived(index, ref)
                continue
            del self.runs[index]
            try:
                ray.get(ref)
                log.info("fleet: worker %d stopped", index)
            except ACTOR_GONE as exc:
                if self.draining.is_set():
                    continue
                self.restarts += 1
                log.warning("fleet: worker %d died (%s); Ray restarts it, its job resumes from its checkpoint",
                            index, type(exc).__name__)
                self.reviving[index] = self.actors[index].info.remote()

    def _revived(self, index: int, ref: Any) -> None:
        """A call sent just after a death can still reach the dead process and fail: that is the same death,
        so ask again; the agent loop goes only to an incarnation that has answered."""
        del self.reviving[index]
        if self.draining.is_set():
            return
        try:
            ray.get(ref)
        except ACTOR_GONE:
            self.reviving[index] = self.actors[index].info.remote()
            return
        self.runs[index] = self.actors[index].run.remote()

    def supervise(self, stop: threading.Event) -> None:
        while not stop.is_set() and (self.runs or self.reviving):
            self.supervise_once()

    def status(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        return actor_infos(self.actors, timeout)

    def drain(self, timeout: float) -> bool:
        """Stop every agent (running jobs checkpoint and are released as preempted), then kill the actors.
        True when every agent loop ended within `timeout`."""
        self.draining.set()
        for actor in self.actors:
            actor.stop.remote()
        deadline = time.monotonic() + timeout
        self.reviving.clear()  # a restarting actor has no job to release: its lease brings the job back
        while self.runs and time.monotonic() < deadline:
            self.supervise_once(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        clean = not self.runs
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        return clean


def actor_infos(actors: list[Any], timeout: float) -> list[dict[str, Any]]:
    refs = [actor.info.remote() for actor in actors]
    infos = []
    for index, ref in enumerate(refs):
        try:
            infos.append(ray.get(ref, timeout=timeout))
        except (*ACTOR_GONE, GetTimeoutError) as exc:
            infos.append({"index": index, "error": f"not answering: {type(exc).__name__}"})
    return infos


def named_actors() -> list[Any]:
    """The fleet's actors on the cluster this process is connected to (for `gridfleet fleet status`)."""
    names = sorted((a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == NAMESPACE and a["name"].startswith(ACTOR_PREFIX)),
                   key=lambda n: int(n[len(ACTOR_PREFIX):]))
    return [ray.get_actor(name, namespace=NAMESPACE) for name in names]
