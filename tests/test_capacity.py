"""Capacity refusals: the launch plan's order, spot share and backoff, and a fleet whose first instance
type EC2 refuses (a proxy answers RunInstances as EC2 does when a zone has no capacity)."""

import http.client
import http.server
import itertools
import logging
import threading
import time
import urllib.parse

import boto3
import botocore.exceptions
import pytest
from conftest import read_results, run_client, start_client, wait_until
from test_provisioning import fleet  # noqa: F401  (a fixture)
from test_remote import _allowed, _operations

from cloudkon.capacity import CAPACITY_BACKOFF_SECONDS, ON_DEMAND, SPOT, LaunchPlan

AMI = "ami-0123456789abcdef0"


class FakeEC2:
    """RunInstances granting at most ``grant`` instances of a (type, subnet), refusing those in
    ``refuse`` as EC2 does (InsufficientInstanceCapacity, HTTP 500); every call recorded."""

    def __init__(self, refuse=(), grant=100):
        self.refuse, self.grant, self.calls = set(refuse), grant, []
        self._next = iter(range(10_000))

    def run_instances(self, **request):
        self.calls.append(request)
        if (request["InstanceType"], request.get("SubnetId")) in self.refuse:
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no capacity"},
                 "ResponseMetadata": {"HTTPStatusCode": 500}}, "RunInstances")
        market = "spot" if "InstanceMarketOptions" in request else None
        return {"Instances": [{"InstanceId": f"i-{next(self._next)}", "InstanceType": request["InstanceType"],
                               "InstanceLifecycle": market}
                              for _ in range(min(self.grant, request["MaxCount"]))]}


def test_spot_share_follows_the_ratio_over_launches():
    plan = LaunchPlan(["t3.micro"], [], 0.3, ec2=FakeEC2())
    instances = [i for count in (1, 2, 3, 4) for i in plan.launch(count, {})]
    assert len(instances) == 10 and plan.launched == {SPOT: 3, ON_DEMAND: 7}
    assert sum(i["InstanceLifecycle"] == "spot" for i in instances) == 3
    assert LaunchPlan(["t3.micro"], [], 1.0).split(5) == [(SPOT, 5)]
    assert LaunchPlan(["t3.micro"], [], 0.0).split(5) == [(ON_DEMAND, 5)]


def test_a_refused_pair_falls_back_in_order_and_is_left_alone_while_it_backs_off(caplog):
    ec2 = FakeEC2(refuse={("c5.large", "subnet-a")}, grant=2)
    plan = LaunchPlan(["c5.large", "t3.micro"], ["subnet-a", "subnet-b"], 0.0, ec2=ec2)
    with caplog.at_level(logging.INFO, logger="cloudkon.fleet"):
        first = plan.launch(3, {"ImageId": AMI})
        second = plan.launch(1, {"ImageId": AMI})
    pairs = [(call["InstanceType"], call["SubnetId"], call["MaxCount"]) for call in ec2.calls]
    # c5.large in a (refused), in b (2 of 3 granted), then t3.micro in a for the last one; the next
    # launch skips the refused pair.
    assert pairs == [("c5.large", "subnet-a", 3), ("c5.large", "subnet-b", 3), ("t3.micro", "subnet-a", 1),
                     ("c5.large", "subnet-b", 1)]
    assert len(first) == 3 and len(second) == 1
    assert all(call["MinCount"] == 1 for call in ec2.calls), "a partial grant is taken"
    refusals = [r for r in caplog.records if "c5.large in subnet-a failed" in r.getMessage()]
    assert len(refusals) == 1 and "InsufficientInstanceCapacity" in refusals[0].getMessage()


def test_every_pair_refused_launches_nothing_and_says_so_once(caplog):
    ec2 = FakeEC2(refuse={("c5.large", None), ("t3.micro", None)})
    plan = LaunchPlan(["c5.large", "t3.micro"], [], 1.0, ec2=ec2)
    with caplog.at_level(logging.INFO, logger="cloudkon.fleet"):
        assert [plan.launch(2, {}) for _ in range(5)] == [[]] * 5
    assert len(ec2.calls) == 2, "each refused pair is asked once, then waits out its backoff"
    assert all(call["InstanceMarketOptions"]["MarketType"] == "spot" for call in ec2.calls)
    every = [r for r in caplog.records if "every instance type and subnet refused" in r.getMessage()]
    assert len(every) == 1


class RefusingEC2(http.server.ThreadingHTTPServer):
    """An HTTP proxy in front of the AWS emulator that answers RunInstances for the instance types in
    ``refuse`` as EC2 does when it has no capacity; every RunInstances' type recorded in ``asked``,
    with when (monotonic) in ``times``."""

    def __init__(self, target: str, refuse: set[str]) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target = urllib.parse.urlsplit(target).netloc
        self.refuse = refuse
        self.asked: list[str] = []
        self.times: list[float] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a scheduler stopped in the middle of a call (a long poll): nothing to tell

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: RefusingEC2

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        form = urllib.parse.parse_qs(body.decode(errors="replace"))
        if form.get("Action") == ["RunInstances"]:
            kind = form["InstanceType"][0]
            self.server.asked.append(kind)
            self.server.times.append(time.monotonic())
            if kind in self.server.refuse:
                self._answer(500, {"Content-Type": "text/xml"}, _refusal(kind))
                return
        self._forward(body)

    def do_GET(self) -> None:
        self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    do_PUT = do_DELETE = do_HEAD = do_GET

    def _forward(self, body: bytes) -> None:
        connection = http.client.HTTPConnection(self.server.target, timeout=60)
        try:
            connection.request(self.command, self.path, body, dict(self.headers))
            response = connection.getresponse()
            headers = {k: v for k, v in response.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length")}
            self._answer(response.status, headers, response.read())
        except OSError:  # the emulator hung up: a gateway's answer, which boto retries
            self._answer(502, {}, b"")
        finally:
            connection.close()

    def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _refusal(kind: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            f"<Code>InsufficientInstanceCapacity</Code><Message>We currently do not have sufficient {kind} "
            "capacity in the Availability Zone you requested (us-east-1a).</Message></Error></Errors>"
            "<RequestID>refused</RequestID></Response>").encode()


@pytest.fixture
def refusing(remote):
    proxy = RefusingEC2(remote.env["AWS_ENDPOINT_URL"], set())
    yield proxy
    proxy.close()


def _scheduler(start_scheduler, remote, fleet, proxy, *args):  # noqa: F811
    return start_scheduler("--remote", *remote.scheduler_options, "--provision", "--ami", AMI, *fleet.options,
                           *args, env={**remote.env, "AWS_ENDPOINT_URL": proxy.url})


def test_fleet_launches_the_next_type_when_the_first_is_refused(fleet, remote, refusing,  # noqa: F811
                                                                start_scheduler, workload, tmp_path):
    refusing.refuse.add("c5.large")
    sched = _scheduler(start_scheduler, remote, fleet, refusing, "--instance-type", "c5.large",
                       "--instance-type", "t3.micro", "--max-workers", "2", "--worker-threads", "1",
                       "--worker-idle-timeout", "2")
    for round in range(2):  # the second after the fleet retired: the refused type still backs off
        out = tmp_path / f"r{round}.jsonl"
        done = run_client("-s", sched.address, "-w", workload([f"sleep 0.2; echo {i}" for i in range(12)]),
                          "-o", str(out))
        assert done.returncode == 0, done.stderr
        assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(12)]
        wait_until(lambda: not fleet.hyper.alive(), timeout=60)
    sched.stop()
    log = sched.proc.stderr.read()
    refused = [refusing.times[n] for n, kind in enumerate(refusing.asked) if kind == "c5.large"]
    pauses = [later - earlier for earlier, later in itertools.pairwise(refused)]
    assert refused and all(pause >= CAPACITY_BACKOFF_SECONDS[0] / 2 for pause in pauses), \
        "a refused type is asked again only after its backoff"
    assert refusing.asked.count("t3.micro") >= 2
    assert log.count("launching on-demand c5.large in the default subnet failed") == 1, log
    assert "InsufficientInstanceCapacity" in log and "(t3.micro)" in log
    ec2 = boto3.client("ec2", endpoint_url=remote.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    kinds = {i["InstanceType"] for r in ec2.describe_instances(
        Filters=[{"Name": "tag:cloudkon:fleet", "Values": [fleet.hyper.fleet]}])["Reservations"]
        for i in r["Instances"]}
    assert kinds == {"t3.micro"}
    assert _operations(log) <= _allowed("scheduler")


def test_fleet_refused_everywhere_waits_and_stays_up(fleet, remote, refusing,  # noqa: F811
                                                      start_scheduler, workload):
    refusing.refuse.update({"c5.large", "t3.micro"})
    sched = _scheduler(start_scheduler, remote, fleet, refusing, "--instance-type", "c5.large,t3.micro",
                       "--max-workers", "2", "--worker-threads", "1")
    client = start_client("-s", sched.address, "-w", workload(["echo never"] * 4))
    wait_until(lambda: len(refusing.asked) == 2, timeout=30)
    time.sleep(3)  # six scaling rounds: each pair waits out its backoff, not asked again
    assert refusing.asked == ["c5.large", "t3.micro"]
    assert sched.proc.poll() is None and fleet.hyper.states() == {}
    client.kill()
    client.communicate()
    sched.stop()
    log = sched.proc.stderr.read()
    assert log.count("every instance type and subnet refused") == 1, log
    assert "Traceback" not in log
