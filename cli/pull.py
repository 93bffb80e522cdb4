"""`gridfleet pull GRID`: a grid's results (from the API) and its final models and job files (from the store).

Layout under DEST: results.csv and results.json for the grid, then `job-<id>/` per succeeded job with
config.json, result.json, README.md (the model card) and the final checkpoint. Hub files come through
the real huggingface_hub client with the read token; local-store files are copied when on this machine.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import job_files
from common.checkpoints import StoreOptions
from common.results import write_csv
from common.store_uri import job_folder, parse_hf_uri, split_hf_pointer
from scheduler.reports import results_table


@dataclass
class PulledJob:
    job_id: int
    files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "name: why"


class PullError(RuntimeError):
    pass


def pull_grid(summary: dict[str, Any], rows: list[dict[str, Any]], dest: Path, options: StoreOptions,
              local_root: Path) -> list[PulledJob]:
    """`summary` and `rows` are the API's GET /grids/{grid} and /grids/{grid}/results replies."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps({"grid": summary["name"], "results": rows}, indent=2) + "\n")
    columns, flat = results_table(rows)
    write_csv(dest / "results.csv", columns, flat)
    branch_of = _branches(summary, options)
    pulled = []
    for row in rows:
        if row["state"] != "succeeded":
            continue
        job = PulledJob(row["job_id"])
        job_dir = dest / f"job-{row['job_id']}"
        job_dir.mkdir(exist_ok=True)
        pointer = row.get("checkpoint")
        names = [job_files.CONFIG, job_files.RESULT, job_files.MODEL_CARD]
        if pointer and pointer["uri"].startswith("hf://"):
            _pull_from_hub(summary["id"], row["job_id"], pointer, names, job_dir, options, local_root,
                           branch_of, job)
        elif pointer and pointer["uri"].startswith("local:"):
            _pull_local(Path(pointer["uri"][len("local:"):]), names, job_dir, job)
        else:
            job.missing.append("checkpoint: the job recorded none")
        pulled.append(job)
    return pulled


def _branches(summary: dict[str, Any], options: StoreOptions) -> dict[str, str]:
    """repo id -> the branch the grid writes to (its own store, else the deployment default)."""
    branches = {}
    for uri in (options.default_store, (summary.get("spec") or {}).get("store")):
        if uri and uri.startswith("hf://"):
            repo_id, branch = parse_hf_uri(uri)
            branches[repo_id] = branch
    return branches


def _pull_from_hub(grid_id: int, job_id: int, pointer: dict[str, Any], names: list[str], job_dir: Path,
                   options: StoreOptions, local_root: Path, branch_of: dict[str, str], job: PulledJob) -> None:
    from common.hub_store import HubStore, HubStoreError

    repo_id, path = split_hf_pointer(pointer["uri"])
    store = HubStore(f"hf://{repo_id}@{branch_of.get(repo_id, 'main')}", local_root,
                     read_token=options.hub_read_token, endpoint=options.hub_endpoint, max_attempts=3)
    wanted = [(path, pointer["revision"])] + [(f"{job_folder(grid_id, job_id)}/{n}", None) for n in names]
    for in_repo, revision in wanted:
        name = in_repo.rsplit("/", 1)[1]
        try:
            shutil.copyfile(store.download(in_repo, revision), job_dir / name)
            job.files.append(name)
        except HubStoreError as exc:  # e.g. not uploaded yet: the worker commits on its interval
            job.missing.append(f"{name}: {exc}")


def _pull_local(checkpoint: Path, names: list[str], job_dir: Path, job: PulledJob) -> None:
    for source in [checkpoint] + [checkpoint.parent / n for n in names]:
        if source.exists():
            shutil.copyfile(source, job_dir / source.name)
            job.files.append(source.name)
        else:
            job.missing.append(f"{source.name}: not on this machine ({source}); a local store lives on the "
                               "worker that trained the job")
