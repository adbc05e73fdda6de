"""Signed bundles and control messages: nobody but a scheduler of the fleet puts work to the workers."""

import json
import secrets
import socket
import time
import uuid

import boto3
import pytest
from conftest import read_results, run_client, wait_until

from cloudkon.claims import ensure_claim_table
from cloudkon.control import queue_name
from cloudkon.errors import RefusedMessage
from cloudkon.signing import (
    KEY_ITEM_PREFIX,
    SEAL_BYTES,
    Keyring,
    Signer,
    SigningKey,
    publish_key,
    seal,
    unseal,
)
from cloudkon.sqsmessages import request_body
from cloudkon.tasks import Bundle

KEY = SigningKey("0123456789abcdef", b"k" * 32, time.time() + 3600)


def _known(key_id: str) -> SigningKey | None:
    return KEY if key_id == KEY.id else None


def test_a_sealed_body_opens_with_its_key_and_the_seal_is_what_the_size_rule_reserves():
    body = request_body(Bundle("job1", 0, [0], ["echo \u00e9"]), "https://queue")
    sealed = seal(body, KEY)
    assert unseal(sealed, _known) == body
    assert len(sealed) - len(body) == SEAL_BYTES


@pytest.mark.parametrize("text, reason", [
    ('{"type": "bundle"}', "unsigned"),
    ("", "unsigned"),
    ("cloudkon-hmac-sha256 0123456789abcdef\n{}", "unsigned"),
    ("cloudkon-hmac-sha256 0123456789abcdef " + "\u00e9" * 64 + "\n{}", "malformed"),
    ("cloudkon-hmac-sha256 ../../etc/passwd " + "0" * 64 + "\n{}", "malformed"),
    ("cloudkon-hmac-sha256 fedcba9876543210 " + "0" * 64 + "\n{}", "unknown or expired key"),
    ("cloudkon-hmac-sha256 0123456789abcdef " + "0" * 64 + "\n{}", "forged"),
])
def test_unsigned_malformed_and_forged_seals_are_refused(text, reason):
    with pytest.raises(RefusedMessage, match=reason):
        unseal(text, _known)


def test_a_changed_body_or_another_key_breaks_the_seal():
    sealed = seal('{"commands": ["echo hi"]}', KEY)
    with pytest.raises(RefusedMessage, match="forged"):
        unseal(sealed.replace("echo hi", "rm -rf ~"), _known)
    impostor = seal('{"commands": ["echo hi"]}', SigningKey(KEY.id, b"x" * 32, KEY.expires_at))
    with pytest.raises(RefusedMessage, match="forged"):
        unseal(impostor, _known)


@pytest.fixture
def claim_table(aws_env):
    """A claim table of this test's own on the emulator, and its client counting GetItem calls."""
    dynamodb = boto3.client("dynamodb", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"claims-{uuid.uuid4().hex[:8]}"
    ensure_claim_table(dynamodb, name)
    reads: list[str] = []
    dynamodb.meta.events.register("before-parameter-build.dynamodb.GetItem", lambda params, **_: reads.append(
        params["Key"]["claim"]["S"]))
    yield dynamodb, name, reads
    dynamodb.delete_table(TableName=name)


def test_a_worker_reads_each_key_once_and_each_made_up_key_once(claim_table):
    dynamodb, table, reads = claim_table
    keyring = Keyring(dynamodb, table)  # a worker started before any key exists
    signer = Signer(dynamodb, table)
    for _ in range(3):
        assert keyring.open(signer.sign("a body")) == "a body"
    assert reads == [KEY_ITEM_PREFIX + signer.key().id]  # read at its first message, then held
    made_up = SigningKey(secrets.token_hex(8), secrets.token_bytes(32), time.time() + 3600)
    for _ in range(3):
        with pytest.raises(RefusedMessage, match="unknown"):
            keyring.open(seal("a body", made_up))
    assert reads[1:] == [KEY_ITEM_PREFIX + made_up.id]  # absent for good: asked once


def test_an_expired_key_verifies_nothing(claim_table):
    dynamodb, table, _ = claim_table
    key = publish_key(dynamodb, table)
    dynamodb.update_item(TableName=table, Key={"claim": {"S": KEY_ITEM_PREFIX + key.id}},
                         UpdateExpression="SET expires_at = :past",
                         ExpressionAttributeValues={":past": {"N": str(int(time.time()) - 1)}})
    with pytest.raises(RefusedMessage, match="expired"):
        Keyring(dynamodb, table).open(seal("a body", key))


def _emulator(service: str, remote):
    return boto3.client(service, endpoint_url=remote.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_forged_bundles_never_run_and_go_to_the_dead_letter_queue(remote, workload, tmp_path):
    sqs, dynamodb = _emulator("sqs", remote), _emulator("dynamodb", remote)
    request_url = sqs.create_queue(QueueName=remote.request_queue)["QueueUrl"]
    ensure_claim_table(dynamodb, remote.table)
    worker = remote.worker("-t", "2")
    pwned = tmp_path / "pwned"
    forged = request_body(Bundle("f0f0f0f0f0f0f0f0", 0, [0], [f"touch {pwned}"]), request_url)
    genuine = publish_key(dynamodb, remote.table)  # a scheduler's key, published after the worker started
    tampered = seal(forged.replace("touch", "echo"), genuine).replace("echo", "touch")
    made_up = seal(forged, SigningKey(secrets.token_hex(8), secrets.token_bytes(32), time.time() + 3600))
    for body in (forged, tampered, made_up):  # sent straight to the queue, as anyone allowed to could
        sqs.send_message(QueueUrl=request_url, MessageBody=body)
    dead_url = wait_until(lambda: sqs.list_queues(QueueNamePrefix=f"{remote.request_queue}-dead")
                          .get("QueueUrls"), timeout=30)[0]
    dead: list[str] = []

    def all_dead() -> bool:
        received = sqs.receive_message(QueueUrl=dead_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        dead.extend(message["Body"] for message in received.get("Messages", []))
        return len(dead) == 3

    wait_until(all_dead, timeout=30)
    assert sorted(dead) == sorted([forged, tampered, made_up])  # kept as they came, for a look
    # A bundle signed with the genuine key runs on the same worker, and so does a scheduler's job.
    ran = tmp_path / "ran"
    reply_url = sqs.create_queue(QueueName=f"{remote.request_queue}-replies")["QueueUrl"]
    sqs.send_message(QueueUrl=request_url, MessageBody=seal(
        request_body(Bundle("a0a0a0a0a0a0a0a0", 0, [0], [f"touch {ran}"]), reply_url), genuine))
    sched = remote.scheduler()
    out = tmp_path / "r.jsonl"
    assert run_client("-s", sched.address, "-w", workload(["echo fine"]), "-o", str(out)).returncode == 0
    assert read_results(out)[0]["output"] == "fine\n"
    wait_until(ran.exists, timeout=30)
    worker.terminate()
    log = worker.communicate(timeout=30)[1]
    assert not pwned.exists()
    refused = [line for line in log.splitlines() if "refused request message" in line]
    assert len(refused) == 3, log
    for reason in ("unsigned message", f"does not match key {genuine.id}", "unknown or expired key"):
        assert sum(reason in line for line in refused) == 1, refused
    assert all(f"moved to {remote.request_queue}-dead" in line for line in refused)
    attributes = sqs.get_queue_attributes(QueueUrl=request_url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == attributes["ApproximateNumberOfMessagesNotVisible"] \
        == "0"  # deleted from the request queue
    sqs.delete_queue(QueueUrl=dead_url)
    sqs.delete_queue(QueueUrl=reply_url)


def test_forged_control_messages_are_ignored(remote, workload, tmp_path):
    sqs, sns = _emulator("sqs", remote), _emulator("sns", remote)
    worker = remote.worker("-t", "1")
    topic = sns.create_topic(Name=remote.topic)["TopicArn"]
    wait_until(lambda: sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"], timeout=30)
    control_url = sqs.get_queue_url(QueueName=queue_name(f"{socket.gethostname()}:{worker.pid}"))["QueueUrl"]
    shutdown = json.dumps({"type": "shutdown"})
    sns.publish(TopicArn=topic, Message=shutdown)  # whoever may publish to the topic
    sqs.send_message(QueueUrl=control_url, MessageBody=json.dumps({"type": "drain"}))  # or send to the queue

    def taken() -> bool:
        counts = sqs.get_queue_attributes(QueueUrl=control_url, AttributeNames=["All"])["Attributes"]
        return counts["ApproximateNumberOfMessages"] == counts["ApproximateNumberOfMessagesNotVisible"] == "0"

    wait_until(taken, timeout=30)
    sched = remote.scheduler()
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload(["echo still here"]), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert read_results(out)[0]["output"] == "still here\n"
    assert worker.poll() is None
    worker.terminate()
    log = worker.communicate(timeout=30)[1]
    assert log.count("ignoring control message") == 2, log
    assert "shutdown: stopping now" not in log and "drain: finishing" not in log
