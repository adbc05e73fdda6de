"""Scheduling on mixed workloads, with the real programs: long tasks spread over every
worker (read from each result's ``worker`` field, not from timings), time-boxed bundles
hand back what they did not start, and nothing is lost when a worker dies meanwhile."""

from __future__ import annotations

import collections
import os
import signal
import stat
from pathlib import Path

from conftest import read_results, run_client, start_client, wait_until


def _slow_program(tmp_path: Path) -> Path:
    """A program whose runs take as many seconds as its argument: short at first, then long.

    The scheduler learns its time from the short runs, so the long ones are first taken
    for short ones and bundled together: only the time box keeps them apart.
    """
    script = tmp_path / "slow"
    script.write_text('#!/bin/sh\nsleep "$1"\necho "done $1"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _workers_of(results: list[dict], ids: range) -> collections.Counter:
    return collections.Counter(results[i]["worker"] for i in ids)


def test_long_tasks_after_short_ones_spread_over_every_worker(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "4")
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload(["sleep 0"] * 50 + ["sleep 2000"] * 8),
                      "-o", str(out))
    assert done.returncode == 0, done.stderr
    results = read_results(out)
    assert [r["status"] for r in results] == ["success"] * 58
    long_ones = _workers_of(results, range(50, 58))
    assert len(long_ones) == 4 and set(long_ones.values()) == {2}, long_ones


def test_misjudged_long_tasks_are_handed_back_and_spread(start_scheduler, workload, tmp_path):
    slow = _slow_program(tmp_path)
    sched = start_scheduler("--local", "4")
    out = tmp_path / "r.jsonl"
    # Taken for runs of a few milliseconds, the six long runs go out in bundles of two, to
    # three workers; the fourth gets one of them only because they are handed back.
    tasks = [f"{slow} 0"] * 12 + [f"{slow} 1.5"] * 6
    done = run_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    assert done.returncode == 0, done.stderr
    results = read_results(out)
    assert [r["output"] for r in results] == ["done 0\n"] * 12 + ["done 1.5\n"] * 6
    long_ones = _workers_of(results, range(12, 18))
    assert len(long_ones) == 4 and max(long_ones.values()) == 2, long_ones


def _process_running(command: str) -> int | None:
    """The pid of a process whose command line contains ``command``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if command.encode() in f.read().replace(b"\0", b" "):
                        return int(entry)
            except OSError:
                continue
    return None


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _kill_worker_running(command: str) -> str:
    """Kill -9 the worker process running ``command`` (the parent of its shell); its pid."""
    shell = wait_until(lambda: _process_running(command), timeout=60)
    worker = _parent_of(shell)
    os.kill(worker, signal.SIGKILL)
    return str(worker)


def test_worker_killed_while_its_bundle_is_over_its_time_box_loses_nothing(start_scheduler, workload,
                                                                             tmp_path):
    slow = _slow_program(tmp_path)
    sched = start_scheduler("--local", "2")
    out = tmp_path / "r.jsonl"
    # The 3 s runs are bundled in twos (taken for 10 ms ones): the worker that runs the first
    # of a bundle is past its time box, holding the second to hand back, when it is killed.
    tasks = [f"{slow} 0.01"] * 8 + [f"{slow} 3"] * 4
    client = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    victim = _kill_worker_running(f"{slow} 3")
    assert client.wait(120) == 0, client.stderr.read()
    client.stdout.close()
    client.stderr.close()
    results = read_results(out)
    assert [r["output"] for r in results] == ["done 0.01\n"] * 8 + ["done 3\n"] * 4
    assert not any(r["worker"].endswith(f":{victim}") for r in results[8:]), "its tasks ran elsewhere"


def test_remote_worker_killed_while_its_bundle_is_over_its_time_box_loses_nothing(remote, workload,
                                                                                    tmp_path):
    slow = _slow_program(tmp_path)
    sched = remote.scheduler("--visibility-timeout", "3")
    for _ in range(2):
        remote.worker("-t", "1", "--visibility-timeout", "3")
    out = tmp_path / "r.jsonl"
    tasks = [f"{slow} 0.01"] * 8 + [f"{slow} 2"] * 4
    client = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out), env=remote.env)
    victim = _kill_worker_running(f"{slow} 2")
    assert client.wait(120) == 0, client.stderr.read()
    client.stdout.close()
    client.stderr.close()
    results = read_results(out)
    assert [r["output"] for r in results] == ["done 0.01\n"] * 8 + ["done 2\n"] * 4
    assert all(r["worker"] and not r["worker"].endswith(f":{victim}") for r in results[8:])


def test_an_idle_local_worker_takes_the_unstarted_tail_of_a_busy_one():
    from cloudkon.localworkers import LocalBackend
    from cloudkon.tasks import Bundle

    backend = LocalBackend(2)
    try:
        # One bundle, no time box: only a steal can split it.
        backend.submit(Bundle("j", 0, [0, 1, 2, 3], ["sleep 300"] * 4))
        ran_on: dict[int, str] = {}
        handed_back: list[list[int]] = []
        while len(ran_on) < 4:
            for batch in backend.receive(1.0):
                ran_on.update(dict.fromkeys(batch.ids, batch.worker))
                if batch.returned:
                    handed_back.append(batch.returned)
                    backend.submit(Bundle("j", len(handed_back), batch.returned,
                                          ["sleep 300"] * len(batch.returned)))
        assert handed_back[0] == [1, 2, 3], "the first task ran, the rest came back"
        assert len(set(ran_on.values())) == 2, "the tail ran on the other worker"
    finally:
        backend.close(wait=False)
