"""Fixtures that run the real programs: scheduler.py and client.py as processes on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Tests' temporary folders in the checkout (.pytest-tmp, emptied at each run), not in the
    system's temporary folder, where pytest would leave its last three runs' behind."""
    if not config.option.basetemp:
        config.option.basetemp = str(ROOT / ".pytest-tmp")
sys.path.insert(0, str(ROOT))

from cloudkon import protocol  # noqa: E402


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
        """Worker processes: the first ones forked by the scheduler itself, later ones (replacements)
        by the fork server it starts then."""
        workers = []
        for child in children(self.proc.pid):
            command = _command_line(child)
            if "forkserver" in command:
                workers += children(child)
            elif "resource_tracker" not in command:
                workers.append(child)
        return workers


def running(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, killed but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def line_count(path: Path) -> int:
    """Lines in a file that tasks append to (0 before the first)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def processes_mentioning(text: str) -> list[str]:
    """The command lines of the processes whose command line holds ``text`` (a test's folder, say)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        command = _command_line(int(pid))
        if text in command:
            found.append(command)
    return found


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """A process's children, whichever of its threads started them."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += map(int, f.read().split())
    except OSError:  # gone, or a thread of it gone meanwhile
        pass
    return found


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path_factory, monkeypatch):
    """Temporary files (sandboxes) of every process a test starts go in a folder of pytest's, so
    that one a test kills leaves nothing in the system's temporary folder."""
    folder = tmp_path_factory.mktemp("tmp")
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # this process's cached choice too


@pytest.fixture
def start_scheduler(tmp_path_factory):
    started: list[SchedulerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> SchedulerProcess:
        if not {"--state", "--no-state", "--remote"} & set(args):  # a store of its own, not the user's
            args += ("--state", str(tmp_path_factory.mktemp("state") / "jobs.sqlite"))
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


def start_client(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kwargs}
    return subprocess.Popen([sys.executable, str(ROOT / "client.py"), *args],
                            env={**os.environ, **(env or {})}, **options)


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


ANIMOTO = ROOT / "examples" / "animoto"


def animoto_workload(tmp_path: Path, jobs: int, slow_seconds: int = 0) -> str:
    """A workload of Animoto jobs (8 images of 160x90 each); a prologue may make each one slow."""
    made = subprocess.run([sys.executable, str(ANIMOTO / "make_jobs.py"), "--jobs", str(jobs),
                           "--images", "8", "--size", "160x90", "-o", str(tmp_path / "videos.txt")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    if slow_seconds:
        (tmp_path / "slow.sh").write_text(f"sleep {slow_seconds}\n")
        lines = [json.loads(line) for line in (tmp_path / "videos.txt").read_text().splitlines()]
        for line in lines:
            line["prologue"] = [str(tmp_path / "slow.sh")]
        (tmp_path / "videos.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(tmp_path / "videos.txt")


def validate_videos(paths: list[str]) -> None:
    """Assert that examples/animoto/validate.py finds every video valid."""
    check = subprocess.run([sys.executable, str(ANIMOTO / "validate.py"), "--images", "8",
                            "--size", "160x90", *paths], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(paths)} of {len(paths)} videos valid" in check.stdout


def wait_until(condition, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="session")
def aws_env():
    """Environment pointing boto3 at an AWS emulator (moto_server) on a free loopback port."""
    with aws_emulator() as env:
        yield env


@contextlib.contextmanager
def aws_emulator() -> Iterator[dict[str, str]]:
    """An AWS emulator (moto_server) on a free loopback port, stopped on leaving; the environment
    pointing boto3 at it (the ``aws_env`` fixture, and bench/harness_fleet.py outside pytest)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(up, timeout=30)
        yield env
    finally:
        server.terminate()
        server.wait()


@pytest.fixture
def remote(aws_env, start_scheduler):
    """Start remote schedulers and workers on queues and a table of this test's own."""
    import uuid
    suffix = uuid.uuid4().hex[:8]
    names = {"request_queue": f"req-{suffix}", "table": f"claims-{suffix}", "topic": f"control-{suffix}",
             "bucket": f"cloudkon-test-{suffix}"}
    workers: list[subprocess.Popen] = []

    class Remote:
        env = aws_env
        full_env = {**os.environ, **aws_env}
        request_queue = names["request_queue"]
        table = names["table"]
        topic = names["topic"]
        bucket = names["bucket"]
        options = ("--request-queue", names["request_queue"], "--table", names["table"],
                   "--control-topic", names["topic"])
        scheduler_options = (*options, "--bucket", names["bucket"])

        @staticmethod
        def scheduler(*args: str) -> SchedulerProcess:
            return start_scheduler("--remote", *Remote.scheduler_options, *args, env=aws_env)

        @staticmethod
        def command(*args: str) -> subprocess.CompletedProcess:
            """scheduler.py --remote run as a command (--drain, --cleanup...)."""
            return subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--remote",
                                   *Remote.scheduler_options, *args],
                                  capture_output=True, text=True, timeout=120, env={**os.environ, **aws_env})

        @staticmethod
        def worker(*args: str) -> subprocess.Popen:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "worker.py"), *Remote.options, *args],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **aws_env})
            workers.append(proc)
            return proc

    yield Remote
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
