"""Remote mode against the AWS emulator: tasks/s and AWS API calls per task.

    python bench/remote.py                    # 10,000 sleep-0 tasks; baseline on 1,000
    python bench/remote.py --tasks 2000 --baseline-tasks 300
    python bench/remote.py --tasks 4000 --task-ms 10 --baseline-tasks 0   # 8 slots x 500 x 10 ms

Runs a moto_server on a free loopback port, then in the same invocation:
  cloudkon  scheduler.py --remote, two worker.py -t 4, client.py: every AWS API call
            counted by botocore's before-call hook in each process (they log the
            count at exit), scheduler and workers together;
  baseline  the seeds' design, one SQS message per task: one send, receive and
            delete per task and per result, plus one DynamoDB claim per task,
            in 8 worker threads (boto3 directly, counted the same way).
The emulator is slow in ways AWS is not (~4.5 ms a call), so compare calls per task;
tasks/s mostly measures the emulator.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from local import machine  # noqa: E402

CALLS = re.compile(r"AWS API calls: (\d+)")
SUMMARY = re.compile(r"(\d+) tasks: (\d+) succeeded, (\d+) failed, ([\d.]+) s wall")


def start_emulator() -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, env
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto_server did not start")


WORKERS, THREADS = 2, 4


def run_cloudkon(tasks: int, env: dict[str, str], workdir: str, task_ms: int = 0) -> tuple[float, int, float]:
    """(tasks/s, API calls, seconds from submission to the last result) of one remote run."""
    names = ["--request-queue", f"bench-{uuid.uuid4().hex[:8]}", "--table", f"bench-{uuid.uuid4().hex[:8]}"]
    full_env = {**os.environ, **env}
    sched = subprocess.Popen([sys.executable, str(ROOT / "scheduler.py"), "--remote", "--port", "0", *names],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    address = sched.stdout.readline().strip().removeprefix("listening on ")
    workers = [subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "-t", str(THREADS),
                                 "--idle-timeout", "3", *names],
                                stderr=subprocess.PIPE, text=True, env=full_env)
               for _ in range(WORKERS)]
    time.sleep(3)  # as a user would: the workers are up before the job is submitted
    workload = os.path.join(workdir, "tasks.txt")
    with open(workload, "w") as f:
        f.write(f"sleep {task_ms}\n" * tasks)
    client = subprocess.run([sys.executable, str(ROOT / "client.py"), "-s", address, "-w", workload],
                            capture_output=True, text=True, env=full_env)
    summary = SUMMARY.search(client.stderr)
    if client.returncode != 0 or not summary:
        raise SystemExit(f"remote run failed: {client.stderr}")
    logs = [w.communicate(timeout=120)[1] for w in workers]
    sched.send_signal(signal.SIGTERM)
    logs.append(sched.communicate(timeout=60)[1])
    calls = [CALLS.search(log) for log in logs]
    if not all(calls):
        raise SystemExit("a process did not report its API calls")
    return tasks / float(summary[4]), sum(int(c[1]) for c in calls), float(summary[4])


def run_baseline(tasks: int, env: dict[str, str], threads: int = 8) -> tuple[float, int]:
    """(tasks/s, API calls) of one message per task, one claim per task."""
    session = boto3.session.Session(region_name=env["AWS_DEFAULT_REGION"],
                                    aws_access_key_id="testing", aws_secret_access_key="testing")
    calls: collections.Counter[str] = collections.Counter()
    session.events.register("before-call", lambda model, **_: calls.update([model.name]))
    sqs = session.client("sqs", endpoint_url=env["AWS_ENDPOINT_URL"])
    dynamodb = session.client("dynamodb", endpoint_url=env["AWS_ENDPOINT_URL"])
    suffix = uuid.uuid4().hex[:8]
    requests = sqs.create_queue(QueueName=f"base-req-{suffix}")["QueueUrl"]
    responses = sqs.create_queue(QueueName=f"base-resp-{suffix}")["QueueUrl"]
    table = f"base-claims-{suffix}"
    dynamodb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                          AttributeDefinitions=[{"AttributeName": "claim", "AttributeType": "S"}],
                          KeySchema=[{"AttributeName": "claim", "KeyType": "HASH"}])
    calls.clear()
    from cloudkon.processes import run_task
    remaining = [tasks]
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
            for m in sqs.receive_message(QueueUrl=requests, MaxNumberOfMessages=1,
                                         WaitTimeSeconds=1).get("Messages", []):
                task = json.loads(m["Body"])
                dynamodb.put_item(TableName=table, Item={"claim": {"S": str(task["id"])}},
                                  ConditionExpression="attribute_not_exists(claim)")
                code, output, _, _ = run_task(task["command"])
                sqs.send_message(QueueUrl=responses, MessageBody=json.dumps([task["id"], code, output]))
                sqs.delete_message(QueueUrl=requests, ReceiptHandle=m["ReceiptHandle"])

    start = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for i in range(tasks):
        sqs.send_message(QueueUrl=requests, MessageBody=json.dumps({"id": i, "command": "sleep 0"}))
    got = 0
    while got < tasks:
        for m in sqs.receive_message(QueueUrl=responses, MaxNumberOfMessages=1,
                                     WaitTimeSeconds=1).get("Messages", []):
            got += 1
            sqs.delete_message(QueueUrl=responses, ReceiptHandle=m["ReceiptHandle"])
    elapsed = time.perf_counter() - start
    with lock:
        remaining[0] = 0
    for t in pool:
        t.join()
    return tasks / elapsed, sum(calls.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000,
                        help="sleep-0 tasks for cloudkon (default 10,000)")
    parser.add_argument("--task-ms", type=int, default=0,
                        help="each task is 'sleep N' of this many milliseconds (default 0)")
    parser.add_argument("--baseline-tasks", type=int, default=1_000,
                        help="tasks for the one-message-per-task baseline (default 1,000: it is slow; "
                             "0 skips it)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    server, env = start_emulator()
    try:
        with tempfile.TemporaryDirectory() as workdir:
            rate, calls, wall = run_cloudkon(args.tasks, env, workdir, args.task_ms)
        if args.baseline_tasks:
            base_rate, base_calls = run_baseline(args.baseline_tasks, env)
    finally:
        server.terminate()
        server.wait()
    ours = calls / args.tasks
    print(f"{'design':<40} {'tasks':>8} {'tasks/s':>10} {'API calls':>10} {'calls/task':>11}")
    print(f"{'cloudkon (bundles, batches of 10)':<40} {args.tasks:>8,} {rate:>10,.0f} {calls:>10,} "
          f"{ours:>11.4f}")
    if args.task_ms:
        work = args.tasks * args.task_ms / 1000 / (WORKERS * THREADS)
        print(f"efficiency: {work:.2f} s of work per slot ({WORKERS} workers x {THREADS} threads) in "
              f"{wall:.2f} s wall = {work / wall:.3f}")
    if not args.baseline_tasks:
        return
    theirs = base_calls / args.baseline_tasks
    print(f"{'baseline (one message per task)':<40} {args.baseline_tasks:>8,} {base_rate:>10,.0f} "
          f"{base_calls:>10,} {theirs:>11.4f}")
    print(f"calls per task: {theirs / ours:,.0f}x fewer; tasks/s: {rate / base_rate:,.1f}x")


if __name__ == "__main__":
    main()
