"""The scheduler's command line: its options, its logging and signals, and its pieces started.

Owns the process a user starts (``python scheduler.py``): parses the options, builds
the backend, the job store and the fleet (wiring.py), and runs the job service
(service.py) behind the TCP server (server.py) and, with ``--http-port``, the HTTP
API (httpapi.py; with ``--metrics-port``, a metrics server too), until a signal: the first
stops intake and lets the tasks in flight finish (``--grace``), a second stops at once.

Threads: the asyncio event loop runs connections, the job service and its Dispatcher;
one more thread sits in ``backend.receive`` and hands result batches to the loop
(JobService.receive_results); with ``--provision`` one sizes the fleet; the journal's
thread writes the job store; the HTTP API has threads of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from cloudkon.errors import BackendError, CloudKonError, ConfigError
from cloudkon.fleetpolicy import backlog_seconds
from cloudkon.httpapi import HttpApi
from cloudkon.options import add_remote_arguments, require_boto3, task_timeout_argument
from cloudkon.server import Server, format_address
from cloudkon.service import DEFAULT_MAX_HELD_BYTES, DEFAULT_RESULT_TTL_SECONDS, JobService
from cloudkon.tasks import MAX_TASK_TIMEOUT_SECONDS
from cloudkon.telemetry import Telemetry, store_write_seconds
from cloudkon.wiring import (
    create_backend,
    create_costs,
    create_fleet,
    create_keeper,
    create_telemetry,
    run_fleet_command,
    store_name,
)

log = logging.getLogger("cloudkon.scheduler")

DEFAULT_PORT = 9000
DEFAULT_GRACE_SECONDS = 30.0
# The same unexpected error of the event loop (accept failing for want of file descriptors,
# say) is logged at most once in this long.
LOOP_ERROR_LOG_SECONDS = 10.0
# How often finished jobs are looked at for expiry (more often for a short --result-ttl).
EXPIRY_CHECK_SECONDS = 10.0


class _Stop:
    """How the scheduler is asked to stop: the first signal stops intake, a second stops now."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.force = asyncio.Event()
        self._signals = 0

    def on_signal(self) -> None:
        # Runs in the event loop: only set flags, the main coroutine does the work.
        self._signals += 1
        if self._signals == 1:
            log.info("shutting down: finishing tasks in flight (signal again to stop now)")
            self.requested.set()
        else:
            log.warning("stopping now")
            self.force.set()

    def now(self) -> None:
        """Stop at once, as after a second signal."""
        self.force.set()
        self.requested.set()


class _LoopErrors:
    """The event loop's unexpected errors, each kind logged at most once per LOOP_ERROR_LOG_SECONDS."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        kind = context.get("message", "")
        now = time.monotonic()
        if now - self._last.get(kind, -LOOP_ERROR_LOG_SECONDS) < LOOP_ERROR_LOG_SECONDS:
            return
        first = kind not in self._last
        self._last[kind] = now
        exc = context.get("exception")
        log.error("%s%s%s", kind, f": {exc!r}" if exc else "",
                  "" if first else f" (again; logged at most every {LOOP_ERROR_LOG_SECONDS:g} s)",
                  exc_info=exc if first else None)


async def serve(service: JobService, args: argparse.Namespace, telemetry: Telemetry,
                fleet: Any = None) -> int:
    """Serve until a signal (or the parent's exit) ends it; the exit code."""
    loop = asyncio.get_running_loop()
    stop = _Stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.on_signal)
    loop.set_exception_handler(_LoopErrors())
    await service.restore_jobs()
    server = Server(service, args.token or None)
    listening = await server.listen(args.host, args.port)
    try:
        http_servers = _start_http(service, args, loop, telemetry)
    except OSError:
        listening.close()
        raise
    print(f"listening on {format_address(*listening.sockets[0].getsockname()[:2])}", flush=True)
    for http in http_servers:
        print(f"{http.title} on http://{format_address(*http.address)}", flush=True)
    log.info("%s", service.backend.describe())
    stop_receiving = threading.Event()
    receiver = threading.Thread(target=service.receive_results, args=(loop, stop_receiving),
                                name="cloudkon-receive", daemon=True)
    receiver.start()
    if fleet is not None:
        threading.Thread(target=_scale_loop, name="cloudkon-scale", daemon=True,
                         args=(service, fleet, args.scale_interval, stop_receiving, telemetry)).start()
    housekeeping = asyncio.create_task(_housekeeping(service, stop, args.exit_with_parent))
    await stop.requested.wait()
    listening.close()
    for http in http_servers:
        await loop.run_in_executor(None, http.close)
    housekeeping.cancel()
    server.refuse_open_jobs()
    finished = await service.drain(args.grace, stop.force)
    await server.close()
    service.log_stopped(finished)
    stop_receiving.set()
    service.backend.wake()
    await loop.run_in_executor(None, receiver.join)
    await loop.run_in_executor(None, service.backend.close, finished)
    return 0


def _start_http(service: JobService, args: argparse.Namespace, loop: asyncio.AbstractEventLoop,
                telemetry: Telemetry) -> list[HttpApi]:
    """The HTTP API (--http-port) and the metrics' server of its own (--metrics-port), started;
    OSError naming the port that could not be served (none is left open then)."""
    started: list[HttpApi] = []
    for title, port, metrics_only in (("HTTP API", args.http_port, False),
                                      ("metrics", args.metrics_port, True)):
        if port is None:
            continue
        try:
            http = HttpApi(args.host, port, args.token or None, service, loop, telemetry, metrics_only)
        except OSError as exc:
            for running in started:
                running.close()
            raise OSError(exc.errno, f"{title} on port {port}: {exc.strerror}") from exc
        http.start()
        started.append(http)
    return started


def _scale_loop(service: JobService, fleet: Any, interval: float, stop: threading.Event,
                telemetry: Telemetry) -> None:
    """Provisioning: every few seconds, size the fleet to the backlog's estimated work."""
    while not stop.wait(interval):
        try:
            fleet.scale(backlog_seconds(service.dispatcher))
            telemetry.fleet_scanned()
        except BackendError as exc:
            log.error("provisioning: %s", exc)
        except Exception:  # the next round may work: this thread must not die
            log.exception("provisioning failed")


async def _housekeeping(service: JobService, stop: _Stop, parent_pid: int | None) -> None:
    """Expire unclaimed results; stop if the parent that started us is gone."""
    last_expiry = time.monotonic()
    expiry_check = min(EXPIRY_CHECK_SECONDS, max(service.result_ttl / 2, 0.5))
    while True:
        await asyncio.sleep(0.5)
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("parent process %d is gone: stopping", parent_pid)
            stop.now()
        if time.monotonic() - last_expiry >= expiry_check:
            last_expiry = time.monotonic()
            service.expire_results()


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


# --- command line -------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scheduler.py", description="Run CloudKon tasks sent by clients on worker processes.",
        epilog="Prints 'listening on HOST:PORT' on stdout when ready; logs go to stderr. "
               "SIGINT/SIGTERM: stop taking jobs, finish tasks in flight (the rest stay in the job "
               "store for the next start; with --no-state they are reported failed), exit 0; a second "
               "one stops at once.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", type=int, metavar="N", default=None,
                      help="run tasks in N local worker processes (the default, with N = the CPU count)")
    mode.add_argument("--remote", action="store_true",
                      help="run tasks on remote workers (worker.py) through SQS, with a DynamoDB claim table")
    add_remote_arguments(parser)
    commands = parser.add_argument_group("fleet commands (remote mode; each does its work and exits)")
    commands.add_argument("--cleanup", action="store_true",
                          help="terminate every instance of the fleet, delete its queues, tables, control "
                               "topic and any worker control queues left behind, and exit")
    commands.add_argument("--drain", action="store_true",
                          help="tell every worker (over the control topic) to finish the bundles it holds, "
                               "take no new one and exit; wait until they have (up to --grace seconds)")
    commands.add_argument("--shutdown", action="store_true",
                          help="tell every worker to stop now, handing the bundles it holds back to the "
                               "request queue; wait until they have exited (up to --grace seconds)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default: {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="also serve the HTTP API (POST /tasks/submit, GET /tasks/result/CURSOR; "
                             "docs/openapi.json), the dashboard (http://HOST:PORT/) and GET /metrics on "
                             "this port of --host (0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="also serve the Prometheus metrics (GET /metrics, without --token: for a "
                             "scraper) on this port of --host; the HTTP API serves them too, with the token")
    parser.add_argument("--token", default=os.environ.get("CLOUDKON_TOKEN"),
                        help="secret every client must present (default: $CLOUDKON_TOKEN); "
                             "required to listen on a non-loopback address")
    parser.add_argument("--task-timeout", type=task_timeout_argument, metavar="SECONDS", default=None,
                        help="kill a task's process group after this long (default: no limit; at most "
                             f"{MAX_TASK_TIMEOUT_SECONDS:.0f}, 30 days)")
    parser.add_argument("--result-ttl", type=float, metavar="SECONDS", default=DEFAULT_RESULT_TTL_SECONDS,
                        help="keep a finished job and its results this long "
                             f"(default: {DEFAULT_RESULT_TTL_SECONDS:g}, a day)")
    state = parser.add_argument_group("job store (jobs survive a restart on the same store)")
    state.add_argument("--state", metavar="PATH|NAME",
                       help="local mode: SQLite file of jobs and results (default: "
                            "$XDG_DATA_HOME/cloudkon/jobs.sqlite; ':memory:' keeps them in memory); "
                            "remote mode: this scheduler's name in the jobs table, also naming its "
                            "response queue (default: a new random name, logged at start)")
    state.add_argument("--jobs-table", default="cloudkon-jobs",
                       help="remote mode: DynamoDB table of jobs and results (default: cloudkon-jobs)")
    state.add_argument("--no-state", action="store_true",
                       help="keep jobs in memory only: results are dropped once delivered")
    parser.add_argument("--max-held-bytes", type=int, metavar="BYTES", default=DEFAULT_MAX_HELD_BYTES,
                        help="tasks the scheduler holds in memory at once, over every job, weighed as their "
                             "commands' bytes plus 64 each; a submission past it is refused (default: "
                             f"{DEFAULT_MAX_HELD_BYTES >> 30} GiB)")
    parser.add_argument("--grace", type=float, metavar="SECONDS", default=DEFAULT_GRACE_SECONDS,
                        help="on shutdown, wait this long for tasks in flight before failing them "
                             f"(default: {DEFAULT_GRACE_SECONDS:g})")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    parser.add_argument("--exit-with-parent", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _check_options(args: argparse.Namespace) -> None:
    """ConfigError for options that cannot serve."""
    for flag, port in (("--port", args.port), ("--http-port", args.http_port),
                       ("--metrics-port", args.metrics_port)):
        if port is not None and not 0 <= port < 65536:
            raise ConfigError(f"{flag} {port} is not a TCP port")
    if not args.token and not is_loopback(args.host):
        raise ConfigError(f"refusing to listen on {args.host} without --token "
                          "(or $CLOUDKON_TOKEN): anyone who can reach it could run commands")
    if args.remote:
        require_boto3()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s scheduler %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # its INFO lines are noise here
    backend = None
    try:
        _check_options(args)
        if args.drain or args.shutdown or args.cleanup:
            return run_fleet_command(args)
        costs = create_costs(args)  # first: a bad --prices file stops the start before anything is made
        fleet = create_fleet(args)
        if costs is not None and fleet is not None:
            costs.fleet = fleet.usage
        name = store_name(args)
        backend = create_backend(args, name, fleet)
        store_writes = store_write_seconds()
        keeper = create_keeper(args, name, store_writes)
        # Bundle numbers of each start are apart, so a restart never reuses one (remote
        # claims are per job and bundle number).
        first_bundle = keeper.start() << 32
    except CloudKonError as exc:
        if backend is not None:
            backend.close(wait=False)
        print(f"scheduler.py: error: {exc}", file=sys.stderr)
        return 2
    service = JobService(backend, keeper, args.result_ttl, args.task_timeout, args.max_held_bytes,
                         first_bundle, costs)
    telemetry = create_telemetry(args, service, store_writes, fleet)
    try:
        return asyncio.run(serve(service, args, telemetry, fleet))
    except OSError as exc:
        backend.close(wait=False)
        print(f"scheduler.py: error: cannot listen on {args.host}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except CloudKonError as exc:  # the job store could not be read back
        backend.close(wait=False)
        print(f"scheduler.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        keeper.close()


if __name__ == "__main__":
    sys.exit(main())
