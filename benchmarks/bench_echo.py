"""Line-echo throughput and latency: a 1-worker longshore ``text://`` server against a bare
uvloop ``asyncio.Protocol`` echo server (the ceiling for Python), in the same run.

    python benchmarks/bench_echo.py [--duration 5] [--runs 3]

The servers run on CPU 0 and the C load client (benchmarks/loadclient.c, built
automatically) on CPU 1. Each measurement is ``--connections`` connections sending
``--size``-byte lines with 1 and 16 messages in flight per connection; the runs alternate
the servers (ABBA order) and the table shows medians and the longshore/bare ratio.
Target (longshore issue): ratio >= 0.85 at every pipeline depth.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from typing import Any

import benchlib

TARGET_RATIO = 0.85
SERVER_CPU = 0
CLIENT_CPU = 1


def measure_once(server: benchlib.Server, args: argparse.Namespace, pipeline: int, pinned: bool) -> dict[str, Any]:
    command = [
        *benchlib.taskset_prefix(CLIENT_CPU if pinned else None),
        benchlib.LOADCLIENT,
        "-c", str(args.connections),
        "-d", str(args.duration),
        "-w", str(args.warmup),
        "-s", str(args.size),
        "-p", str(pipeline),
        "-v",
        server.host,
        str(server.port),
    ]  # fmt: skip
    server_before = benchlib.cpu_seconds(server.pid)
    busy_before = benchlib.busy_cpu_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + args.warmup + 60)
    elapsed = time.monotonic() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_after = benchlib.busy_cpu_seconds()
    server_after = benchlib.cpu_seconds(server.pid)
    lines = result.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("msgs_per_sec="):
        raise RuntimeError(f"load client failed ({result.returncode}): {result.stdout}{result.stderr}")
    values: dict[str, Any] = benchlib.parse_fields(lines[-1])
    details = [line for line in result.stderr.splitlines() if line.startswith("loadclient: answered=")]
    if details:
        values.update(benchlib.parse_fields(details[-1].removeprefix("loadclient: ")))
    problems = [line for line in result.stderr.splitlines() if line not in details]
    if problems:
        values["problems"] = problems
    server_cpu = server_after - server_before
    client_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    values["server_cpu_pct"] = 100.0 * server_cpu / elapsed
    # CPU time used by anything but the server and the load client (other programs on
    # the machine, in percent of one CPU): the sign of a disturbed measurement.
    values["other_cpu_pct"] = max(0.0, 100.0 * ((busy_after - busy_before) - server_cpu - client_cpu) / elapsed)
    values["exit"] = result.returncode
    return values


def measure(
    server: benchlib.Server, args: argparse.Namespace, pipeline: int, pinned: bool, label: str
) -> dict[str, Any]:
    """Measure; re-measure (up to --retries times) while other programs use the CPUs."""
    tries = []
    for attempt in range(args.retries + 1):
        values = measure_once(server, args, pipeline, pinned)
        tries.append(values)
        disturbed = values["other_cpu_pct"] > args.max_other
        note = ""
        if disturbed:
            note = "  (disturbed: measuring again)" if attempt < args.retries else "  (disturbed)"
        if values["server_cpu_pct"] < 90:
            note += "  (server not saturated: the client or the machine held it back)"
        print(
            f"{label}  {server.name:<9}  pipeline {pipeline:>2}: "
            f"{values['msgs_per_sec']:>10,.0f} msg/s  p50 {values['p50_us']:>6,.0f} us  "
            f"p99 {values['p99_us']:>7,.0f} us  errors {values['errors']:.0f}  "
            f"CPU: server {values['server_cpu_pct']:.0f}%, client {values.get('client_cpu_pct', float('nan')):.0f}%, "
            f"others {values['other_cpu_pct']:.0f}%{note}",
            flush=True,
        )
        for problem in values.get("problems", [])[:5]:
            print(f"    {problem}")
        if not disturbed:
            break
    best = min(tries, key=lambda v: v["other_cpu_pct"])
    best["disturbed"] = best["other_cpu_pct"] > args.max_other
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description="longshore vs bare uvloop: line-echo throughput and latency")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per measurement (5)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every measurement (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each measurement (1)")
    parser.add_argument("--connections", type=int, default=50, help="connections (50)")
    parser.add_argument("--size", type=int, default=64, help="line size in bytes, with the newline (64)")
    parser.add_argument(
        "--pipelines", default="1,16", help="messages in flight per connection, comma-separated (1,16)"
    )
    parser.add_argument(
        "--max-other", type=float, default=10.0,
        help="a measurement is disturbed when other programs used more than this %% of a CPU (10)",
    )  # fmt: skip
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a disturbed measurement (2)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client to CPUs")
    args = parser.parse_args()
    pipelines = [int(p) for p in args.pipelines.split(",")]
    pinned = not args.no_pin and benchlib.pinning_possible()

    print(f"bench_echo: {benchlib.describe_machine()}")
    print(
        f"{args.connections} connections, {args.size}-byte lines, pipeline {args.pipelines}, "
        f"{args.duration:g} s (+{args.warmup:g} s warm-up) per measurement, {args.runs} runs"
    )
    if pinned:
        print(f"servers pinned to CPU {SERVER_CPU}, load client to CPU {CLIENT_CPU}")
    else:
        print("NOT pinned (fewer than 2 CPUs, no taskset, or --no-pin): numbers are less comparable")
    loadclient = benchlib.build_loadclient()
    print(f"load client: {os.path.relpath(loadclient)}", flush=True)

    app = benchlib.LongshoreApp("echo")
    servers: dict[str, benchlib.Server] = {}
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    status_after: dict | None = None
    try:
        servers["longshore"] = app.start()
        servers["bare"] = benchlib.start_bare("echo", SERVER_CPU if pinned else None)
        if pinned:
            benchlib.pin(servers["longshore"].pid, SERVER_CPU)
        for name, server in servers.items():
            print(f"  {name}: pid {server.pid} on {server.host}:{server.port}", flush=True)

        for run in range(args.runs):
            order = ["longshore", "bare"] if run % 2 == 0 else ["bare", "longshore"]
            for pipeline in pipelines:
                for name in order:
                    values = measure(servers[name], args, pipeline, pinned, f"run {run + 1}/{args.runs}")
                    results.setdefault((name, pipeline), []).append(values)
        status_after = app.status()
    finally:
        for server in servers.values():
            server.stop()
        problems = app.log_problems()
        app.cleanup()

    print()
    header = (
        f"{'server':<10} {'pipeline':>8} {'msgs/s (median)':>16} {'min':>11} {'max':>11} "
        f"{'p50 us':>7} {'p99 us':>7} {'srv CPU':>7} {'msgs/CPU-s':>11} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))

    def per_cpu_second(row: dict[str, Any]) -> float:
        return row["msgs_per_sec"] / (row["server_cpu_pct"] / 100) if row["server_cpu_pct"] > 0 else 0.0

    for pipeline in pipelines:
        for name in ("longshore", "bare"):
            rows = results[(name, pipeline)]
            rates = [r["msgs_per_sec"] for r in rows]
            print(
                f"{name:<10} {pipeline:>8} {benchlib.median(rates):>16,.0f} {min(rates):>11,.0f} "
                f"{max(rates):>11,.0f} {benchlib.median([r['p50_us'] for r in rows]):>7,.0f} "
                f"{benchlib.median([r['p99_us'] for r in rows]):>7,.0f} "
                f"{benchlib.median([r['server_cpu_pct'] for r in rows]):>6.0f}% "
                f"{benchlib.median([per_cpu_second(r) for r in rows]):>11,.0f} "
                f"{sum(r['errors'] for r in rows):>6.0f}"
            )
    print()
    verdicts = []
    for pipeline in pipelines:
        ours = results[("longshore", pipeline)]
        bare = results[("bare", pipeline)]
        ratio = benchlib.median([r["msgs_per_sec"] for r in ours]) / benchlib.median(
            [r["msgs_per_sec"] for r in bare]
        )
        per_cpu = benchlib.median([per_cpu_second(r) for r in ours]) / benchlib.median(
            [per_cpu_second(r) for r in bare]
        )
        paired = [a["msgs_per_sec"] / b["msgs_per_sec"] for a, b in zip(ours, bare) if b["msgs_per_sec"] > 0]
        met = ratio >= TARGET_RATIO
        verdicts.append(met)
        print(
            f"pipeline {pipeline:>2}: longshore/bare = {ratio:.2f} "
            f"(per run: {', '.join(f'{p:.2f}' for p in paired)}; per server CPU-second: {per_cpu:.2f})  "
            f"target >= {TARGET_RATIO}: {'met' if met else 'NOT met'}"
        )
    disturbed = sum(1 for rows in results.values() for row in rows if row["disturbed"])
    if disturbed:
        print(
            f"\n{disturbed} measurement(s) stayed disturbed by other programs (> {args.max_other:g}% of a CPU) "
            "after the retries; the medians include them. Re-run on a quieter machine, or with more --runs."
        )

    if status_after is not None:
        process = status_after["processes"][0] if status_after.get("processes") else {}
        counters = {
            key: process.get(key, 0)
            for key in ("throw_exception", "send_fail", "protocol_error", "package_too_large", "connect_fail")
        }
        print(f"\nlongshore worker counters after the runs: {counters}; exits: {status_after.get('exits') or 'none'}")
    if problems:
        print("\nlongshore log warnings/errors:")
        for line in problems[:40]:
            print(f"  {line}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
