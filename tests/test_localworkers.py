"""LocalBackend against what an adversarial probe found (issue #15, findings 7 and 9): a bundle its
worker cannot read, workers that cannot be started, and processes outliving their scheduler."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, run_client, start_client, wait_until

from cloudkon import localworkers
from cloudkon.localworkers import LocalBackend
from cloudkon.tasks import Bundle, ResultBatch


@pytest.fixture
def backend():
    started: list[LocalBackend] = []

    def start(workers: int) -> LocalBackend:
        started.append(LocalBackend(workers))
        return started[-1]

    yield start
    for one in started:
        one.close(wait=False)


def _receive_until(backend: LocalBackend, done, timeout: float = 20) -> list[ResultBatch]:
    """Every batch received until ``done(batches so far)``; AssertionError after ``timeout``."""
    batches: list[ResultBatch] = []
    deadline = time.monotonic() + timeout
    while not done(batches):
        assert time.monotonic() < deadline, f"not done in {timeout} s: {batches}"
        batches += backend.receive(0.1)
    return batches


def _outputs(batches: list[ResultBatch]) -> list[str]:
    return [output for batch in batches for output in batch.outputs]


def test_a_bundle_its_worker_cannot_read_fails_and_the_worker_goes_on(backend):
    local = backend(1)
    local.submit(Bundle("j", 1, [0, 1], [1, {"not": "a command"}]))  # from a damaged store, say
    failed = _receive_until(local, lambda batches: sum(map(len, batches)) >= 2)
    assert [error for batch in failed for error in batch.errors] == [
        "the worker could not read this task's bundle: bundle: 'commands' must be strings, one per id"] * 2
    local.submit(Bundle("j", 2, [2], ["echo still here"]))
    assert _outputs(_receive_until(local, _outputs)) == ["still here\n"]


def test_with_no_worker_startable_queued_tasks_fail_after_a_while_then_work_resumes(backend, monkeypatch,
                                                                                    caplog):
    monkeypatch.setattr(localworkers, "NO_WORKERS_FAIL_SECONDS", 0.5)
    monkeypatch.setattr(localworkers, "MAX_RESTART_PAUSE_SECONDS", 0.2)
    local = backend(1)
    start_worker = local._start_worker

    def out_of_descriptors():
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(local, "_start_worker", out_of_descriptors)
    os.kill(local._slots[0].process.pid, signal.SIGKILL)
    local.submit(Bundle("j", 1, [0], ["echo never"]))
    failed = _receive_until(local, lambda batches: any(batch.errors for batch in batches))
    assert [batch.errors for batch in failed if batch.errors] == [
        ["no worker process could be started for 0.5 s ([Errno 24] Too many open files)"]]
    assert caplog.text.count("cannot start a worker process: [Errno 24] Too many open files") == 1

    monkeypatch.setattr(local, "_start_worker", start_worker)
    _receive_until(local, lambda _: "worker processes start again" in caplog.text)
    local.submit(Bundle("j", 2, [1], ["echo back"]))
    assert _outputs(_receive_until(local, _outputs)) == ["back\n"]


# A scheduler whose one worker's pipe end is also held by another process, so the worker never
# reads end of file: it must learn of the scheduler's end otherwise.
_HELD_PIPE_SCHEDULER = """
import subprocess, sys, time
from cloudkon.localworkers import LocalBackend
backend = LocalBackend(1)
slot = backend._slots[0]
holder = subprocess.Popen(["sleep", "60"], pass_fds=[slot.conn.fileno()])
print(slot.process.pid, holder.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie has stopped
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="watching a process takes a pidfd (Linux)")
def test_a_worker_stops_when_its_scheduler_dies_though_its_pipe_is_held_open():
    scheduler = subprocess.Popen([sys.executable, "-c", _HELD_PIPE_SCHEDULER], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
    worker, holder = map(int, scheduler.stdout.readline().split())
    try:
        scheduler.kill()
        scheduler.wait()
        wait_until(lambda: _gone(worker), timeout=15)
    finally:
        os.kill(holder, signal.SIGKILL)
        if not _gone(worker):
            os.kill(worker, signal.SIGKILL)
        scheduler.stdout.close()


def _descendants(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                found += [child, *_descendants(child)]
    return found


def test_a_killed_scheduler_leaves_no_process_behind(start_scheduler, workload):
    sched = start_scheduler("--local", "2")
    client = start_client("-s", sched.address, "-w", workload(["true; sleep 60"] * 4))
    try:
        # Scheduler < 2 workers (forked by it) < 2 shells (< their sleeps).
        left = wait_until(lambda: len(found := _descendants(sched.proc.pid)) >= 4 and found, timeout=20)
        sched.proc.kill()
        sched.proc.wait()
        wait_until(lambda: all(map(_gone, left)), timeout=15)
    finally:
        client.kill()
        client.communicate()


class _Lines:
    """A process's stderr lines as they come (read by a thread, so the process never blocks)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(stream), daemon=True).start()

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))


def test_a_worker_not_replaced_for_want_of_descriptors_is_replaced_later(start_scheduler, workload):
    sched = start_scheduler("--local", "2", "--no-state")
    assert run_client("-s", sched.address, "-w", workload(["echo warm"])).returncode == 0
    log = _Lines(sched.proc.stderr)
    _, hard = resource.prlimit(sched.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(sched.proc.pid, resource.RLIMIT_NOFILE, (0, hard))  # no new descriptor at all
    try:
        os.kill(sched.worker_pids()[0], signal.SIGKILL)
        wait_until(lambda: log.count("cannot start a worker process: [Errno 24] Too many open files"),
                   timeout=15)
    finally:
        resource.prlimit(sched.proc.pid, resource.RLIMIT_NOFILE, (1024, hard))
    wait_until(lambda: log.count("worker processes start again"), timeout=20)
    done = run_client("-s", sched.address, "-w", workload([f"echo {i}" for i in range(6)]), "-o", "-",
                      timeout=30)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["output"] for line in done.stdout.splitlines()] == [f"{i}\n" for i in range(6)]
    assert log.count("cannot start a worker process") == 1
