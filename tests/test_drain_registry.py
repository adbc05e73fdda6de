"""Who a drain waits for, and what an idle worker costs (#21, findings 9 and 10)."""

import re

import boto3
import pytest
from conftest import wait_until

from cloudkon import aws
from cloudkon.claims import ensure_claim_table
from cloudkon.control import ControlQueue, ControlTopic
from cloudkon.signing import Keyring, Signer


def _emulator(service: str, remote):
    return boto3.client(service, endpoint_url=remote.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _topic_arn(remote) -> str:
    return f"arn:aws:sns:us-east-1:123456789012:{remote.topic}"


def _subscribed(sns, remote) -> int:
    try:
        return len(sns.list_subscriptions_by_topic(TopicArn=_topic_arn(remote))["Subscriptions"])
    except sns.exceptions.NotFoundException:
        return 0


def test_drain_waits_for_the_workers_of_a_deleted_topic_and_they_leave(remote):
    sns = _emulator("sns", remote)
    workers = [remote.worker("-t", "1") for _ in range(2)]
    wait_until(lambda: _subscribed(sns, remote) == 2, timeout=30)
    sns.delete_topic(TopicArn=_topic_arn(remote))  # drain makes it again, with no subscriber
    drain = remote.command("--drain")
    assert drain.returncode == 0, drain.stderr
    assert "2 worker(s) not subscribed" in drain.stderr
    assert "every worker has left (drain)" in drain.stderr
    assert "did not take the drain message" not in drain.stderr  # neither was taken for dead
    for worker in workers:  # not still running, as they did when drain counted the new topic's subscribers
        assert worker.wait(30) == 0
        assert "drain: finishing the bundles held" in worker.stderr.read()


@pytest.fixture
def emulated(remote, monkeypatch):
    """This process's own boto3 clients (aws.client) on the emulator."""
    for name, value in remote.env.items():
        monkeypatch.setenv(name, value)
    sqs, dynamodb = aws.clients()
    ensure_claim_table(dynamodb, remote.table)
    return sqs, dynamodb


def test_a_worker_whose_topic_was_deleted_subscribes_again(remote, emulated):
    sqs, dynamodb = emulated
    queue = ControlQueue(sqs, remote.topic, f"resubscribing-{remote.topic}", Keyring(dynamodb, remote.table))
    try:
        assert not queue.resubscribe_if_lost()  # subscribed: one call, nothing done
        _emulator("sns", remote).delete_topic(TopicArn=_topic_arn(remote))
        assert queue.resubscribe_if_lost()
        ControlTopic(remote.topic, Signer(dynamodb, remote.table)).publish({"type": "drain"})
        assert wait_until(lambda: queue.receive(1), timeout=20) == [{"type": "drain"}]
    finally:
        queue.close()


def test_an_idle_worker_makes_one_long_poll_at_a_time(remote):
    # It exits, and logs its calls, after 25 s idle: SQS's 20 s long polls fit twice in that time, and
    # only once each if it polled the request and the control queue at the same time.
    worker = remote.worker("-t", "2", "--idle-timeout", "25", "--economize-after", "0")
    log = worker.communicate(timeout=90)[1]
    assert worker.returncode == 0, log
    assert "idle for 25 s: exiting" in log
    receives = int(re.search(r"sqs\.ReceiveMessage (\d+)", log)[1])
    assert receives <= 2, log
