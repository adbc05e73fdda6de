"""The client's command line: submit a workload, collect every result, report.

Owns the user's side of a run: the options, reading the workload, the messages on
stderr, the summary and the exit code: 0 every task succeeded, 1 some task failed, 2
usage, workload, connection or protocol error, 3 the job was cancelled, 130
interrupted.  Also the job commands ``--cancel JOB`` and ``--jobs``, ``--report FILE`` (a
results file's report, no scheduler needed), and Ctrl-C during a run (cancel, or leave the
job running on its scheduler).  ``--remote`` embeds a remote-mode scheduler instead of a
local one: the client alone then drives SQS (and, with ``--provision``, EC2).  The
connection to a scheduler is connection.py's, the results and their file formats
results.py's, the report of ``--summary`` and ``--report`` report.py's, job description
files jobfiles.py's, the scheduler started when no ``-s`` is given embedded.py's.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from typing import Any

from cloudkon import protocol
from cloudkon.connection import (
    SchedulerConnection,
    cancel_job,
    fetch_job,
    list_jobs,
    parse_address,
    run_with_callback,
)
from cloudkon.costs import describe, load_prices
from cloudkon.embedded import embedded_scheduler
from cloudkon.errors import CloudKonError, IncompleteFrame
from cloudkon.interrupts import Interrupts
from cloudkon.jobfiles import JobFiles
from cloudkon.options import add_remote_arguments, positive_int, require_boto3, task_timeout_argument
from cloudkon.report import TOP, JobReport, read_records
from cloudkon.results import RESULT_FORMATS, Progress, Results, write_results
from cloudkon.workloads import TaskSender, Workload, submit_workload

log = logging.getLogger("cloudkon.client")

EXIT_OK, EXIT_TASKS_FAILED, EXIT_ERROR, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Runs shorter than this get no rate in their summary: over a fraction of a second it is noise.
RATE_AFTER_SECONDS = 0.5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py", description="Run a CloudKon workload (one task per line) and collect every result.",
        epilog="Without -s, an embedded scheduler runs the job (local worker processes, or with --remote "
               "SQS and remote workers). Ctrl-C during a run on a scheduler (-s) asks whether to cancel the "
               "job or leave it running there (-y: cancel without asking). Exit codes: 0 every task "
               "succeeded, 1 some task failed, 2 usage/workload/connection/protocol error, 3 the job was "
               "cancelled, 130 interrupted; --report: 0 the report was printed, 2 the file is not "
               "results.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("-w", "--workload", metavar="FILE", nargs="+", action="extend",
                      help="tasks, one per line: 'sleep N' sleeps N ms, a line starting with '{\"' is a JSON "
                           "job description with files (docs/jobs.md), anything else runs in /bin/sh. "
                           "Several files (-w a.txt b.txt -w c.txt) make one job, in the order given; "
                           "'-' reads standard input, its tasks submitted as they arrive")
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
    what.add_argument("--report", metavar="RESULTS",
                      help="print the report of --summary for a results file written earlier (JSONL or "
                           "--format csv; '-' for standard input); needs no scheduler")
    parser.add_argument("-s", "--scheduler", metavar="HOST:PORT",
                        help="scheduler to submit to (default: start an embedded local one)")
    parser.add_argument("-o", "--output", metavar="RESULTS",
                        help="write one result per task, in workload order ('-' for stdout), as --format "
                             "says")
    parser.add_argument("--format", choices=RESULT_FORMATS, default="jsonl",
                        help="of -o: jsonl, a JSON object per line (default), or csv, a header then a row "
                             "per task (id, command, source, status, exit_code, elapsed_ms, worker, error, "
                             "output; RFC 4180 quoting, an empty cell for null)")
    parser.add_argument("--summary", action="store_true",
                        help="after the run's summary line, print a report on stderr: totals, the slowest "
                             "tasks, the failures grouped by exit code (or error) and first output line, "
                             "the time per worker (also with --cursor, and with -q)")
    parser.add_argument("--top", type=positive_int, default=TOP, metavar="N",
                        help=f"rows of each table of --summary and --report (default: {TOP})")
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


def remote_option_defaults() -> dict[str, Any]:
    """The options add_remote_arguments declares (those a client with --remote forwards to its
    embedded scheduler), by destination, with their defaults: a parser of their own lists them
    through argparse's public API."""
    parser = argparse.ArgumentParser(add_help=False)
    add_remote_arguments(parser)
    return vars(parser.parse_args([]))


def embedded_options(args: argparse.Namespace) -> list[str]:
    """The command line options of the embedded scheduler: --local N, or --remote and what was given."""
    if not args.remote:
        return [] if args.local is None else ["--local", str(args.local)]
    options = ["--remote"]
    for dest, default in remote_option_defaults().items():
        value = getattr(args, dest)
        unchanged = value == default and type(value) is type(default)  # 0 is not None
        if value is None or value is False or unchanged:
            continue
        # argparse names the destination after the long option, '-' made '_': this is that option.
        option = "--" + dest.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            options += [option] + ([] if item is True else [str(item)])
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
            argparse.Namespace(**{**vars(args), "remote": True}))):
        parser.error("the remote mode and provisioning options go with --remote")
    for option, given in (("--cursor", args.cursor), ("--cancel", args.cancel), ("--jobs", args.jobs)):
        if given and not args.scheduler:
            parser.error(f"{option} needs -s HOST:PORT (the scheduler that holds the job)")
    if args.report and (args.scheduler or args.output or args.remote or args.listen is not None):
        parser.error("--report reads a results file: it goes with no -s, -o, -l or --remote")
    if args.format != "jsonl" and not args.output:
        parser.error("--format says how -o writes the results: give -o FILE")
    if args.cursor and args.listen is not None:
        parser.error("--cursor and -l do not go together")
    if args.local is not None and args.local < 1:
        parser.error("--local needs at least 1 worker")
    try:
        if args.remote:
            require_boto3()
            load_prices(args.prices)  # a bad --prices file is said before anything starts
        return run(args, embedded_options(args))
    except KeyboardInterrupt:
        print("client.py: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CloudKonError, OSError) as exc:
        print(f"client.py: error: {_describe(exc, args)}", file=sys.stderr)
        return EXIT_ERROR


def run(args: argparse.Namespace, embedded: list[str]) -> int:
    start = time.monotonic()
    if args.report:
        print(JobReport.of(read_records(args.report), args.top).render())
        return EXIT_OK
    if args.scheduler:
        host, port = parse_address(args.scheduler)
    if args.cancel:
        print(cancel_outcome(args.cancel, cancel_job(host, port, args.token, args.cancel)), file=sys.stderr)
        return EXIT_OK
    if args.jobs:
        answer = list_jobs(host, port, args.token)
        print_jobs(answer["jobs"], answer.get("fleet"))
        return EXIT_OK
    if args.cursor:
        tasks, results = fetch_job(host, port, args.token, args.cursor,
                                   commands=bool(args.output or args.summary))
        JobFiles({}, args.outputs).bring_back(results)
        return report(args, tasks, results, time.monotonic() - start)
    workload = Workload.job_description(args.jdl) if args.jdl else Workload(args.workload)
    if args.listen is not None and workload.streaming:
        workload.read_all()  # -l hangs up once the job is submitted: the whole of it
    files = JobFiles(workload.specs, args.outputs)
    starting = 0.0  # of the wall time, what starting an embedded scheduler took
    if args.scheduler:
        results = submit_and_collect(host, port, args.token, workload, args, files)
    else:
        starting = time.monotonic()
        with embedded_scheduler(embedded) as (host, port, token):
            starting = time.monotonic() - starting
            results = submit_and_collect(host, port, token, workload, args, files)
    files.bring_back(results)
    return report(args, workload.commands, results, time.monotonic() - start, starting, workload)


# The columns of --jobs: a job's tasks by where they are, under headers that say it.  "running"
# counts the tasks in bundles given out: running, or waiting at a worker behind another bundle.
JOB_COLUMNS = {"queued": "QUEUED", "running": "IN-FLIGHT", "succeeded": "SUCCEEDED", "failed": "FAILED",
               "cancelled": "CANCELLED"}


def print_jobs(jobs: list[dict[str, Any]], fleet: dict[str, Any] | None = None) -> None:
    """The jobs, a line each; a remote scheduler's jobs with their estimated cost (USD, once finished)
    and its fleet's figures under them."""
    columns = JOB_COLUMNS
    print(f"{'JOB':<16}  {'STATE':<9}  {'CREATED':<19}  {'TOTAL':>9}  "
          + "  ".join(f"{header:>9}" for header in columns.values()) + ("  COST-USD" if fleet else ""))
    for job in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created_at"]))
        cost = job.get("cost")
        usd = cost["usd"] if protocol.is_cost(cost) and cost["usd"] is not None else None
        column = "" if not fleet else f"  {'-' if usd is None else f'{usd:.6f}':>8}"
        print(f"{job['job']:<16}  {job['state']:<9}  {created:<19}  {job['total']:>9}  "
              + "  ".join(f"{job[c]:>9}" for c in columns) + column)
    if fleet:
        instances = f"{fleet['instances']} instance(s), " if "instances" in fleet else ""
        print(f"since the scheduler started: {instances}{describe(fleet)}")


def report(args: argparse.Namespace, tasks: list[str], results: Results, wall: float,
           starting: float = 0.0, workload: Workload | None = None) -> int:
    """Write the results file, the summary (the time ``starting`` an embedded scheduler told
    apart from the rest) and the report if asked for; the exit code."""
    if args.output:
        write_results(results, tasks, args.output, workload and workload.sources(), args.format)
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
        if results.cost is not None:  # remote mode only
            print(f"cost (estimate): {describe(results.cost)}", file=sys.stderr)
    if args.summary:  # on stderr, as the summary: stdout may be the results file (-o -)
        text = JobReport.of(results.records(tasks), args.top).render(None if args.cursor else wall)
        print(text if args.quiet else "\n" + text, file=sys.stderr)
    if results.cancelled:
        return EXIT_CANCELLED
    return EXIT_TASKS_FAILED if results.failed else EXIT_OK


def submit_and_collect(host: str, port: int, token: str | None, workload: Workload,
                       args: argparse.Namespace, files: JobFiles) -> Results:
    tasks = workload.commands
    if args.listen is not None:
        return run_with_callback(host, port, token, tasks, args.listen, args.task_timeout, files,
                                 announce=bool(args.scheduler) and not args.quiet)
    conn = SchedulerConnection(host, port, token)
    sender: TaskSender | None = None  # a workload read from standard input: its tasks' sender
    try:
        job, results, sender = submit_workload(conn, workload, args.task_timeout,
                                               files.preparer(tasks, conn.welcome.get("staging")),
                                               lambda job: cancel_job(host, port, token, job))
        keeps, durable = conn.welcome.get("keeps_results", True), conn.welcome.get("durable", True)
        if args.scheduler and not args.quiet:  # an embedded scheduler keeps nothing after the run
            print(f"client.py: job {job}" + (f" (its results again: --cursor {job})" if keeps else ""),
                  file=sys.stderr)
        progress = Progress(enabled=not args.quiet and sys.stderr.isatty())
        interrupts = Interrupts()

        def on_wake() -> None:
            if interrupts.take():
                interrupts.raise_from_now_on()  # a second Ctrl-C, at the question or the cancel, leaves
                progress.clear()
                _answer_ctrl_c(host, port, token, job, args)
                if sender is not None:  # cancelled: the job ends with the tasks sent
                    sender.stop()

        try:
            with interrupts:
                conn.collect(job, results, progress, wake=interrupts.wake, on_wake=on_wake)
            if sender is not None:
                sender.finish()
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
        if sender is not None:
            sender.stop()
        conn.close()


def cancel_outcome(job: str, answer: dict[str, Any]) -> str:
    """What a ``cancelled`` answer means, in words."""
    if answer.get("state") == "finished":
        return f"job {job} had finished already: nothing to cancel"
    if answer["count"] == 0:
        return f"job {job} had been cancelled already"
    return f"job {job} cancelled: {answer['count']} task(s) stopped"


def _answer_ctrl_c(host: str, port: int, token: str | None, job: str, args: argparse.Namespace) -> None:
    """Ctrl-C during a run: cancel the job (asking first on a terminal, unless -y) and return,
    its results keep coming, cancelled; or KeyboardInterrupt, the job left running on its
    scheduler.  An embedded scheduler's job ends with this client: its tasks are stopped."""
    if not args.scheduler:
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


def _cancel_quietly(host: str, port: int, token: str | None, job: str) -> None:
    try:
        cancel_job(host, port, token, job)
    except (CloudKonError, OSError) as exc:
        log.warning("could not cancel job %s: %s", job, exc)


def _describe(exc: BaseException, args: argparse.Namespace) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {args.scheduler}: connection refused (is the scheduler running?)"
    if isinstance(exc, socket.timeout):
        return f"cannot connect to {args.scheduler}: timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}"
    return str(exc)


def _confirm(question: str) -> bool:
    """Ask a yes/no question on the terminal; False without one (or on end of input)."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    sys.stderr.write(question)
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


if __name__ == "__main__":
    sys.exit(main())
