"""Durable jobs in local mode: a scheduler killed with kill -9 and started again on its store."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter

from conftest import ROOT, read_results, run_client, start_client, wait_until


def _job_id(stderr: str) -> str:
    match = re.search(r"job ([0-9a-f]{16})", stderr)
    assert match, stderr
    return match.group(1)


def test_killed_scheduler_resumes_the_job_without_rerunning_finished_tasks(start_scheduler, workload,
                                                                             tmp_path):
    state, ran = tmp_path / "jobs.sqlite", tmp_path / "ran"
    tasks = [f"echo {i} >> {ran}; echo out{i}" for i in range(20)]
    tasks += [f"sleep 1; echo {i} >> {ran}; echo out{i}" for i in range(20, 26)]
    sched = start_scheduler("--local", "2", "--state", str(state))
    client = start_client("-s", sched.address, "-w", workload(tasks))
    wait_until(lambda: ran.exists() and len(ran.read_text().split()) >= 22)  # quick ones + 2 slow
    time.sleep(0.5)  # past the journal's write delay
    first_workers = set(sched.worker_pids())
    sched.proc.kill()
    sched.proc.wait()
    _, stderr = client.communicate(timeout=30)
    assert client.returncode == 2 and "connection closed" in stderr
    job = _job_id(stderr)
    before = Counter(ran.read_text().split())

    again = start_scheduler("--local", "2", "--state", str(state))
    out = tmp_path / "results.jsonl"
    fetched = run_client("-s", again.address, "--cursor", job, "-o", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert [r["output"] for r in read_results(out)] == [f"out{i}\n" for i in range(26)]
    assert [r["command"] for r in read_results(out)] == tasks
    # Where each ran is kept in the store: the first 20 ran before the kill, on the first workers.
    pids = [int(r["worker"].rpartition(":")[2]) for r in read_results(out)]
    assert {r["worker"].rpartition(":")[0] for r in read_results(out)} == {socket.gethostname()}
    assert set(pids[:20]) <= first_workers, (pids, first_workers)
    assert set(pids) <= first_workers | set(again.worker_pids())
    runs = Counter(ran.read_text().split())
    assert all(runs[str(i)] == 1 for i in range(20)), runs  # finished before the kill: not run again
    assert all(runs[str(i)] == 1 for i in before if int(i) >= 20), runs
    assert all(runs[str(i)] >= 1 for i in range(20, 26)), runs
    log = again.stop() == 0 and again.proc.stderr.read()
    assert "unfinished resumed" in log


def test_sigterm_keeps_unfinished_jobs_for_the_next_start(start_scheduler, workload, tmp_path):
    state = tmp_path / "jobs.sqlite"
    sched = start_scheduler("--local", "2", "--state", str(state))
    client = start_client("-s", sched.address, "-w", workload([f"sleep 0.3; echo {i}" for i in range(20)]))
    time.sleep(1.5)
    assert sched.stop() == 0  # finishes the tasks in flight, starts no more
    _, stderr = client.communicate(timeout=30)
    assert client.returncode == 2 and "is kept in its job store" in stderr
    job = _job_id(stderr)

    again = start_scheduler("--local", "2", "--state", str(state))
    out = tmp_path / "results.jsonl"
    fetched = run_client("-s", again.address, "--cursor", job, "-o", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(20)]


def test_http_cursor_survives_a_restart(start_scheduler, tmp_path):
    state = tmp_path / "jobs.sqlite"
    sched = start_scheduler("--local", "1", "--state", str(state), "--http-port", "0")
    url = sched.proc.stdout.readline().strip().removeprefix("HTTP API on ")
    body = json.dumps({"count": 3, "tasks": ["sleep 2000", "echo a", "echo b"]}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/tasks/submit", body), timeout=30) as answer:
        cursor = json.loads(answer.read())["cursor"]
    sched.proc.kill()  # accepted means stored: nothing has run yet
    sched.proc.wait()

    again = start_scheduler("--local", "2", "--state", str(state), "--http-port", "0")
    url = again.proc.stdout.readline().strip().removeprefix("HTTP API on ")

    def report() -> dict | None:
        with urllib.request.urlopen(f"{url}/tasks/result/{cursor}", timeout=30) as answer:
            body = json.loads(answer.read())
        return body if body["status"] == "completed" else None
    done = wait_until(report, timeout=30)
    assert [t["output"] for t in done["tasks"]] == ["", "a\n", "b\n"]


def test_results_expire_after_the_ttl_and_are_gone_after_a_restart(start_scheduler, workload, tmp_path):
    state = tmp_path / "jobs.sqlite"
    sched = start_scheduler("--local", "1", "--state", str(state), "--result-ttl", "1")
    submitted = run_client("-s", sched.address, "-w", workload(["echo kept"]))
    assert submitted.returncode == 0
    job = _job_id(submitted.stderr)
    fetched = run_client("-s", sched.address, "--cursor", job, "-o", "-")
    assert fetched.returncode == 0 and json.loads(fetched.stdout)["output"] == "kept\n"  # delivered, kept

    def expired() -> bool:
        return "unknown_job" in run_client("-s", sched.address, "--cursor", job).stderr
    wait_until(expired, timeout=10, interval=0.3)
    sched.stop()
    again = start_scheduler("--local", "1", "--state", str(state))
    gone = run_client("-s", again.address, "--cursor", job)
    assert gone.returncode == 2 and f"no job '{job}'" in gone.stderr


def test_a_store_serves_one_scheduler_at_a_time(start_scheduler, tmp_path):
    state = tmp_path / "jobs.sqlite"
    start_scheduler("--local", "1", "--state", str(state))
    second = subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--port", "0",
                             "--state", str(state)], capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert f"job store {state} is in use by another scheduler" in second.stderr


def test_the_store_keeps_where_each_result_ran(tmp_path):
    from cloudkon.jobstore import JobOpened, ResultsAdded, SQLiteJobStore, TasksAdded
    from cloudkon.tasks import ResultBatch

    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    store.write([JobOpened("j", 1.0, None), TasksAdded("j", 0, ["true", "true"]),
                 ResultsAdded("j", ResultBatch("j", 0, [0], [0], [""], [5], [None], worker="host:42"))])
    # A row written before results named their worker reads back with none.
    store._db.execute("INSERT INTO results (job, batch) VALUES (?, ?)", ("j", json.dumps(
        {"type": "results", "job": "j", "ids": [1], "exit_codes": [0], "outputs": [""],
         "elapsed_us": [5], "errors": [None]}).encode()))
    assert [(batch.ids, batch.worker) for batch in store.read_results("j")] == [([0], "host:42"), ([1], None)]
    store.close()
