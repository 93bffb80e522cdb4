"""`gridfleet run`'s tables name configs by the leaves that differ, nested sections as dotted keys."""
from __future__ import annotations

from common.plots.data import differing_keys
from worker.local import _short_config


def _swept_keys(configs):
    return differing_keys({"config": c, "seed": 0} for c in configs)


def test_nested_sections_show_the_dotted_leaves_that_differ():
    a = {"training": {"gradient_computation": "wp", "epochs": 500, "perturbation": 0.001}, "fsm": True}
    b = {"training": {"gradient_computation": "bptt", "epochs": 500, "perturbation": 0.01}, "fsm": True}
    keys = _swept_keys([a, b])
    assert keys == ["training.gradient_computation", "training.perturbation"]
    assert _short_config(a, 90, keys) == "gradient_computation=wp perturbation=0.001"  # unique leaves, short
    both = {"model": {"size": 1}, "data": {"size": 2}}
    assert _short_config(both) == "model.size=1 data.size=2"  # a leaf in two sections keeps its section


def test_an_axis_into_a_list_shows_the_list_and_flat_configs_are_unchanged():
    config = {"block_types": [["R", "G"], ["G"]], "lr": 0.1}
    assert _short_config(config, 90, ["block_types.1.0"]) == "block_types=[['R', 'G'], ['G']]"
    assert _swept_keys([{"lr": 0.1, "n": 1}, {"lr": 0.2, "n": 1}]) == ["lr"]
    assert _short_config({"lr": 0.1, "n": 1}) == "lr=0.1 n=1"


# ---- the live display of `gridfleet run` ----------------------------------------------------------------
def _grid(engine):
    from scheduler.grids import submit_grid
    from scheduler.spec import GridSpec
    from worker.trainers import validate_config

    spec = GridSpec.model_validate({"name": "live", "trainer": "sleep", "axes": {"steps": [20, 30]}})
    return submit_grid(engine, spec, validate_config).grid_id


def _row(engine, grid_id):
    from rich.console import Console

    from worker.local import _running_table

    console = Console(width=200, record=True)
    console.print(_running_table(engine, grid_id, ["steps"]))
    lines = [line.split() for line in console.export_text().splitlines()[1:] if line.strip()]
    return {int(cells[0]): cells[1:] for cells in lines}  # job -> attempt, step, progress, loss, config


def test_first_frame_names_the_grid_and_its_counts(tmp_path):
    from rich.console import Console

    from common.db import make_engine, migrate
    from scheduler.reports import grid_summary
    from worker.local import _progress_bar

    url = f"sqlite:///{tmp_path / 'g.db'}"
    migrate(url)
    engine = make_engine(url)
    summary = grid_summary(engine, _grid(engine))
    bar, task = _progress_bar(Console(), summary)
    shown = bar.tasks[0]
    assert (shown.description, shown.fields["counts"], shown.completed) == ("live", "queued 2", 0.0)
    engine.dispose()


def test_running_rows_show_step_and_progress_of_one_report_and_the_checkpoint_on_resume(tmp_path):
    from common.db import make_engine, migrate
    from scheduler.policy import RetryPolicy
    from scheduler.queue import Metric, Queue

    url = f"sqlite:///{tmp_path / 'g.db'}"
    migrate(url)
    engine = make_engine(url)
    queue = Queue(engine, RetryPolicy(lease_seconds=30.0))
    grid_id = _grid(engine)
    worker = queue.register_worker(name="w", host="h", trainers=["sleep"], gpus=[], resources={})
    job = queue.claim(worker, trainers=["sleep"])
    assert _row(engine, grid_id)[job.id] == ["1", "steps=20"]  # no step, progress or loss before the first report
    queue.heartbeat(job.id, job.attempt_id, step=10, progress=(10, 20), metrics=[Metric(10, {"loss": 0.5})],
                    worker_id=worker)
    queue.set_checkpoint(job.id, job.attempt_id, {"uri": "local:x", "step": 8}, worker_id=worker)  # lands late
    assert _row(engine, grid_id)[job.id][:4] == ["1", "10", "50%", "0.5000"]  # not step 8 from the pointer

    queue.finish(job.id, job.attempt_id, "preempted", worker_id=worker)
    again = queue.claim(worker, trainers=["sleep"])
    assert again.id == job.id
    assert _row(engine, grid_id)[job.id][:3] == ["2", "8", "40%"]  # resumes from the checkpoint, shown at once
    queue.heartbeat(job.id, again.attempt_id, step=12, progress=(12, 20), metrics=[Metric(12, {"loss": 0.4})],
                    worker_id=worker)
    assert _row(engine, grid_id)[job.id][:4] == ["2", "12", "60%", "0.4000"]
    engine.dispose()


def test_the_results_table_keeps_the_swept_keys_on_an_80_column_pipe():
    """`gridfleet run` piped or in CI: rich's 80 columns used to squeeze the swept-key columns to nothing."""
    import io

    from rich.console import Console

    from worker.local import _print_results

    summary = {"objective": "min:loss", "spec": {"axes": {"state_size": [32, 64], "use_forget_gate": [True, False],
                                                         "use_state_gate": [True], "use_input_gate": [False]}},
               "counts": {"queued": 0, "succeeded": 2}}
    rows = [{"job_id": i, "state": "succeeded", "seed": 0, "external_id": "ab" * 32, "result": {"loss": 2.0 + i, "final_loss": 2.5, "steps_asked": 600, "seconds": 3.03},
             "config": {"state_size": size, "use_forget_gate": gate, "use_state_gate": True, "use_input_gate": False}}
            for i, (size, gate) in enumerate([(32, True), (64, False)], start=1)]
    out = io.StringIO()
    _print_results(Console(file=out, width=80), summary, rows)
    lines = out.getvalue().splitlines()
    row_1 = next(line for line in lines if line.count("│") > 2 and line.split("│")[1].strip() == "1")
    cells = [cell.strip() for cell in row_1.split("│")]
    assert "32" in cells and "true" in cells and "3" in cells
