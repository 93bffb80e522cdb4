"""What `gridfleet status` and `gridfleet plots` read: a grid source, the local database or a server
(the tables they print are scheduler/report_tables.py's, shared with `gridfleet run`).

`LocalGrids` reads settings.database_url directly (the database `gridfleet run` writes; no token);
`RemoteGrids` asks the API through a `get(path, params) -> json` the CLI gives it. Both answer the same
calls with the same shapes (the API's JSON).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote


class SourceError(Exception):
    pass


class LocalGrids:
    def __init__(self, database_url: str):
        from sqlalchemy.engine import make_url

        from common.db import is_sqlite, make_engine

        if is_sqlite(database_url):
            path = make_url(database_url).database
            if path and path != ":memory:" and not Path(path).is_file():
                raise SourceError(f"no local database at {path}: `gridfleet run GRID.yaml` makes it here, or ask a "
                                  "server with --server URL (or GRIDFLEET_SERVER_URL)")
        self.engine = make_engine(database_url)

    def close(self) -> None:
        self.engine.dispose()

    def _read(self, call: Callable, *args, **kwargs):
        from sqlalchemy.exc import SQLAlchemyError

        from scheduler.grids import NotFound

        try:
            return json.loads(json.dumps(call(self.engine, *args, **kwargs), default=str))  # as the API sends it
        except NotFound as exc:
            raise SourceError(str(exc)) from None
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            raise SourceError(f"cannot read the database: {type(cause).__name__}: {str(cause).splitlines()[0]}") \
                from None

    def grids(self) -> list[dict[str, Any]]:
        from scheduler import reports

        return [{k: v for k, v in g.items() if k != "spec"} for g in self._read(reports.list_grids)]  # as the API

    def summary(self, grid: str) -> dict[str, Any]:
        from scheduler import reports

        return self._read(reports.grid_summary, int(grid) if grid.isdigit() else grid)

    def results(self, grid: str) -> list[dict[str, Any]]:
        from scheduler import reports

        return self._read(reports.grid_results, int(grid) if grid.isdigit() else grid)

    def jobs(self, external_id: str, grid: str | None) -> list[dict[str, Any]]:
        from scheduler import reports

        return self._read(reports.list_jobs, external_id=external_id, grid=grid)

    def metrics(self, job_id: int) -> list[dict[str, Any]]:
        from scheduler import reports

        return self._read(reports.job_metrics, job_id)


class RemoteGrids:
    def __init__(self, get: Callable[..., Any]):
        self.get = get

    def close(self) -> None:
        pass

    def grids(self):
        return self.get("/grids")["grids"]

    def summary(self, grid: str):
        return self.get(f"/grids/{quote(grid, safe='')}")

    def results(self, grid: str):
        return self.get(f"/grids/{quote(grid, safe='')}/results")["results"]

    def jobs(self, external_id: str, grid: str | None):
        return self.get("/jobs", params={"external_id": external_id, **({"grid": grid} if grid else {})})["jobs"]

    def metrics(self, job_id: int):
        return self.get(f"/jobs/{job_id}/metrics")["metrics"]
