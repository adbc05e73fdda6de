"""What a client can make the scheduler hold, and what it cannot make it do: limits of connections,
frames, jobs, answers and timeouts, each refused with an error frame while others are served."""

import os
import resource
import socket
import struct
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_client, wait_until

from cloudkon import protocol, server


def _error(sock: socket.socket) -> dict:
    """The first error frame the scheduler sends on ``sock`` (results may come before it)."""
    while (message := protocol.receive(sock))["type"] != "error":
        pass
    return message


def _serves_others(sched, workload, *args: str) -> None:
    done = run_client("-s", sched.address, *args, "-w", workload(["echo still here"]))
    assert done.returncode == 0, done.stderr


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.parametrize("body, code", [
    (b'{"type":"job_open","timeout":NaN}', "MalformedMessage"),
    (b'{"type":"job_open","timeout":Infinity}', "MalformedMessage"),
    (b'{"type":"job_open","timeout":1e400}', "bad_request"),
    (b'{"type":"job_open","timeout":1e308}', "bad_request"),
    (b'{"type":"job_open","timeout":0}', "bad_request"),
    (b"[" * 100_000 + b"]" * 100_000, "MalformedMessage"),
    (b'{"type":"tasks","job":"x","tasks":["\\ud800"]}', "MalformedMessage"),
])
def test_timeouts_and_frames_no_number_or_text_holds_get_an_error(start_scheduler, workload, body, code):
    sched = start_scheduler("--local", "1")
    sock = sched.hello()
    sock.sendall(struct.pack(">I", len(body)) + body)
    assert _error(sock)["code"] == code
    _serves_others(sched, workload)


@pytest.mark.parametrize("value", ["nan", "inf", "1e308", "-1", "soon"])
def test_task_timeouts_on_the_command_line_are_checked(value, workload):
    for program in ("scheduler.py", "client.py"):
        done = subprocess.run([sys.executable, str(ROOT / program), "--task-timeout", value,
                               "-w", workload(["true"])][:None if program == "client.py" else 3],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and "--task-timeout" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_token_that_is_no_text_is_an_error_not_a_crash(start_scheduler, workload):
    sched = start_scheduler("--local", "1", "--token", "secret")
    sock = sched.connect()
    body = b'{"type":"hello","version":1,"token":"\\ud800"}'
    sock.sendall(struct.pack(">I", len(body)) + body)
    assert _error(sock)["code"] == "MalformedMessage"
    _serves_others(sched, workload, "--token", "secret")


def test_before_hello_only_a_small_frame_is_read(start_scheduler, workload):
    sched = start_scheduler("--local", "1", "--token", "secret")
    sock = sched.connect()
    sock.sendall(struct.pack(">I", server.MAX_HELLO_FRAME_BYTES + 1))  # and never the body
    assert _error(sock)["code"] == "FrameTooLarge"
    _serves_others(sched, workload, "--token", "secret")


def test_a_client_that_never_reads_its_answers_does_not_grow_the_scheduler(start_scheduler, workload):
    sched = start_scheduler("--local", "2")
    done = run_client("-s", sched.address, "-w", workload(["sleep 0"] * 20_000), "--quiet")
    assert done.returncode == 0, done.stderr
    sock = sched.hello()
    protocol.send(sock, {"type": "list_jobs"})
    job = protocol.receive(sock)["jobs"][0]["job"]
    before = _rss_mib(sched.proc.pid)
    # Each answer is ~400 KB (20,000 results); each request is padded to 64 KB, so that socket
    # buffers hold few of them and the sender notices when the scheduler stops reading.
    frame = protocol.encode({"type": "fetch", "job": job, "padding": "x" * 65536})
    sock.settimeout(5)
    sent = 0
    try:
        while sent < 1000:
            sock.sendall(frame)
            sent += 1
    except TimeoutError:
        pass
    time.sleep(2)  # what the scheduler read, it has answered by now
    grown = _rss_mib(sched.proc.pid) - before
    assert sent < 1000, "the scheduler read every request of a client that reads no answer"
    assert grown < 100, f"the scheduler grew by {grown:.0f} MiB for one connection"
    sock.close()
    _serves_others(sched, workload)


def test_jobs_open_on_one_connection_are_limited(start_scheduler, workload):
    sched = start_scheduler("--local", "1")
    sock = sched.hello()
    for _ in range(server.MAX_OPEN_JOBS_PER_CONNECTION):
        protocol.send(sock, {"type": "job_open"})
        assert protocol.receive(sock)["type"] == "job_opened"
    protocol.send(sock, {"type": "job_open"})
    assert _error(sock)["code"] == "too_many_jobs"
    _serves_others(sched, workload)


def test_connections_are_limited(start_scheduler, workload):
    sched = start_scheduler("--local", "1")
    held = [sched.hello() for _ in range(server.MAX_CONNECTIONS)]
    refused = sched.connect()
    assert _error(refused)["code"] == "too_many_connections"
    held.pop().close()
    wait_until(lambda: run_client("-s", sched.address, "-w", workload(["true"])).returncode == 0)
    for sock in held:
        sock.close()


def test_tasks_held_past_the_limit_are_refused_and_none_of_them_runs(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "1", "--max-held-bytes", "200000")
    ran = tmp_path / "ran"
    refused = run_client("-s", sched.address, "-w", workload([f"echo {i} >> {ran}" for i in range(3000)]))
    assert refused.returncode == 2
    assert "--max-held-bytes" in refused.stderr and "Traceback" not in refused.stderr
    _serves_others(sched, workload)
    assert not ran.exists()


def test_a_scheduler_out_of_file_descriptors_logs_it_briefly_and_recovers(workload, tmp_path):
    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    log_path = tmp_path / "log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scheduler.py"), "--local", "1", "--port", "0",
                                 "--http-port", "0", "--no-state"], stdout=subprocess.PIPE, stderr=log_file,
                                text=True, preexec_fn=few_descriptors)
    try:
        address = proc.stdout.readline().strip().removeprefix("listening on ")
        http_port = int(proc.stdout.readline().strip().rsplit(":", 1)[1])
        host, port = address.rsplit(":", 1)
        # More than it has descriptors for, then a few HTTP ones (as many as its listen backlog holds).
        held = [socket.create_connection((host, number), timeout=5)
                for number, count in ((int(port), 40), (http_port, 5)) for _ in range(count)]
        cpu_before = _cpu_seconds(proc.pid)
        time.sleep(5)  # accept fails and is retried meanwhile, on both ports
        assert proc.poll() is None
        assert _cpu_seconds(proc.pid) - cpu_before < 2.5, "accepting spins while descriptors are out"
        log = log_path.read_text()
        assert len(log) < 20_000, f"{len(log)} bytes of log in 5 s"
        for sock in held:
            sock.close()
        wait_until(lambda: run_client("-s", address, "-w", workload(["true"]), timeout=30).returncode == 0,
                   timeout=30)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _cpu_seconds(pid: int) -> float:
    """User and system time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
