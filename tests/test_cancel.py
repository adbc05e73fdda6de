"""Cancelling a job on the local backend: through the client, its job list, and Ctrl-C."""

import os
import pty
import random
import re
import signal
import time

import pytest
from conftest import read_results, run_client, start_client, wait_until

from cloudkon import protocol


def _job_id(client) -> str:
    """The job id a client run with -s prints first on stderr."""
    return re.search(r"job ([0-9a-f]+) ", client.stderr.readline())[1]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_cancel_stops_running_and_queued_tasks_not_other_jobs(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    pidfile, ran = tmp_path / "pid", tmp_path / "ran"
    doomed_tasks = ["sleep 60000", f"echo $$ > {pidfile}; exec sleep 60"] + [f"echo {i} >> {ran}"
                                                                            for i in range(20)]
    out = tmp_path / "doomed.jsonl"
    doomed = start_client("-s", sched.address, "-w", workload(doomed_tasks), "-o", str(out))
    job = _job_id(doomed)
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip()))
    other = start_client("-s", sched.address, "-w", workload([f"echo other {i}" for i in range(50)]))

    done = run_client("-s", sched.address, "--cancel", job)
    assert done.returncode == 0 and f"job {job} cancelled: 22 task(s) stopped" in done.stderr
    assert doomed.wait(10) == 3, doomed.stderr.read()
    assert "22 tasks: 0 succeeded, 0 failed, 22 cancelled" in doomed.stderr.read()
    results = read_results(out)
    assert [r["id"] for r in results] == list(range(22))
    assert {(r["status"], r["error"]) for r in results} == {("cancelled", "cancelled")}
    assert not ran.exists(), "a queued task of the cancelled job ran"
    wait_until(lambda: _gone(pid), timeout=5)  # the running shell command's process group is killed

    assert other.wait(30) == 0 and "50 tasks: 50 succeeded" in other.stderr.read()
    for client in (doomed, other):
        client.stdout.close()
        client.stderr.close()


def test_cancel_of_a_finished_job_is_a_no_op_and_an_unknown_job_is_an_error(start_scheduler, workload):
    sched = start_scheduler("--local", "1")
    finished = run_client("-s", sched.address, "-w", workload(["echo a"]))
    job = re.search(r"job ([0-9a-f]+) ", finished.stderr)[1]
    done = run_client("-s", sched.address, "--cancel", job)
    assert done.returncode == 0 and f"job {job} had finished already: nothing to cancel" in done.stderr
    assert run_client("-s", sched.address, "--cursor", job).returncode == 0  # its results unchanged
    unknown = run_client("-s", sched.address, "--cancel", "0123456789abcdef")
    assert unknown.returncode == 2 and "no job '0123456789abcdef'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert run_client("--cancel", job).returncode == 2  # which scheduler?


def test_jobs_lists_each_job_with_its_tasks_by_state(start_scheduler, workload):
    sched = start_scheduler("--local", "1")
    finished = run_client("-s", sched.address, "-w", workload(["true", "false"]))
    first = re.search(r"job ([0-9a-f]+) ", finished.stderr)[1]
    running = start_client("-s", sched.address, "-w", workload(["sleep 60000"] + ["true"] * 9))
    second = _job_id(running)
    listing = run_client("-s", sched.address, "--jobs")
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    # JOB STATE DATE TIME TOTAL QUEUED IN-FLIGHT SUCCEEDED FAILED CANCELLED
    assert rows[first][1] == "finished" and rows[first][4:] == ["2", "0", "0", "1", "1", "0"]
    assert rows[second][1] == "running" and rows[second][4] == "10"
    assert int(rows[second][5]) + int(rows[second][6]) == 10  # none done yet: queued or running
    assert run_client("-s", sched.address, "--cancel", second).returncode == 0
    assert running.wait(10) == 3
    rows = {line.split()[0]: line.split() for line in run_client(
        "-s", sched.address, "--jobs").stdout.splitlines()[1:]}
    assert rows[second][1] == "cancelled" and rows[second][4:] == ["10", "0", "0", "0", "0", "10"]
    again = run_client("-s", sched.address, "--cancel", second)
    assert again.returncode == 0 and f"job {second} had been cancelled already" in again.stderr
    running.stdout.close()
    running.stderr.close()


def test_ctrl_c_with_yes_cancels_and_without_a_terminal_leaves_the_job_running(start_scheduler, workload):
    sched = start_scheduler("--local", "2")
    client = start_client("-s", sched.address, "-y", "-w", workload(["sleep 60000"] * 4))
    job = _job_id(client)
    time.sleep(0.5)
    client.send_signal(signal.SIGINT)
    assert client.wait(10) == 3
    assert f"job {job} cancelled: 4 task(s) stopped" in client.stderr.read()

    client = start_client("-s", sched.address, "-w", workload(["sleep 1500", "echo kept"]))
    job = _job_id(client)
    time.sleep(0.5)
    client.send_signal(signal.SIGINT)  # no terminal to ask on: the job is left to run
    assert client.wait(10) == 130
    assert f"job {job} keeps running" in client.stderr.read()
    fetched = run_client("-s", sched.address, "--cursor", job)
    assert fetched.returncode == 0 and "2 tasks: 2 succeeded" in fetched.stderr
    for stream in (client.stdout, client.stderr):
        stream.close()


def _on_a_terminal(sched, tasks_file: str):
    """A client on a pseudo-terminal (stdin and stderr), interrupted once its job runs and asking:
    (client, the terminal's fd, what it printed so far, its job id)."""
    terminal, side = pty.openpty()
    client = start_client("-s", sched.address, "-w", tasks_file, stdin=side, stderr=side,
                          start_new_session=True)
    os.close(side)
    output = b""
    while b"(its results again" not in output:
        output += os.read(terminal, 1024)
    job = re.search(rb"job ([0-9a-f]+) ", output)[1].decode()
    time.sleep(0.3)
    client.send_signal(signal.SIGINT)
    while b"[y/N]" not in output:
        output += os.read(terminal, 1024)
    assert f"cancel job {job}? [y/N]".encode() in output
    return client, terminal, output, job


def test_ctrl_c_asks_on_the_terminal_before_cancelling(start_scheduler, workload):
    sched = start_scheduler("--local", "1")
    client, terminal, output, job = _on_a_terminal(sched, workload(["sleep 60000"] * 2))
    os.write(terminal, b"y\n")
    assert client.wait(10) == 3
    output += _drain(terminal)
    assert f"job {job} cancelled: 2 task(s) stopped".encode() in output and b"2 cancelled" in output
    os.close(terminal)
    client.stdout.close()


def test_a_cancelled_native_sleep_frees_its_worker_at_once(start_scheduler, workload):
    sched = start_scheduler("--local", "1")
    doomed = start_client("-s", sched.address, "-w", workload(["sleep 60000"]))
    job = _job_id(doomed)
    time.sleep(0.5)
    assert run_client("-s", sched.address, "--cancel", job).returncode == 0
    assert doomed.wait(10) == 3
    # The only worker takes the next job at once: its 60 s sleep was interrupted, not waited for.
    assert run_client("-s", sched.address, "-w", workload(["echo next"]), timeout=10).returncode == 0
    doomed.stdout.close()
    doomed.stderr.close()


def test_cancelling_a_big_job_answers_in_frames_of_the_allowed_size(start_scheduler, workload):
    sched = start_scheduler("--local", "1")
    big = start_client("-s", sched.address, "-w", workload(["sleep 100000"] * 600_000))
    job = _job_id(big)
    # Printed once the client has sent every task: the scheduler may still be reading them.
    wait_until(lambda: re.search(rf"^{job} .* 600000 ", run_client("-s", sched.address, "--jobs").stdout,
                                 re.MULTILINE), timeout=60, interval=0.2)
    done = run_client("-s", sched.address, "--cancel", job, timeout=60)
    assert done.returncode == 0 and "600000 task(s) stopped" in done.stderr, done.stderr
    assert big.wait(60) == 3
    assert "600000 tasks: 0 succeeded, 0 failed, 600000 cancelled" in big.stderr.read()
    # The job store took it all: the scheduler still answers, and stores, the next job.
    assert run_client("-s", sched.address, "-w", workload(["echo after"]), timeout=30).returncode == 0
    big.stdout.close()
    big.stderr.close()


@pytest.mark.parametrize("answer", [b"n\n", b"ctrl-c"])
def test_ctrl_c_answered_no_or_pressed_again_leaves_the_job_running(start_scheduler, workload, answer):
    sched = start_scheduler("--local", "1")
    client, terminal, output, job = _on_a_terminal(sched, workload(["sleep 1500", "echo kept"]))
    if answer == b"ctrl-c":
        client.send_signal(signal.SIGINT)
    else:
        os.write(terminal, answer)
    assert client.wait(10) == 130
    output += _drain(terminal)
    assert f"job {job} keeps running".encode() in output and b"Traceback" not in output
    fetched = run_client("-s", sched.address, "--cursor", job)
    assert fetched.returncode == 0 and "2 tasks: 2 succeeded" in fetched.stderr
    os.close(terminal)
    client.stdout.close()


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the other side closed
            return data
        if not chunk:
            return data
        data += chunk


def test_a_cancel_racing_the_last_results_gets_one_answer_everywhere(start_scheduler):
    """Cancels sent as a job ends: the answer, the job list, the job's end and its results agree."""
    sched = start_scheduler("--local", "2")
    rng = random.Random(15)
    for _ in range(25):
        sock = sched.hello()
        protocol.send(sock, {"type": "job_open"})
        job = protocol.receive(sock)["job"]
        tasks = [rng.choice(["true", "sleep 3", "sleep 0"]) for _ in range(20)]
        protocol.send(sock, {"type": "tasks", "job": job, "tasks": tasks})
        protocol.send(sock, {"type": "job_close", "job": job, "count": len(tasks)})
        cancelled = 0
        # Closed first: a cancel that beat the close (on another connection) would cancel an open
        # job, rightly, though every task it held so far had its result.
        while (message := protocol.receive(sock))["type"] != "job_accepted":
            cancelled += message["errors"].count("cancelled") if message["type"] == "results" else 0
        time.sleep(rng.uniform(0, 0.08))  # the job takes about as long: some cancels come after its end
        other = sched.hello()
        protocol.send(other, {"type": "cancel", "job": job})
        answer = protocol.receive(other)
        while (message := protocol.receive(sock))["type"] != "job_done":
            if message["type"] == "results":
                cancelled += message["errors"].count("cancelled")
        protocol.send(other, {"type": "list_jobs"})
        listed = {j["job"]: j for j in protocol.receive(other)["jobs"]}[job]
        assert answer["state"] == listed["state"] == ("cancelled" if cancelled else "finished")
        assert answer["count"] == message["cancelled"] == listed["cancelled"] == cancelled
        sock.close()
        other.close()
