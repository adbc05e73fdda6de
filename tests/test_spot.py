"""Spot instances on the hypervisor harness: launched on the spot market, and a worker that leaves on its
interruption notice, handing its bundles back, before EC2 reclaims the instance."""

import re
import subprocess
import sys
import time

import boto3
from conftest import ROOT, read_results, start_client, wait_until
from test_provisioning import fleet  # noqa: F401  (a fixture)

from cloudkon.spotwatch import SPOT_POLL_SECONDS

# EC2's two minutes of notice, scaled down: several of the worker's reads of the notice.
NOTICE_SECONDS = 4 * SPOT_POLL_SECONDS


def _running_claims(remote) -> set[str]:
    """The workers holding a running bundle now (claims.py: the owner of each claim ``running``)."""
    dynamodb = boto3.client("dynamodb", endpoint_url=remote.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")
    items = dynamodb.scan(TableName=remote.table)["Items"]
    return {item["owner"]["S"] for item in items if item.get("state", {}).get("S") == "running"}


def test_interrupted_spot_worker_hands_its_bundles_back(fleet, remote, workload, tmp_path):  # noqa: F811
    sched = fleet.scheduler("--spot", "--max-workers", "2", "--worker-threads", "2",
                            "--worker-idle-timeout", "3")
    out = tmp_path / "r.jsonl"
    tasks = [f"sleep 1; echo {i}" for i in range(60)]  # 15 s of work for the four threads
    client = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out))
    # A worker running a bundle, its notice watched: the one interrupted.
    victim = wait_until(lambda: next((i for i in sorted(_running_claims(remote) & set(fleet.hyper.running))
                                      if "reading its interruption notice" in fleet.hyper.log(i)), None),
                        timeout=60)
    fleet.hyper.interrupt(victim, NOTICE_SECONDS)
    noticed = time.monotonic()
    wait_until(lambda: fleet.hyper.states()[victim] == "terminated", timeout=NOTICE_SECONDS + 10)
    left_after = time.monotonic() - noticed
    assert client.wait(180) == 0, client.stderr.read()
    client.stdout.close()
    client.stderr.close()
    results = read_results(out)
    assert [r["output"] for r in results] == [f"{i}\n" for i in range(60)], "every task, exactly once"
    assert {r["status"] for r in results} == {"success"}
    assert victim not in fleet.hyper.reclaimed, f"the worker left by itself ({left_after:.1f} s)"
    log = fleet.hyper.log(victim)
    assert "spot interruption notice" in log and "terminating this instance" in log
    assert re.search(r"handing back [1-9]\d* message\(s\) held", log), log
    ec2 = boto3.client("ec2", endpoint_url=fleet.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    lifecycles = {i["InstanceId"]: i.get("InstanceLifecycle") for r in ec2.describe_instances(
        Filters=[{"Name": "tag:cloudkon:fleet", "Values": [fleet.hyper.fleet]}])["Reservations"]
        for i in r["Instances"]}
    assert set(lifecycles.values()) == {"spot"} and victim in lifecycles
    wait_until(lambda: not fleet.hyper.alive(), timeout=60)
    sched.stop()


def test_spot_options_are_checked():
    for args, message in ((["--spot-ratio", "1.5"], "from 0 to 1"),
                          (["--spot-ratio", "half"], "not a number"),
                          (["--instance-type", "t3.micro,,c5.large"], "empty item")):
        done = subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--remote", "--provision", *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
