"""A/B of this checkout against an earlier commit, alternating runs on the same machine.

    python bench/ab.py f198d80          # 1,000,000 `sleep 0`; 8 x 1,000 `sleep 10`; 16 x 1,000 `sleep 1`
    python bench/ab.py f198d80 --repeat 5 --tasks 300000

Checks the earlier commit out into a temporary work tree, then alternates A (that commit)
and B (this checkout): each run starts `scheduler.py --local 2 --no-state` (8 for the
efficiency runs, 16 for 1 ms) and times `client.py` from start to summary.  Prints the
medians and B / A for throughput of `sleep 0` tasks and for the efficiency of 10 ms and
1 ms tasks (ideal time over measured time, as bench/local.py measures them).  The machine
is shared and noisy: read ratios of medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Both sides run on the interpreter beneath any virtual environment, each in its own tree: an
# editable install of this checkout, or this folder as the current one, would load B's modules
# into A's worker processes (the forkserver's path starts with the current folder).
PYTHON = getattr(sys, "_base_executable", sys.executable)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from local import machine  # noqa: E402


def timed_run(tree: Path, workload: Path, workers: int) -> float:
    """Seconds from the client's start to its exit, against a fresh scheduler of ``tree``."""
    command = [PYTHON, str(tree / "scheduler.py"), "--local", str(workers), "--port", "0",
               "--no-state", "-q"]
    sched = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tree)
    try:
        address = sched.stdout.readline().strip().removeprefix("listening on ")
        start = time.perf_counter()
        subprocess.run([PYTHON, str(tree / "client.py"), "-s", address, "-w", str(workload)],
                       check=True, capture_output=True, cwd=tree)
        return time.perf_counter() - start
    finally:
        sched.terminate()
        sched.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the earlier commit (A)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side per figure (default 3)")
    parser.add_argument("--tasks", type=int, default=1_000_000, help="sleep-0 tasks (default 1,000,000)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "a"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.base],
                       check=True)
        try:
            zero, tens, ones = (Path(scratch) / name for name in ("zero.txt", "tens.txt", "ones.txt"))
            zero.write_text("sleep 0\n" * args.tasks)
            tens.write_text("sleep 10\n" * 8000)
            ones.write_text("sleep 1\n" * 16000)
            names = ("sleep 0 tasks/s", "sleep 10 efficiency", "sleep 1 efficiency")
            figures = {name: {"A": [], "B": []} for name in names}
            for _ in range(args.repeat):
                for side, tree in (("A", base), ("B", ROOT)):
                    figures[names[0]][side].append(args.tasks / timed_run(tree, zero, 2))
                    figures[names[1]][side].append(8000 * 0.010 / 8 / timed_run(tree, tens, 8))
                    figures[names[2]][side].append(16000 * 0.001 / 16 / timed_run(tree, ones, 16))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True)
    print(f"A = {args.base}, B = this checkout; medians of {args.repeat}, alternating")
    for name, sides in figures.items():
        a, b = statistics.median(sides["A"]), statistics.median(sides["B"])
        print(f"{name:<22} A {a:>12,.3f}   B {b:>12,.3f}   B/A {b / a:.3f}")


if __name__ == "__main__":
    main()
