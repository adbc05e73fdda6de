"""Remote mode when AWS goes away or loses what the scheduler made (#21, findings 3 and 4).

The scheduler and its workers reach the AWS emulator through a fault-injecting proxy
(faultproxy.py), so a test can take AWS away from them for a while, as a network blip or an
endpoint restart does, while the test itself keeps using the emulator directly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import boto3
import pytest
from conftest import ROOT, line_count, read_results, run_client, start_client, wait_until
from faultproxy import FaultProxy

import cloudkon.journal
from cloudkon import aws
from cloudkon.errors import BackendError
from cloudkon.jobstore import JobOpened, SQLiteJobStore, TasksAdded
from cloudkon.journal import Journal

# The target is 60 s; the suite takes AWS away for 15 s (measured by hand at 60 s).
OUTAGE_SECONDS = 15


@pytest.fixture
def proxy(aws_env):
    port = int(aws_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with FaultProxy(port) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def proxied(remote, proxy, start_scheduler):
    """remote's scheduler and workers, reaching AWS through the proxy."""
    env = {**remote.env, "AWS_ENDPOINT_URL": proxy.url}
    workers: list[subprocess.Popen] = []

    class Proxied:
        @staticmethod
        def scheduler(*args: str):
            return start_scheduler("--remote", *remote.scheduler_options, *args, env=env)

        @staticmethod
        def worker(*args: str) -> subprocess.Popen:
            proc = subprocess.Popen([sys.executable, str(ROOT / "worker.py"), *remote.options, *args],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, **env})
            workers.append(proc)
            return proc

    yield Proxied
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def _job_id(stderr: str) -> str:
    match = re.search(r"job ([0-9a-f]{16})", stderr)
    assert match, stderr
    return match.group(1)


def _finish(client: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """A client's exit code and stderr, once it exits (killed if it has not within ``timeout``)."""
    try:
        _, stderr = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        client.communicate()
        raise
    return client.returncode, stderr


def test_an_aws_outage_mid_job_passes_without_a_restart(proxied, proxy, workload, tmp_path):
    """Finding 3: AWS unreachable for OUTAGE_SECONDS in the middle of a job.  The scheduler lives
    on, takes a job submitted meanwhile, and its job store resumes: every task of both jobs has
    exactly one result, and both are read back from the store afterwards."""
    sched = proxied.scheduler("--visibility-timeout", "10")
    proxied.worker("-t", "2", "--visibility-timeout", "10")
    proxied.worker("-t", "2", "--visibility-timeout", "10")
    ran = tmp_path / "ran"
    tasks = [f"echo {i} >> {ran}; sleep 0.2; echo out{i}" for i in range(60)]
    first_out, second_out = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(first_out))
    wait_until(lambda: ran.exists() and len(ran.read_text().split()) >= 8, timeout=60)
    proxy.fault("refuse", OUTAGE_SECONDS)
    time.sleep(2)
    # Submitted while AWS is away: accepted once the store has its tasks, then run.
    second = start_client("-s", sched.address, "-w", workload([f"echo again{i}" for i in range(5)]),
                          "-o", str(second_out))

    code, first_err = _finish(first, 120)
    assert code == 0, first_err
    code, second_err = _finish(second, 60)
    assert code == 0, second_err
    assert sched.proc.poll() is None
    assert [r["output"] for r in read_results(first_out)] == [f"out{i}\n" for i in range(60)]
    assert [r["output"] for r in read_results(second_out)] == [f"again{i}\n" for i in range(5)]
    # Both jobs are in the store: a finished job's results are read back from there.
    for stderr, count in ((first_err, 60), (second_err, 5)):
        again = tmp_path / "again.jsonl"
        fetched = run_client("-s", sched.address, "--cursor", _job_id(stderr), "-o", str(again))
        assert fetched.returncode == 0, fetched.stderr
        assert len(read_results(again)) == count
    assert sched.stop() == 0
    log = sched.proc.stderr.read()
    assert log.count("receiving results failed") == 1, log
    assert log.count("receiving results works again") == 1, log
    assert log.count("job store failed") == 1, log
    assert log.count("job store works again") == 1, log


def test_a_worker_starts_no_task_on_a_lease_it_could_not_renew(proxied, proxy, workload, tmp_path):
    """AWS away for longer than a lease while one worker runs a bundle: once the lease it wrote last
    has under a third left, it starts none of the bundle's tasks (another worker could hold the bundle
    by then), waits for AWS, renews (nobody took the bundle) and goes on.  No task starts while its
    lease is unaccounted for; every task runs once and has one result, though SQS delivers the bundle's
    message again meanwhile (to the same worker: it knows the message and keeps its bundle running once)."""
    lease = 3
    # One slot: a bundle is not cut to spread the job over more.
    sched = proxied.scheduler("--visibility-timeout", str(lease), "--in-flight", "1")
    # Two threads: the second is free to take the message when SQS delivers it again (its visibility
    # ran out with the lease); it must not run the bundle the first still holds.
    worker = proxied.worker("-t", "2", "--visibility-timeout", str(lease))
    ran = tmp_path / "ran"
    # 0.1 s each: bundles of about 5 s by the estimates (the first goes out alone), so the outage
    # starts early in the second, which runs well past the lease.
    tasks = [f'read up _ < /proc/uptime; echo "{i} $up" >> {ran}; sleep 0.1' for i in range(100)]
    out = tmp_path / "out.jsonl"
    client = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    wait_until(lambda: line_count(ran) >= 5, timeout=60, interval=0.02)
    began = time.clock_gettime(time.CLOCK_BOOTTIME)  # /proc/uptime's clock
    proxy.fault("refuse", 8)
    wait_until(lambda: proxy.mode == "pass", timeout=10, interval=0.02)
    ended = time.clock_gettime(time.CLOCK_BOOTTIME)
    code, stderr = _finish(client, 120)
    assert code == 0, stderr
    starts = [(int(i), float(up)) for i, up in (line.split() for line in ran.read_text().splitlines())]
    # Renewed every third of the lease until AWS went away, so in doubt two thirds of it later.
    unvouched = [(i, round(up - began, 2)) for i, up in starts if began + lease < up < ended]
    assert not unvouched, f"tasks started on a lease the worker could not renew: {unvouched}"
    assert sorted(i for i, _ in starts) == list(range(100))
    assert sorted(r["id"] for r in read_results(out)) == list(range(100))
    assert sched.stop() == 0
    worker.terminate()
    log = worker.communicate(timeout=40)[1]
    assert log.count("renewing a lease before a task failed") == 1, log
    assert log.count("renewing a lease before a task works again") == 1, log
    assert "lost its lease" not in log, log


def _emulator(service: str, env: dict[str, str]):
    return boto3.client(service, endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _slow_tasks(ran, count: int) -> list[str]:
    return [f"echo {i} >> {ran}; sleep 0.3; echo out{i}" for i in range(count)]


def test_a_claim_table_deleted_mid_job_is_made_again(remote, workload, tmp_path):
    """Finding 4: with the claim table gone no worker can claim a bundle; the scheduler notices
    the bundles it hears nothing of, makes the table again (logged), and the job finishes."""
    sched = remote.scheduler("--visibility-timeout", "3")
    remote.worker("-t", "1", "--visibility-timeout", "3")
    ran, out = tmp_path / "ran", tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload(_slow_tasks(ran, 8)), "-o", str(out))
    wait_until(lambda: ran.exists(), timeout=60)
    _emulator("dynamodb", remote.env).delete_table(TableName=remote.table)

    code, stderr = _finish(client, 60)
    assert code == 0, stderr
    assert [r["output"] for r in read_results(out)] == [f"out{i}\n" for i in range(8)]
    assert sched.stop() == 0
    assert f"claim table {remote.table} is gone" in sched.proc.stderr.read()


def test_a_request_queue_deleted_mid_job_is_made_again_and_its_bundles_sent_again(remote, workload, tmp_path):
    """Finding 4: bundles waiting in a request queue that is deleted are lost with it; the scheduler
    sends them again (into the queue made again) once they are overdue, and the job finishes."""
    sched = remote.scheduler("--visibility-timeout", "3", "--in-flight", "4")
    remote.worker("-t", "1", "--visibility-timeout", "3")
    ran, out = tmp_path / "ran", tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload(_slow_tasks(ran, 8)), "-o", str(out))
    wait_until(lambda: ran.exists(), timeout=60)
    sqs = _emulator("sqs", remote.env)
    sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=remote.request_queue)["QueueUrl"])

    code, stderr = _finish(client, 60)
    assert code == 0, stderr
    assert [r["output"] for r in read_results(out)] == [f"out{i}\n" for i in range(8)]
    assert sched.stop() == 0
    log = sched.proc.stderr.read()
    assert "no worker holds it: sent again" in log and f"creating queue {remote.request_queue}" in log, log


class _FlakyStore(SQLiteJobStore):
    """An in-memory store whose writes fail (as AWS unreachable does) until ``heal`` is set."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.heal = threading.Event()
        self.tries = 0

    def write(self, records: list) -> None:
        self.tries += 1
        if not self.heal.is_set():
            raise BackendError("writing: Could not connect to the endpoint URL")
        super().write(records)


def test_a_journal_keeps_what_it_could_not_write_and_writes_it_once_the_store_answers(monkeypatch):
    monkeypatch.setattr(cloudkon.journal, "STORE_RETRY_SECONDS", (0.01, 0.05))
    store = _FlakyStore()
    journal = Journal(store)
    journal.record(JobOpened("j", 1.0, None))
    journal.record(TasksAdded("j", 0, ["echo a", "echo b"]))
    accepted = journal.written()
    wait_until(lambda: store.tries >= 3)
    journal.record(TasksAdded("j", 2, ["echo c"]))  # recorded during the outage: kept, in order
    assert not accepted.done()
    store.heal.set()
    accepted.result(timeout=10)
    assert journal.call(store.read_commands, "j").result(timeout=10) == ["echo a", "echo b", "echo c"]
    journal.close()


def test_a_journal_gives_up_past_its_limit_of_unwritten_records(monkeypatch):
    monkeypatch.setattr(cloudkon.journal, "STORE_RETRY_SECONDS", (0.01, 0.05))
    monkeypatch.setattr(cloudkon.journal, "MAX_UNWRITTEN_BYTES", 1000)
    store = _FlakyStore()
    journal = Journal(store)
    journal.record(JobOpened("j", 1.0, None))
    wait_until(lambda: store.tries >= 2)
    journal.record(TasksAdded("j", 0, ["x" * 2000]))
    with pytest.raises(BackendError, match="job store failed"):
        journal.written().result(timeout=10)
    journal.close()


def test_a_queue_made_meanwhile_by_another_process_is_used_not_refused(aws_env, monkeypatch):
    """A worker and a scheduler (or two clients' embedded schedulers) starting at once both find no
    request queue and both create it, with attributes of their own: SQS refuses the second
    (QueueAlreadyExists). That one uses the queue made first."""
    for name, value in aws_env.items():
        monkeypatch.setenv(name, value)
    sqs = aws.client("sqs")
    theirs = sqs.create_queue(QueueName="made-meanwhile", Attributes={"VisibilityTimeout": "5"})["QueueUrl"]
    assert aws._create_queue(sqs, "made-meanwhile", {"VisibilityTimeout": "30"}) == theirs
    attributes = sqs.get_queue_attributes(QueueUrl=theirs, AttributeNames=["VisibilityTimeout"])["Attributes"]
    assert attributes["VisibilityTimeout"] == "5"  # the first one made keeps its settings
