"""Cost accounting: the billing rule and price table, and a provisioned job's figures checked against
what the emulator recorded of its instances, the results and the scheduler's logged AWS calls."""

import json
import re
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
import test_provisioning
from conftest import ROOT, read_results, run_client, wait_until
from test_http import call

from cloudkon.connection import list_jobs, parse_address
from cloudkon.costs import (
    MINIMUM_BILLED_SECONDS,
    CostBook,
    FleetUsage,
    PriceTable,
    WorkerRequests,
    billed_seconds,
    describe,
    load_prices,
)
from cloudkon.errors import ConfigError
from cloudkon.jobstore import FinishedJob, JobFinished, JobOpened, SQLiteJobStore
from cloudkon.protocol import is_cost
from cloudkon.tasks import ResultBatch

fleet = test_provisioning.fleet  # the provisioning tests' fleet on the hypervisor harness
FLEET_BILLED_MINIMUM = 1.0  # its --billed-minimum

T0 = 1_800_000_000.0


def _described(instance_id: str, launched: float, state: str = "running", ended: float | None = None,
               kind: str = "t3.micro", spot: bool = False) -> dict:
    """An instance as DescribeInstances gives it (boto's parsed form)."""
    instance = {"InstanceId": instance_id, "State": {"Name": state}, "InstanceType": kind,
                "LaunchTime": datetime.fromtimestamp(launched, timezone.utc)}
    if ended is not None:
        stamp = datetime.fromtimestamp(ended, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        instance["StateTransitionReason"] = f"User initiated ({stamp} GMT)"
    if spot:
        instance["InstanceLifecycle"] = "spot"
    return instance


def test_billing_rule_is_per_second_with_a_minute_minimum():
    assert billed_seconds(T0, T0 + 1) == MINIMUM_BILLED_SECONDS == 60
    assert billed_seconds(T0, T0 + 59.5) == 60
    assert billed_seconds(T0, T0 + 61.25) == 61.25
    assert billed_seconds(T0, T0 + 3600) == 3600


def test_fleet_usage_follows_runs_from_launch_to_the_recorded_termination():
    usage = FleetUsage()
    usage.observe([_described("i-old", T0 - 500, "terminated", T0 - 400),  # ended before: not ours
                   _described("i-a", T0), _described("i-b", T0 + 10, kind="c5.large", spot=True)],
                  now=T0 + 20)
    usage.observe([_described("i-a", T0, "terminated", T0 + 30)], now=T0 + 95)  # i-b vanished: ended now
    assert usage.count() == 2
    scaled = FleetUsage(billed_minimum=6)  # --billed-minimum 6: runs are billed 6 s at least
    scaled.observe([_described("i-a", T0)], now=T0 + 1)
    scaled.observe([_described("i-a", T0, "terminated", T0 + 2)], now=T0 + 10)
    assert scaled.paid(now=T0 + 10) == {("t3.micro", False): 6.0}
    assert usage.paid(now=T0 + 1000) == {("t3.micro", False): 60.0, ("c5.large", True): 85.0}
    # A job from T0 + 5 to T0 + 200 has i-b's minute (launched in it) and its 25 s past the minute;
    # i-a was launched before it and ended within its minute.
    assert usage.during(T0 + 5, T0 + 200) == {("t3.micro", False): 0.0, ("c5.large", True): 85.0}
    # A launch in the second a job started is the job's (LaunchTime has whole seconds).
    assert usage.during(T0 + 0.7, T0 + 10)[("t3.micro", False)] == 60.0


def test_prices_default_override_and_refuse_what_is_not_a_price_table(tmp_path):
    default = load_prices(None)
    assert default.hourly("t3.micro", False) == 0.0104 and default.hourly("x9.huge", False) is None
    assert default.per_request("sqs.SendMessageBatch") == pytest.approx(0.40e-6)
    assert default.per_request("dynamodb.Query") == pytest.approx(0.125e-6)
    given = tmp_path / "prices.json"
    given.write_text(json.dumps({"instances": {"x9.huge": 2}, "spot": {"t3.micro": 0.003},
                                 "requests": {"dynamodb": 1}}))
    prices = load_prices(str(given))
    assert prices.hourly("x9.huge", False) == 2 and prices.hourly("t3.micro", True) == 0.003
    assert prices.hourly("c5.large", True) == 0.085  # no spot price: the on-demand one
    assert prices.per_request("dynamodb.Query") == pytest.approx(1e-6), "a service's price covers its calls"
    assert str(given) in prices.source
    for text, message in (("{", "not JSON"), ("[]", "a JSON object"), ('{"cpu": {}}', "a JSON object"),
                          ('{"instances": {"t3.micro": -1}}', "numbers, 0 or more"),
                          ('{"requests": {"sqs": "cheap"}}', "numbers, 0 or more"),
                          ('{"instances": {"t3.micro": true}}', "numbers, 0 or more")):
        given.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_prices(str(given))
    with pytest.raises(ConfigError, match="No such file"):
        load_prices(str(tmp_path / "missing.json"))


def test_jobs_at_once_split_the_fleet_pro_rata_of_their_task_seconds():
    clock, calls = [T0], {"sqs.SendMessageBatch": 0}
    usage = FleetUsage()
    prices = PriceTable(instances={"t3.micro": 3.6}, requests={"sqs": 1000.0})  # $0.001 a second, a call
    book = CostBook(prices, usage, lambda: dict(calls), clock=lambda: clock[0])
    book.opened("a", T0)
    book.opened("b", T0)
    usage.observe([_described("i-1", T0 + 1)], now=T0 + 1)
    calls["sqs.SendMessageBatch"] = 40
    book.add("a", ResultBatch("a", ids=[0, 1], elapsed_us=[30_000_000, 30_000_000]))
    book.add("b", ResultBatch("b", ids=[0], elapsed_us=[20_000_000]))
    clock[0] = T0 + 100
    book.finished("a", T0 + 100)
    book.finished("b", T0 + 100)
    a, b = book.job_cost("a"), book.job_cost("b")
    assert is_cost(a) and is_cost(b)
    assert (a["instance_seconds"], b["instance_seconds"]) == (74.25, 24.75)  # 99 s paid (60 + 39), 3:1
    assert (a["task_seconds"], b["task_seconds"]) == (60.0, 20.0)
    assert (a["requests"], b["requests"]) == ({"sqs": 30}, {"sqs": 10})
    assert a["usd"] == pytest.approx(0.07425 + 0.030) and b["usd"] == pytest.approx(0.02475 + 0.010)
    fleet_figures = book.fleet_cost()
    assert fleet_figures["instances"] == 1 and fleet_figures["instance_seconds"] == 99.0
    assert "99 instance-s paid" in describe(fleet_figures)
    book.forget("a")
    assert book.job_cost("a") is None


def test_an_instance_type_without_a_price_gives_no_total():
    usage = FleetUsage()
    usage.observe([_described("i-1", T0, kind="x9.huge")], now=T0)
    book = CostBook(PriceTable(), usage, dict, clock=lambda: T0 + 10)
    report = book.fleet_cost()
    assert report["usd"] is None and report["unpriced"] == ["x9.huge"]
    assert "no price for x9.huge (--prices)" in describe(report)


def test_workers_requests_count_as_their_heartbeats_report_them():
    requests = WorkerRequests()
    requests.seen("i-1", {"sqs.ReceiveMessage": 10, "dynamodb.UpdateItem": 2})
    requests.seen("i-2", {"sqs.ReceiveMessage": 5})
    requests.seen("i-1", {"sqs.ReceiveMessage": 14, "dynamodb.UpdateItem": 3})  # +4, +1
    assert requests.totals() == {"sqs.ReceiveMessage": 19, "dynamodb.UpdateItem": 3}
    requests.seen("i-2", {"sqs.ReceiveMessage": 2})  # lower: a new worker process, counted from 0
    assert requests.totals() == {"sqs.ReceiveMessage": 21, "dynamodb.UpdateItem": 3}
    requests.seen("i-1", {"sqs.ReceiveMessage": 14, "dynamodb.UpdateItem": 3})  # nothing new
    assert requests.totals()["sqs.ReceiveMessage"] == 21
    # A new process on i-1 that has not yet made an UpdateItem: its first ones count whole.
    requests.seen("i-1", {"sqs.ReceiveMessage": 1})
    requests.seen("i-1", {"sqs.ReceiveMessage": 2, "dynamodb.UpdateItem": 5})  # not 2 more than 3: 5
    assert requests.totals() == {"sqs.ReceiveMessage": 23, "dynamodb.UpdateItem": 8}


def test_a_job_has_its_share_of_the_workers_requests_seen_while_it_ran():
    clock = [T0]
    usage = FleetUsage()
    prices = PriceTable(instances={}, requests={"sqs": 1000.0, "dynamodb": 0.0})  # $0.001 an SQS call
    book = CostBook(prices, usage, dict, clock=lambda: clock[0])
    usage.requests.seen("i-1", {"sqs.ReceiveMessage": 100})  # before the jobs: the fleet's only
    book.opened("a", T0)
    book.opened("b", T0)
    usage.requests.seen("i-1", {"sqs.ReceiveMessage": 140, "dynamodb.UpdateItem": 8})
    usage.requests.seen("i-2", {"sqs.ReceiveMessage": 20})  # then it leaves the registry: kept
    book.add("a", ResultBatch("a", ids=[0, 1, 2], elapsed_us=[10_000_000] * 3))
    book.add("b", ResultBatch("b", ids=[0], elapsed_us=[10_000_000]))
    book.finished("a", T0 + 50)
    book.finished("b", T0 + 50)
    usage.requests.seen("i-1", {"sqs.ReceiveMessage": 200})  # after the jobs: the fleet's only
    a, b = book.job_cost("a"), book.job_cost("b")
    assert is_cost(a) and is_cost(b)
    assert a["worker_requests"] == {"dynamodb": 6, "sqs": 45}  # 3:1 of what was seen while they ran
    assert b["worker_requests"] == {"dynamodb": 2, "sqs": 15}
    assert a["requests"] == {} and a["usd"] == pytest.approx(0.045)
    fleet_figures = book.fleet_cost()
    assert fleet_figures["worker_requests"] == {"dynamodb": 8, "sqs": 220}
    assert fleet_figures["usd"] == pytest.approx(0.220)
    assert "AWS requests of the scheduler: none; of its workers: dynamodb 8, sqs 220; about $" \
        in describe(fleet_figures)
    no_fleet = CostBook(prices, None, dict).fleet_cost()
    assert "worker_requests" not in no_fleet and "workers" not in describe(no_fleet)  # none counted


def test_the_job_store_keeps_a_finished_jobs_cost(tmp_path):
    cost = {"task_seconds": 1.5, "requests": {"sqs": 3}, "worker_requests": {"sqs": 40}, "usd": 0.043,
            "prices": "default prices", "instance_seconds": 60.0}
    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)  # a store made before costs were kept: no cost column
    old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, created_at REAL, timeout REAL, total INTEGER, "
                "finished_at REAL, succeeded INTEGER, failed INTEGER, cancelled INTEGER)")
    old.execute("INSERT INTO jobs VALUES ('old', 1.0, NULL, 1, 2.0, 1, 0, 0)")
    old.commit()
    old.close()
    store = SQLiteJobStore(str(path))
    store.write([JobOpened("j", 3.0, None), JobFinished("j", 0, 4.0, 0, 0, 0, cost),
                 JobOpened("local", 5.0, None), JobFinished("local", 0, 6.0, 0, 0)])
    store.close()
    store = SQLiteJobStore(str(path))
    jobs = {job.id: job for job in store.load(0.0)}
    store.close()
    assert all(isinstance(job, FinishedJob) for job in jobs.values())
    assert jobs["j"].cost == cost and jobs["old"].cost is None and jobs["local"].cost is None


def _emulated_runs(fleet) -> list[tuple[float, float]]:
    """Each instance's (launch, termination) as the emulator recorded them."""
    runs = []
    for page in fleet.hyper.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag:cloudkon:fleet", "Values": [fleet.hyper.fleet]}]):
        for instance in (i for r in page["Reservations"] for i in r["Instances"]):
            ended = re.search(r"\((.*) UTC\)", instance["StateTransitionReason"])[1]
            runs.append((instance["LaunchTime"].timestamp(), datetime.strptime(
                ended, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()))
    return runs


def _logged_calls(log: str) -> dict[str, int]:
    """The AWS calls a scheduler or worker logged (as it exits), by service."""
    calls: dict[str, int] = {}
    for item in re.search(r"AWS API calls: \d+ \((.*)\)", log)[1].split(", "):
        operation, count = item.split()
        calls[operation.split(".")[0]] = calls.get(operation.split(".")[0], 0) + int(count)
    return calls


def test_a_provisioned_job_reports_what_its_instances_cost(fleet, remote, workload, tmp_path):
    prices = tmp_path / "prices.json"  # $0.001 an instance-second and an SQS request; the rest free
    prices.write_text(json.dumps({"instances": {"t3.micro": 3.6}, "requests": {
        "sqs": 1000, "dynamodb": 0, "sns": 0, "s3": 0, "ec2": 0}}))
    state = f"costs-{fleet.hyper.fleet}"  # its job store: the restarted scheduler's too
    sched = fleet.scheduler("--max-workers", "2", "--worker-threads", "1", "--worker-idle-timeout", "2",
                            "--instance-type", "t3.micro", "--prices", str(prices), "--http-port", "0",
                            "--state", state)
    http_api = sched.proc.stdout.readline().strip().removeprefix("HTTP API on ")
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload([f"sleep 0.2; echo {i}" for i in range(16)]),
                      "-o", str(out))
    assert done.returncode == 0, done.stderr
    summary = re.search(r"cost \(estimate\): ([\d,]+) instance-s paid; ([\d.]+) task-s; AWS requests of "
                        r"the scheduler: (.*); of its workers: (.*); about \$([\d.]+) at the prices of ",
                        done.stderr)
    assert summary, done.stderr
    elapsed = sum(r["elapsed_ms"] for r in read_results(out)) / 1000
    assert float(summary[2]) == pytest.approx(elapsed, abs=0.05)
    wait_until(lambda: fleet.hyper.booted and not fleet.hyper.alive(), timeout=60)
    runs = _emulated_runs(fleet)
    assert len(runs) == len(fleet.hyper.booted) >= 1
    # The fleet's billed minimum is its --billed-minimum (1 s on the harness, EC2's 60 s by default):
    # every instance was launched for this job, so the job pays at least each one's minimum, and
    # at most all of its paid time (the idle time after the job is the fleet's).
    paid = sum(billed_seconds(*run, minimum=FLEET_BILLED_MINIMUM) for run in runs)
    assert FLEET_BILLED_MINIMUM * len(runs) - 1 <= int(summary[1].replace(",", "")) <= paid + 1
    host, port = parse_address(sched.address)
    time.sleep(1.5)  # a scaling step or two: the scheduler reads the terminations
    answer = list_jobs(host, port, None)
    (job,) = answer["jobs"]
    assert job["cost"]["task_seconds"] == pytest.approx(elapsed, abs=0.002)
    assert answer["fleet"]["instance_seconds"] == paid
    assert answer["fleet"]["instances"] == len(runs)
    cost = job["cost"]
    sqs_requests = cost["requests"]["sqs"] + cost["worker_requests"]["sqs"]  # one job: all of them
    assert cost["usd"] == pytest.approx(cost["instance_seconds"] * 0.001 + sqs_requests * 0.001, abs=2e-6)
    assert float(summary[5]) == pytest.approx(cost["usd"], abs=2e-6)
    assert summary[4] == ", ".join(f"{service} {n:,}" for service, n in cost["worker_requests"].items())
    status, report = call("GET", f"{http_api}/tasks/result/{job['job']}",
                          operation=("/tasks/result/{cursor}", "get"))  # checked against docs/openapi.json
    assert status == 200 and report["cost"] == cost  # the HTTP API's results carry it too
    jobs_listed = run_client("-s", sched.address, "--jobs")
    assert "COST-USD" in jobs_listed.stdout and f"{len(runs)} instance(s)" in jobs_listed.stdout
    sched.stop()
    logged = _logged_calls(sched.proc.stderr.read())
    assert cost["requests"]["sqs"] > 0
    for service, count in answer["fleet"]["requests"].items():
        assert cost["requests"].get(service, 0) <= count <= logged[service], service
    # The workers' requests, as their heartbeats reported them: at most what each logged as it
    # exited (its last calls, after its last heartbeat read, are not counted), and not none.
    workers_logged: dict[str, int] = {}
    for instance in fleet.hyper.booted:
        for service, count in _logged_calls(fleet.hyper.log(instance)).items():
            workers_logged[service] = workers_logged.get(service, 0) + count
    assert cost["worker_requests"]["sqs"] > 0 and cost["worker_requests"]["dynamodb"] > 0
    for service, count in answer["fleet"]["worker_requests"].items():
        assert cost["worker_requests"].get(service, 0) <= count <= workers_logged[service], service

    # Restarted on the same job store, the scheduler still gives the finished job's figures.
    again = remote.scheduler("--state", state, "--http-port", "0", "--prices", str(prices))
    http_api = again.proc.stdout.readline().strip().removeprefix("HTTP API on ")
    (kept,) = list_jobs(*parse_address(again.address), None)["jobs"]
    assert kept["job"] == job["job"] and kept["cost"] == cost
    status, report = call("GET", f"{http_api}/tasks/result/{job['job']}",
                          operation=("/tasks/result/{cursor}", "get"))
    assert status == 200 and report["cost"] == cost
    jobs_listed = run_client("-s", again.address, "--jobs")
    assert f"{cost['usd']:.6f}" in jobs_listed.stdout, jobs_listed.stdout


def test_a_bad_price_file_is_a_clear_error(tmp_path, workload):
    prices = tmp_path / "prices.json"
    prices.write_text('{"instances": {"t3.micro": "free"}}')
    done = run_client("--remote", "--prices", str(prices), "-w", workload(["echo hi"]))
    assert done.returncode == 2
    assert "client.py: error: --prices" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--remote", "--prices", str(prices)],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "scheduler.py: error: --prices" in done.stderr, done.stderr
    local = run_client("-w", workload(["echo hi"]), "--local", "1")
    assert local.returncode == 0 and "cost" not in local.stderr  # local mode counts no cost
