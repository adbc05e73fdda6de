"""Fixtures that run the real programs: scheduler.py and client.py as processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protocol  # noqa: E402


class SchedulerProcess:
    """A running ``scheduler.py`` and the address it announced."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scheduler.py"), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"scheduler did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.removeprefix("listening on ")
        self.host, port = self.address.rsplit(":", 1)
        self.port = int(port)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=30)

    def hello(self, token: str | None = None) -> socket.socket:
        """A connection that has said hello and read the welcome."""
        sock = self.connect()
        message = {"type": "hello", "version": protocol.PROTOCOL_VERSION}
        if token is not None:
            message["token"] = token
        protocol.send(sock, message)
        assert protocol.receive(sock)["type"] == "welcome"
        return sock

    def worker_pids(self) -> list[int]:
        """Worker processes: children of the forkserver the scheduler started."""
        return [pid for child in _children(self.proc.pid) for pid in _children(child)]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.fixture
def start_scheduler():
    started: list[SchedulerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> SchedulerProcess:
        sched = SchedulerProcess(list(args), env)
        started.append(sched)
        return sched

    yield start
    for sched in started:
        sched.stop(signal.SIGKILL if sched.proc.poll() is None else signal.SIGTERM)
        for stream in (sched.proc.stdout, sched.proc.stderr):
            stream.close()


def run_client(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "client.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)


def start_client(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "client.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_results(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def workload(tmp_path):
    """Write a workload file from lines (or bytes); its path as a string."""
    counter = iter(range(1000))

    def write(content: list[str] | bytes) -> str:
        path = tmp_path / f"workload{next(counter)}.txt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text("\n".join(content) + "\n")
        return str(path)

    return write


def wait_until(condition, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
