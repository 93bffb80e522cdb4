"""`gridfleet fleet`: worker actors on a Ray cluster (the logic is in worker/fleet.py).

    gridfleet fleet --ray-address ADDR --server URL --token T [--workers N|auto] [--gpus-per-worker F]
    gridfleet fleet status --ray-address ADDR
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import typer

from cli.support import GANG_HELP, fail

app = typer.Typer(help="Run gridfleet workers as actors on a Ray cluster.", invoke_without_command=True)
RAY_ADDRESS = typer.Option(None, "--ray-address",
                           help="Ray cluster address (default: RAY_ADDRESS; 'local' starts a one-machine cluster)")



def _connect(address: Optional[str], num_cpus: Optional[int] = None) -> None:
    import ray

    if address == "local":  # a cluster of this machine only, started here and gone with this process
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="gridfleet", log_to_driver=False)
    else:
        ray.init(address=address or "auto", namespace="gridfleet", log_to_driver=False)


@app.callback()
def fleet(
    ctx: typer.Context,
    ray_address: Optional[str] = RAY_ADDRESS,
    server: Optional[str] = typer.Option(None, help="API base URL (default: GRIDFLEET_SERVER_URL, else "
                                         "http://127.0.0.1:8000)"),
    token: Optional[str] = typer.Option(None, help="a worker token (default: GRIDFLEET_TOKEN)"),
    workers: str = typer.Option("auto", help="how many worker actors, or 'auto' to fill the cluster's GPUs"),
    gpus_per_worker: float = typer.Option(1.0, min=0.0, help="GPUs per worker; fractions pack small jobs"),
    cpus_per_worker: float = typer.Option(1.0, min=0.0, help="CPUs Ray reserves per worker"),
    trainers: Optional[str] = typer.Option(None, help="comma-separated trainers to run (default: all known)"),
    grace: float = typer.Option(30.0, min=0.0, help="seconds a preempted job gets to checkpoint"),
    num_cpus: Optional[int] = typer.Option(None, min=1, help="with --ray-address local: CPUs of the cluster"),
    gang: Optional[int] = typer.Option(None, min=1, max=1024, help=GANG_HELP),
) -> None:
    """Start worker actors and keep them running until Ctrl-C or SIGTERM, which drains the fleet: running jobs
    checkpoint and are released as preempted."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"ray_address": ray_address}
        return
    from cli.support import trainer_names, worker_token
    from common.settings import Settings
    from worker import logs
    from worker.agent import AgentOptions
    from worker.fleet import FleetError, FleetOptions, RayFleet

    logs.configure()
    settings = Settings()
    secret = worker_token(settings, token)
    if workers != "auto" and not workers.isdigit():
        fail(f"--workers takes a number or 'auto', got '{workers}'")
    agent = AgentOptions(
        trainers=trainer_names(trainers),
        grace_seconds=grace, home=settings.home, stores=settings.store_options(),
        max_gang=settings.gang_size if gang is None else gang,
    )
    options = FleetOptions(server_url=server or settings.server_url, token=secret,
                           workers=None if workers == "auto" else int(workers), gpus_per_worker=gpus_per_worker,
                           cpus_per_worker=cpus_per_worker, agent=agent)
    _connect(ray_address, num_cpus)
    try:
        fleet_ = RayFleet(options).start()
    except FleetError as exc:
        fail(str(exc))
    stop = threading.Event()

    def on_signal(signum, _frame):
        typer.echo(f"signal {signum}: draining the fleet (running jobs checkpoint and are released)", err=True)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    fleet_.supervise(stop)
    clean = fleet_.drain(timeout=grace + 60.0)
    typer.echo(f"fleet stopped ({'drained' if clean else 'some workers did not stop in time'}; "
               f"{fleet_.restarts} restart(s))")
    raise typer.Exit(0 if clean else 1)


@app.command()
def status(ctx: typer.Context, ray_address: Optional[str] = RAY_ADDRESS) -> None:
    """List the fleet's actors: node, GPUs, worker id and current job."""
    from rich.console import Console
    from rich.table import Table

    from worker.fleet import actor_infos, named_actors

    _connect(ray_address or (ctx.obj or {}).get("ray_address") or os.environ.get("RAY_ADDRESS"))
    infos = actor_infos(named_actors(), timeout=10.0)
    if not infos:
        typer.echo("no gridfleet worker actors on this cluster")
        raise typer.Exit(1)
    table = Table("actor", "node", "pid", "GPUs", "CUDA_VISIBLE_DEVICES", "worker", "job", "done")
    for info in infos:
        if "error" in info:
            table.add_row(str(info["index"]), info["error"], "", "", "", "", "", "")
            continue
        table.add_row(info["name"], info["node_ip"], str(info["pid"]), f"{info['gpus']:g} {info['gpu_ids']}",
                      info["cuda_visible_devices"] or "", info["worker_id"] or "", str(info["job_id"] or ""),
                      str(info["jobs_done"]))
    Console().print(table)
