"""The CloudKon experiments on the local backend, each beside a baseline from the same run.

    python bench/local.py            # full sizes (a few minutes on 2 cores)
    python bench/local.py --quick    # a tenth of the sizes

Experiments (medians of --repeat runs, real scheduler and client processes):
  throughput  1,000,000 `sleep 0` tasks, client file to summary, scheduler --local 2 with its
              job store (an SQLite file, the default); baseline: a raw multiprocessing pool of
              2 doing the same with JSON both ways.
  store cost  the same runs against a scheduler with --no-state (jobs in memory only),
              interleaved with the ones above.
  efficiency  ideal time / measured time for sleep 10 (8 workers x 1,000 tasks), sleep 1
              (16 x 1,000) and sleep 1000 (8 x 4); baseline: the same sleeps in bare
              processes, no framework (what the OS itself loses to timer overshoot).
  shell       5,000 `true` lines, --local 2 against `xargs -P 2 -I{} sh -c {}`.
  memory      peak RSS of scheduler and client in the throughput run.
Prints a table and the machine, and writes bench/results/local.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"(\d+) tasks: (\d+) succeeded, (\d+) failed, ([\d.]+) s wall")


def machine() -> str:
    model = "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


class Scheduler:
    def __init__(self, workers: int, state: str | None) -> None:
        """A scheduler with ``workers`` local workers, its job store at ``state`` (None: --no-state)."""
        store = ["--state", state] if state else ["--no-state"]
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scheduler.py"), "--local", str(workers),
                                      "--port", "0", "-q", *store], stdout=subprocess.PIPE, text=True)
        self.address = self.proc.stdout.readline().strip().removeprefix("listening on ")
        time.sleep(0.5)  # workers are up; not part of any measurement

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def run_client(address: str, workload: str) -> tuple[float, float]:
    """(wall seconds, client peak RSS in MB) for one client run; every task must succeed.

    The wall time is the client's own, from reading the workload to its summary.
    """
    proc = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "-s", address, "-w", workload],
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    summary = SUMMARY.search(proc.stderr.read())
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0 or not summary or summary[1] != summary[2]:
        raise SystemExit(f"client run failed: {summary and summary[0]}")
    return float(summary[4]), usage.ru_maxrss / 1024


def write_workload(directory: str, name: str, lines: list[str]) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _json_round_trip(chunk: str) -> str:
    return json.dumps([(0, "", 0) for _ in json.loads(chunk)])


def raw_pool_rate(n: int) -> float:
    """Tasks/s of a bare 2-process pool doing nothing per task but JSON both ways."""
    chunks = [json.dumps(["sleep 0"] * 4096) for _ in range(n // 4096)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        start = time.perf_counter()
        for _ in pool.imap_unordered(_json_round_trip, chunks):
            pass
        return len(chunks) * 4096 / (time.perf_counter() - start)


def _bare_sleeper(go, count: int, ms: int) -> None:
    from cloudkon.processes import reduce_timer_slack
    reduce_timer_slack()
    go.wait()
    for _ in range(count):
        time.sleep(ms / 1000)


def bare_sleep_efficiency(workers: int, count: int, ms: int) -> float:
    """Efficiency of already-started processes that only sleep (the OS's own loss)."""
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    procs = [ctx.Process(target=_bare_sleeper, args=(go, count, ms)) for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start = time.perf_counter()
    go.set()
    for p in procs:
        p.join()
    return count * ms / 1000 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; medians are reported")
    parser.add_argument("--csv", default=str(ROOT / "bench" / "results" / "local.csv"))
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    sys.path.insert(0, str(ROOT))
    rows: list[dict] = []

    def record(experiment: str, ours: float, baseline: float, unit: str, baseline_name: str) -> None:
        rows.append({"experiment": experiment, "cloudkon": round(ours, 4), "baseline": round(baseline, 4),
                     "ratio": round(ours / baseline, 3), "unit": unit, "baseline_is": baseline_name})
        print(f"{experiment:<34} {ours:>12,.3f} {baseline:>12,.3f} {ours / baseline:>7.3f}  {unit}  "
              f"(baseline: {baseline_name})", flush=True)

    print(f"machine: {machine()}")
    print(f"{'experiment':<34} {'cloudkon':>12} {'baseline':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        n = 1_000_000 // scale
        zero = write_workload(tmp, "zero.txt", ["sleep 0"] * n)
        state = os.path.join(tmp, "jobs.sqlite")
        sched, in_memory = Scheduler(2, state), Scheduler(2, None)
        runs, unstored = [], []
        for _ in range(args.repeat):
            runs.append(run_client(sched.address, zero))
            unstored.append(run_client(in_memory.address, zero)[0])
        scheduler_rss = sched.peak_rss_mb()
        sched.stop()
        in_memory.stop()
        pool = statistics.median(raw_pool_rate(n) for _ in range(args.repeat))
        stored_rate = n / statistics.median(w for w, _ in runs)
        record(f"throughput {n:,} x sleep 0", stored_rate, pool,
               "tasks/s", "raw multiprocessing pool, JSON both ways")
        record("  with the job store vs without", stored_rate, n / statistics.median(unstored),
               "tasks/s", "--no-state")
        print(f"  job store after {args.repeat} runs: {os.path.getsize(state) / 1e6:,.0f} MB "
              "(+ its write-ahead log)")
        rows.append({"experiment": f"peak RSS at {n:,} tasks", "cloudkon": round(scheduler_rss, 1),
                     "baseline": round(max(r for _, r in runs), 1), "ratio": "", "unit": "MB",
                     "baseline_is": "scheduler / client"})
        print(f"peak RSS at {n:,} tasks: scheduler {scheduler_rss:,.0f} MB, client "
              f"{max(r for _, r in runs):,.0f} MB")

        for ms, workers, per_worker in ((10, 8, 1000), (1, 16, 1000), (1000, 8, 4)):
            per_worker = max(per_worker // scale, 4) if ms < 1000 else per_worker
            path = write_workload(tmp, f"sleep{ms}.txt", [f"sleep {ms}"] * (workers * per_worker))
            ideal = per_worker * ms / 1000
            sched = Scheduler(workers, os.path.join(tmp, f"jobs{ms}.sqlite"))
            walls = [run_client(sched.address, path)[0] for _ in range(args.repeat)]
            sched.stop()
            bare = statistics.median(bare_sleep_efficiency(workers, per_worker, ms)
                                     for _ in range(args.repeat))
            record(f"efficiency sleep {ms} ms, {workers} workers", ideal / statistics.median(walls), bare,
                   "ideal/measured", "bare sleeping processes")

        shell = write_workload(tmp, "true.txt", ["true"] * (5000 // scale))
        sched = Scheduler(2, os.path.join(tmp, "jobs-shell.sqlite"))
        ours = statistics.median(run_client(sched.address, shell)[0] for _ in range(args.repeat))
        sched.stop()
        xargs = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            with open(shell) as f:
                subprocess.run(["xargs", "-P", "2", "-I{}", "sh", "-c", "{}"], stdin=f, check=True)
            xargs.append(time.perf_counter() - start)
        count = 5000 // scale
        record(f"shell {count:,} x true, 2 workers", count / ours, count / statistics.median(xargs),
               "tasks/s", "xargs -P 2")

    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
