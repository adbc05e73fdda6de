"""Makespan of mixed workloads on the local backend, against the greedy list schedule of the same durations.

    python bench/makespan.py                # the full set, --scale 0.5 (about 15 minutes on 2 cores)
    python bench/makespan.py --scale 1      # durations as specified (about 27 minutes)
    python bench/makespan.py --quick        # smoke run: --scale 0.1, 8 workers, 2 orders (under 2 minutes)

Workloads, 400 `sleep N` tasks each (N in ms, fixed --seed), every duration times --scale:
  loguniform  log-uniform between 1 ms and 10 s, and 5% (20 tasks) exactly 0 ms;
  bimodal     half 0 ms, half 10 s (200 x 10 s / 8 workers = 250 s at scale 1: hence the default
              scale of 0.5, so that the whole set fits in about 15 minutes);
  uniform     every task 500 ms (run in one order: every order is the same file).
Orders: random, ascending, descending, short-first (the tasks under 1 s before scaling, then the
others, each group shuffled).

Each workload x order runs once per worker count (--workers, default 8 32) as one client.py run
against a scheduler `--local N --no-state` started once per worker count, warmed up, and reused.
  real    the client's own wall time (its summary line: from its start, after imports, to its last
          result), so it includes the fixed per-job cost (connect, submit, collect), measured on
          the same scheduler as the median client wall of 1-task `sleep 0` jobs and printed
          (about 0.15 s warm); at small scales it weighs more;
  greedy  the same durations in file order, each task to the worker that frees first (no overhead);
  ideal   sum of durations / workers.
Target: real / greedy <= 1.10 for the mixed workloads, <= 1.05 for uniform.  Every task must have
exactly one result, `success` (exit 2 otherwise).  `busiest` is the largest sum of `elapsed_ms` over
the tasks one worker ran (the results' `worker` field): near `real`, the assignment was uneven; well
under it, the workers waited.
Prints a table and the machine, and writes bench/results/makespan.csv, makespan.md and, when
matplotlib is importable, makespan.png.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from local import SUMMARY, Scheduler, machine, write_workload  # noqa: E402

TASKS = 400
WORKLOADS = ("loguniform", "bimodal", "uniform")
ORDERS = ("random", "ascending", "descending", "short-first")
QUICK_ORDERS = ("random", "short-first")
TARGETS = {"loguniform": 1.10, "bimodal": 1.10, "uniform": 1.05}
SHORT_MS = 1000  # short-first: tasks under this (before scaling) go first
DEFAULT_SCALE = 0.5
QUICK_SCALE = 0.1
OVERHEAD_RUNS = 5
# Per client run beyond the makespan (Python start, results file) and per scheduler (start, warm-up,
# overhead runs): only for the time estimate printed at the start.
RUN_COST_S, SCHEDULER_COST_S = 0.6, 8.0


def durations(workload: str, seed: int) -> list[int]:
    """The workload's durations in ms before scaling, in a random order."""
    rng = random.Random(f"{seed}:{workload}")
    if workload == "loguniform":
        zeros = TASKS // 20
        ms = [0] * zeros + [round(10 ** rng.uniform(0, 4)) for _ in range(TASKS - zeros)]
    elif workload == "bimodal":
        ms = [0] * (TASKS // 2) + [10_000] * (TASKS - TASKS // 2)
    else:
        ms = [500] * TASKS
    rng.shuffle(ms)
    return ms


def ordered(ms: list[int], order: str, seed: int) -> list[int]:
    rng = random.Random(f"{seed}:{order}")
    if order == "random":
        out = list(ms)
        rng.shuffle(out)
        return out
    if order in ("ascending", "descending"):
        return sorted(ms, reverse=order == "descending")
    short, long = [d for d in ms if d < SHORT_MS], [d for d in ms if d >= SHORT_MS]
    rng.shuffle(short)
    rng.shuffle(long)
    return short + long


def greedy_makespan(ms: list[int], workers: int) -> float:
    """Seconds: tasks in order, each to the worker that frees first."""
    free = [0] * workers
    for d in ms:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free) / 1000


def scaled(ms: list[int], scale: float) -> list[int]:
    return [round(d * scale) for d in ms]


def run_client(address: str, workload: str, output: str) -> tuple[float, float, int]:
    """(client wall s from its summary line, process wall s, exit code) of one client run."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "client.py"), "-s", address, "-w", workload,
                           "-o", output], stderr=subprocess.PIPE, text=True)
    process_wall = time.perf_counter() - start
    summary = SUMMARY.search(proc.stderr)
    if summary is None:
        sys.stderr.write(proc.stderr)
    return (float(summary[4]) if summary else math.nan), process_wall, proc.returncode


def check_results(path: str, total: int) -> tuple[list[str], dict[str, float], float]:
    """(problems, seconds of elapsed_ms per worker, sum of elapsed s) from a results file."""
    problems: list[str] = []
    per_worker: dict[str, float] = defaultdict(float)
    seen: Counter[int] = Counter()
    try:
        with open(path) as f:
            results = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as exc:
        return [f"no readable results file: {exc}"], {}, 0.0
    for result in results:
        seen[result["id"]] += 1
        if result["status"] != "success":
            problems.append(f"task {result['id']}: {result['status']} {result.get('error', '')}".rstrip())
        per_worker[str(result.get("worker"))] += result["elapsed_ms"] / 1000
    missing = [i for i in range(total) if seen[i] == 0]
    twice = [i for i, n in seen.items() if n > 1]
    stray = [i for i in seen if not 0 <= i < total]
    if missing or twice or stray:
        problems.append(f"{len(missing)} task(s) without a result, {len(twice)} with more than one, "
                        f"{len(stray)} unknown id(s)")
    return problems, dict(per_worker), sum(per_worker.values())


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    cells = []
    for workload in args.workloads:
        for order in (["any"] if workload == "uniform" else args.orders):
            cells.append((workload, order))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: --scale {QUICK_SCALE}, 8 workers, orders {', '.join(QUICK_ORDERS)}")
    parser.add_argument("--scale", type=float, help=f"multiply every duration (default {DEFAULT_SCALE}; "
                        f"--quick {QUICK_SCALE})")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default 8 32; --quick 8)")
    parser.add_argument("--orders", nargs="+", choices=ORDERS, help="default: all (--quick: a subset)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the table shows medians")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "makespan"),
                        help="path prefix of the .csv, .md and .png written")
    parser.add_argument("--keep", metavar="DIR", help="keep the workloads and results files in DIR")
    args = parser.parse_args()
    args.scale = args.scale if args.scale is not None else QUICK_SCALE if args.quick else DEFAULT_SCALE
    args.workers = args.workers or ([8] if args.quick else [8, 32])
    args.orders = args.orders or list(QUICK_ORDERS if args.quick else ORDERS)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])

    cells = plan(args)
    base = {w: durations(w, args.seed) for w in args.workloads}
    files = {(w, o): scaled(ordered(base[w], o, args.seed) if o != "any" else base[w], args.scale)
             for w, o in cells}
    expected = sum(greedy_makespan(ms, n) + RUN_COST_S for ms in files.values() for n in args.workers)
    expected = expected * args.repeat + SCHEDULER_COST_S * len(args.workers)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    print(f"machine: {machine()}")
    print(f"date: {started}, load average {load_before[0]:.2f}")
    print(f"scale: {args.scale:g} (every duration x {args.scale:g}: the 10 s tasks run "
          f"{10 * args.scale:g} s, the 500 ms ones {round(500 * args.scale)} ms); seed {args.seed}; "
          f"{len(cells)} workload/order cells x workers {' '.join(map(str, args.workers))} x "
          f"{args.repeat} run(s); expected about {expected / 60:.1f} min", flush=True)

    rows: list[dict] = []
    overheads: dict[int, tuple[float, float]] = {}
    problems: list[str] = []
    tmp = tempfile.TemporaryDirectory()
    directory = args.keep or tmp.name
    os.makedirs(directory, exist_ok=True)
    paths = {(w, o): write_workload(directory, f"{w}-{o}.txt", [f"sleep {d}" for d in ms])
             for (w, o), ms in files.items()}
    one = write_workload(directory, "one.txt", ["sleep 0"])
    header = (f"{'workload':<11} {'order':<12} {'workers':>7} {'real s':>8} {'greedy s':>8} {'ratio':>6} "
              f"{'ideal s':>8} {'target':>6} {'meets':>5} {'busiest s':>9}")
    try:
        for workers in args.workers:
            sched = Scheduler(workers, None)
            try:
                warm = write_workload(directory, "warm.txt", ["sleep 50"] * (2 * workers))
                run_client(sched.address, warm, os.path.join(directory, "warm.jsonl"))
                samples = [run_client(sched.address, one, os.path.join(directory, "one.jsonl"))
                           for _ in range(OVERHEAD_RUNS)]
                overhead = statistics.median(s[0] for s in samples)
                process = statistics.median(s[1] for s in samples)
                overheads[workers] = (overhead, process)
                print(f"\n{workers} workers: fixed per-job cost (client wall of a 1-task `sleep 0` job, "
                      f"median of {OVERHEAD_RUNS}): {overhead:.3f} s; the whole client process, Python "
                      f"start included: {process:.3f} s")
                print(header, flush=True)
                for run in range(args.repeat):
                    for workload, order in cells:
                        ms = files[workload, order]
                        output = os.path.join(directory, f"{workload}-{order}-{workers}w-{run}.jsonl")
                        real, process_wall, code = run_client(sched.address, paths[workload, order], output)
                        found, per_worker, elapsed = check_results(output, len(ms))
                        if code != 0:
                            found.insert(0, f"client exit code {code}")
                        problems += [f"{workload}/{order}/{workers} workers: {p}" for p in found[:5]]
                        greedy = greedy_makespan(ms, workers)
                        row = {
                            "workload": workload, "order": order, "workers": workers, "run": run,
                            "scale": args.scale, "real_s": round(real, 3), "greedy_s": round(greedy, 3),
                            "ratio": round(real / greedy, 4) if greedy else math.nan,
                            "ideal_s": round(sum(ms) / 1000 / workers, 3), "target": TARGETS[workload],
                            "busiest_s": round(max(per_worker.values(), default=math.nan), 3),
                            "workers_used": len(per_worker), "elapsed_sum_s": round(elapsed, 3),
                            "nominal_sum_s": sum(ms) / 1000, "process_wall_s": round(process_wall, 3),
                            "job_overhead_s": round(overhead, 3),
                            "ratio_net": round((real - overhead) / greedy, 4) if greedy else math.nan,
                            "ok": not found,
                        }
                        row["meets"] = row["ratio"] <= row["target"]
                        rows.append(row)
                        print(_line(row), flush=True)
            finally:
                sched.stop()
    finally:
        if not args.keep:
            tmp.cleanup()

    table = _medians(rows)
    load_after = os.getloadavg()
    print(f"\nload average at the end: {load_after[0]:.2f}")
    _summary(table, overheads, args.scale)
    written = _write(args, rows, table, overheads, command, started, (load_before[0], load_after[0]))
    print("wrote " + ", ".join(written))
    if problems:
        print(f"{len(problems)} problem(s) with the results:", *problems, sep="\n  ", file=sys.stderr)
        raise SystemExit(2)


def _line(row: dict) -> str:
    return (f"{row['workload']:<11} {row['order']:<12} {row['workers']:>7} {row['real_s']:>8.3f} "
            f"{row['greedy_s']:>8.3f} {row['ratio']:>6.3f} {row['ideal_s']:>8.3f} {row['target']:>6.2f} "
            f"{'yes' if row['meets'] else 'NO':>5} {row['busiest_s']:>9.3f}")


def _medians(rows: list[dict]) -> list[dict]:
    """One row per workload/order/workers: medians over the runs."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["workload"], row["order"], row["workers"]].append(row)
    table = []
    for group in groups.values():
        row = dict(group[0])
        for key in ("real_s", "ratio", "busiest_s", "ratio_net", "process_wall_s"):
            row[key] = statistics.median(r[key] for r in group)
        row["runs"] = len(group)
        row["meets"] = row["ratio"] <= row["target"]
        table.append(row)
    return table


def _overall(table: list[dict]) -> list[tuple[str, float, int, int]]:
    """(group, median ratio, cells meeting the target, cells) per workload, per worker count, and all."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for key in ("workload", "workers", "all"):
        for row in table:
            name = {"workload": f"workload {row['workload']}", "workers": f"{row['workers']} workers"}
            groups[name.get(key, "all")].append(row)
    return [(name, statistics.median(r["ratio"] for r in rs), sum(r["meets"] for r in rs), len(rs))
            for name, rs in groups.items()]


def _summary(table: list[dict], overheads: dict[int, tuple[float, float]], scale: float) -> None:
    for name, ratio, met, cells in _overall(table):
        print(f"median real/greedy, {name}: {ratio:.3f} ({met}/{cells} cells meet the target)")
    shortest = min(table, key=lambda r: r["greedy_s"])
    overhead = overheads[shortest["workers"]][0]
    print(f"fixed per-job cost {', '.join(f'{n} workers {o:.3f} s' for n, (o, _) in overheads.items())}: "
          f"at scale {scale:g} the shortest greedy makespan is {shortest['greedy_s']:.2f} s "
          f"({shortest['workload']}/{shortest['order']}/{shortest['workers']}), so this cost alone is "
          f"{overhead / shortest['greedy_s']:.1%} of it")


def _write(args: argparse.Namespace, rows: list[dict], table: list[dict],
           overheads: dict[int, tuple[float, float]], command: str, started: str,
           load: tuple[float, float]) -> list[str]:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    written = [f"{args.out}.csv", f"{args.out}.md"]
    with open(written[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = _plot(table, args.scale, f"{args.out}.png")
    lines = [
        "# Makespan of mixed workloads against the greedy list schedule",
        "",
        f"- machine: {machine()}",
        f"- date: {started}; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end "
        "(a shared VM: expect noise)",
        f"- command: `{command}`",
        f"- scale: **{args.scale:g}** (every duration x {args.scale:g}); seed {args.seed}; "
        f"{TASKS} `sleep N` tasks per workload; {args.repeat} run(s) per cell (medians shown)",
        "- fixed per-job cost (client wall of a 1-task `sleep 0` job, median of "
        f"{OVERHEAD_RUNS}): " + ", ".join(f"{n} workers {o:.3f} s (whole process {p:.3f} s)"
                                          for n, (o, p) in overheads.items())
        + "; it is part of every `real` figure and weighs more at small scales",
        "",
        "real: the client's own wall time (from its start to its last result); greedy: the same durations "
        "in file order, each to the worker that frees first; ideal: sum / workers; busiest: the largest "
        "sum of `elapsed_ms` over one worker's tasks. Target real/greedy <= 1.10 (mixed), <= 1.05 "
        "(uniform, run in one order: all orders are the same file).",
        "",
        "| workload | order | workers | real s | greedy s | real/greedy | ideal s | target | meets "
        "| busiest s | (real - per-job cost)/greedy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in table:
        lines.append(f"| {r['workload']} | {r['order']} | {r['workers']} | {r['real_s']:.3f} | "
                     f"{r['greedy_s']:.3f} | {r['ratio']:.3f} | {r['ideal_s']:.3f} | {r['target']:.2f} | "
                     f"{'yes' if r['meets'] else '**no**'} | {r['busiest_s']:.3f} | {r['ratio_net']:.3f} |")
    lines += ["", "Medians of real/greedy:", "", "| group | median real/greedy | cells meeting the target |",
              "| --- | ---: | ---: |"]
    lines += [f"| {name} | {ratio:.3f} | {met}/{cells} |" for name, ratio, met, cells in _overall(table)]
    if png:
        lines += ["", f"![real/greedy]({os.path.basename(png)})"]
        written.append(png)
    with open(written[1], "w") as f:
        f.write("\n".join(lines) + "\n")
    return written


def _plot(table: list[dict], scale: float, path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not importable (pip install matplotlib, or the bench extra): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["workload"], r["order"]) for r in table))
    counts = sorted({r["workers"] for r in table})
    ratio = {(r["workload"], r["order"], r["workers"]): r["ratio"] for r in table}
    width = 0.8 / len(counts)
    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 4.5))
    for k, workers in enumerate(counts):
        xs = [i + (k - (len(counts) - 1) / 2) * width for i in range(len(groups))]
        axes.bar(xs, [ratio.get((w, o, workers), math.nan) for w, o in groups], width,
                 label=f"{workers} workers")
    axes.axhline(1.10, color="red", linestyle="--", linewidth=1, label="target 1.10 (mixed)")
    if any(w == "uniform" for w, _ in groups):
        axes.axhline(1.05, color="orange", linestyle=":", linewidth=1, label="target 1.05 (uniform)")
    axes.axhline(1.0, color="black", linewidth=0.5)
    axes.set_xticks(range(len(groups)), [f"{w}\n{o}" for w, o in groups], fontsize=8)
    axes.set_ylabel("real / greedy makespan")
    axes.set_ylim(min(0.9, min(ratio.values()) - 0.02), max(1.2, max(ratio.values()) + 0.05))
    axes.set_title(f"Makespan against the greedy list schedule, {TASKS} sleep tasks, scale {scale:g}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
