"""CloudKon's remote mode against Celery's SQS transport, on the same AWS emulator, counted the same way.

    python bench/remote_peers.py                       # 2,000 no-op tasks, 2 workers, both systems
    python bench/remote_peers.py --tasks 500 --workers 2 --system celery

Owns the emulator with its counting proxy, and how each system is run and measured; the Celery app
and its client are in celery_sqs_app.py. Data flow:

    scheduler, workers, client  \\                          moto_server
    celery worker, celery client -> counting proxy (here) -> (127.0.0.1, its own port)
                                  counts every request by operation

The proxy sits on the wire rather than in botocore, so it sees every call of every process,
including those kombu's SQS transport sends with pycurl; each run resets the count before its
first process starts and reads it after the last one stopped, so setup (queues, tables) and
teardown count too. The emulator is slow in ways AWS is not (~4.5 ms a call, ReceiveMessage slower
as messages queue up): compare calls per task; tasks/s mostly measures the emulator.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from local import SUMMARY, machine  # noqa: E402

# Longer than an SQS long poll (20 s), so that a waiting ReceiveMessage is not cut off.
UPSTREAM_TIMEOUT_SECONDS = 60
# Per connection, not end to end: neither side may add, drop or reinterpret these.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                        "trailer", "upgrade", "expect", "content-length"})
STOP_GRACE_SECONDS = 30
START_TIMEOUT_SECONDS = 60
# KEY/DATE/REGION/SERVICE/aws4_request: a SigV4 credential, in the Authorization header or, for a
# presigned URL, in X-Amz-Credential.
CREDENTIAL_SCOPE = re.compile(r"[^/\s,=]+/\d{8}/[^/]+/([^/]+)/aws4_request")


@dataclasses.dataclass
class Result:
    """One measured run of one system."""

    system: str
    tasks: int
    seconds: float
    api_calls: int
    settings: str
    operations: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds

    @property
    def calls_per_task(self) -> float:
        return self.api_calls / self.tasks


def operation_name(method: str, target: str, headers: http.client.HTTPMessage, body: bytes) -> str:
    """`service:Operation` of one AWS request, as IAM names it (`sqs:SendMessageBatch`).

    JSON protocols name it in X-Amz-Target, query protocols in an Action parameter (URL or form
    body); the service comes from the signature's credential scope, so both protocols of one
    service get the same name.
    """
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
    scope = CREDENTIAL_SCOPE.search(headers.get("Authorization", "") + " " +
                                    query.get("X-Amz-Credential", [""])[0])
    service = scope[1] if scope else ""
    amz_target = headers.get("X-Amz-Target")
    if amz_target:
        prefix, _, action = amz_target.rpartition(".")
        return f"{service or prefix}:{action}"
    if "x-www-form-urlencoded" in headers.get("Content-Type", ""):
        query.update(urllib.parse.parse_qs(body.decode("latin-1")))
    if "Action" in query:
        return f"{service or 'unknown'}:{query['Action'][0]}"
    return f"other:{method} {urllib.parse.urlsplit(target).path}"


class _CountingProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _ForwardingHandler)
        self.upstream_port = upstream_port
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        # A client or the emulator went away mid-call, as a stopped worker's long poll does:
        # the call was counted on arrival, and there is nothing to report.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def record(self, operation: str) -> None:
        with self.lock:
            self.calls[operation] += 1


class _ForwardingHandler(BaseHTTPRequestHandler):
    """Forwards each request to moto as received, and moto's response back as sent.

    Method, path and query, end-to-end headers in their order, and body pass unchanged; only the
    per-connection headers (HOP_BY_HOP) are redone. One upstream connection per client connection.
    """

    # Keep-alive, as botocore and curl use it: one thread per client connection, not per call.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the body would wait for the
    # client's delayed ACK of the headers, ~40 ms a call.
    disable_nagle_algorithm = True
    server: _CountingProxy

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        super().finish()
        if self.upstream is not None:
            self.upstream.close()

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per call would drown the benchmark's output

    def forward(self) -> None:
        body = self._read_body()
        self.server.record(operation_name(self.command, self.path, self.headers, body))
        try:
            status, reason, headers, payload = self._exchange(body)
        except OSError as exc:
            self.send_error(502, f"emulator: {exc}")
            return
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        # The body was read whole, so it goes back with a length (never chunked).
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = forward

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _exchange(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        # moto may have closed the kept-alive upstream connection since its last use; the request
        # then never reached it, so it goes once more on a new connection (counted once anyway).
        for attempt in range(2):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port,
                                                           timeout=UPSTREAM_TIMEOUT_SECONDS)
            try:
                # The client's Host header goes through unchanged: moto builds queue URLs from it,
                # so they name the proxy and the calls made on them are counted too.
                self.upstream.putrequest(self.command, self.path, skip_host=True,
                                         skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self.upstream.putheader(name, value)
                self.upstream.putheader("Content-Length", str(len(body)))
                self.upstream.endheaders(body)
                response = self.upstream.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, ConnectionError):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
                continue
            if response.will_close:
                self.upstream.close()
                self.upstream = None
            return response.status, response.reason, response.getheaders(), payload
        raise AssertionError("unreachable")


class Emulator:
    """moto_server on a free loopback port, behind a proxy that counts every AWS call by operation.

    Point processes at `env`: it names the proxy as the endpoint.
    """

    def __init__(self) -> None:
        self._moto: subprocess.Popen[bytes] | None = None
        self._proxy: _CountingProxy | None = None
        self.env: dict[str, str] = {}

    def __enter__(self) -> Emulator:
        port = _free_port()
        self._moto = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                       "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
        _wait(lambda: _accepts(port), START_TIMEOUT_SECONDS, "moto_server")
        self._proxy = _CountingProxy(port)
        threading.Thread(target=self._proxy.serve_forever, name="counting-proxy", daemon=True).start()
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self._proxy.server_address[1]}",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    # No profile of this machine may change the region, endpoint or retries.
                    "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
        if self._moto is not None:
            _stop(self._moto)

    def reset_counts(self) -> None:
        assert self._proxy is not None, "use Emulator as a context manager"
        with self._proxy.lock:
            self._proxy.calls.clear()

    def counts(self) -> collections.Counter[str]:
        """Calls since the last reset, by `service:Operation`."""
        assert self._proxy is not None, "use Emulator as a context manager"
        with self._proxy.lock:
            return collections.Counter(self._proxy.calls)

    def total(self) -> int:
        return sum(self.counts().values())


def run_cloudkon_remote(emulator: Emulator, tasks: int, workers: int, workdir: str) -> Result:
    """`tasks` sleep-0 tasks through scheduler.py --remote, `workers` worker.py -t 2 and client.py."""
    run = uuid.uuid4().hex[:8]
    names = ["--request-queue", f"peers-requests-{run}", "--table", f"peers-claims-{run}"]
    env = {**os.environ, **emulator.env}
    workload = Path(workdir, f"cloudkon-{run}.txt")
    workload.write_text("sleep 0\n" * tasks)
    logs = [Path(workdir, f"cloudkon-worker-{run}-{i}.log") for i in range(workers)]
    procs: list[subprocess.Popen[str]] = []
    emulator.reset_counts()
    try:
        scheduler_log = Path(workdir, f"cloudkon-scheduler-{run}.log")
        scheduler = _start([str(ROOT / "scheduler.py"), "--remote", "--port", "0", "-q", *names,
                            "--jobs-table", f"peers-jobs-{run}"], env, scheduler_log, stdout=subprocess.PIPE)
        procs.append(scheduler)
        address = _read_line(scheduler, START_TIMEOUT_SECONDS, scheduler_log).removeprefix("listening on ")
        for log in logs:
            # Not -q: the worker's start line is how we know it polls, and its exit line gives
            # its own botocore count, kept in the log for a check on the proxy.
            procs.append(_start([str(ROOT / "worker.py"), "-t", "2", *names], env, log))
        _wait(lambda: all("threads on" in log.read_text() for log in logs), START_TIMEOUT_SECONDS,
              "worker.py", logs[0])
        client = subprocess.run([sys.executable, str(ROOT / "client.py"), "-s", address, "-w", str(workload)],
                                capture_output=True, text=True, env=env, timeout=600 + tasks)
    finally:
        for proc in procs[1:] + procs[:1]:  # workers first: the scheduler deletes its queue at exit
            _stop(proc)
    summary = SUMMARY.search(client.stderr)
    if client.returncode != 0 or not summary or int(summary[2]) != tasks:
        raise RuntimeError(f"cloudkon run failed: {client.stderr[-2000:]}")
    calls = emulator.counts()
    settings = (f"scheduler.py --remote -q (--in-flight 32, the default), {workers} x worker.py -t 2, "
                f"client.py -w ({tasks} x 'sleep 0'); seconds: client's wall time; calls: scheduler, "
                f"workers and client from start to stop")
    return Result("cloudkon remote", tasks, float(summary[4]), sum(calls.values()), settings, dict(calls))


def run_celery_sqs(emulator: Emulator, tasks: int, workers: int, workdir: str) -> Result:
    """`tasks` no-op tasks through one Celery worker with `workers` prefork processes on SQS."""
    run = uuid.uuid4().hex[:8]
    # A prefetch of 10 lets each ReceiveMessage take SQS's maximum of 10 messages; Celery's
    # optimizing guide recommends a high prefetch for many short tasks. Never below the default 4.
    prefetch = max(4, -(-10 // workers))
    ready = Path(workdir, f"celery-ready-{run}")
    env = {**os.environ, **emulator.env, "PYTHONPATH": str(BENCH),
           "CELERY_BENCH_QUEUE_PREFIX": f"peers-{run}-", "CELERY_BENCH_TABLE": f"peers-celery-results-{run}",
           "CELERY_BENCH_PREFETCH": str(prefetch), "CELERY_BENCH_READY": str(ready)}
    log = Path(workdir, f"celery-worker-{run}.log")
    emulator.reset_counts()
    # Before the worker: Celery would create the result table in every process at once (see there).
    subprocess.run([sys.executable, str(BENCH / "celery_sqs_app.py"), "--create-table"], env=env, cwd=workdir,
                   check=True, capture_output=True, timeout=START_TIMEOUT_SECONDS)
    worker = _start(["-m", "celery", "-A", "celery_sqs_app", "worker", "--pool", "prefork",
                     "--concurrency", str(workers), "--without-gossip", "--without-mingle",
                     "--without-heartbeat", "--loglevel", "WARNING", "--hostname", f"peers-{run}@%h"],
                    env, log, cwd=workdir)
    try:
        _wait(ready.exists, START_TIMEOUT_SECONDS, "celery worker", log)
        client = subprocess.run([sys.executable, str(BENCH / "celery_sqs_app.py"), str(tasks)],
                                capture_output=True, text=True, env=env, cwd=workdir, timeout=600 + tasks)
    finally:
        _stop(worker)
    if client.returncode != 0:
        raise RuntimeError(f"celery run failed: {client.stderr[-2000:]}")
    report = json.loads(client.stdout.splitlines()[-1])
    calls = emulator.counts()
    settings = (f"one celery worker --pool prefork --concurrency {workers} --without-gossip --without-mingle "
                f"--without-heartbeat; {report['settings']}; group({tasks} x noop.s()).apply_async().get(); "
                f"seconds: from apply_async to every result; calls: table creation, worker and client "
                f"from start to stop")
    return Result("celery sqs + dynamodb", tasks, report["seconds"], sum(calls.values()), settings,
                  dict(calls))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait(condition: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = f": {log.read_text()[-2000:]}" if log else ""
            raise RuntimeError(f"{what} did not start in {timeout:g} s{tail}")
        time.sleep(0.05)


def _start(args: list[str], env: dict[str, str], log: Path, stdout: int | None = None,
           cwd: str | None = None) -> subprocess.Popen[str]:
    """A Python subprocess in its own process group, so that _stop can reach its children too.

    Its stderr, and its stdout unless piped, go to `log`.
    """
    with open(log, "w") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen([sys.executable, *args], stdout=out if stdout is None else stdout,
                                stderr=out, text=True, env=env, cwd=cwd, start_new_session=True)


def _read_line(proc: subprocess.Popen[str], timeout: float, log: Path) -> str:
    """The first line `proc` prints, waiting at most `timeout` seconds for it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if not line:
        raise RuntimeError(f"{proc.args[1]} did not start in {timeout:g} s: {log.read_text()[-2000:]}")
    return line


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a graceful stop for every process here), then SIGKILL to whatever of its group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    try:
        # Pool children and task processes would outlive a killed parent otherwise.
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def print_table(results: list[Result]) -> None:
    print(f"{'system':<24} {'tasks':>7} {'seconds':>9} {'tasks/s':>9} {'API calls':>10} {'calls/task':>11}")
    for r in results:
        print(f"{r.system:<24} {r.tasks:>7,} {r.seconds:>9.2f} {r.rate:>9,.0f} {r.api_calls:>10,} "
              f"{r.calls_per_task:>11.4f}")
    for r in results:
        print(f"\n{r.system}: {r.settings}")
        print("  calls: " + ", ".join(f"{op} {n}" for op, n in sorted(r.operations.items(),
                                                                      key=lambda item: -item[1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2_000, help="no-op tasks per system (default 2,000)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker.py processes; prefork processes of the one celery worker (default 2)")
    parser.add_argument("--system", choices=["both", "cloudkon", "celery"], default="both")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    results = []
    with Emulator() as emulator, tempfile.TemporaryDirectory() as workdir:
        if args.system in ("both", "cloudkon"):
            results.append(run_cloudkon_remote(emulator, args.tasks, args.workers, workdir))
        if args.system in ("both", "celery"):
            results.append(run_celery_sqs(emulator, args.tasks, args.workers, workdir))
    print_table(results)


if __name__ == "__main__":
    main()
