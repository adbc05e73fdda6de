"""The scheduler's side of results in remote mode: only whole, signed result batches are recorded;
anything else on its response queue is moved aside; an idle scheduler long-polls."""

import json
import re
import secrets
import signal
import time
import uuid

import boto3
import pytest
from conftest import read_results, start_client, wait_until

from cloudkon.claims import ensure_claim_table
from cloudkon.errors import BackendError, RefusedMessage
from cloudkon.signing import Keyring, Signer, SigningKey, seal


def _emulator(service: str, env: dict[str, str]):
    return boto3.client(service, endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _results_body(job: str, elapsed_us: object = 1, output: str = "forged\n") -> str:
    return json.dumps({"type": "results", "job": job, "bundle": 0, "ids": [0], "exit_codes": [0],
                       "outputs": [output], "elapsed_us": [elapsed_us], "errors": [None], "worker": "forger"})


def _waiting(sqs, url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return sum(int(attributes[name]) for name in ("ApproximateNumberOfMessages",
                                                  "ApproximateNumberOfMessagesNotVisible"))


def test_stray_forged_and_damaged_results_are_moved_aside_and_the_real_ones_count(remote, tmp_path):
    sqs, dynamodb = _emulator("sqs", remote.env), _emulator("dynamodb", remote.env)
    response_queue = f"resp-{uuid.uuid4().hex[:8]}"
    response_url = sqs.create_queue(QueueName=response_queue)["QueueUrl"]
    sqs.send_message(QueueUrl=response_url, MessageBody='{"type":"hello","version":1}')  # before it starts
    sched = remote.scheduler("--response-queue", response_queue, "--in-flight", "1")
    remote.worker("-t", "1")
    go = tmp_path / "go"
    (tmp_path / "w.txt").write_text(f"while [ ! -e {go} ]; do sleep 0.05; done; echo real\n")
    out = tmp_path / "out.jsonl"
    client = start_client("-s", sched.address, "-w", str(tmp_path / "w.txt"), "-o", str(out), env=remote.env)
    job = wait_until(lambda: re.search(r"client.py: job ([0-9a-f]+)", client.stderr.readline())).group(1)
    fleet_key = Signer(dynamodb, remote.table).key()  # as a worker of the fleet would seal
    made_up = SigningKey(secrets.token_hex(8), secrets.token_bytes(32), time.time() + 3600)
    for body in (_results_body(job),  # unsigned: anyone who can send to the queue
                 seal(_results_body(job), made_up),  # a key that is not the fleet's
                 seal(_results_body(job, elapsed_us="1"), fleet_key),  # signed, but a column is bad
                 seal('{"type":"hello","version":1}', fleet_key)):  # signed, but no results
        sqs.send_message(QueueUrl=response_url, MessageBody=body)
    dead = f"{response_queue}-dead"
    dead_url = wait_until(lambda: sqs.list_queues(QueueNamePrefix=dead).get("QueueUrls"))[0]
    wait_until(lambda: _waiting(sqs, dead_url) == 5 and _waiting(sqs, response_url) == 0)
    go.touch()
    assert client.wait(60) == 0, client.stderr.read()
    client.stdout.close()
    client.stderr.close()
    assert [(r["status"], r["output"], r["worker"] != "forger") for r in read_results(out)] == [
        ("success", "real\n", True)]
    assert sched.stop() == 0
    log = sched.proc.stderr.read()
    set_aside = [line for line in log.splitlines() if "no signed result batch" in line]
    assert set_aside and "unsigned message" in log and "moved to" in set_aside[0]
    assert sum(int(re.search(r"set aside: (\d+)", line).group(1)) for line in set_aside) == 5
    assert "Traceback" not in log


def test_an_idle_scheduler_long_polls_and_still_stops_at_once(remote):
    sched = remote.scheduler("--in-flight", "1")
    time.sleep(12)  # idle: one long poll, not twelve
    sched.proc.send_signal(signal.SIGTERM)
    assert sched.proc.wait(10) == 0  # not after the rest of a 20 s poll (the stop fixture would kill it)
    calls = re.search(r"AWS API calls: \d+ \((.*)\)", sched.proc.stderr.read()).group(1)
    counts = {name: int(n) for name, n in (item.rsplit(" ", 1) for item in calls.split(", "))}
    assert counts["sqs.ReceiveMessage"] <= 2, counts


@pytest.fixture
def claim_table(aws_env):
    dynamodb = _emulator("dynamodb", aws_env)
    name = f"claims-{uuid.uuid4().hex[:8]}"
    ensure_claim_table(dynamodb, name)
    calls: list[str] = []
    dynamodb.meta.events.register("before-call.dynamodb", lambda model, **_: calls.append(model.name))
    yield dynamodb, name, calls
    dynamodb.delete_table(TableName=name)


def test_a_worker_seals_results_with_a_fleet_key_the_scheduler_reads_in_one_call(claim_table):
    dynamodb, table, calls = claim_table
    worker = Keyring(dynamodb, table)
    with pytest.raises(BackendError, match="no signing key"):  # it has run no bundle yet
        worker.seal("results")
    signer = Signer(dynamodb, table)
    worker.open(signer.sign("a bundle"))
    sealed = worker.seal("results")
    made_up = [seal("forged", SigningKey(secrets.token_hex(8), b"k" * 32, time.time() + 3600))
               for _ in range(150)]
    scheduler = Keyring(dynamodb, table)
    del calls[:]
    scheduler.read([sealed, *made_up, "unsigned"])
    assert calls == ["BatchGetItem", "BatchGetItem"]  # 151 keys, 100 to a call
    assert scheduler.open(sealed) == "results"
    with pytest.raises(RefusedMessage, match="unknown"):
        scheduler.open(made_up[0])
    assert calls == ["BatchGetItem", "BatchGetItem"]  # held, or known to be absent: no more reads
