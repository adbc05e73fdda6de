"""Command line options shared by scheduler.py and client.py --remote.

Owns the remote-mode and provisioning options: scheduler.py offers them, and a client
with --remote forwards the ones given to the scheduler it embeds.  Kept apart so that
the client does not load the scheduler (its server, HTTP API and job store) to parse
its own command line.
"""

from __future__ import annotations

import argparse
import importlib.util

from cloudkon.errors import ConfigError
from cloudkon.protocol import check_task_timeout

# The AWS resources of a fleet, by default (aws.py and control.py use them; kept here, where
# loading them loads no boto3, so that every program's --help works without it).
DEFAULT_REQUEST_QUEUE = "cloudkon-requests"
DEFAULT_CLAIM_TABLE = "cloudkon-claims"
DEFAULT_CONTROL_TOPIC = "cloudkon-control"
# A bundle's lease: SQS visibility timeout and claim, renewed while it runs.
DEFAULT_VISIBILITY_TIMEOUT = 60

# Titles of the option groups that a client with --remote forwards to its embedded scheduler.
REMOTE_GROUP_TITLES = ("remote mode (AWS settings come from boto3's standard chain)",
                       "provisioning of EC2 workers (remote mode)")


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


def require_boto3() -> None:
    """ConfigError, saying how to install it, unless boto3 (remote mode's one dependency) is there."""
    if importlib.util.find_spec("boto3") is None:
        raise ConfigError("remote mode needs boto3, which is not installed: pip install '.[remote]' "
                          "(from the CloudKon-py folder), or pip install boto3")


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """The remote mode and provisioning options (shared with client.py --remote)."""
    remote = parser.add_argument_group(REMOTE_GROUP_TITLES[0])
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
                        help="visibility timeout of queues this scheduler creates (default: 60)")
    remote.add_argument("--bucket",
                        help="S3 bucket where clients stage the files of job descriptions (default: "
                             "cloudkon-<account>-<region>, created if missing)")
    remote.add_argument("--staging-prefix", metavar="PREFIX",
                        help="key prefix of job files in the bucket (default: jobs)")
    remote.add_argument("--retention-days", type=int, metavar="DAYS",
                        help="a lifecycle rule deletes job files this many days after they are "
                             "written (default: 7)")
    remote.add_argument("--control-topic",
                        help="SNS topic of control messages to the workers (cancel, drain, shutdown; "
                             "default: cloudkon-control)")
    fleet = parser.add_argument_group(REMOTE_GROUP_TITLES[1])
    fleet.add_argument("--provision", action="store_true",
                       help="launch EC2 worker instances while bundles wait; they terminate when idle")
    fleet.add_argument("--ami", help="image made with ami_setup.sh (required with --provision)")
    fleet.add_argument("--instance-type", default="t3.micro", help="(default: t3.micro)")
    fleet.add_argument("--max-workers", type=int, default=16, metavar="N", help="(default: 16)")
    fleet.add_argument("--key-name", help="EC2 key pair for the instances")
    fleet.add_argument("--subnet", help="subnet to launch in")
    fleet.add_argument("--security-group", action="append", default=[], metavar="ID",
                       help="security group id (repeatable)")
    fleet.add_argument("--instance-profile", metavar="NAME",
                       help="IAM instance profile giving the workers iam/worker-policy.json")
    fleet.add_argument("--worker-threads", type=int, default=4, metavar="N",
                       help="bundles each worker runs at once (default: 4)")
    fleet.add_argument("--worker-idle-timeout", type=float, default=300, metavar="SECONDS",
                       help="an instance terminates itself after this long without work (default: 300)")
    fleet.add_argument("--fleet", default="cloudkon",
                       help="fleet name: a restarted scheduler adopts its fleet's instances "
                            "(default: cloudkon)")
    fleet.add_argument("--fleet-table", default="cloudkon-fleet",
                       help="DynamoDB table registering the instances (default: cloudkon-fleet)")
    fleet.add_argument("--heartbeat-seconds", type=float, default=5, help=argparse.SUPPRESS)
    fleet.add_argument("--heartbeat-timeout", type=float, default=30, metavar="SECONDS",
                       help="terminate an instance silent this long (default: 30)")
    fleet.add_argument("--boot-timeout", type=float, default=300, metavar="SECONDS",
                       help="terminate an instance that sent no heartbeat this long after launch "
                            "(default: 300)")
    fleet.add_argument("--scale-interval", type=float, default=5, metavar="SECONDS",
                       help="how often to check the backlog and the fleet (default: 5)")
