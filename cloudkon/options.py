"""Command line options shared by scheduler.py and client.py --remote.

Owns the remote-mode and provisioning options: scheduler.py offers them, and a client
with --remote forwards the ones given to the scheduler it embeds.  Kept apart so that
the client does not load the scheduler (its server, HTTP API and job store) to parse
its own command line.  Their defaults are defaults.py's (where loading them loads no
boto3, so that every program's --help works without it).
"""

from __future__ import annotations

import argparse
import importlib.util

from cloudkon.costs import MINIMUM_BILLED_SECONDS
from cloudkon.defaults import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CLAIM_TABLE,
    DEFAULT_CONTROL_TOPIC,
    DEFAULT_FLEET,
    DEFAULT_FLEET_TABLE,
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_MAX_WORKERS,
    DEFAULT_REQUEST_QUEUE,
    DEFAULT_RETENTION_DAYS,
    DEFAULT_SCALE_INTERVAL,
    DEFAULT_STAGING_PREFIX,
    DEFAULT_VISIBILITY_TIMEOUT,
    DEFAULT_WORKER_THREADS,
)
from cloudkon.errors import ConfigError
from cloudkon.fleetpolicy import ASSUMED_BOOT_SECONDS, USEFUL_SHARE
from cloudkon.tasks import check_task_timeout


def task_timeout_argument(text: str) -> float:
    """argparse type of --task-timeout: seconds, positive, finite, at most protocol's limit."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    try:
        return check_task_timeout(seconds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (client.py --top)."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {count}")
    return count


def comma_list(text: str) -> list[str]:
    """argparse type of a repeatable option that also takes comma-separated values."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"an empty item in {text!r}")
    return items


def share_argument(text: str) -> float:
    """argparse type of --useful-share: a number between 0 and 1, both excluded."""
    share = ratio_argument(text)
    if share in (0, 1):
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return share


def ratio_argument(text: str) -> float:
    """argparse type of --spot-ratio: a number from 0 to 1."""
    try:
        ratio = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= ratio <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, not {text}")
    return ratio


def require_boto3() -> None:
    """ConfigError, saying how to install it, unless boto3 (remote mode's one dependency) is there."""
    if importlib.util.find_spec("boto3") is None:
        raise ConfigError("remote mode needs boto3, which is not installed: pip install '.[remote]' "
                          "(from the CloudKon-py folder), or pip install boto3")


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """The remote mode and provisioning options (shared with client.py --remote)."""
    remote = parser.add_argument_group("remote mode (AWS settings come from boto3's standard chain)")
    remote.add_argument("--request-queue",
                        help=f"SQS queue shared with the workers (default: {DEFAULT_REQUEST_QUEUE})")
    remote.add_argument("--response-queue", default=None,
                        help="SQS queue for this scheduler's results (default: a new "
                             "cloudkon-responses-<random>, deleted at exit)")
    remote.add_argument("--table",
                        help=f"DynamoDB claim table (default: {DEFAULT_CLAIM_TABLE})")
    remote.add_argument("--in-flight", type=int, metavar="N",
                        help="bundles kept queued or running on the workers, and the slots a job's last "
                             "bundles are spread over (default: the thread counts of the workers "
                             "subscribed to the control topic, added up; with --provision, "
                             "--max-workers x --worker-threads)")
    remote.add_argument("--visibility-timeout", type=int, metavar="SECONDS",
                        help="visibility timeout of queues this scheduler creates "
                             f"(default: {DEFAULT_VISIBILITY_TIMEOUT})")
    remote.add_argument("--bucket",
                        help="S3 bucket where clients stage the files of job descriptions (default: "
                             "cloudkon-<account>-<region>, created if missing)")
    remote.add_argument("--staging-prefix", metavar="PREFIX",
                        help=f"key prefix of job files in the bucket (default: {DEFAULT_STAGING_PREFIX})")
    remote.add_argument("--retention-days", type=int, metavar="DAYS",
                        help="a lifecycle rule deletes job files this many days after they are "
                             f"written (default: {DEFAULT_RETENTION_DAYS})")
    remote.add_argument("--control-topic",
                        help="SNS topic of control messages to the workers (cancel, drain, shutdown; "
                             f"default: {DEFAULT_CONTROL_TOPIC})")
    remote.add_argument("--prices", metavar="FILE",
                        help="JSON price table for the cost estimates, over the defaults (us-east-1 "
                             "on-demand, README 'What a job costs'): {\"instances\": {TYPE: USD per hour}, "
                             "\"spot\": {TYPE: USD per hour}, \"requests\": {SERVICE[.Operation]: USD per "
                             "million}}")
    fleet = parser.add_argument_group("provisioning of EC2 workers (remote mode)")
    fleet.add_argument("--provision", action="store_true",
                       help="launch EC2 worker instances while bundles wait; they terminate when idle")
    fleet.add_argument("--ami", help="image made with ami_setup.sh (required with --provision)")
    fleet.add_argument("--instance-type", type=comma_list, action="extend", metavar="TYPE[,TYPE...]",
                       help="instance type; several (comma-separated or repeated) are tried in order "
                            f"when EC2 has no capacity for one (default: {DEFAULT_INSTANCE_TYPE})")
    fleet.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS, metavar="N",
                       help=f"(default: {DEFAULT_MAX_WORKERS})")
    fleet.add_argument("--key-name", help="EC2 key pair for the instances")
    fleet.add_argument("--subnet", type=comma_list, action="extend", metavar="ID[,ID...]",
                       help="subnet to launch in; several (comma-separated or repeated): each type is "
                            "tried in each subnet (its zone) in turn when one is refused")
    fleet.add_argument("--spot", action="store_true",
                       help="launch spot instances (--spot-ratio 1); a worker leaves on its two-minute "
                            "interruption notice, handing its bundles back")
    fleet.add_argument("--spot-ratio", type=ratio_argument, metavar="R",
                       help="share of the instances launched that are spot, 0 to 1 (default: 0, or 1 "
                            "with --spot)")
    fleet.add_argument("--security-group", action="append", default=[], metavar="ID",
                       help="security group id (repeatable)")
    fleet.add_argument("--instance-profile", metavar="NAME",
                       help="IAM instance profile giving the workers iam/worker-policy.json")
    fleet.add_argument("--worker-threads", type=int, default=DEFAULT_WORKER_THREADS, metavar="N",
                       help=f"bundles each worker runs at once (default: {DEFAULT_WORKER_THREADS})")
    fleet.add_argument("--worker-idle-timeout", type=float, metavar="SECONDS",
                       help="an instance terminates itself after this long without work (default: the "
                            "cost rule: kept while keeping it costs less than booting another, judged by "
                            "the gaps between bursts seen; never before --billed-minimum)")
    fleet.add_argument("--billed-minimum", type=float, default=MINIMUM_BILLED_SECONDS, metavar="SECONDS",
                       help="the least an instance is billed for (EC2 Linux: per second, at least "
                            f"{MINIMUM_BILLED_SECONDS:g} s): the cost rule keeps it that long, the cost "
                            "report bills it (default: "
                            f"{MINIMUM_BILLED_SECONDS:g})")
    fleet.add_argument("--boot-seconds", type=float, default=ASSUMED_BOOT_SECONDS, metavar="SECONDS",
                       help="launch to a worker's first heartbeat, assumed until one is measured: a launch "
                            "is made when the backlog exceeds what the workers finish in this long "
                            f"(default: {ASSUMED_BOOT_SECONDS:g})")
    fleet.add_argument("--useful-share", type=share_argument, default=USEFUL_SHARE, metavar="S",
                       help="the share of a launched instance's paid time (its boot included) it should "
                            "spend running tasks: higher launches fewer instances (cheaper, slower), lower "
                            f"more (faster, dearer); between 0 and 1 (default: {USEFUL_SHARE:g})")
    fleet.add_argument("--fleet", default=DEFAULT_FLEET,
                       help="fleet name: a restarted scheduler adopts its fleet's instances "
                            f"(default: {DEFAULT_FLEET})")
    fleet.add_argument("--fleet-table", default=DEFAULT_FLEET_TABLE,
                       help=f"DynamoDB table registering the instances (default: {DEFAULT_FLEET_TABLE})")
    fleet.add_argument("--heartbeat-seconds", type=float, default=DEFAULT_HEARTBEAT_SECONDS,
                       help=argparse.SUPPRESS)
    fleet.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT,
                       metavar="SECONDS",
                       help="terminate an instance silent this long "
                            f"(default: {DEFAULT_HEARTBEAT_TIMEOUT:g})")
    fleet.add_argument("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT, metavar="SECONDS",
                       help="terminate an instance that sent no heartbeat this long after launch "
                            f"(default: {DEFAULT_BOOT_TIMEOUT:g})")
    fleet.add_argument("--scale-interval", type=float, default=DEFAULT_SCALE_INTERVAL, metavar="SECONDS",
                       help="how often to check the backlog and the fleet "
                            f"(default: {DEFAULT_SCALE_INTERVAL:g})")
