"""Building a scheduler's pieces from its parsed options: backend, job store, staging, fleet, figures.

Owns the choices the command line's options make: local worker processes or SQS
(``--local``/``--remote``), the job store and its name (``--state``, ``--no-state``,
``--jobs-table``), the figures of the metrics and dashboard (with AWS calls in remote mode),
the staging bucket (``--bucket``, ``--staging-prefix``, ``--retention-days``), the fleet
(``--provision``) and the fleet commands that do their work and exit (``--drain``,
``--shutdown``, ``--cleanup``).  A ConfigError says which options do not go together.
boto3 and the modules on it are imported here only in remote mode, so that local mode never
loads them.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from cloudkon.backend import Backend
from cloudkon.errors import ConfigError
from cloudkon.jobstore import JobStore, SQLiteJobStore
from cloudkon.journal import Journal
from cloudkon.keeper import Keeper, MemoryKeeper, StoreKeeper
from cloudkon.metrics import Histogram
from cloudkon.service import JobService
from cloudkon.telemetry import Telemetry

log = logging.getLogger("cloudkon.scheduler")


def store_name(args: argparse.Namespace) -> str | None:
    """Remote mode with a job store: this scheduler's name in the jobs table, which also names its
    response queue (--state, else the one --response-queue names, else a new random one); else None."""
    if not args.remote or args.no_state:
        return None
    from cloudkon.aws import RESPONSE_QUEUE_PREFIX  # boto3 is loaded in remote mode only
    if args.state:
        return args.state
    if args.response_queue:
        return args.response_queue.removeprefix(RESPONSE_QUEUE_PREFIX)
    return secrets.token_hex(6)


def create_backend(args: argparse.Namespace, name: str | None, fleet: Any = None) -> Backend:
    """The backend the options choose; in remote mode, its response queue named by ``name``
    (store_name) unless --response-queue names one, and its workers ``fleet``'s instances."""
    if args.remote:
        if args.in_flight is not None and args.in_flight < 1:
            raise ConfigError("--in-flight needs at least 1")
        from cloudkon.aws import RESPONSE_QUEUE_PREFIX
        from cloudkon.sqsbackend import SQSBackend  # boto3 is loaded in remote mode only
        response_queue, delete = args.response_queue, None
        if response_queue is None and name is not None:  # a restart finds results sent meanwhile
            response_queue = f"{RESPONSE_QUEUE_PREFIX}{name}"
            # A name made up for this start goes with it, as one SQSBackend makes up does.
            delete = True if not args.state else None
        in_flight = args.in_flight
        if in_flight is None and args.provision:  # the fleet grows to what its bundles keep busy
            in_flight = args.max_workers * args.worker_threads
        options = {"request_queue": args.request_queue, "response_queue": response_queue,
                   "claim_table": args.table, "in_flight": in_flight,
                   "visibility_timeout": args.visibility_timeout, "control_topic": args.control_topic,
                   "delete_response_queue": delete}
        return SQSBackend(**{key: value for key, value in options.items() if value is not None},
                          staging=staging_area(args), fleet=fleet)
    from cloudkon.localworkers import LocalBackend
    workers = args.local if args.local is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError("--local needs at least 1 worker")
    return LocalBackend(workers)


def staging_area(args: argparse.Namespace) -> str:
    """The s3:// prefix where clients stage job files, its bucket made ready (remote mode)."""
    from cloudkon.defaults import DEFAULT_RETENTION_DAYS
    from cloudkon.s3staging import ensure_bucket
    retention = DEFAULT_RETENTION_DAYS if args.retention_days is None else args.retention_days
    if retention < 1:
        raise ConfigError("--retention-days needs at least 1")
    bucket, prefix = staging_bucket(args)
    ensure_bucket(bucket, prefix, retention)
    return f"s3://{bucket}/{prefix}"


def staging_bucket(args: argparse.Namespace) -> tuple[str, str]:
    """The bucket and key prefix of job files (--bucket, --staging-prefix)."""
    from cloudkon.defaults import DEFAULT_STAGING_PREFIX
    from cloudkon.s3staging import default_bucket
    prefix = (args.staging_prefix or DEFAULT_STAGING_PREFIX).strip("/")
    if not prefix:
        raise ConfigError("--staging-prefix needs at least one character besides '/'")
    return args.bucket or default_bucket(), prefix


def default_state_path() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "cloudkon" / "jobs.sqlite"


def create_keeper(args: argparse.Namespace, name: str | None, timed: Histogram | None = None) -> Keeper:
    """What keeps the jobs: the job store chosen by --state / --jobs-table (in remote mode, under
    ``name``: store_name), behind its journal (its writes' times observed in ``timed``); nothing
    with --no-state."""
    if args.no_state:
        return MemoryKeeper()
    if args.remote:
        from cloudkon.dynamostore import DynamoJobStore  # boto3 is loaded in remote mode only
        assert name is not None, "store_name names every remote store"
        store: JobStore = DynamoJobStore(args.jobs_table, name, args.result_ttl)
    else:
        store = SQLiteJobStore(args.state or str(default_state_path()))
    log.info("job store: %s", store.describe())
    return StoreKeeper(Journal(store, None if timed is None else timed.observe))


def create_fleet(args: argparse.Namespace) -> Any:
    """The provisioning.Fleet for --provision or --cleanup, else None."""
    if not (args.provision or args.cleanup):
        return None
    if not args.remote:
        raise ConfigError("--provision and --cleanup go with --remote")
    if args.provision and not args.ami:
        raise ConfigError("--provision needs --ami (an image made with ami_setup.sh)")
    from cloudkon.defaults import DEFAULT_INSTANCE_TYPE
    from cloudkon.fleetpolicy import FleetPolicy, IdleRule
    from cloudkon.provisioning import Fleet, LaunchOptions, WorkerSettings
    settings = WorkerSettings(fleet=args.fleet, fleet_table=args.fleet_table, threads=args.worker_threads,
                              heartbeat_seconds=args.heartbeat_seconds)
    idle = IdleRule(args.worker_idle_timeout, args.billed_minimum)
    if args.worker_idle_timeout is not None:  # else the cost rule (fleetpolicy) sets it, and the minimum
        settings.idle_timeout = args.worker_idle_timeout
    else:
        settings.billed_minimum = args.billed_minimum
    for option, value in (("request_queue", args.request_queue), ("claim_table", args.table),
                          ("visibility_timeout", args.visibility_timeout),
                          ("control_topic", args.control_topic)):
        if value is not None:
            setattr(settings, option, value)
    launch = LaunchOptions(args.ami, args.instance_type or [DEFAULT_INSTANCE_TYPE], args.key_name,
                           args.subnet or [], args.security_group, args.instance_profile,
                           spot_ratio(args)) if args.provision else None
    return Fleet(settings, launch, args.max_workers, args.heartbeat_timeout, args.boot_timeout,
                 make_registry=not args.cleanup,
                 policy=FleetPolicy(args.max_workers, args.worker_threads, idle, args.boot_seconds,
                                    args.useful_share))


def create_costs(args: argparse.Namespace) -> Any:
    """The costs.CostBook of a remote scheduler (prices from --prices over the defaults; its ``fleet``
    set once there is one), else None; ConfigError for a bad --prices file."""
    if not args.remote:
        if args.prices:
            raise ConfigError("--prices goes with --remote (local mode counts no cost)")
        return None
    from cloudkon import aws  # boto3 is loaded in remote mode only
    from cloudkon.costs import CostBook, load_prices
    return CostBook(load_prices(args.prices), None, aws.call_counts)


def create_telemetry(args: argparse.Namespace, service: JobService, store_writes: Histogram,
                     fleet: Any = None) -> Telemetry:
    """The figures of the metrics and the dashboard, listening to ``service``; remote, with this
    process's AWS calls and the fleet's instances."""
    aws_calls = None
    if args.remote:
        from cloudkon import aws  # boto3 is loaded in remote mode only
        aws_calls = aws.call_counts
    telemetry = Telemetry(service, store_writes, aws_calls, fleet)
    service.add_listener(telemetry)
    return telemetry


def spot_ratio(args: argparse.Namespace) -> float:
    """The share of spot instances --spot and --spot-ratio ask for."""
    if args.spot and args.spot_ratio is not None:
        raise ConfigError("--spot is --spot-ratio 1: give one of them")
    return 1.0 if args.spot else args.spot_ratio or 0.0


def run_fleet_command(args: argparse.Namespace) -> int:
    """--drain or --shutdown (0 once every worker has left, 1 on timeout) or --cleanup (0)."""
    if not args.remote:
        raise ConfigError("--drain, --shutdown and --cleanup go with --remote")
    if args.drain + args.shutdown + args.cleanup > 1:
        raise ConfigError("--drain, --shutdown and --cleanup are separate commands: one at a time")
    from cloudkon import aws  # boto3 is loaded in remote mode only
    from cloudkon.control import ControlTopic
    from cloudkon.defaults import DEFAULT_CLAIM_TABLE, DEFAULT_CONTROL_TOPIC
    from cloudkon.signing import Signer
    try:  # drain and shutdown are signed with a key of this command's own, written at first use
        topic = ControlTopic(args.control_topic or DEFAULT_CONTROL_TOPIC,
                             Signer(aws.client("dynamodb"), args.table or DEFAULT_CLAIM_TABLE))
        if args.drain or args.shutdown:
            return 0 if topic.stop_workers("drain" if args.drain else "shutdown", args.grace) else 1
        fleet = create_fleet(args)
        fleet.cleanup()
        fleet.remove_resources()
        topic.remove()
        from cloudkon.s3staging import remove_staging
        remove_staging(*staging_bucket(args))
        return 0
    finally:
        aws.log_api_calls()
