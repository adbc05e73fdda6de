"""A chaos test with an invariant checker (issue #15): a 10,000-task job runs while local workers are
killed with SIGKILL and the scheduler is restarted on its job store, killed with SIGKILL twice and
stopped with SIGTERM once; afterwards every task has exactly one result, and no task ran twice unless
the process running it died.

Each task is a shell command that appends one line to a side file when it starts (one small
O_APPEND write: lines never mix): its task id, the shell's pid, and its parent's pid, start time
and name (from /proc/$PPID/stat).  The parent of a task's shell is the worker process running it,
and a pid with its start time names one process for good, whatever pids the system reuses.

The rule for runs (a task's lines in the side file): at most one run of each task was made by a
worker process that lived on; every other run was made by one that died by the test's hand: a
worker the test killed with SIGKILL, or one alive when the test killed its scheduler with SIGKILL
(its workers then stop, with what they ran but had not reported, or the scheduler had not
stored).  A run whose shell was orphaned before it started (its worker was killed between fork
and exec, so that its parent is the reaper, no python process) is one of a dead worker too; such
a shell may write its line after the task's rerun has written its own, so the rule does not go by
the order of the lines.  The scheduler stopped with SIGTERM finishes what it runs and stores it:
its workers' runs count as ones that lived on.  Work stealing and time boxes hand back only tasks
that never started, so they add no run.  A task that succeeded ran at least once; a task that
failed says its worker died (a task that was running when its worker was killed twice is
reported failed rather than run a third time).
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
from pathlib import Path

from conftest import (
    SchedulerProcess,
    children,
    line_count,
    processes_mentioning,
    read_results,
    run_client,
    start_client,
    wait_until,
)

TASKS = 10_000
WORKERS = 3
SEED = 1516
# Faults, each once the side file holds that many runs: "worker" kills a random worker process
# with SIGKILL, "kill" the scheduler with SIGKILL and "term" stops it with SIGTERM; a new
# scheduler then starts on the same store and the job goes on.
FAULTS = [(600, "worker"), (1300, "worker"), (2000, "kill"), (2800, "worker"), (3500, "worker"),
          (4300, "term"), (5100, "worker"), (5800, "worker"), (6600, "kill"), (7400, "worker"),
          (8100, "worker")]
DEATH = re.compile(r"died|killed|stopped|shut down")

Process = tuple[int, int]  # pid and start time (clock ticks since boot): one process for good


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the name
    except (OSError, IndexError, ValueError):
        return None


def _alive(process: Process) -> bool:
    return _start_time(process[0]) == process[1]


class Chaos:
    """The schedulers started, the processes seen and the faults made."""

    def __init__(self, start_scheduler, state: Path) -> None:
        self._start = start_scheduler
        self.state = state
        self.schedulers: list[SchedulerProcess] = []
        self.logs: list[list[str]] = []
        self.seen: set[Process] = set()  # every worker, forkserver and helper process observed
        self.killed: set[Process] = set()  # workers killed by the test, and workers of killed schedulers
        self.terminated: set[Process] = set()  # workers of the scheduler stopped with SIGTERM
        self.sched = self.start()

    def start(self) -> SchedulerProcess:
        sched = self._start("--local", str(WORKERS), "--state", str(self.state))
        log: list[str] = []  # its stderr, read all along so that its logging never blocks
        threading.Thread(target=lambda: log.extend(sched.proc.stderr), daemon=True).start()
        self.schedulers.append(sched)
        self.logs.append(log)
        return sched

    def workers(self) -> set[Process]:
        """The current scheduler's worker processes, once it has all of them (none being replaced)."""
        def full() -> set[Process] | None:
            found = {(pid, _start_time(pid)) for pid in self.sched.worker_pids()}
            found = {p for p in found if p[1] is not None}
            return found if len(found) == WORKERS else None
        workers = wait_until(full, timeout=30)
        self.observe()
        return workers

    def observe(self) -> None:
        helpers = children(self.sched.proc.pid)  # the forkserver and the resource tracker
        for pid in helpers + [w for h in helpers for w in children(h)]:
            start = _start_time(pid)
            if start is not None:
                self.seen.add((pid, start))

    def kill_worker(self, rng: random.Random) -> None:
        victim = rng.choice(sorted(self.workers()))
        os.kill(victim[0], signal.SIGKILL)
        self.killed.add(victim)

    def restart(self, sig: int) -> None:
        workers = self.workers()
        helpers = children(self.sched.proc.pid)
        code = self.sched.stop(sig)
        if sig == signal.SIGKILL:
            # Workers started between the look and the kill are the forkserver's children still.
            late = {(pid, _start_time(pid)) for h in helpers for pid in children(h)}
            self.killed |= workers | {p for p in late if p[1] is not None}
        else:
            assert code == 0, "".join(self.logs[-1])[-3000:]
            self.terminated |= workers
        self.sched = self.start()


def _runs(side: Path) -> dict[int, list[tuple[int, Process, str]]]:
    """Each task's runs in the order they started: the shell's pid, its parent and the parent's name."""
    runs: dict[int, list[tuple[int, Process, str]]] = {}
    for line in side.read_text().splitlines():
        task, shell, ppid, name, start = line.split()
        runs.setdefault(int(task), []).append((int(shell), (int(ppid), int(start)), name))
    return runs


def test_workers_and_schedulers_die_and_every_task_gets_one_result(start_scheduler, workload, tmp_path):
    rng = random.Random(SEED)
    side = tmp_path / "runs"
    # /proc/$PPID/stat: "pid (name) state ppid ..." with the start time 22nd (names have no space here).
    record = f'read -r s < /proc/$PPID/stat; set -- $s; echo "%d $$ $PPID $2 ${{22}}" >> {side}'
    tasks = [record % i + ("; sleep 0.01" if i % 20 == 0 else "") for i in range(TASKS)]
    chaos = Chaos(start_scheduler, tmp_path / "state" / "jobs.sqlite")
    client = start_client("-s", chaos.sched.address, "-w", workload(tasks), "-o", str(tmp_path / "first"))
    try:
        submitted = client.stderr.readline()
        job = re.search(r"client\.py: job (\S+)", submitted)
        assert job, submitted + client.stderr.read()
        job = job.group(1)

        for runs, fault in FAULTS:
            def reached(runs: int = runs) -> bool:
                chaos.observe()
                return line_count(side) >= runs
            wait_until(reached, timeout=60, interval=0.05)
            if fault == "worker":
                chaos.kill_worker(rng)
            else:
                chaos.restart(signal.SIGKILL if fault == "kill" else signal.SIGTERM)

        out = tmp_path / "results.jsonl"
        fetched = run_client("-s", chaos.sched.address, "--cursor", job, "-o", str(out), timeout=110)
        assert fetched.returncode in (0, 1), fetched.stderr
        chaos.observe()
        assert chaos.sched.stop(signal.SIGTERM) == 0
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()
        client.stderr.close()
        client.stdout.close()

    results = read_results(out)
    assert sorted(r["id"] for r in results) == list(range(TASKS)), "not exactly one result per task"
    runs = _runs(side)
    failed = [r for r in results if r["status"] != "success"]
    for result in results:
        if result["status"] == "success":
            assert result["exit_code"] == 0 and result["id"] in runs, result
        else:
            assert result["status"] == "failed" and DEATH.search(result["error"] or ""), result
    assert len(failed) <= len(chaos.killed), failed

    def died(process: Process, parent_name: str) -> bool:
        return process in chaos.killed or "python" not in parent_name

    repeated = {task: task_runs for task, task_runs in runs.items() if len(task_runs) > 1}
    wrong = {task: task_runs for task, task_runs in repeated.items()
             if sum(not died(parent, name) for _, parent, name in task_runs) > 1}
    print(f"{len(chaos.killed)} workers died by SIGKILL ({len([f for _, f in FAULTS if f == 'worker'])} "
          f"killed alone), {len(chaos.schedulers)} schedulers; {len(repeated)} tasks ran more than once, "
          f"{len(failed)} failed")
    assert not wrong, ("tasks ran again although the worker that ran them lived on: "
                       f"{dict(list(wrong.items())[:5])}; killed: {sorted(chaos.killed)}; "
                       f"stopped by SIGTERM: {sorted(chaos.terminated)}")

    for n, log in enumerate(chaos.logs):
        text = "".join(log)
        assert "Traceback" not in text, f"scheduler {n} of {len(chaos.logs)} (faults {FAULTS}): " + \
            text[max(0, text.index("Traceback") - 1500):][:4000]
    # Every process of the test is gone: workers, forkservers, resource trackers, the shells.
    wait_until(lambda: not any(_alive(p) for p in chaos.seen), timeout=30)

    wait_until(lambda: not processes_mentioning(str(tmp_path)), timeout=30)
