"""Start-up: how long a newcomer's first command takes, beside what any Python program takes.

    python bench/startup.py [--repeat 10]

Medians of --repeat runs, alternating, each a fresh process on this machine:
  python -c pass      the interpreter alone: a floor no Python tool goes under
  xargs, 1 line       `xargs -P 2 -I{} sh -c {}` on the same one-line file: a shell tool's floor
  client, 1 line      `python client.py -w one-line.txt` (the embedded local scheduler: started,
                      the task run, stopped), the README's first command on the smallest file
  client, example     `python client.py -w examples/workload.txt` (10 lines), the README's command
Targets (issue #16): one line <= 0.35 s and the example <= 0.5 s on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local import ROOT, machine  # noqa: E402


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        one_line = Path(folder) / "one-line.txt"
        one_line.write_text("echo a\n")
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "xargs -P 2, 1 line": ["sh", "-c", f"xargs -P 2 -I{{}} sh -c {{}} < {one_line}"],
            "client, 1 line": [sys.executable, "client.py", "-w", str(one_line), "-o", "/dev/null"],
            "client, example (10 lines)": [sys.executable, "client.py", "-w", "examples/workload.txt",
                                           "-o", "/dev/null"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):  # alternating, so that a busy moment falls on every one alike
            for name, command in commands.items():
                times[name].append(wall(command))
    print(f"start-up, medians of {args.repeat} ({machine()})")
    floor = statistics.median(times["python -c pass"])
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"  {name:28} {median:6.3f} s   (min {min(runs):.3f}, max {max(runs):.3f}; "
              f"{median / floor:5.1f} x python -c pass)")


if __name__ == "__main__":
    main()
