"""The remote worker's command line: ``python worker.py -t 4`` on each worker machine.

Owns the options, logging, signals and exit code of a worker process; what it does
(take bundles from SQS, run them, report) is remoteworker.py's, loaded with boto3 only
once the options are read, so that --help and a missing boto3 say what they should.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from cloudkon.defaults import (
    DEFAULT_CLAIM_TABLE,
    DEFAULT_CONTROL_TOPIC,
    DEFAULT_ECONOMIZE_AFTER_SECONDS,
    DEFAULT_REQUEST_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT,
    DEFAULT_WORKER_THREADS,
)
from cloudkon.errors import CloudKonError
from cloudkon.options import require_boto3

if TYPE_CHECKING:  # loads boto3: only once the options are read
    from cloudkon.remoteworker import Worker

log = logging.getLogger("cloudkon.worker")

# SIGINT/SIGTERM stop the worker (twice: at once).
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker.py", description="Run CloudKon bundles from an SQS request queue (remote mode).",
        epilog="AWS credentials, region and endpoint come from boto3's standard settings. SIGINT/SIGTERM: "
               "take no new bundle, finish and report the ones held, exit 0; a second one kills the "
               "running tasks and exits (SQS redelivers what was held).")
    parser.add_argument("-t", "--threads", type=int, default=DEFAULT_WORKER_THREADS,
                        help=f"bundles run at once (default: {DEFAULT_WORKER_THREADS})")
    parser.add_argument("--request-queue", default=DEFAULT_REQUEST_QUEUE,
                        help=f"SQS queue to take bundles from (default: {DEFAULT_REQUEST_QUEUE})")
    parser.add_argument("--table", default=DEFAULT_CLAIM_TABLE,
                        help=f"DynamoDB claim table (default: {DEFAULT_CLAIM_TABLE})")
    parser.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                        help="exit after this long without work (default: never)")
    parser.add_argument("--economize-after", type=float, metavar="SECONDS",
                        default=DEFAULT_ECONOMIZE_AFTER_SECONDS,
                        help="after this long without work, poll the request and control queues in turn "
                             "(3 calls a minute instead of 6; a new bundle may then wait up to 20 s) "
                             f"(default: {DEFAULT_ECONOMIZE_AFTER_SECONDS:g})")
    parser.add_argument("--visibility-timeout", type=int, default=DEFAULT_VISIBILITY_TIMEOUT,
                        metavar="SECONDS", help="lease on a bundle, renewed while it runs; a dead "
                        f"worker's bundles run again after it (default: {DEFAULT_VISIBILITY_TIMEOUT})")
    parser.add_argument("--control-topic", default=DEFAULT_CONTROL_TOPIC,
                        help="SNS topic of the fleet's control messages: cancel, drain, shutdown "
                             f"(default: {DEFAULT_CONTROL_TOPIC})")
    parser.add_argument("--ec2", action="store_true",
                        help="run as an instance launched by 'scheduler.py --provision': settings and "
                             "identity from the instance metadata service (IMDSv2), heartbeats to the "
                             "fleet registry, and terminate this instance when idle")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads needs at least 1")
    if args.visibility_timeout < 3:
        parser.error("--visibility-timeout must be at least 3 seconds")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s worker %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # its INFO lines are noise here
    try:
        worker = start_worker(args)
    except CloudKonError as exc:
        print(f"worker.py: error: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, frame: object) -> None:
        # Only flags: the main thread acts on them (Worker.run), and nothing here may wait on a
        # lock the interrupted code holds.
        worker.request_stop()

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, on_signal)
    return worker.run()


def start_worker(args: argparse.Namespace) -> Worker:
    """The worker the options (or, with --ec2, the instance's launch settings) ask for, set up:
    boto3 is loaded from here on."""
    require_boto3()
    from cloudkon.processes import reduce_timer_slack
    from cloudkon.remoteworker import Worker
    from cloudkon.workerinstance import Instance, metadata_instance_id
    reduce_timer_slack()
    instance = None
    if args.ec2:
        instance = Instance.from_metadata()
        os.environ.setdefault("AWS_REGION", instance.region)
        settings = instance.settings
        args.request_queue, args.table, args.threads = (settings.request_queue, settings.claim_table,
                                                        settings.threads)
        args.idle_timeout, args.visibility_timeout = settings.idle_timeout, settings.visibility_timeout
        args.control_topic = settings.control_topic
        identity = instance.id
    else:
        identity = f"{metadata_instance_id() or socket.gethostname()}:{os.getpid()}"
    named = logging.Formatter(f"%(asctime)s worker {identity} %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # every line names this worker
        handler.setFormatter(named)
    if instance is not None:
        log.info("instance %s of fleet %s", instance.id, instance.settings.fleet)
    return Worker(args.request_queue, args.table, args.threads, args.idle_timeout, args.visibility_timeout,
                  identity, args.control_topic, instance, economize_after=args.economize_after)


if __name__ == "__main__":
    sys.exit(main())
