"""Tasks that try to outlive their limits: a closed output, a child holding it, a process gone from the group.

A task is its process: its deadline covers the process, not the pipe; it ends when the
process exits, whatever it left behind (killed, and said so in its output).
"""

import errno
import os
import signal
import threading

import pytest
from conftest import read_results, run_client, running, wait_until

from cloudkon import processes
from cloudkon.jdl import JobSpec
from cloudkon.processes import Cancellations, run_task
from cloudkon.sandbox import run_job, staged_command
from cloudkon.tasks import CANCELLED

LEFT_RUNNING = "[cloudkon: killed what the task left running in its process group]"
PIPE_HELD = "[cloudkon: stopped reading: a process outside the task's group holds its output]"


def _started(pidfile, command: str, escape: bool = False) -> str:
    """Shell text starting ``command`` in the background (in a session of its own if ``escape``),
    its pid written to ``pidfile``, and going on once it is written."""
    setsid = "setsid " if escape else ""
    return (f"{setsid}sh -c 'echo $$ > {pidfile}; exec {command}' & "
            f"while [ ! -s {pidfile} ]; do sleep 0.01; done")


@pytest.fixture
def pids(tmp_path):
    """pids(name) -> a pid file path; every process named in one is killed afterwards."""
    files = []

    def pidfile(name: str):
        files.append(tmp_path / name)
        return files[-1]
    yield pidfile
    for path in files:
        if path.exists() and path.read_text().strip():
            try:
                os.kill(int(path.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_task_that_closes_its_output_is_still_killed_at_its_timeout(pids):
    pidfile = pids("task")
    code, output, _, error = run_task(f"echo $$ > {pidfile}; exec >/dev/null 2>&1; sleep 15", timeout=1)
    assert (code, output, error) == (None, "", "timed out after 1 s")
    wait_until(lambda: not running(int(pidfile.read_text())), timeout=10)


def test_a_job_script_that_redirects_its_output_to_a_log_is_killed_at_the_jobs_timeout(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nexec >run.log 2>&1\necho working\nsleep 15\n")
    spec = JobSpec("job.sh", inputs=[str(script)], outputs=["run.log"], timeout=1)
    code, _, _, error, artifact = run_job(staged_command(spec, str(tmp_path / "out")), None, 1000, None)
    assert (code, error, artifact) == (None, "timed out after 1 s", None)


def test_a_child_left_holding_the_output_is_killed_when_the_shell_exits(pids):
    pidfile = pids("child")
    code, output, _, error = run_task(f"{_started(pidfile, 'sleep 15')}; echo hi", timeout=10)
    assert (code, error) == (0, None), "the shell's exit status, not a timeout"
    assert output == f"hi\n\n{LEFT_RUNNING}"
    wait_until(lambda: not running(int(pidfile.read_text())), timeout=10)


def test_a_shell_that_leaves_nothing_behind_gets_no_note():
    assert run_task("sleep 0.01 & wait; echo done")[:2] == (0, "done\n")


def test_a_process_that_left_the_group_holding_the_output_is_not_waited_for(pids):
    pidfile = pids("escaped")
    code, output, _, error = run_task(f"{_started(pidfile, 'sleep 25', escape=True)}; echo hi; exit 3")
    assert (code, error) == (3, None)
    assert output == f"hi\n\n{PIPE_HELD}"
    assert running(int(pidfile.read_text())), "out of the task's reach: the note says so"


def test_a_cancel_stops_a_task_whose_output_is_held_by_an_escaped_process(pids):
    pidfile = pids("escaped")
    cancellations = Cancellations()
    result = []
    with cancellations.running("job") as cancelled:
        runner = threading.Thread(target=lambda: result.append(
            run_task(f"{_started(pidfile, 'sleep 25', escape=True)}; sleep 25", None, 1000, cancelled)))
        runner.start()
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10)
        cancellations.cancel("job")
        runner.join(timeout=15)
    assert not runner.is_alive(), "the worker is free again"
    code, output, _, error = result[0]
    assert (code, error) == (None, CANCELLED) and output.endswith(PIPE_HELD)


def test_a_process_that_cannot_be_watched_is_killed_and_reported(monkeypatch, pids):
    def no_descriptor_left(pid: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    monkeypatch.setattr(processes.os, "pidfd_open", no_descriptor_left)
    pidfile = pids("task")
    code, _, _, error = run_task(f"echo $$ > {pidfile}; exec sleep 15")
    assert code is None and error == f"could not watch /bin/sh: [Errno 24] {os.strerror(errno.EMFILE)}"
    if pidfile.exists() and pidfile.read_text().strip():
        wait_until(lambda: not running(int(pidfile.read_text())), timeout=10)


def test_a_worker_is_free_for_the_next_task_once_a_shell_with_leftovers_exits(start_scheduler, workload,
                                                                                tmp_path, pids):
    sched = start_scheduler("--local", "1", "--task-timeout", "10")
    escaped, child = pids("escaped"), pids("child")
    lines = [f"{_started(escaped, 'sleep 25', escape=True)}; {_started(child, 'sleep 25')}; echo hi",
             "echo next"]
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload(lines), "-o", str(out))
    assert done.returncode == 0, done.stderr
    first, second = read_results(out)
    assert first["status"] == "success" and first["output"] == f"hi\n\n{LEFT_RUNNING}\n{PIPE_HELD}"
    assert second["output"] == "next\n"
