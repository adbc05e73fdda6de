"""The remote worker under faults and abuse (#21): poison bundles, a pause past the lease, a stop mid-poll."""

import json
import signal
import socket
import time

import boto3
from conftest import read_results, start_client, wait_until

from cloudkon import aws
from cloudkon.claims import ensure_claim_table
from cloudkon.signing import publish_key, seal
from cloudkon.sqsmessages import request_body
from cloudkon.tasks import Bundle


def _emulator(service: str, remote):
    return boto3.client(service, endpoint_url=remote.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _identity(worker) -> str:
    return f"{socket.gethostname()}:{worker.pid}"


def _close(*clients) -> None:
    for client in clients:
        client.stdout.close()
        client.stderr.close()


def test_the_request_queue_sends_a_message_never_deleted_to_its_dead_letter_queue(remote):
    sqs = _emulator("sqs", remote)
    aws.ensure_queue(sqs, remote.request_queue)  # made by a version without the policy
    url = aws.ensure_request_queue(sqs, remote.request_queue)  # it gets one
    policy = json.loads(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])[
        "Attributes"]["RedrivePolicy"])
    assert policy["maxReceiveCount"] == aws.MAX_RECEIVES
    assert policy["deadLetterTargetArn"].endswith(f":{remote.request_queue}-dead")
    sqs.send_message(QueueUrl=url, MessageBody="a bundle that makes every worker fail")
    for _ in range(aws.MAX_RECEIVES):  # each worker that takes it dies, or fails
        assert sqs.receive_message(QueueUrl=url, VisibilityTimeout=0, WaitTimeSeconds=5)["Messages"]
    assert not sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages")
    dead_url = sqs.get_queue_url(QueueName=f"{remote.request_queue}-dead")["QueueUrl"]
    assert sqs.receive_message(QueueUrl=dead_url, WaitTimeSeconds=5)["Messages"][0]["Body"] == \
        "a bundle that makes every worker fail"
    sqs.delete_queue(QueueUrl=dead_url)


def test_signed_poison_bundles_never_run_and_an_idle_worker_still_retires(remote, tmp_path):
    sqs, dynamodb = _emulator("sqs", remote), _emulator("dynamodb", remote)
    request_url = aws.ensure_request_queue(sqs, remote.request_queue, visibility_timeout=3)
    reply_url = sqs.create_queue(QueueName=f"{remote.request_queue}-replies")["QueueUrl"]
    ensure_claim_table(dynamodb, remote.table)
    key = publish_key(dynamodb, remote.table)  # a scheduler's key: these are signed, yet no bundle to run
    pwned = tmp_path / "pwned"
    touch = [f"touch {pwned}"]
    poison = [Bundle("", 0, [0], touch), Bundle("j" * 3000, 0, [0], touch),
              Bundle("a0a0a0a0a0a0a0a0", 0, [0], touch, timeout=1e308),
              Bundle("b0b0b0b0b0b0b0b0", 0, [0], touch, budget=1e308)]
    for bundle in poison:
        sqs.send_message(QueueUrl=request_url, MessageBody=seal(request_body(bundle, reply_url), key))
    worker = remote.worker("-t", "2", "--idle-timeout", "6", "--visibility-timeout", "3")

    def retired() -> bool:  # refused messages keep coming meanwhile: they are no work either
        sqs.send_message(QueueUrl=request_url, MessageBody="not signed")
        return worker.poll() is not None

    wait_until(retired, timeout=60, interval=1)
    log = worker.communicate(timeout=30)[1]
    assert worker.returncode == 0 and "idle for 6 s: exiting" in log, log
    assert not pwned.exists()
    invalid = [line for line in log.splitlines() if "refused request message" in line and "bundle:" in line]
    assert len(invalid) == 4, log
    assert all(f"moved to {remote.request_queue}-dead" in line for line in invalid)
    for reason in ("job id ''", "(3000 characters)", "a task timeout must be", "a time box of 1e+308"):
        assert sum(reason in line for line in invalid) == 1, (reason, invalid)
    sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=f"{remote.request_queue}-dead")["QueueUrl"])
    sqs.delete_queue(QueueUrl=reply_url)


def test_a_worker_paused_past_its_lease_stops_the_bundle_and_sends_nothing(remote, workload, tmp_path):
    sched = remote.scheduler("--visibility-timeout", "3")
    paused = remote.worker("-t", "1", "--visibility-timeout", "3")
    runs = tmp_path / "runs"
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload([f"echo run >> {runs}; sleep 8; echo done"]),
                          "-o", str(out))
    wait_until(runs.exists, timeout=30)
    paused.send_signal(signal.SIGSTOP)  # a VM freeze: its task runs on, its lease does not
    other = remote.worker("-t", "1", "--visibility-timeout", "3")
    wait_until(lambda: runs.read_text().count("run") == 2, timeout=30)  # the other took the bundle over
    paused.send_signal(signal.SIGCONT)  # ends its task's sleep first: it would report, mark done, delete
    assert client.wait(60) == 0
    results = read_results(out)
    assert len(results) == 1 and results[0]["output"] == "done\n"
    assert results[0]["worker"] == _identity(other)
    paused.terminate()
    log = paused.communicate(timeout=40)[1]
    assert "lost its lease to another worker" in log, log
    other.terminate()
    assert other.wait(40) == 0
    _close(client)


def test_a_worker_stopped_while_idle_hands_back_what_its_last_poll_brings(remote, workload, tmp_path):
    sched = remote.scheduler()  # a visibility timeout of 60 s: a message lost in a poll waits that long
    stopped = remote.worker("-t", "1")
    sns = _emulator("sns", remote)
    topic = f"arn:aws:sns:us-east-1:123456789012:{remote.topic}"
    wait_until(lambda: sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"], timeout=30)
    time.sleep(1)  # its first long poll is open by now
    stopped.send_signal(signal.SIGTERM)  # idle, in a long poll
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload(["echo hi"]), "-o", str(out))
    assert stopped.wait(40) == 0
    log = stopped.stderr.read()
    other = remote.worker("-t", "1")
    assert client.wait(40) == 0, "the bundle waited out its visibility timeout"
    assert read_results(out)[0]["output"] == "hi\n"
    assert "handing back 1 message(s) of the last poll" in log, log
    other.terminate()
    _close(client)


def test_normal_bundles_raise_no_warning_about_their_leases(remote, workload, tmp_path):
    sched = remote.scheduler("--visibility-timeout", "3")
    worker = remote.worker("-t", "4", "--visibility-timeout", "3")  # leases renewed every second
    out = tmp_path / "r.jsonl"
    tasks = [f"sleep 0.{i % 10}; echo {i}" for i in range(60)]
    client = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    assert client.wait(120) == 0
    assert len(read_results(out)) == 60
    worker.terminate()
    log = worker.communicate(timeout=40)[1]
    assert "WARNING" not in log, log
    _close(client)
