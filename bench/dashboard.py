"""What the dashboard's grid page costs the API per poll: GET /dashboard/grids/{grid} (summary, swept keys,
labels, importance) beside the plain GET /grids/{grid}/results it builds on, on one grid of imported
results (seed 001's size by default, 432 jobs), in the same process and the same run, as a ratio.

    python bench/dashboard.py [--jobs 432] [--repeat 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from starlette.testclient import TestClient  # noqa: E402

from api.app import create_app  # noqa: E402
from common.settings import Settings  # noqa: E402

TOKEN = "gf_bench_dashboard_admin_0123456789"


def timed(client: TestClient, path: str, repeat: int) -> float:
    """Median milliseconds of one GET."""
    assert client.get(path).status_code == 200
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        assert client.get(path).status_code == 200
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=432)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    side = min(24, args.jobs)  # 24 x 18 = seed 001's 432
    steps = list(range(1, side + 1))
    seconds = [round(0.1 * i, 1) for i in range(1, args.jobs // side + 1)]
    done = [{"config": {"checkpoint_every": 1, "steps": a, "seconds": b}, "seed": 0,
             "result": {"loss": 1.0 / a + b}} for a in steps for b in seconds]
    app = create_app(Settings(database_url=f"sqlite:///{tempfile.mkdtemp()}/bench.db", admin_token=TOKEN))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        spec = {"name": "bench", "trainer": "sleep", "config": {"checkpoint_every": 1},
                "axes": {"steps": steps, "seconds": seconds}, "objective": "min:loss"}
        assert client.post("/api/v1/grids/import", json={"grid": spec, "done": done}).status_code == 201
        plain = timed(client, "/api/v1/grids/bench/results", args.repeat)
        view = timed(client, "/api/v1/dashboard/grids/bench", args.repeat)
        listing = timed(client, "/api/v1/dashboard/grids", args.repeat)
    print(f"{len(done)} jobs (SQLite, in process): /grids/bench/results {plain:.1f} ms, "
          f"/dashboard/grids/bench {view:.1f} ms (x{view / plain:.2f}), /dashboard/grids {listing:.1f} ms")


if __name__ == "__main__":
    main()
