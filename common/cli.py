"""Forwarding stub for workers updating from a commit before the CLI moved to cli/ (December 2026).

An agent started as `python -m common.cli worker` (or through a console script installed as
`common.cli:app`) re-execs itself with that same command line after a self-update, and its import check
asks for `common.cli`. This file keeps both working; it is the one module of common/ that reaches above
it, by name only and at call time (tests/unit/test_layering.py allows exactly this). New code uses cli.
"""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:  # `from common.cli import app` of an old console script
    return getattr(importlib.import_module("cli.main"), name)


if __name__ == "__main__":  # pragma: no cover - `python -m common.cli` of an old agent's command line
    import runpy

    runpy.run_module("cli", run_name="__main__", alter_sys=True)
