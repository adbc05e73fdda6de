"""Control of remote work on the emulator: cancel through SQS/SNS/DynamoDB, drain, scheduler-less runs."""

import re

import boto3
import pytest
from conftest import read_results, run_client, start_client, wait_until


@pytest.fixture
def aws(remote):
    """boto3 clients on the emulator, and the depth of this test's request queue."""
    settings = {"endpoint_url": remote.env["AWS_ENDPOINT_URL"], "region_name": "us-east-1",
                "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}

    class Aws:
        sqs = boto3.client("sqs", **settings)
        sns = boto3.client("sns", **settings)

        @staticmethod
        def subscribed() -> int:
            """Workers subscribed to this test's control topic."""
            arn = f"arn:aws:sns:us-east-1:123456789012:{remote.topic}"
            try:
                return len(Aws.sns.list_subscriptions_by_topic(TopicArn=arn)["Subscriptions"])
            except Aws.sns.exceptions.NotFoundException:
                return 0

        @staticmethod
        def requests(kind: str = "") -> int:
            """Messages on the request queue: all of them, or only ``NotVisible`` ones (taken)."""
            url = Aws.sqs.get_queue_url(QueueName=remote.request_queue)["QueueUrl"]
            names = ["ApproximateNumberOfMessagesNotVisible"] + (["ApproximateNumberOfMessages"] * (not kind))
            attributes = Aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
            return sum(int(value) for value in attributes.values())

    return Aws


def _job_id(client) -> str:
    return re.search(r"job ([0-9a-f]+) ", client.stderr.readline())[1]



def test_remote_cancel_stops_the_running_task_and_skips_the_queued_ones(remote, aws, workload, tmp_path):
    sched = remote.scheduler("--in-flight", "11")  # more bundles out than the one worker thread runs
    worker = remote.worker("-t", "1")
    ran = tmp_path / "ran"
    out = tmp_path / "r.jsonl"
    # Every task is the long one: bundles go out in parallel batches, so which one runs first is open.
    client = start_client("-s", sched.address, "-w", workload([f"sleep 60000 && echo {i} >> {ran}"
                                                                for i in range(11)]),
                          "-o", str(out))
    job = _job_id(client)
    wait_until(lambda: aws.requests() == 11, timeout=20)  # each task alone: nothing is known of them
    wait_until(lambda: aws.requests("NotVisible") == 1, timeout=20)  # the worker runs one of them
    assert run_client("-s", sched.address, "--cancel", job).returncode == 0
    assert client.wait(10) == 3
    assert {r["status"] for r in read_results(out)} == {"cancelled"} and len(read_results(out)) == 11
    # The worker heard it over SNS: the running task stops and the queued bundles are skipped, not run.
    wait_until(lambda: aws.requests() == 0, timeout=20)
    assert not ran.exists()
    assert run_client("-s", sched.address, "-w", workload(["echo after"]), timeout=15).returncode == 0
    worker.terminate()
    log = worker.communicate(timeout=30)[1]
    assert f"job {job} cancelled: stopping its tasks" in log
    client.stdout.close()
    client.stderr.close()


def test_a_worker_that_missed_the_cancel_message_reads_it_from_dynamodb(remote, aws, workload, tmp_path):
    sched = remote.scheduler("--in-flight", "8")  # the doomed job's bundles are queued behind the busy one
    worker = remote.worker("-t", "1")
    busy = start_client("-s", sched.address, "-w", workload(["sleep 3000"]))
    wait_until(lambda: aws.requests("NotVisible") == 1, timeout=20)  # the worker runs it
    control = wait_until(lambda: aws.sqs.list_queues(QueueNamePrefix="cloudkon-control-").get("QueueUrls"))
    for url in control:
        aws.sqs.delete_queue(QueueUrl=url)  # the worker never hears the broadcast
    ran = tmp_path / "ran"
    doomed = start_client("-s", sched.address, "-w", workload([f"echo {i} >> {ran}" for i in range(5)]))
    job = _job_id(doomed)
    assert run_client("-s", sched.address, "--cancel", job).returncode == 0
    assert doomed.wait(10) == 3
    assert busy.wait(30) == 0  # the other job was not disturbed
    wait_until(lambda: aws.requests() == 0, timeout=30)  # the worker took the bundles and skipped them
    assert not ran.exists()
    worker.terminate()
    assert f"job {job} is cancelled: skipping bundle" in worker.communicate(timeout=30)[1]
    for client in (busy, doomed):
        client.stdout.close()
        client.stderr.close()


def test_drain_lets_workers_finish_what_they_hold_and_loses_nothing(remote, aws, workload, tmp_path):
    sched = remote.scheduler("--in-flight", "8")  # every task out at once (alone: nothing is known of them)
    # On a queue of its own: the emulator would hand a bundle to the long poll it leaves open.
    killed = remote.worker("-t", "1", "--request-queue", f"{remote.request_queue}-elsewhere")
    wait_until(lambda: aws.subscribed() == 1)
    killed.kill()  # leaves its control queue and subscription behind: drain must not wait for it
    killed.wait()
    workers = [remote.worker("-t", "1") for _ in range(2)]
    ran = tmp_path / "ran"
    out = tmp_path / "r.jsonl"
    tasks = [f"sleep 1; echo {i} >> {ran}; echo {i}" for i in range(8)]
    client = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    wait_until(lambda: aws.requests() == 8, timeout=20)
    wait_until(lambda: ran.exists(), timeout=20)  # both workers are running a task by now, or soon
    drain = remote.command("--drain")
    assert drain.returncode == 0, drain.stderr
    assert "every worker has left (drain)" in drain.stderr
    assert "did not take the drain message" in drain.stderr  # the killed worker's queue, removed
    for worker in workers:
        assert worker.wait(30) == 0
        assert "drain: finishing the bundles held" in worker.stderr.read()
    finished_before = len(ran.read_text().split())
    assert client.poll() is None and finished_before < 8, "the drained workers took no new bundles"
    remote.worker("-t", "2")
    assert client.wait(60) == 0
    assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(8)]
    assert sorted(map(int, ran.read_text().split())) == list(range(8)), "each task ran exactly once"
    client.stdout.close()
    client.stderr.close()


def test_scheduler_less_remote_runs_keep_two_clients_results_apart(remote, workload, tmp_path):
    remote.worker("-t", "2")
    remote.worker("-t", "2")
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    clients = [start_client("--remote", *remote.scheduler_options, "-o", str(out),
                            "-w", workload([f"echo {name}{i}" for i in range(1000)]), env=remote.env)
               for name, out in zip("ab", outs, strict=True)]
    for name, client, out in zip("ab", clients, outs, strict=True):
        _, stderr = client.communicate(timeout=180)
        assert client.returncode == 0, stderr
        assert "1000 tasks: 1000 succeeded" in stderr
        assert [r["output"] for r in read_results(out)] == [f"{name}{i}\n" for i in range(1000)]


def test_shutdown_stops_workers_now_and_their_bundles_run_elsewhere(remote, aws, workload, tmp_path):
    sched = remote.scheduler()
    first = remote.worker("-t", "1")
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload(["sleep 3; echo late", "echo quick"]),
                          "-o", str(out))
    wait_until(lambda: aws.requests("NotVisible") >= 1, timeout=20)
    stop = remote.command("--shutdown")
    assert stop.returncode == 0, stop.stderr
    assert first.wait(10) == 0 and "shutdown: stopping now" in first.stderr.read()
    assert client.poll() is None
    # What it held is back on the queue at once (no visibility timeout, no lease to wait for).
    wait_until(lambda: aws.requests("NotVisible") == 0, timeout=5)
    remote.worker("-t", "2")
    assert client.wait(60) == 0
    assert [r["output"] for r in read_results(out)] == ["late\n", "quick\n"]
    client.stdout.close()
    client.stderr.close()


def test_a_running_bundle_stops_when_its_job_is_marked_cancelled_unheard(remote, aws, workload, tmp_path):
    sched = remote.scheduler()
    worker = remote.worker("-t", "1", "--visibility-timeout", "3")  # the mark is read every second
    client = start_client("-s", sched.address, "-w", workload(["sleep 60000"]))
    job = _job_id(client)
    wait_until(lambda: aws.requests("NotVisible") == 1, timeout=20)
    for url in aws.sqs.list_queues(QueueNamePrefix="cloudkon-control-").get("QueueUrls", []):
        aws.sqs.delete_queue(QueueUrl=url)  # the broadcast is lost
    assert run_client("-s", sched.address, "--cancel", job).returncode == 0
    assert client.wait(10) == 3
    wait_until(lambda: aws.requests() == 0, timeout=15)  # the 60 s task stopped, its bundle done
    worker.terminate()
    log = worker.communicate(timeout=30)[1]
    assert f"job {job} is marked cancelled: stopping its tasks" in log
    client.stdout.close()
    client.stderr.close()
