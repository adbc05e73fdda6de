"""CloudKon-py beside Dask, Ray, Celery, GNU parallel and xargs, measured in one run, with plots.

    pip install -e '.[bench]'          # the peers and matplotlib
    python bench/compare.py --quick    # a few minutes on 2 cores
    python bench/compare.py            # the full matrix (tens of minutes)

Workloads, the same task list for every system, systems in a rotating order:
  throughput  N `sleep 0` tasks (N: 1,000,000 for CloudKon, 10,000 for the peers; --quick: a tenth)
              at each worker count;
  efficiency  `sleep 1` and `sleep 10` (milliseconds), each worker given the same number of tasks
              (the CloudKon experiment); efficiency = ideal time / measured time;
              Beside them, processes that only sleep (no framework): what the OS itself loses;
  shell       5,000 `true` lines, 2 workers: CloudKon, GNU parallel, xargs -P;
  remote      CloudKon's remote mode and Celery's SQS transport on the same AWS emulator, every
              AWS call counted by one proxy (bench/remote_peers.py): tasks/s and calls per task
              (2,000 tasks; --quick 1,000).
Writes bench/results/compare.csv, PNG plots and bench/results/compare.md (the report).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path[:0] = [str(HERE), str(ROOT)]
from local import SUMMARY, bare_sleep_efficiency, machine  # noqa: E402

PEERS = ["dask", "ray", "celery-redis"]
LOCAL_SYSTEMS = ["cloudkon", *PEERS]
TASK_MS = (1, 10)
BARE = "bare sleeping processes"


@dataclass
class Row:
    system: str
    workload: str  # throughput, efficiency, shell, remote
    workers: int
    tasks: int
    ms: int
    seconds: float
    api_calls: int | None = None
    settings: str = ""

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds

    @property
    def efficiency(self) -> float:
        return self.tasks / self.workers * self.ms / 1000 / self.seconds


class CloudKon:
    """A scheduler with ``workers`` local workers (its job store on, as by default) and a client per job."""

    def __init__(self, workers: int, workdir: str) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scheduler.py"), "--local", str(workers), "--port", "0", "-q",
             "--state", os.path.join(workdir, f"jobs-{workers}-{time.monotonic_ns()}.sqlite")],
            stdout=subprocess.PIPE, text=True)
        self.address = self.proc.stdout.readline().strip().removeprefix("listening on ")
        time.sleep(0.5)  # workers up: start-up is outside the figures, as for the peers
        self.settings = (f"scheduler.py --local {workers} (job store on); client.py -s ADDRESS -w FILE; "
                         "wall time from the client's summary")

    def run(self, lines: list[str]) -> float:
        path = os.path.join(self.workdir, "workload.txt")
        Path(path).write_text("\n".join(lines) + "\n")
        done = subprocess.run([sys.executable, str(ROOT / "client.py"), "-s", self.address, "-w", path],
                              capture_output=True, text=True)
        summary = SUMMARY.search(done.stderr)
        if done.returncode != 0 or not summary:
            raise SystemExit(f"cloudkon run failed: {done.stderr[-500:]}")
        return float(summary[4])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def run_local_system(system: str, workers: int, jobs: list[tuple[int, int]],
                     workdir: str) -> tuple[str, list[float]]:
    """(settings, seconds per job) of one system at one worker count."""
    if system == "cloudkon":
        cloudkon = CloudKon(workers, workdir)
        try:
            return cloudkon.settings, [cloudkon.run([f"sleep {ms}"] * tasks) for tasks, ms in jobs]
        finally:
            cloudkon.stop()
    done = subprocess.run([sys.executable, str(HERE / "peers.py"), system, "--workers", str(workers),
                           "--jobs", json.dumps(jobs)], capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise SystemExit(f"{system} failed: {done.stderr[-2000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer["settings"], answer["seconds"]


def shell_runs(count: int, workdir: str) -> list[Row]:
    path = os.path.join(workdir, "true.txt")
    Path(path).write_text("true\n" * count)
    commands = {"gnu-parallel": (["parallel", "-j", "2"], "parallel -j 2 < FILE"),
                "xargs": (["xargs", "-P", "2", "-I{}", "sh", "-c", "{}"], "xargs -P 2 -I{} sh -c {} < FILE")}
    rows = []
    cloudkon = CloudKon(2, workdir)
    try:
        rows.append(Row("cloudkon", "shell", 2, count, 0, cloudkon.run(["true"] * count),
                        settings=cloudkon.settings))
    finally:
        cloudkon.stop()
    for system, (command, settings) in commands.items():
        if shutil.which(command[0]) is None:
            print(f"  {system}: {command[0]} not installed, skipped", flush=True)
            continue
        start = time.perf_counter()
        with open(path) as workload:
            subprocess.run(command, stdin=workload, stdout=subprocess.DEVNULL, check=True)
        rows.append(Row(system, "shell", 2, count, 0, time.perf_counter() - start, settings=settings))
    return rows


def remote_runs(tasks: int, workers: int, workdir: str) -> list[Row]:
    import remote_peers
    rows = []
    with remote_peers.Emulator() as emulator:
        for system, run in (("cloudkon-remote", remote_peers.run_cloudkon_remote),
                            ("celery-sqs", remote_peers.run_celery_sqs)):
            result = run(emulator, tasks, workers, workdir)
            rows.append(Row(system, "remote", workers, result.tasks, 0, result.seconds, result.api_calls,
                            result.settings))
            print(f"  {system}: {result.tasks / result.seconds:,.0f} tasks/s, "
                  f"{result.api_calls / result.tasks:.4f} calls/task", flush=True)
    return rows


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per (system, workload, workers, ms): the median run."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.system, row.workload, row.workers, row.ms)].append(row)
    return [sorted(group, key=lambda r: r.seconds)[len(group) // 2] for group in groups.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes, fewer worker counts")
    parser.add_argument("--repeat", type=int, default=None, help="rounds of the matrix (default 3; quick 1)")
    parser.add_argument("--skip", action="append", default=[], metavar="SYSTEM",
                        help="leave a system out (repeatable): " + ", ".join(LOCAL_SYSTEMS + ["remote"]))
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    repeat = args.repeat or (1 if args.quick else 3)
    worker_counts = [1, 2, 4, 8, 16]
    per_worker = 200 if not args.quick else 50
    systems = [s for s in LOCAL_SYSTEMS if s not in args.skip]
    print(f"machine: {machine()}", flush=True)
    rows: list[Row] = []
    settings: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for round_number in range(repeat):
            for i, workers in enumerate(worker_counts):
                turn = i + round_number
                for system in systems[turn % len(systems):] + systems[:turn % len(systems)]:
                    zero = (1_000_000 if system == "cloudkon" else 10_000) // scale
                    jobs = [(zero, 0)] + [(workers * per_worker, ms) for ms in TASK_MS]
                    settings[system], seconds = run_local_system(system, workers, jobs, workdir)
                    for (tasks, ms), took in zip(jobs, seconds, strict=True):
                        rows.append(Row(system, "throughput" if ms == 0 else "efficiency", workers, tasks, ms,
                                        took, settings=settings[system]))
                    print(f"round {round_number + 1} {system:<13} {workers:>2} workers: "
                          f"{zero / seconds[0]:>10,.0f} sleep-0 tasks/s, efficiency "
                          + ", ".join(f"{ms} ms {rows[-len(TASK_MS) + k].efficiency:.1%}"
                                      for k, ms in enumerate(TASK_MS)), flush=True)
            for workers in worker_counts:
                for ms in TASK_MS:
                    ideal = per_worker * ms / 1000
                    took = ideal / bare_sleep_efficiency(workers, per_worker, ms)
                    rows.append(Row(BARE, "efficiency", workers, workers * per_worker, ms, took,
                                    settings="already started processes that only call time.sleep, "
                                             "timer slack 1 ns (bench/local.py's baseline)"))
            rows += shell_runs(5000 // scale, workdir)
        if "remote" not in args.skip:
            # CloudKon's ~220 calls are mostly fixed (queues, tables, idle polls): too few tasks
            # would measure set-up rather than calls per task.
            rows += remote_runs(1000 if args.quick else 2000, 2, workdir)
    summary = median_rows(rows)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(summary[0]), "rate", "efficiency"])
        writer.writeheader()
        for row in summary:
            writer.writerow({**asdict(row), "rate": round(row.rate, 1),
                             "efficiency": round(row.efficiency, 4) if row.ms else ""})
    import report
    report.write(summary, machine(), date.today().isoformat(), repeat, per_worker, args.quick,
                 platform.python_version())
    print((RESULTS / "compare.md").read_text().split("\n## How each system was run")[0])
    print(f"wrote {RESULTS / 'compare.csv'}, {RESULTS / 'compare.md'} and the plots", flush=True)


if __name__ == "__main__":
    main()
