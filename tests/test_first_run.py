"""What a newcomer meets first: commands without boto3, workloads as editors save them, the embedded run."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, run_client, start_client

from cloudkon import protocol
from cloudkon.results import PROGRESS_AFTER_SECONDS, Progress, Results
from cloudkon.tasks import CANCELLED, ResultBatch


def _without_site_packages(*args: str) -> subprocess.CompletedProcess:
    """A program run as on a machine where only Python is installed (-S: no site-packages, no boto3)."""
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


@pytest.mark.parametrize("command", [
    ["scheduler.py", "--remote"],
    ["scheduler.py", "--remote", "--drain"],
    ["client.py", "--remote", "-w", "examples/workload.txt"],
    ["worker.py", "-t", "1"],
])
def test_remote_mode_without_boto3_says_how_to_install_it(command):
    done = _without_site_packages(*command)
    assert done.returncode == 2, done.stderr
    assert "pip install '.[remote]'" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("program", ["scheduler.py", "client.py", "worker.py"])
def test_help_works_without_boto3(program):
    done = _without_site_packages(program, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_a_short_embedded_run_tells_start_up_apart_and_gives_no_rate(workload):
    done = run_client("-w", workload(["echo a"]))
    assert done.returncode == 0, done.stderr
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("1 tasks: 1 succeeded, 0 failed, ") and "tasks/s" not in summary
    assert "s of it starting the embedded scheduler" in summary


def test_the_progress_line_counts_cancelled_tasks_apart_from_failed_ones(capsys):
    results = Results(4)
    results.add(ResultBatch("j", 0, [0, 1, 2], [0, 1, None], [""] * 3, [1] * 3, [None, None, CANCELLED]))
    progress = Progress(enabled=True)
    progress.start -= 2 * PROGRESS_AFTER_SECONDS  # a job running for a while
    progress._next = 0.0
    progress(results)
    line = capsys.readouterr().err
    assert "3/4 tasks" in line and "failed 1  cancelled 1" in line


def test_an_empty_job_is_refused_over_tcp_and_http_alike(start_scheduler):
    sched = start_scheduler("--local", "1", "--http-port", "0")
    http_port = int(sched.proc.stdout.readline().strip().rsplit(":", 1)[1])
    sock = sched.hello()
    protocol.send(sock, {"type": "job_open"})
    job = protocol.receive(sock)["job"]
    protocol.send(sock, {"type": "job_close", "job": job, "count": 0})
    while (message := protocol.receive(sock))["type"] != "error":
        pass
    assert message["code"] == "empty_job"
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/tasks/submit",
                                     json.dumps({"count": 0, "tasks": []}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and "at least one task" in json.loads(refused.value.read())["error"]


def test_a_scheduler_with_jobs_in_memory_promises_no_resumption(start_scheduler, workload):
    sched = start_scheduler("--local", "1", "--state", ":memory:", "--grace", "0")
    client = start_client("-s", sched.address, "-w", workload(["sleep 60000", "echo never"]))
    assert "(its results again: --cursor" in client.stderr.readline()
    time.sleep(0.5)
    sched.stop()
    _, stderr = client.communicate(timeout=30)
    assert "resumes" not in stderr and "job store" not in stderr
    assert "2 tasks: 0 succeeded, 2 failed" in stderr
    assert "stopped: every job finished (what was in flight failed)" in sched.proc.stderr.read()
