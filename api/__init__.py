"""FastAPI service: grids, jobs, workers, results, auth."""
