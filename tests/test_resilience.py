"""Bad input and dying workers: a clear error, and nothing lost, nothing reported twice."""

import os
import signal
import struct
import time

import pytest
from conftest import read_results, run_client, start_client, wait_until

from cloudkon import protocol


def _error_then_closed(sock):
    """The error message the scheduler sent, after checking it then closed the connection."""
    message = protocol.receive(sock)
    assert message["type"] == "error"
    assert sock.recv(1) == b""
    return message


def _serves_others(sched, workload):
    done = run_client("-s", sched.address, "-w", workload(["echo still here"]))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("payload, code", [
    (struct.pack(">I", protocol.MAX_FRAME_BYTES + 1) + b"x" * 16, "FrameTooLarge"),
    (struct.pack(">I", 0xFFFFFFFF), "FrameTooLarge"),
    (struct.pack(">I", 9) + b"not json!", "MalformedMessage"),
    (struct.pack(">I", 15) + b"\xff" * 15, "MalformedMessage"),
    (protocol.encode({"type": "rm -rf"}), "MalformedMessage"),
])
def test_bad_frames_get_an_error_and_a_closed_connection(start_scheduler, workload, payload, code):
    sched = start_scheduler("--local", "1")
    sock = sched.hello()
    sock.sendall(payload)
    assert _error_then_closed(sock)["code"] == code
    _serves_others(sched, workload)


def test_first_message_must_be_hello(start_scheduler, workload):
    sched = start_scheduler("--local", "1")
    sock = sched.connect()
    protocol.send(sock, {"type": "fetch", "job": "x"})
    assert _error_then_closed(sock)["code"] == "bad_request"
    _serves_others(sched, workload)


def test_wrong_count_and_unknown_job_are_refused(start_scheduler):
    sched = start_scheduler("--local", "1")
    sock = sched.hello()
    protocol.send(sock, {"type": "job_open"})
    job = protocol.receive(sock)["job"]
    protocol.send(sock, {"type": "tasks", "job": job, "tasks": ["true"]})
    protocol.send(sock, {"type": "job_close", "job": job, "count": 2})
    message = protocol.receive(sock)
    while message["type"] != "error":  # the task's result may come first
        message = protocol.receive(sock)
    assert message["code"] == "count_mismatch"
    other = sched.hello()
    protocol.send(other, {"type": "fetch", "job": "no-such-job"})
    assert _error_then_closed(other)["code"] == "unknown_job"


def test_frames_one_byte_at_a_time(start_scheduler):
    sched = start_scheduler("--local", "2")
    sock = sched.connect()
    sock.setsockopt(__import__("socket").IPPROTO_TCP, __import__("socket").TCP_NODELAY, 1)
    data = b"".join(protocol.encode(m) for m in (
        {"type": "hello", "version": protocol.PROTOCOL_VERSION}, {"type": "job_open"}))
    for byte in data:
        sock.sendall(bytes([byte]))
        time.sleep(0.001)
    assert protocol.receive(sock)["type"] == "welcome"
    job = protocol.receive(sock)["job"]
    for message in ({"type": "tasks", "job": job, "tasks": ["echo slow"]},
                    {"type": "job_close", "job": job, "count": 1}):
        for byte in protocol.encode(message):
            sock.sendall(bytes([byte]))
    kinds = []
    while not kinds or kinds[-1] != "job_done":
        message = protocol.receive(sock)
        kinds.append(message["type"])
        if message["type"] == "results":
            assert message["outputs"] == ["slow\n"]
    assert sorted(kinds) == ["job_accepted", "job_done", "results"]


def test_multi_megabyte_frames_both_ways(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    sock = sched.hello()
    protocol.send(sock, {"type": "job_open"})
    job = protocol.receive(sock)["job"]
    tasks = [f"echo {i:06d}" + " " * 100 for i in range(60_000)]  # one ~7 MB frame
    frame = protocol.encode({"type": "tasks", "job": job, "tasks": tasks})
    assert len(frame) > 6 * 1024 * 1024
    sock.sendall(frame)
    protocol.send(sock, {"type": "job_close", "job": job, "count": len(tasks)})
    seen = 0
    while (message := protocol.receive(sock))["type"] != "job_done":
        if message["type"] == "results":
            seen += len(message["ids"])
    assert seen == len(tasks) == message["succeeded"]
    # and big results: 60 tasks of 200 KB output each, capped at 64 KiB apiece
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload(["head -c 200000 /dev/zero | tr '\\0' z"] * 60),
                      "-o", str(out))
    assert done.returncode == 0
    rows = read_results(out)
    assert all(r["output"].startswith("z" * 65536) and "134464 more bytes not kept" in r["output"]
               for r in rows)


def test_worker_killed_mid_job_loses_nothing(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    out = tmp_path / "r.jsonl"
    marks = tmp_path / "marks"
    marks.mkdir()
    tasks = [f"sleep 0.1; touch {marks}/{i}; echo {i}" for i in range(60)]
    client = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    workers = wait_until(lambda: len(sched.worker_pids()) == 2 and sched.worker_pids())
    wait_until(lambda: len(os.listdir(marks)) >= 5)
    os.kill(workers[0], signal.SIGKILL)
    assert client.wait(60) == 0, client.stderr.read()
    rows = read_results(out)
    assert [r["output"] for r in rows] == [f"{i}\n" for i in range(60)]
    assert all(r["status"] == "success" for r in rows)
    assert len(sched.worker_pids()) == 2 and workers[0] not in sched.worker_pids()
    client.stdout.close()
    client.stderr.close()


def test_task_that_kills_its_worker_is_retried_once_then_failed(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    out = tmp_path / "r.jsonl"
    tasks = ["echo before", "kill -9 $PPID", *[f"echo {i}" for i in range(20)]]
    done = run_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    assert done.returncode == 1
    rows = read_results(out)
    assert len(rows) == 22
    killer = rows[1]
    assert killer["status"] == "failed" and killer["exit_code"] is None
    assert "died" in killer["error"] and "twice" in killer["error"]
    assert all(r["status"] == "success" for i, r in enumerate(rows) if i != 1)
    _serves_others(sched, workload)
