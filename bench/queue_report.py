"""The queue bench's tables (bench/queue_throughput.py): cycles, heartbeat latency, where the CPU went, and
the issue's targets next to what was measured. Read `print_summary` for the targets."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from bench.processes import ms, pct

if TYPE_CHECKING:
    from bench.queue_throughput import CycleRow, HeartbeatRow

TARGET_PG_CYCLES = 1000.0
TARGET_API_CYCLES = 250.0
TARGET_HB_P99_MS = 50.0
TARGET_HB_RATE = 100.0

def ratio_text(measured: float, target: float, higher_is_better: bool = True) -> str:
    if math.isnan(measured):
        return "-"
    ratio = measured / target
    ok = ratio >= 1.0 if higher_is_better else ratio < 1.0
    return f"{ratio:5.2f}x {'PASS' if ok else 'FAIL'}"


LABEL_WIDTH = 34


def cycle_target(row: CycleRow) -> float | None:
    return {"postgres": TARGET_PG_CYCLES, "api": TARGET_API_CYCLES}.get(row.backend)


def print_cycle_table(rows: list[CycleRow]) -> None:
    header = (f"{'backend':<{LABEL_WIDTH}} {'workers':>7} {'cycles/s':>9} {'cycle p50':>9} {'p99':>7} {'claim p50':>9} "
              f"{'finish p50':>10} {'errors':>6}   {'target':>8}  {'measured/target':<15}")
    print(header)
    print("-" * len(header))
    for row in rows:
        target = cycle_target(row)
        print(f"{row.label:<{LABEL_WIDTH}} {row.workers:>7} {row.rate:>9.0f} {ms(pct(row.cycle, 50)):>9} "
              f"{ms(pct(row.cycle, 99)):>7} {ms(pct(row.claim, 50)):>9} {ms(pct(row.finish, 50)):>10} "
              f"{row.errors:>6}   {f'>= {target:.0f}' if target else '-':>8}  "
              f"{ratio_text(row.rate, target) if target else '-':<15}")
    for row in rows:
        if row.error:
            print(f"  {row.label} x{row.workers}: {row.errors} errors, first: {row.error}")
        if row.dry:
            print(f"  {row.label} x{row.workers}: workers found the queue empty {row.dry} times (a lower bound)")


def print_heartbeat_table(rows: list[HeartbeatRow]) -> None:
    header = (f"{'server':<{LABEL_WIDTH}} {'offered/s':>9} {'done/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
              f"{'max ms':>7} {'errors':>6}   {'target':>8}  {'measured/target':<15}")
    print(header)
    print("-" * len(header))
    for row in rows:
        p99 = pct(row.latency, 99)
        print(f"{row.label:<{LABEL_WIDTH}} {row.sent / row.seconds:>9.0f} {row.ok / row.seconds:>7.0f} "
              f"{ms(pct(row.latency, 50)):>7} {ms(pct(row.latency, 90)):>7} {ms(p99):>7} "
              f"{ms(max(row.latency) if row.latency else float('nan')):>7} {row.errors:>6}   "
              f"{f'p99 < {TARGET_HB_P99_MS:.0f}':>8}  {ratio_text(p99 * 1000, TARGET_HB_P99_MS, False):<15}")
    for row in rows:
        if row.error:
            print(f"  {row.label}: {row.errors} errors, first: {row.error}")
        if row.late:
            print(f"  {row.label}: {row.late} heartbeats left the client more than one interval late "
                  "(client starved of CPU); their latency counts from the scheduled time")


def _cpu_ms(cpu: dict, part: str, ops: int) -> str:
    value = cpu.get(part)
    return "-" if value is None or ops <= 0 else f"{value / ops * 1000:.2f}"


def print_cpu_table(cycle_rows: list[CycleRow], hb_rows: list[HeartbeatRow]) -> None:
    cores = os.cpu_count() or 1
    header = (f"{'measurement':<{LABEL_WIDTH}} {'workers':>7} {'per':<9} {'workers':>7} {'server':>7} {'postgres':>8} "
              f"{'total':>7} {'ops/s/core':>10}   {'busy cores':>10} {'not ours':>8} {'load1':>5}   {'new pg conns/s':>14}")
    print(f"{'':<{LABEL_WIDTH + 18}}{'CPU ms per operation':-^40}   {'machine (' + str(cores) + ' cores)':-^26}")
    print(header)
    print("-" * len(header))
    entries = [(r.label, str(r.workers), "cycle", r.cpu, r.rate * r.cpu.get("seconds", 0.0), r.load) for r in cycle_rows]
    entries += [(r.label, f"{r.clients}hb", "heartbeat", r.cpu, r.ok * r.cpu.get("seconds", 0.0) / r.seconds, r.load)
                for r in hb_rows]
    for label, workers, per, cpu, ops, load in entries:
        ops = round(ops)
        parts = [cpu.get(k) for k in ("client", "server", "pg")]
        known = sum(v for v in parts if v is not None)
        total_ms = known / ops * 1000 if ops else float("nan")
        seconds = cpu.get("seconds") or float("nan")
        machine = cpu.get("machine")
        busy = f"{machine / seconds:.2f}" if machine is not None else "-"
        other = f"{max(0.0, machine - known) / seconds:.2f}" if machine is not None else "-"
        per_core = f"{1000 / total_ms:.0f}" if total_ms > 0 else "-"
        conns = f"{cpu['connections'] / seconds:.1f}" if cpu.get("connections") is not None else "-"
        print(f"{label:<{LABEL_WIDTH}} {workers:>7} {per:<9} {_cpu_ms(cpu, 'client', ops):>7} {_cpu_ms(cpu, 'server', ops):>7} "
              f"{_cpu_ms(cpu, 'pg', ops):>8} {total_ms:>7.2f} {per_core:>10}   {busy:>10} {other:>8} {load:>5}   "
              f"{conns:>14}")
    for line in (
        "workers = the benchmark's worker/client processes; server = the uvicorn process tree; postgres = the",
        "backends serving the benchmark database (not WAL writer/checkpointer; backends that exit inside the window",
        "are missed, so with pool churn it reads low). ops/s/core = 1000 / total: what one free core could sustain.",
        "busy cores = the whole machine in the window; not ours = busy minus the three columns (other people's work,",
        "Postgres background processes, this script). new pg conns/s = connections opened to the benchmark database",
        "in the window (pool churn; PostgreSQL 14+).",
    ):
        print("  " + line)


def print_summary(cycle_rows: list[CycleRow], hb_rows: list[HeartbeatRow]) -> None:
    print("targets from the issue, measured in this run (best row of each kind):")
    variants = list(dict.fromkeys([r.variant for r in cycle_rows] + [r.variant for r in hb_rows]))
    for variant in variants:
        if len(variants) > 1:
            print(f" code: {variant}")
        _print_targets([r for r in cycle_rows if r.variant == variant], [r for r in hb_rows if r.variant == variant])


def _print_targets(cycle_rows: list[CycleRow], hb_rows: list[HeartbeatRow]) -> None:
    lines = []
    pg = [r for r in cycle_rows if r.backend == "postgres"]
    if pg:
        best = max(pg, key=lambda r: r.rate)
        lines.append(("Postgres direct, cycles/s", f"{best.rate:.0f} ({best.workers} workers)",
                      f">= {TARGET_PG_CYCLES:.0f}", ratio_text(best.rate, TARGET_PG_CYCLES)))
    api = [r for r in cycle_rows if r.backend == "api"]
    if api:
        best = max(api, key=lambda r: r.rate)
        measured = f"{best.rate:.0f} ({best.workers} workers, uvicorn --workers {best.uvicorn_workers})"
        lines.append(("API, cycles/s", measured, f">= {TARGET_API_CYCLES:.0f}",
                      ratio_text(best.rate, TARGET_API_CYCLES)))
    if hb_rows:
        best = min(hb_rows, key=lambda r: pct(r.latency, 99))
        p99 = pct(best.latency, 99) * 1000
        measured = f"{p99:.1f} ms (uvicorn --workers {best.uvicorn_workers})"
        lines.append((f"heartbeat p99 at {best.target_rate:.0f}/s", measured, f"< {TARGET_HB_P99_MS:.0f} ms",
                      ratio_text(p99, TARGET_HB_P99_MS, False) + " (lower is better)"))
    if not lines:
        print("  (no Postgres, API or heartbeat row measured)")
    for name, measured, target, ratio in lines:
        print(f"  {name:<28} {measured:<42} target {target:<10} measured/target {ratio}")
