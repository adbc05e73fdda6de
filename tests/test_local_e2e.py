"""End to end on the local backend: real scheduler and client processes on loopback."""

import json
import re
import signal
import socket
import time

import pytest
from conftest import ROOT, read_results, run_client, start_client, wait_until

from cloudkon import protocol

MIXED = ["sleep 0", "sleep 20", "echo hello", "exit 4", "printf 'a\\nb'", "echo err >&2"]


def test_every_task_one_result_in_workload_order(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    out = tmp_path / "results.jsonl"
    tasks = workload(MIXED)
    done = run_client("-s", sched.address, "-w", tasks, "-o", str(out))
    assert done.returncode == 1, done.stderr  # 'exit 4' failed
    assert "6 tasks: 5 succeeded, 1 failed" in done.stderr
    rows = read_results(out)
    assert [r["id"] for r in rows] == list(range(6))
    assert [r["command"] for r in rows] == MIXED
    assert [r["status"] for r in rows] == ["success"] * 3 + ["failed"] + ["success"] * 2
    assert [r["exit_code"] for r in rows] == [0, 0, 0, 4, 0, 0]
    assert [r["output"] for r in rows] == ["", "", "hello\n", "", "a\nb", "err\n"]
    assert rows[1]["elapsed_ms"] >= 20
    assert set(rows[0]) == {"id", "command", "source", "status", "exit_code", "output", "elapsed_ms",
                            "worker"}
    assert list(rows[0])[6:8] == ["elapsed_ms", "worker"]
    assert [r["source"] for r in rows] == [f"{tasks}:{line}" for line in range(1, 7)]
    assert all(re.fullmatch(r".+:\d+", r["worker"]) for r in rows)


def test_each_result_names_the_worker_process_that_ran_it(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    out = tmp_path / "results.jsonl"
    done = run_client("-s", sched.address, "-w", workload(["sleep 300"] * 6), "-o", str(out))
    assert done.returncode == 0, done.stderr
    workers = [r["worker"] for r in read_results(out)]
    hosts = {w.rpartition(":")[0] for w in workers}
    pids = {int(w.rpartition(":")[2]) for w in workers}
    assert hosts == {socket.gethostname()}
    assert pids <= set(sched.worker_pids()), (pids, sched.worker_pids())  # still running: none died
    assert len(pids) == 2, workers  # 1.8 s of work in one-task bundles: both workers took some


def test_embedded_scheduler_is_the_default(workload, tmp_path):
    out = tmp_path / "r.jsonl"
    done = run_client("-w", workload([f"echo {i}" for i in range(50)]), "--local", "2", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(50)]


def test_bundled_example_runs(tmp_path):
    done = run_client("-w", str(ROOT / "examples" / "workload.txt"), "-o", str(tmp_path / "r.jsonl"))
    assert done.returncode == 0, done.stderr
    assert len(read_results(tmp_path / "r.jsonl")) == 10


def test_task_timeout_is_reported_failed(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2", "--task-timeout", "0.3")
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload(["sleep 5000", "sh -c 'sleep 30'", "true"]),
                      "-o", str(out))
    assert done.returncode == 1
    rows = read_results(out)
    assert [r["error"] for r in rows[:2]] == ["timed out after 0.3 s"] * 2
    assert [r["exit_code"] for r in rows] == [None, None, 0]


def test_client_timeout_overrides(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "1")
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload(["sleep 3000"]), "--task-timeout", "0.2",
                      "-o", str(out))
    assert done.returncode == 1 and read_results(out)[0]["error"] == "timed out after 0.2 s"


@pytest.mark.parametrize("content, message", [
    (b"echo ok\n\xc3\x28\n", "workload0.txt:2: not UTF-8"),
    (b"# nothing\n\n", "no tasks"),
])
def test_bad_workloads_exit_2_with_a_clear_message(workload, content, message):
    done = run_client("-w", workload(content))
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_missing_workload_and_unreachable_scheduler_exit_2(tmp_path, workload):
    done = run_client("-w", str(tmp_path / "nope.txt"))
    assert done.returncode == 2 and "No such file" in done.stderr
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_client("-s", f"127.0.0.1:{port}", "-w", workload(["true"]))
    assert done.returncode == 2 and "connection refused" in done.stderr
    done = run_client("-s", "nonsense", "-w", workload(["true"]))
    assert done.returncode == 2 and "HOST:PORT" in done.stderr


@pytest.mark.parametrize("program", ["client.py", "scheduler.py"])
def test_help(program):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / program), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage:" in done.stdout


def test_token_is_required_and_checked(start_scheduler, workload):
    sched = start_scheduler("--local", "1", env={"CLOUDKON_TOKEN": "s3cret"})
    tasks = workload(["true"])
    assert run_client("-s", sched.address, "-w", tasks, "--token", "s3cret").returncode == 0
    wrong = run_client("-s", sched.address, "-w", tasks, "--token", "guess")
    assert wrong.returncode == 2 and "unauthorized" in wrong.stderr
    missing = run_client("-s", sched.address, "-w", tasks, env={"CLOUDKON_TOKEN": ""})
    assert missing.returncode == 2 and "unauthorized" in missing.stderr


def test_refuses_non_loopback_address_without_token():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "without --token" in done.stderr


def test_listen_flow_callback_then_one_fetch(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload([f"echo {i}" for i in range(30)]),
                      "-l", "0", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(30)]
    assert re.search(r"job [0-9a-f]+ \(its results again: --cursor [0-9a-f]+\); waiting for the scheduler "
                     r"to call back on port \d+", done.stderr)


def test_twenty_concurrent_clients_each_get_their_own_results(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "4")
    clients = []
    for c in range(20):
        tasks = [f"echo client{c}-task{t}" if t % 3 else f"sleep {t % 7}" for t in range(200)]
        out = tmp_path / f"out{c}.jsonl"
        clients.append((start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out)), tasks, out))
    for proc, tasks, out in clients:
        assert proc.wait(120) == 0, proc.stderr.read()
        rows = read_results(out)
        assert [r["command"] for r in rows] == tasks
        assert [r["output"] for r in rows] == [t[5:] + "\n" if t.startswith("echo") else "" for t in tasks]
        proc.stdout.close()
        proc.stderr.close()


def test_small_job_is_not_stuck_behind_a_big_one(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    big = start_client("-s", sched.address, "-w", workload(["sleep 10"] * 600), "-o", str(tmp_path / "big"))
    time.sleep(0.5)  # the big job is running
    small = run_client("-s", sched.address, "-w", workload(["sleep 10"] * 10))
    assert small.returncode == 0
    assert big.poll() is None, "the big job (3 s of work) finished before the small one"
    assert big.wait(60) == 0
    big.stdout.close()
    big.stderr.close()


def test_sigterm_without_a_store_finishes_in_flight_and_fails_the_rest(start_scheduler, workload,
                                                                         tmp_path):
    sched = start_scheduler("--local", "2", "--no-state")
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload(["sleep 300"] * 40), "-o", str(out))
    time.sleep(1)
    assert sched.stop(signal.SIGTERM) == 0
    assert client.wait(30) == 1
    rows = read_results(out)
    assert len(rows) == 40
    succeeded = [r for r in rows if r["status"] == "success"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert succeeded and failed
    assert {r["error"] for r in failed} == {"scheduler shut down before this task started"}
    assert {r["worker"] for r in failed} == {None}  # made up by the scheduler: no worker ran them
    assert all(r["worker"] for r in succeeded)
    client.stdout.close()
    client.stderr.close()


def test_second_signal_stops_at_once(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2", "--no-state")
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload(["sleep 60000"] * 4), "-o", str(out))
    wait_until(lambda: len(sched.worker_pids()) == 2)
    time.sleep(0.5)
    sched.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    start = time.monotonic()
    assert sched.stop(signal.SIGINT) == 0
    assert time.monotonic() - start < 10
    assert client.wait(30) == 1
    errors = {r["error"] for r in read_results(out)}
    assert errors <= {"scheduler stopped before this task finished",
                      "scheduler shut down before this task started"}
    client.stdout.close()
    client.stderr.close()


def test_disconnected_client_job_runs_on_and_can_be_fetched(start_scheduler):
    sched = start_scheduler("--local", "2")
    sock = sched.hello()
    protocol.send(sock, {"type": "job_open"})
    job = protocol.receive(sock)["job"]
    protocol.send(sock, {"type": "tasks", "job": job, "tasks": ["sleep 100", "echo kept"]})
    protocol.send(sock, {"type": "job_close", "job": job, "count": 2})
    sock.close()  # gone before any result
    again = sched.hello()
    protocol.send(again, {"type": "fetch", "job": job})
    assert protocol.receive(again) == {"type": "job_accepted", "job": job, "count": 2}
    results, message = [], protocol.receive(again)
    while message["type"] == "results":
        results += message["outputs"]
        message = protocol.receive(again)
    assert message == {"type": "job_done", "job": job, "total": 2, "succeeded": 2, "failed": 0,
                       "cancelled": 0}
    assert sorted(results) == ["", "kept\n"]
    again.close()


def test_results_summary_and_progress_fields(start_scheduler, workload):
    sched = start_scheduler("--local", "2")
    done = run_client("-s", sched.address, "-w", workload(["true"] * 100), "-o", "-")
    assert done.returncode == 0
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 100 and all(r["status"] == "success" for r in rows)
    assert "100 tasks: 100 succeeded, 0 failed" in done.stderr
