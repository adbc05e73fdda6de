"""Celery side of bench/remote_peers.py: the app, its one no-op task, and the client that submits.

Owns how Celery is configured for the comparison with CloudKon's remote mode: the SQS broker and
the DynamoDB result backend, both on the AWS emulator behind remote_peers.py's counting proxy.
It does not start anything: remote_peers.py runs the worker (`celery -A celery_sqs_app worker`)
and this module's client as subprocesses, and counts their API calls at the proxy.

Settings come from the environment, so that the worker and the client agree:
  AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION  the emulator (the proxy)
  CELERY_BENCH_QUEUE_PREFIX  SQS queue name prefix, fresh per run, so no run sees another's messages
  CELERY_BENCH_TABLE         DynamoDB result table, fresh per run
  CELERY_BENCH_PREFETCH      worker_prefetch_multiplier
  CELERY_BENCH_READY         file the worker creates once it consumes (remote_peers.py waits on it)

    python bench/celery_sqs_app.py --create-table   # before the worker starts
    python bench/celery_sqs_app.py TASKS            # submit TASKS no-op tasks as one group, wait, print JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
from pathlib import Path

from celery import Celery, group
from celery.signals import worker_process_init, worker_ready
from kombu.utils.url import safequote

# Celery's SQS documentation: credentials in the URL (quoted), or from the environment with a
# bare sqs://. kombu takes the endpoint from the URL's host and port (Channel.endpoint_url) and
# the scheme from the is_secure transport option, so the host here is the counting proxy.
_endpoint = urllib.parse.urlsplit(os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"))
_key = safequote(os.environ.get("AWS_ACCESS_KEY_ID", "testing"))
_secret = safequote(os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"))
_region = os.environ.get("AWS_REGION", "us-east-1")

app = Celery("celery_sqs_app")
app.conf.update(
    broker_url=f"sqs://{_key}:{_secret}@{_endpoint.hostname}:{_endpoint.port}",
    broker_transport_options={
        "region": _region,
        "is_secure": _endpoint.scheme == "https",
        "queue_name_prefix": os.environ.get("CELERY_BENCH_QUEUE_PREFIX", "celery-bench-"),
        # Long polling at the AWS maximum: fewest empty ReceiveMessage calls.
        "wait_time_seconds": 20,
        # The docs' example; tasks take microseconds, so it only bounds redelivery of a lost worker.
        "visibility_timeout": 3600,
        # kombu's advice with long polling: no client-side pause on top of it. The default (1 s)
        # also pauses whenever the prefetch is full, capping a worker at one prefetch a second.
        "polling_interval": 0,
    },
    broker_connection_retry_on_startup=True,
    # SQS cannot return results, so Celery's documented DynamoDB backend, on the same proxy: an
    # IP address as the "region" makes the backend use http://HOST:PORT as its endpoint.
    # Credentials come from the environment, not the URL: with them in the URL the backend makes
    # its boto3 client, and a kept-alive connection, as soon as it is built, in the worker's main
    # process; the prefork children then share that socket and one can read the other's
    # response, leaving it to botocore's 60 s read timeout (seen here: 60 s stalls, retried puts).
    result_backend=(f"dynamodb://{_endpoint.hostname}:{_endpoint.port}/"
                    f"{os.environ.get('CELERY_BENCH_TABLE', 'celery-bench-results')}"),
    # SQS supports neither remote control nor events (Celery's SQS caveats): off, so that the
    # worker does not poll for them.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_prefetch_multiplier=int(os.environ.get("CELERY_BENCH_PREFETCH", "4")),
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop() -> None:
    """The benchmark's task: nothing, like CloudKon's `sleep 0`."""
    time.sleep(0)


@worker_process_init.connect
def _own_backend_client(**_: object) -> None:
    # Celery's hook for per-process resources: a client made before the fork would share its
    # connections with the other children (see result_backend above).
    app.backend._client = None


@worker_ready.connect
def _announce_ready(**_: object) -> None:
    # Lets remote_peers.py start the clock only once the worker consumes, as it does for CloudKon.
    ready = os.environ.get("CELERY_BENCH_READY")
    if ready:
        Path(ready).touch()


def submit(tasks: int) -> float:
    """Seconds from submitting `tasks` no-op tasks as one group to holding every result."""
    start = time.perf_counter()
    result = group(noop.s() for _ in range(tasks)).apply_async()
    # Generous: the emulator takes ~5 ms a call, and Celery makes a few calls per task.
    result.get(timeout=60 + tasks)
    return time.perf_counter() - start


def describe() -> str:
    """The settings that matter for the comparison, as configured above (for the results table)."""
    options = ", ".join(f"{k} {v}" for k, v in app.conf.broker_transport_options.items())
    return (f"broker {app.conf.broker_url.split('@')[0].split(':')[0]}:// on the proxy ({options}), "
            f"prefetch multiplier {app.conf.worker_prefetch_multiplier}, results in DynamoDB "
            f"({app.conf.result_backend}), no remote control/events (SQS supports neither)")


def create_table() -> None:
    """Create the result table, once, before the worker starts.

    Celery's backend creates it on first use, but in every process at once (the client and each
    prefork child), and all but one then fail their first task with ResourceInUseException.
    """
    app.backend.client  # noqa: B018 - the property creates the table


if __name__ == "__main__":
    if sys.argv[1:] == ["--create-table"]:
        create_table()
    else:
        count = int(sys.argv[1])
        print(json.dumps({"tasks": count, "seconds": submit(count), "settings": describe()}), flush=True)
