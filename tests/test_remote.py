"""Remote mode on the AWS emulator: scheduler --remote, real worker.py processes, a client."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import boto3
from conftest import ROOT, read_results, run_client, start_client, wait_until

from cloudkon import protocol
from cloudkon.aws import MAX_SQS_MESSAGE_BYTES
from cloudkon.claims import ensure_claim_table
from cloudkon.signing import Signer
from cloudkon.sqsmessages import request_bodies, request_body, response_bodies
from cloudkon.tasks import OUTPUT_CAP_BYTES, Bundle, ResultBatch

MIXED = ["sleep 0", "sleep 30", "echo hello", "exit 4", "printf 'a\\nb'", "echo err >&2",
         "head -c 100000 /dev/urandom"]


def test_remote_run_matches_local_semantics(remote, workload, tmp_path):
    sched = remote.scheduler()
    workers = [remote.worker("-t", "2"), remote.worker("-t", "2")]
    tasks = MIXED * 30
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    assert done.returncode == 1, done.stderr  # 'exit 4' fails
    rows = read_results(out)
    assert [r["id"] for r in rows] == list(range(len(tasks)))
    assert [r["exit_code"] for r in rows] == [0, 0, 0, 4, 0, 0, 0] * 30
    assert [r["output"] for r in rows[:6]] == ["", "", "hello\n", "", "a\nb", "err\n"]
    binary = rows[6]["output"]  # 64 KiB kept, escaped to ~6x that: trimmed to fit an SQS message
    assert "output trimmed to fit an SQS message" in binary or "more bytes not kept" in binary
    assert f"{len(tasks)} tasks: {len(tasks) - 30} succeeded, 30 failed" in done.stderr
    # Each result names the worker that ran it: its identity, host:pid off EC2.
    assert {r["worker"] for r in rows} <= {f"{socket.gethostname()}:{w.pid}" for w in workers}


def test_worker_killed_mid_task_its_bundle_runs_again(remote, workload, tmp_path):
    sched = remote.scheduler("--visibility-timeout", "3")
    starts = tmp_path / "starts"
    first = remote.worker("-t", "1", "--visibility-timeout", "3")
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload([f"echo x >> {starts}; sleep 1; echo done"]),
                          "-o", str(out))
    wait_until(lambda: starts.exists())
    first.send_signal(signal.SIGKILL)
    remote.worker("-t", "1", "--visibility-timeout", "3")
    assert client.wait(60) == 0, client.stderr.read()
    assert [r["output"] for r in read_results(out)] == ["done\n"]
    assert starts.read_text() == "x\nx\n"  # started twice, reported once
    client.stdout.close()
    client.stderr.close()


def _emulator_client(service: str, env: dict[str, str]):
    return boto3.client(service, endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_duplicate_delivery_runs_the_bundle_once(remote, tmp_path):
    sqs = _emulator_client("sqs", remote.env)
    request_url = sqs.create_queue(QueueName=remote.request_queue)["QueueUrl"]
    reply_url = sqs.create_queue(QueueName=remote.request_queue + "-replies")["QueueUrl"]
    dynamodb = _emulator_client("dynamodb", remote.env)
    ensure_claim_table(dynamodb, remote.table)
    ran = tmp_path / "ran"
    body = Signer(dynamodb, remote.table).sign(  # as a scheduler of the fleet signs it
        request_body(Bundle("job1", 0, [0], [f"echo once >> {ran}; sleep 0.5"]), reply_url))
    for _ in range(2):  # SQS delivering one message twice, as it may
        sqs.send_message(QueueUrl=request_url, MessageBody=body)
    remote.worker("-t", "1", "--visibility-timeout", "3")
    remote.worker("-t", "1", "--visibility-timeout", "3")

    def drained():
        counts = sqs.get_queue_attributes(QueueUrl=request_url, AttributeNames=["All"])["Attributes"]
        return counts["ApproximateNumberOfMessages"] == counts["ApproximateNumberOfMessagesNotVisible"] == "0"

    wait_until(drained, timeout=60)
    replies = sqs.receive_message(QueueUrl=reply_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    replies = replies.get("Messages", [])
    assert ran.read_text() == "once\n"
    assert [json.loads(m["Body"].partition("\n")[2])["ids"] for m in replies] == [[0]]


def test_bundles_and_results_never_exceed_the_sqs_limit():
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/cloudkon-responses-0123456789ab"
    for size in (1, 1000, 50_000, 127_000, 131_071):
        for char in ("a", "\u00e9", "\x01", '"'):
            commands = [char * size] * 40
            bodies, too_large = request_bodies(Bundle("j" * 16, 123456, list(range(40)), commands, 30.0), url)
            assert all(len(b.encode()) <= MAX_SQS_MESSAGE_BYTES for b in bodies)
            sent = sum(len(protocol.decode(b.encode())["ids"]) for b in bodies)
            assert sent + sum(len(b.ids) for b in too_large) == 40
    for char in ("a", "\ufffd", "\x01", "\\"):
        output = char * OUTPUT_CAP_BYTES + "\n[cloudkon: output truncated, 99 more bytes not kept]"
        batch = ResultBatch("j" * 16, 9, list(range(50)), [0] * 50, [output] * 50, [123456] * 50, [None] * 50)
        bodies = response_bodies(batch)
        assert all(len(b.encode()) <= MAX_SQS_MESSAGE_BYTES for b in bodies)
        assert sorted(i for b in bodies for i in json.loads(b)["ids"]) == list(range(50))


def test_split_messages_keep_the_budget_the_worker_and_the_returned_tasks():
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/cloudkon-responses-0123456789ab"
    bodies, _ = request_bodies(Bundle("j", 1, list(range(8)), ["x" * 60_000] * 8, 30.0, 2.5), url)
    assert len(bodies) > 1 and {json.loads(b)["budget"] for b in bodies} == {2.5}
    batch = ResultBatch("j", 1, list(range(8)), [0] * 8, ["y" * 60_000] * 8, [1] * 8, [None] * 8,
                        worker="i-0123456789abcdef0", returned=[8, 9])
    messages = [json.loads(b) for b in response_bodies(batch)]
    assert len(messages) > 1 and {m["worker"] for m in messages} == {"i-0123456789abcdef0"}
    assert [i for m in messages for i in m.get("returned", [])] == [8, 9]  # said once
    trimmed = json.loads(response_bodies(ResultBatch("j", 1, [0], [0], ["z" * 300_000], [1], [None],
                                                     worker="h:1", returned=[1]))[0])
    assert (trimmed["worker"], trimmed["returned"]) == ("h:1", [1]) and "trimmed" in trimmed["outputs"][0]


def test_idle_worker_exits_on_its_own(remote):
    worker = remote.worker("-t", "1", "--idle-timeout", "2")
    start = time.monotonic()
    assert worker.wait(60) == 0
    assert 2 <= time.monotonic() - start < 30


def test_a_worker_whose_last_bundle_ends_mid_poll_leaves_on_time(remote, workload, tmp_path):
    """While a bundle runs, a free thread's long poll is no longer than the idle exit that would be
    due were the bundle to end now: the worker leaves about its idle timeout after the bundle, not
    after a whole 20 s long poll begun while the bundle ran."""
    sched = remote.scheduler()
    worker = remote.worker("-t", "2", "--idle-timeout", "2")
    out = tmp_path / "r.jsonl"
    assert run_client("-s", sched.address, "-w", workload(["/bin/sleep 4"]), "-o", str(out)).returncode == 0
    finished = time.monotonic()
    assert worker.wait(60) == 0
    assert time.monotonic() - finished < 10  # idle 2 s, polls of 2 s; a 20 s poll is what this guards


def test_worker_sigterm_finishes_held_bundle(remote, workload, tmp_path):
    sched = remote.scheduler()
    worker = remote.worker("-t", "1")
    started = tmp_path / "started"
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload([f"touch {started}; sleep 1; echo finished"]),
                          "-o", str(out))
    wait_until(lambda: started.exists())
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert client.wait(30) == 0
    assert read_results(out)[0]["output"] == "finished\n"
    client.stdout.close()
    client.stderr.close()


def test_missing_credentials_is_a_clear_error(aws_env):

    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_REGION="us-east-1", AWS_ENDPOINT_URL=aws_env["AWS_ENDPOINT_URL"],
               AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               AWS_EC2_METADATA_DISABLED="true")
    done = subprocess.run([sys.executable, str(ROOT / "worker.py")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2 and "no AWS credentials found" in done.stderr
    assert "Traceback" not in done.stderr


def _operations(log: str) -> set[str]:
    """IAM actions for the operations in a process's 'AWS API calls' log line.

    SQS authorises its batch operations (SendMessageBatch...) by the single action.
    """
    line = re.search(r"AWS API calls: \d+ \((.*)\)", log)[1]
    operations = {re.sub(r"^(sqs:.*)Batch$", r"\1", item.split()[0].replace(".", ":"))
                  for item in line.split(", ")}
    return {_S3_ACTIONS.get(operation, operation) for operation in operations}


# S3 operations authorised by an action of another name.
_S3_ACTIONS = {"s3:HeadObject": "s3:GetObject", "s3:ListObjectsV2": "s3:ListBucket",
               "s3:PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
               "s3:GetBucketLifecycleConfiguration": "s3:GetLifecycleConfiguration",
               "s3:CreateMultipartUpload": "s3:PutObject", "s3:UploadPart": "s3:PutObject",
               "s3:CompleteMultipartUpload": "s3:PutObject", "s3:DeleteObjects": "s3:DeleteObject"}


def _allowed(policy: str) -> set[str]:
    document = json.loads((ROOT / "iam" / f"{policy}-policy.json").read_text())
    return {action for statement in document["Statement"] if statement["Effect"] == "Allow"
            for action in statement["Action"]}


def test_least_privilege_policies_cover_every_call_made(remote, workload, tmp_path):
    sched = remote.scheduler()
    worker = remote.worker("-t", "2", "--visibility-timeout", "3")
    (tmp_path / "in.txt").write_text("staged\n")
    described = json.dumps({"executable": "cp", "arguments": ["in.txt", "out.txt"],
                            "input_sandbox": [str(tmp_path / "in.txt")], "output_sandbox": ["out.txt"]})
    assert run_client("-s", sched.address, "-w", workload(["echo a", "sleep 5"] * 20 + [described]),
                      "--outputs", str(tmp_path / "out"), env=remote.env).returncode == 0
    assert (tmp_path / "out" / "40" / "out.txt").read_text() == "staged\n"
    cancelled = start_client("-s", sched.address, "-w", workload(["sleep 60000"] * 3))
    job = wait_until(lambda: re.search(r"job ([0-9a-f]+)", cancelled.stderr.readline()))[1]
    assert run_client("-s", sched.address, "--cancel", job).returncode == 0
    assert cancelled.wait(30) == 3
    drain = remote.command("--drain")
    assert drain.returncode == 0, drain.stderr
    _, worker_log = worker.communicate(timeout=60)
    sched.stop()
    assert _operations(worker_log) <= _allowed("worker")  # the scheduler created queue and table
    assert _operations(sched.proc.stderr.read()) <= _allowed("scheduler")
    assert _operations(drain.stderr) <= _allowed("scheduler")
    for stream in (cancelled.stdout, cancelled.stderr):
        stream.close()



def test_killed_remote_scheduler_resumes_its_jobs_from_dynamodb(remote, workload, tmp_path):
    ran = tmp_path / "ran"
    state = ["--state", f"resume-{remote.table}", "--jobs-table", f"jobs-{remote.table}"]
    sched = remote.scheduler(*state)
    remote.worker("-t", "2")
    # A finished job, and one whose tasks are still running when the scheduler is killed.
    done = workload([f"echo {i} >> {ran}; echo out{i}" for i in range(30)])
    first = run_client("-s", sched.address, "-w", done)
    assert first.returncode == 0, first.stderr
    finished = re.search(r"job ([0-9a-f]{16})", first.stderr).group(1)
    client = start_client("-s", sched.address, "-w", workload(
        [f"sleep 1; echo {i} >> {ran}; echo out{i}" for i in range(30, 36)]))
    wait_until(lambda: len(ran.read_text().split()) >= 31, timeout=60)
    sched.proc.kill()
    sched.proc.wait()
    _, stderr = client.communicate(timeout=30)
    assert client.returncode == 2
    job = re.search(r"job ([0-9a-f]{16})", stderr).group(1)

    again = remote.scheduler(*state)  # same name: same response queue, where results kept arriving
    for cursor, ids in ((finished, range(30)), (job, range(30, 36))):
        out = tmp_path / f"{cursor}.jsonl"
        fetched = run_client("-s", again.address, "--cursor", cursor, "-o", str(out))
        assert fetched.returncode == 0, fetched.stderr
        assert [r["output"] for r in read_results(out)] == [f"out{i}\n" for i in ids]
    runs = {i: ran.read_text().split().count(str(i)) for i in range(36)}
    assert all(runs[i] == 1 for i in range(30)), runs  # finished before the kill: not run again
    assert all(runs[i] >= 1 for i in range(30, 36)), runs
    assert again.stop() == 0
    assert "1 unfinished resumed" in again.proc.stderr.read()


def test_remote_results_expire_from_the_jobs_table(remote, workload):
    table = f"jobs-{remote.table}"
    sched = remote.scheduler("--jobs-table", table, "--result-ttl", "1")
    remote.worker("-t", "2")
    submitted = run_client("-s", sched.address, "-w", workload(["echo a", "echo b"]))
    assert submitted.returncode == 0
    job = re.search(r"job ([0-9a-f]{16})", submitted.stderr).group(1)
    dynamodb = _emulator_client("dynamodb", remote.env)

    def items() -> list[dict]:
        return dynamodb.query(TableName=table, KeyConditionExpression="job = :job",
                              ExpressionAttributeValues={":job": {"S": job}})["Items"]
    parts = sorted(item["part"]["S"] for item in items())
    assert parts[:2] == ["job", "r#000000000000"] and parts[-1] == "t#000000000000"
    # DynamoDB's own TTL is the backstop should the scheduler never come back.
    assert all(int(item["expires_at"]["N"]) > time.time() + 86400 for item in items())
    ttl = dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expires_at")
    wait_until(lambda: not items(), timeout=15, interval=0.5)
    gone = run_client("-s", sched.address, "--cursor", job)
    assert gone.returncode == 2 and "unknown_job" in gone.stderr
