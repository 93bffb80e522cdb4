"""The files a job leaves beside its checkpoints: config.json at the start; result.json and a model card
(README.md with the config and final metrics) at the end. Same layout in every store:
`grid-<id>/job-<id>/{config.json, ckpt-<step>.pt, result.json, README.md}`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG = "config.json"
RESULT = "result.json"
MODEL_CARD = "README.md"


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temp, path)
    return path


def job_config(job: dict[str, Any]) -> dict[str, Any]:
    return {"grid_id": job["grid_id"], "job_id": job["id"], "trainer": job["trainer"], "seed": job["seed"],
            "config": job["config"]}


def write_config(job_dir: Path, job: dict[str, Any]) -> Path:
    return _write_json(job_dir / CONFIG, job_config(job))


def write_result(job_dir: Path, job: dict[str, Any], result: dict[str, Any], step: int | None) -> list[Path]:
    """result.json and README.md; returns both paths."""
    record = {**job_config(job), "attempt_id": job["attempt_id"], "step": step, "result": result}
    card = job_dir / MODEL_CARD
    card.write_text(model_card(job, result, step))
    return [_write_json(job_dir / RESULT, record), card]


def model_card(job: dict[str, Any], result: dict[str, Any], step: int | None) -> str:
    def rows(values: dict[str, Any]) -> str:
        return "\n".join(f"| `{key}` | `{json.dumps(value, default=str)}` |" for key, value in sorted(values.items()))

    return (
        "---\n"
        f"tags:\n- gridfleet\n- {job['trainer']}\n"
        "---\n\n"
        f"# grid {job['grid_id']} / job {job['id']}: {job['trainer']}, seed {job['seed']}\n\n"
        "Trained by a gridfleet worker. The newest checkpoint in this folder is the final model"
        f"{f' (step {step})' if step is not None else ''}; `config.json` holds the exact configuration.\n\n"
        "## Final metrics\n\n| metric | value |\n|---|---|\n"
        f"{rows(result) or '| (none) | |'}\n\n"
        "## Config\n\n| key | value |\n|---|---|\n"
        f"{rows(job['config']) or '| (defaults) | |'}\n"
    )
