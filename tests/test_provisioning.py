"""Provisioning on the AWS emulator, with a stand-in hypervisor running a worker.py per instance."""

import os
import signal
import subprocess
import sys
import time
import uuid

import boto3
import pytest
from conftest import ROOT, read_results, run_client, start_client, wait_until
from hypervisor import Hypervisor
from test_remote import _allowed, _operations

from cloudkon.control import queue_name


@pytest.fixture
def fleet(remote, tmp_path):
    """A fleet of this test's own; ``fleet.scheduler(*args)`` starts a provisioning scheduler."""
    name = f"fleet-{uuid.uuid4().hex[:8]}"
    hypervisor = Hypervisor(remote.env, name, tmp_path)

    class Fleet:
        env = remote.env
        hyper = hypervisor
        # Time scaled down: a boot here takes a second, and so does the billed minimum.
        options = ["--fleet", name, "--fleet-table", f"{name}-registry", "--visibility-timeout", "3",
                   "--heartbeat-seconds", "0.5", "--heartbeat-timeout", "4", "--scale-interval", "0.5",
                   "--boot-seconds", "1", "--billed-minimum", "1"]

        @staticmethod
        def scheduler(*args: str):
            return remote.scheduler("--provision", "--ami", "ami-0123456789abcdef0", *Fleet.options, *args)

    yield Fleet
    hypervisor.stop()


def test_scales_from_zero_to_max_and_back_to_zero(fleet, workload, tmp_path):
    sched = fleet.scheduler("--max-workers", "3", "--worker-threads", "1", "--worker-idle-timeout", "2")
    time.sleep(2)
    assert fleet.hyper.states() == {}, "no instance while there is no work"
    out = tmp_path / "r.jsonl"
    # 24 s of work: after the first instance (one, while none is up) it is worth two more by the cost
    # rule twice over, however soon the tasks' times are learnt (12 s was on the edge: 2 or 3).
    done = run_client("-s", sched.address, "-w", workload([f"sleep 0.6; echo {i}" for i in range(40)]),
                      "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(40)]
    assert fleet.hyper.peak == 3 and len(fleet.hyper.booted) == 3
    wait_until(lambda: not fleet.hyper.alive(), timeout=60)  # idle instances terminate themselves
    assert set(fleet.hyper.states().values()) == {"terminated"}
    assert all("terminating this instance" in fleet.hyper.log(i) for i in fleet.hyper.booted)
    sched.stop()
    assert _operations(sched.proc.stderr.read()) <= _allowed("scheduler")  # least privilege
    retiring = {"dynamodb:DeleteItem", "ec2:TerminateInstances"}  # made after the count is logged
    for instance in fleet.hyper.booted:
        assert _operations(fleet.hyper.log(instance)) | retiring <= _allowed("worker")


def test_worker_killed_is_noticed_by_its_missing_heartbeat(fleet, workload, tmp_path):
    # A loaded machine may start the victim's worker slower than the second below: killed before
    # its first heartbeat, it is noticed by the boot timeout instead.
    sched = fleet.scheduler("--max-workers", "2", "--worker-threads", "1", "--worker-idle-timeout", "3",
                            "--boot-timeout", "15")
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload([f"sleep 0.4; echo {i}" for i in range(30)]),
                          "-o", str(out))
    victim = wait_until(lambda: len(fleet.hyper.running) == 2 and sorted(fleet.hyper.running)[0])
    time.sleep(1)
    fleet.hyper.kill(victim)  # the process dies; the instance stays up, silent
    wait_until(lambda: fleet.hyper.states()[victim] == "terminated", timeout=30)
    assert client.wait(120) == 0, client.stderr.read()
    assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(30)]
    sched.stop()
    assert f"terminating {victim}: no heartbeat" in sched.proc.stderr.read()
    client.stdout.close()
    client.stderr.close()


def test_restarted_scheduler_adopts_its_instances_and_leaks_none(fleet, workload, tmp_path):
    first = fleet.scheduler("--max-workers", "2", "--worker-threads", "1", "--worker-idle-timeout", "4")
    client = start_client("-s", first.address, "-w", workload(["sleep 2000"] * 6))
    wait_until(lambda: len(fleet.hyper.alive()) == 2)
    first.stop(signal.SIGKILL)
    client.wait(30)
    client.stdout.close()
    client.stderr.close()
    second = fleet.scheduler("--max-workers", "2", "--worker-threads", "1", "--worker-idle-timeout", "4")
    out = tmp_path / "r.jsonl"
    done = run_client("-s", second.address, "-w", workload([f"echo {i}" for i in range(10)]), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(10)]
    wait_until(lambda: not fleet.hyper.alive(), timeout=90)
    second.stop()
    log = second.proc.stderr.read()
    assert "adopted 2 running instance(s)" in log
    assert len(fleet.hyper.booted) == 2, "the adopted instances did the work; none launched twice"


def test_cleanup_terminates_the_fleet_and_removes_its_resources(fleet, remote, workload):
    sched = fleet.scheduler("--max-workers", "2", "--worker-threads", "1", "--worker-idle-timeout", "600")
    # 16 s of work: enough for the policy to launch both (sleep N: N ms).
    assert run_client("-s", sched.address, "-w", workload(["sleep 2000"] * 8)).returncode == 0
    sched.stop()
    assert len(fleet.hyper.alive()) == 2  # idle for ten minutes: still up
    fleet.hyper.kill(fleet.hyper.alive()[0])  # leaves its control queue and subscription behind
    done = subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--remote", "--cleanup",
                           *remote.scheduler_options, *fleet.options],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **fleet.env})
    assert done.returncode == 0, done.stderr
    assert "creating" not in done.stderr, "cleaning up creates nothing it then deletes"
    assert fleet.hyper.alive() == []
    credentials = {"endpoint_url": fleet.env["AWS_ENDPOINT_URL"], "region_name": "us-east-1",
                   "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    queues = boto3.client("sqs", **credentials).list_queues().get("QueueUrls", [])
    gone = ("/" + remote.request_queue, f"/{remote.request_queue}-dead")
    assert not [url for url in queues if url.endswith(gone)]
    assert remote.table not in boto3.client("dynamodb", **credentials).list_tables()["TableNames"]
    buckets = boto3.client("s3", **credentials).list_buckets()["Buckets"]
    assert remote.bucket not in [bucket["Name"] for bucket in buckets]
    topics = boto3.client("sns", **credentials).list_topics()["Topics"]
    assert not [t for t in topics if t["TopicArn"].endswith(":" + remote.topic)]
    control_queues = {queue_name(instance) for instance in fleet.hyper.booted}
    assert not [url for url in queues if url.rsplit("/", 1)[-1] in control_queues], "control queues left"


def test_provision_needs_remote_and_an_image():
    for args, message in ((["--provision"], "go with --remote"),
                          (["--remote", "--provision"], "needs --ami")):
        done = subprocess.run([sys.executable, str(ROOT / "scheduler.py"), *args], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr
