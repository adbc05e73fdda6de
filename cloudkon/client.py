"""The client: submit a workload, collect every result, report.

Owns the user's side of a run: the command line, reading the workload, talking to a
scheduler through protocol.py (starting an embedded one when no ``-s`` is given),
progress on a terminal, the results file, the summary and the exit code:
0 every task succeeded, 1 some task failed, 2 usage, workload, connection or
protocol error, 3 the job was cancelled, 130 interrupted.  Also the job commands:
``--cancel JOB`` and ``--jobs``, and Ctrl-C during a run (cancel, or leave the job
running on its scheduler).  ``--remote`` embeds a remote-mode scheduler instead of a
local one: the client alone then drives SQS (and, with ``--provision``, EC2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from cloudkon import protocol
from cloudkon.errors import CloudKonError, ConfigError, IncompleteFrame, MalformedMessage, ProtocolError
from cloudkon.jdl import JobSpec, read_jdl, workload_specs
from cloudkon.options import REMOTE_GROUP_TITLES, add_remote_arguments, require_boto3, task_timeout_argument
from cloudkon.tasks import ResultBatch, decode_workload, read_workload, task_status, workload_tasks

log = logging.getLogger("cloudkon.client")

EXIT_OK, EXIT_TASKS_FAILED, EXIT_ERROR, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

CONNECT_TIMEOUT_SECONDS = 10.0
EMBEDDED_START_TIMEOUT_SECONDS = 60.0
PROGRESS_AFTER_SECONDS = 1.0
PROGRESS_EVERY_SECONDS = 0.25
# Runs shorter than this get no rate in their summary: over a fraction of a second it is noise.
RATE_AFTER_SECONDS = 0.5


class Results:
    """Every task's result, indexed by task id, filled as batches arrive."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.exit_codes: list[int | None] = [None] * total
        self.outputs: list[str] = [""] * total
        self.elapsed_us: list[int] = [0] * total
        self.errors: list[str | None] = [None] * total
        self.workers: list[str | None] = [None] * total  # where each ran (host:pid, a worker's identity)
        self._seen = bytearray(total)
        self.artifacts: dict[int, dict[str, Any]] = {}  # where a job description's outputs went
        self.received = 0
        self.failed = 0  # cancelled tasks included
        self.cancelled = 0

    def add(self, batch: ResultBatch) -> None:
        seen, total = self._seen, self.total
        for task_id in batch.ids:
            if type(task_id) is not int or not 0 <= task_id < total or seen[task_id]:
                raise MalformedMessage(f"result for unknown or already reported task {task_id!r}")
            seen[task_id] = 1
        workers, worker = self.workers, batch.worker
        for task_id, code, output, elapsed, error in zip(
                batch.ids, batch.exit_codes, batch.outputs, batch.elapsed_us, batch.errors, strict=True):
            self.exit_codes[task_id] = code
            self.outputs[task_id] = output
            self.elapsed_us[task_id] = elapsed
            self.errors[task_id] = error
            workers[task_id] = worker
        if batch.artifacts is not None:
            self.artifacts.update((i, a) for i, a in zip(batch.ids, batch.artifacts, strict=True) if a)
        self.received += len(batch)
        self.failed += batch.failed_count()
        self.cancelled += batch.cancelled_count()

    def fail(self, task_id: int, error: str) -> None:
        """Turn a task's success into a failure the client found (its outputs did not arrive)."""
        if task_status(self.exit_codes[task_id], self.errors[task_id]) == "success":
            self.failed += 1
        self.exit_codes[task_id], self.errors[task_id] = None, error
        self.artifacts.pop(task_id, None)
    @property
    def complete(self) -> bool:
        return self.received == self.total

    def write_jsonl(self, commands: list[str], out: TextIO) -> None:
        """One JSON object per task, in workload order."""
        dumps = json.dumps
        for task_id, command in enumerate(commands):
            code, error = self.exit_codes[task_id], self.errors[task_id]
            record = {"id": task_id, "command": command, "status": task_status(code, error),
                      "exit_code": code, "output": self.outputs[task_id],
                      "elapsed_ms": self.elapsed_us[task_id] / 1000, "worker": self.workers[task_id]}
            if error is not None:
                record["error"] = error
            if task_id in self.artifacts:
                record["outputs"] = self.artifacts[task_id]
            out.write(dumps(record))
            out.write("\n")


class SchedulerConnection:
    """A connection to a scheduler, past the hello."""

    def __init__(self, host: str, port: int, token: str | None) -> None:
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello: dict[str, Any] = {"type": "hello", "version": protocol.PROTOCOL_VERSION}
        if token:
            hello["token"] = token
        self.send(hello)
        self.welcome = self.expect("welcome")

    def send(self, message: dict[str, Any]) -> None:
        protocol.send(self.sock, message)

    def receive(self) -> dict[str, Any]:
        return protocol.receive(self.sock)

    def expect(self, kind: str) -> dict[str, Any]:
        return protocol.raise_if_error(self.receive(), kind)

    def close(self) -> None:
        self.sock.close()

    def submit(self, tasks: list[str], timeout: float | None = None, stream: bool = True,
               callback: dict[str, Any] | None = None,
               prepare: Callable[[str], list[str]] | None = None) -> str:
        """Send a job's tasks; its id.  With ``stream``, results follow on this connection.

        ``prepare(job)``, if given, turns the tasks into what is sent once the job's id is
        known (staging the files of job descriptions).
        """
        opening: dict[str, Any] = {"type": "job_open", "stream": stream}
        if timeout is not None:
            opening["timeout"] = timeout
        if callback is not None:
            opening["callback"] = callback
        self.send(opening)
        job = self.expect("job_opened")["job"]
        if prepare is not None:
            tasks = prepare(job)
        for message in protocol.task_messages(job, tasks):
            self.send(message)
        self.send({"type": "job_close", "job": job, "count": len(tasks)})
        return job

    def collect(self, job: str, results: Results,
                on_progress: Callable[[Results], None] | None = None,
                on_tasks: Callable[[list[str]], None] | None = None) -> None:
        """Read this job's results (and tasks, for a fetch) until the scheduler says it is done."""
        while True:
            message = self.receive()
            kind = message["type"]
            if kind == "results":
                results.add(protocol.results_from_message(message))
                if on_progress is not None:
                    on_progress(results)
            elif kind == "tasks" and on_tasks is not None:
                on_tasks(message["tasks"])
            elif kind == "job_done":
                if not results.complete:
                    raise MalformedMessage(f"job {job} done with {results.received} of "
                                           f"{results.total} results")
                return
            elif kind != "job_accepted":
                protocol.raise_if_error(message, "results")


def request(host: str, port: int, token: str | None, message: dict[str, Any], answer: str) -> dict[str, Any]:
    """Send one request on a connection of its own; the answer of type ``answer``."""
    conn = SchedulerConnection(host, port, token)
    try:
        conn.send(message)
        return conn.expect(answer)
    finally:
        conn.close()


def cancel_job(host: str, port: int, token: str | None, job: str) -> dict[str, Any]:
    """Cancel a job: the scheduler's ``cancelled`` answer (``count``: tasks stopped; ``state``)."""
    return request(host, port, token, {"type": "cancel", "job": job}, "cancelled")


def list_jobs(host: str, port: int, token: str | None) -> list[dict[str, Any]]:
    """The jobs a scheduler holds, with their task counts by state."""
    return request(host, port, token, {"type": "list_jobs"}, "jobs")["jobs"]


def fetch_job(host: str, port: int, token: str | None, job: str,
              commands: bool = False) -> tuple[list[str], Results]:
    """A job's tasks (if ``commands``) and all its results, once it is finished."""
    conn = SchedulerConnection(host, port, token)
    try:
        conn.send({"type": "fetch", "job": job, "commands": commands})
        results = Results(conn.expect("job_accepted")["count"])
        tasks: list[str] = []
        conn.collect(job, results, on_tasks=tasks.extend)
        if commands and len(tasks) != results.total:
            raise MalformedMessage(f"job {job}: {len(tasks)} tasks sent for {results.total}")
        return tasks, results
    finally:
        conn.close()


def get_task_result(host: str, port: int, token: str | None, job: str) -> Results:
    """All results of a job (the cursor ``job``), waiting for it to finish if needed."""
    return fetch_job(host, port, token, job)[1]


def run_with_callback(host: str, port: int, token: str | None, tasks: list[str],
                      listen_port: int, timeout: float | None, files: JobFiles,
                      announce: bool = True) -> Results:
    """Submit, hang up, wait for the scheduler to call back at ``listen_port``, then fetch;
    ``announce`` the job's id on stderr."""
    conn = SchedulerConnection(host, port, token)
    nonce = secrets.token_hex(16)
    with socket.create_server((conn.sock.getsockname()[0], listen_port)) as listener:
        callback = {"port": listener.getsockname()[1], "nonce": nonce}
        try:
            job = conn.submit(tasks, timeout, stream=False, callback=callback,
                              prepare=files.preparer(tasks, conn.welcome.get("staging")))
            conn.expect("job_accepted")
        finally:
            conn.close()
        if announce:
            print(f"client.py: job {job} (its results again: --cursor {job}); waiting for the scheduler "
                  f"to call back on port {callback['port']}", file=sys.stderr)
        while True:
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(CONNECT_TIMEOUT_SECONDS)
                try:
                    ready = protocol.raise_if_error(protocol.receive(peer), "ready")
                except (ProtocolError, OSError) as exc:
                    log.warning("ignoring a bad call on the listening port: %s", exc)
                    continue
            if ready["job"] == job and secrets.compare_digest(ready["nonce"], nonce):
                break
    return get_task_result(host, port, token, job)


@contextmanager
def embedded_scheduler(options: list[str]) -> Iterator[tuple[str, int, str]]:
    """A scheduler process of our own on a free loopback port, with ``options``: (host, port, token)."""
    token = secrets.token_hex(16)
    command = [sys.executable, "-m", "cloudkon.scheduler", "--port", "0",
               "--no-state", "--quiet", "--exit-with-parent", str(os.getpid()), *options]
    # This package is importable there as here, installed or run from a checkout.
    package_home = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, [package_home, os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "CLOUDKON_TOKEN": token, "PYTHONPATH": python_path})
    try:
        line = proc.stdout.readline().decode(errors="replace").strip()  # type: ignore[union-attr]
        if not line.startswith("listening on "):
            raise CloudKonError(f"embedded scheduler did not start (exit code {proc.wait()})")
        host, port = parse_address(line.removeprefix("listening on "))
        yield host, port, token
    finally:
        _stop_process(proc)


def _stop_process(proc: subprocess.Popen) -> None:
    # First signal: finish what is in flight; second: stop now.
    for _ in range(2):
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class Progress:
    """A done/total, rate and ETA line on stderr, for runs over a second on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.monotonic()
        self._next = self.start + PROGRESS_AFTER_SECONDS
        self._shown = False

    def __call__(self, results: Results) -> None:
        now = time.monotonic()
        if not self.enabled or now < self._next:
            return
        self._next = now + PROGRESS_EVERY_SECONDS
        rate = results.received / (now - self.start)
        eta = (results.total - results.received) / rate if rate else float("inf")
        cancelled = f"  cancelled {results.cancelled}" if results.cancelled else ""
        sys.stderr.write(f"\r{results.received}/{results.total} tasks  {rate:,.0f}/s  "
                         f"ETA {eta:,.0f} s  failed {results.failed - results.cancelled}{cancelled}   ")
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _confirm(question: str) -> bool:
    """Ask a yes/no question on the terminal; False without one (or on end of input)."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    sys.stderr.write(question)
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


@contextmanager
def on_interrupt(handler: Callable[[], None]) -> Iterator[None]:
    """Call ``handler`` on Ctrl-C (SIGINT) inside the block instead of raising KeyboardInterrupt.

    A blocked socket read resumes after ``handler`` returns (PEP 475), so a frame half
    read is not lost; ``handler`` raises KeyboardInterrupt to leave instead.
    """
    previous = signal.signal(signal.SIGINT, lambda signum, frame: handler())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py", description="Run a CloudKon workload (one task per line) and collect every result.",
        epilog="Without -s, an embedded scheduler runs the job (local worker processes, or with --remote "
               "SQS and remote workers). Ctrl-C during a run on a scheduler (-s) asks whether to cancel the "
               "job or leave it running there (-y: cancel without asking). Exit codes: 0 every task "
               "succeeded, 1 some task failed, 2 usage/workload/connection/protocol error, 3 the job was "
               "cancelled, 130 interrupted.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("-w", "--workload", metavar="FILE",
                      help="tasks, one per line: 'sleep N' sleeps N ms, a line starting with '{\"' is a JSON "
                           "job description with files (docs/jobs.md), anything else runs in /bin/sh")
    what.add_argument("-j", "--jdl", metavar="FILE.jdl",
                      help="one job in the classic JDL syntax (Executable, Arguments, InputSandbox, "
                           "OutputSandbox, Prologue...; docs/jobs.md)")
    what.add_argument("--cursor", metavar="JOB",
                      help="fetch the results of a job submitted earlier (its id, printed at submission), "
                           "waiting for it to finish if needed; needs -s")
    what.add_argument("--cancel", metavar="JOB",
                      help="cancel a job: its tasks not started never start, its running ones are "
                           "stopped, each gets the result 'cancelled'; needs -s")
    what.add_argument("--jobs", action="store_true",
                      help="list the scheduler's jobs with their tasks queued, running, succeeded, failed "
                           "and cancelled; needs -s")
    parser.add_argument("-s", "--scheduler", metavar="HOST:PORT",
                        help="scheduler to submit to (default: start an embedded local one)")
    parser.add_argument("-o", "--output", metavar="RESULTS.jsonl",
                        help="write one JSON object per task, in workload order ('-' for stdout)")
    parser.add_argument("--outputs", metavar="DIR",
                        help="where the output sandbox of each job description goes: DIR/<task id>/")
    parser.add_argument("-l", "--listen", type=int, metavar="PORT",
                        help="submit, hang up, and wait on PORT for the scheduler to call back when "
                             "the job is done; then fetch every result in one request (0: any port)")
    parser.add_argument("--token", default=os.environ.get("CLOUDKON_TOKEN"),
                        help="the scheduler's secret (default: $CLOUDKON_TOKEN)")
    parser.add_argument("--local", type=int, metavar="N",
                        help="worker processes of the embedded scheduler (default: the CPU count)")
    parser.add_argument("--task-timeout", type=task_timeout_argument, metavar="SECONDS",
                        help="kill a task's process group after this long and report it failed")
    parser.add_argument("-y", "--yes", action="store_true",
                        help="on Ctrl-C, cancel the job without asking")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line and no summary")
    parser.add_argument("--remote", action="store_true",
                        help="no scheduler to run: the client drives SQS itself (scheduler.py --remote "
                             "embedded); the remote options below apply")
    add_remote_arguments(parser)
    return parser


def embedded_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The command line options of the embedded scheduler: --local N, or --remote and what was given."""
    if not args.remote:
        return [] if args.local is None else ["--local", str(args.local)]
    options = ["--remote"]
    for group in parser._action_groups:
        if group.title not in REMOTE_GROUP_TITLES:
            continue
        for action in group._group_actions:
            value = getattr(args, action.dest)
            unchanged = value == action.default and type(value) is type(action.default)  # 0 is not None
            if value is None or value is False or unchanged:
                continue
            for item in value if isinstance(value, list) else [value]:
                options += [action.option_strings[-1]] + ([] if item is True else [str(item)])
    return options


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="client.py: %(message)s", stream=sys.stderr)
    if args.local is not None and (args.scheduler or args.remote):
        parser.error("--local applies only to the embedded local scheduler (no -s, no --remote)")
    if args.remote and args.scheduler:
        parser.error("--remote embeds a scheduler: it does not go with -s")
    if not args.remote and any(o != "--remote" for o in embedded_options(
            argparse.Namespace(**{**vars(args), "remote": True}), parser)):
        parser.error("the remote mode and provisioning options go with --remote")
    for option, given in (("--cursor", args.cursor), ("--cancel", args.cancel), ("--jobs", args.jobs)):
        if given and not args.scheduler:
            parser.error(f"{option} needs -s HOST:PORT (the scheduler that holds the job)")
    if args.cursor and args.listen is not None:
        parser.error("--cursor and -l do not go together")
    if args.local is not None and args.local < 1:
        parser.error("--local needs at least 1 worker")
    try:
        if args.remote:
            require_boto3()
        return run(args, embedded_options(args, parser))
    except KeyboardInterrupt:
        print("client.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CloudKonError, OSError) as exc:
        print(f"client.py: error: {_describe(exc, args)}", file=sys.stderr)
        return EXIT_ERROR


def run(args: argparse.Namespace, embedded: list[str]) -> int:
    start = time.monotonic()
    if args.scheduler:
        host, port = parse_address(args.scheduler)
    if args.cancel:
        print(cancel_outcome(args.cancel, cancel_job(host, port, args.token, args.cancel)), file=sys.stderr)
        return EXIT_OK
    if args.jobs:
        print_jobs(list_jobs(host, port, args.token))
        return EXIT_OK
    if args.cursor:
        tasks, results = fetch_job(host, port, args.token, args.cursor, commands=bool(args.output))
        JobFiles({}, args.outputs).bring_back(results)
        return report(args, tasks, results, time.monotonic() - start)
    if args.jdl:
        lines, specs = [f"# job description {args.jdl}"], {0: read_jdl(args.jdl)}
    else:
        text = decode_workload(read_workload(args.workload), args.workload)  # read once: it may be a pipe
        lines = workload_tasks(text, args.workload)
        specs = workload_specs(args.workload, text, lines)
    files = JobFiles(specs, args.outputs)
    starting = 0.0  # of the wall time, what starting an embedded scheduler took
    if args.scheduler:
        results = submit_and_collect(host, port, args.token, lines, args, files)
    else:
        starting = time.monotonic()
        with embedded_scheduler(embedded) as (host, port, token):
            starting = time.monotonic() - starting
            results = submit_and_collect(host, port, token, lines, args, files)
    files.bring_back(results)
    return report(args, lines, results, time.monotonic() - start, starting)


class JobFiles:
    """The job descriptions of a submission: staged once the job's id is known, outputs brought back."""

    def __init__(self, specs: dict[int, JobSpec], outputs: str | None) -> None:
        if outputs is None and any(spec.outputs for spec in specs.values()):
            raise ConfigError("a job description has an output sandbox: say where it goes with --outputs DIR")
        self.specs = specs
        self.outputs = Path(outputs).resolve() if outputs else None
        if self.outputs is not None:
            try:  # now, rather than once the work is done
                self.outputs.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--outputs {outputs}: {exc.strerror or exc}") from None
            if not os.access(self.outputs, os.W_OK | os.X_OK):
                raise ConfigError(f"--outputs {outputs}: not a folder this user can write to")

    def preparer(self, tasks: list[str], staging: str | None) -> Callable[[str], list[str]] | None:
        """What SchedulerConnection.submit calls with the job's id; None if there is nothing to stage.

        ``staging`` is the scheduler's (its welcome says): local:HOST for local workers, which
        read the inputs where they are and move the outputs into place (so HOST must be this
        machine); an s3:// prefix for remote ones.
        """
        if not self.specs:
            return None
        if staging is None or staging.startswith("local:") and staging != f"local:{socket.gethostname()}":
            raise ConfigError(f"job descriptions need a scheduler with remote workers, or one with local "
                              f"workers on this machine (this scheduler's workers are on "
                              f"{(staging or 'local:?').removeprefix('local:')})")
        from cloudkon.sandbox import staged_command

        def prepare(job: str) -> list[str]:
            commands = list(tasks)
            uploader = None
            if not staging.startswith("local:"):
                from cloudkon.s3staging import InputUploader  # boto3 is needed for remote staging only
                uploader = InputUploader(staging, job)
            for task_id, spec in self.specs.items():
                if uploader is not None:
                    commands[task_id] = staged_command(spec, uploader.output_url(task_id),
                                                       uploader.upload(spec))
                else:
                    deliver = str(self.outputs / str(task_id)) if self.outputs else ""
                    commands[task_id] = staged_command(spec, deliver)
            return commands
        return prepare

    def bring_back(self, results: Results) -> None:
        """Download and check the output archives of remote tasks into DIR/<task id>/."""
        remote = {task_id: a for task_id, a in results.artifacts.items() if "url" in a}
        if not remote or self.outputs is None:
            return
        from cloudkon.s3staging import fetch_outputs
        for task_id, artifact in sorted(remote.items()):
            try:
                fetch_outputs(artifact, self.outputs / str(task_id))
            except (CloudKonError, OSError, KeyError, TypeError, ValueError) as exc:
                results.fail(task_id, f"outputs not brought back: {exc}")


# The columns of --jobs: a job's tasks by where they are, under headers that say it.  "running"
# counts the tasks in bundles given out: running, or waiting at a worker behind another bundle.
JOB_COLUMNS = {"queued": "QUEUED", "running": "IN-FLIGHT", "succeeded": "SUCCEEDED", "failed": "FAILED",
               "cancelled": "CANCELLED"}


def print_jobs(jobs: list[dict[str, Any]]) -> None:
    columns = JOB_COLUMNS
    print(f"{'JOB':<16}  {'STATE':<9}  {'CREATED':<19}  {'TOTAL':>9}  "
          + "  ".join(f"{header:>9}" for header in columns.values()))
    for job in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created_at"]))
        print(f"{job['job']:<16}  {job['state']:<9}  {created:<19}  {job['total']:>9}  "
              + "  ".join(f"{job[c]:>9}" for c in columns))


def report(args: argparse.Namespace, tasks: list[str], results: Results, wall: float,
           starting: float = 0.0) -> int:
    """Write the results file and the summary (the time ``starting`` an embedded scheduler told
    apart from the rest); the exit code."""
    if args.output:
        _write_output(results, tasks, args.output)
    if not args.quiet:
        timing = "" if args.cursor else f", {wall:.3f} s wall"
        if starting:
            timing += f" ({starting:.2f} s of it starting the embedded scheduler)"
        running = wall - starting
        if not args.cursor and running >= RATE_AFTER_SECONDS:  # a rate of a shorter run says little
            timing += f", {results.total / running:,.0f} tasks/s"
        cancelled = f", {results.cancelled} cancelled" if results.cancelled else ""
        print(f"{results.total} tasks: {results.total - results.failed} succeeded, "
              f"{results.failed - results.cancelled} failed{cancelled}{timing}", file=sys.stderr)
    if results.cancelled:
        return EXIT_CANCELLED
    return EXIT_TASKS_FAILED if results.failed else EXIT_OK


def submit_and_collect(host: str, port: int, token: str | None, tasks: list[str],
                       args: argparse.Namespace, files: JobFiles) -> Results:
    if args.listen is not None:
        return run_with_callback(host, port, token, tasks, args.listen, args.task_timeout, files,
                                 announce=bool(args.scheduler) and not args.quiet)
    conn = SchedulerConnection(host, port, token)
    try:
        job = conn.submit(tasks, args.task_timeout,
                          prepare=files.preparer(tasks, conn.welcome.get("staging")))
        keeps, durable = conn.welcome.get("keeps_results", True), conn.welcome.get("durable", True)
        if args.scheduler and not args.quiet:  # an embedded scheduler keeps nothing after the run
            print(f"client.py: job {job}" + (f" (its results again: --cursor {job})" if keeps else ""),
                  file=sys.stderr)
        results = Results(len(tasks))
        progress = Progress(enabled=not args.quiet and sys.stderr.isatty())

        def interrupted() -> None:
            # A second Ctrl-C, at the question or during the cancel, leaves at once.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            progress.clear()
            if not args.scheduler:  # an embedded scheduler's job ends with this client: stop its tasks
                _cancel_quietly(host, port, token, job)
                raise KeyboardInterrupt
            kept = (f"job {job} keeps running on {args.scheduler} (its results: --cursor {job}; "
                    f"to cancel it: --cancel {job})")
            try:
                if not (args.yes or _confirm(f"cancel job {job}? [y/N] ")):
                    raise KeyboardInterrupt
                answer = cancel_job(host, port, token, job)
            except KeyboardInterrupt:
                print(f"\nclient.py: {kept}", file=sys.stderr)
                raise
            except (CloudKonError, OSError) as exc:
                raise CloudKonError(f"could not cancel: {_describe(exc, args)}; {kept}") from exc
            print(f"client.py: {cancel_outcome(job, answer)}", file=sys.stderr)

        try:
            with on_interrupt(interrupted):
                conn.collect(job, results, progress)
        except (IncompleteFrame, ConnectionError) as exc:
            if not args.scheduler:
                raise
            if not durable:
                raise CloudKonError(f"{exc}: the scheduler went away; it kept its jobs in memory only: "
                                    "the results not received are lost") from exc
            raise CloudKonError(f"{exc}: the scheduler went away; if it restarts on its job store, "
                                f"fetch the results with --cursor {job}") from exc
        finally:
            progress.clear()
        return results
    finally:
        conn.close()


def cancel_outcome(job: str, answer: dict[str, Any]) -> str:
    """What a ``cancelled`` answer means, in words."""
    if answer.get("state") == "finished":
        return f"job {job} had finished already: nothing to cancel"
    if answer["count"] == 0:
        return f"job {job} had been cancelled already"
    return f"job {job} cancelled: {answer['count']} task(s) stopped"


def _cancel_quietly(host: str, port: int, token: str | None, job: str) -> None:
    try:
        cancel_job(host, port, token, job)
    except (CloudKonError, OSError) as exc:
        log.warning("could not cancel job %s: %s", job, exc)


def _write_output(results: Results, tasks: list[str], path: str) -> None:
    if path == "-":
        results.write_jsonl(tasks, sys.stdout)
        return
    with open(path, "w", encoding="utf-8") as out:
        results.write_jsonl(tasks, out)


def _describe(exc: BaseException, args: argparse.Namespace) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {args.scheduler}: connection refused (is the scheduler running?)"
    if isinstance(exc, socket.timeout):
        return f"cannot connect to {args.scheduler}: timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
