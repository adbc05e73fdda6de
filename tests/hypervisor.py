"""A stand-in for EC2's hypervisor: a real worker.py process for each instance the emulator runs.

For every instance of a fleet that the AWS emulator reports pending or running, it
starts an instance metadata service (IMDSv2) on a loopback port that answers with that
instance's id, region and user data, and a ``worker.py --ec2`` process pointed at it
through AWS_EC2_METADATA_SERVICE_ENDPOINT, as boto3 would be on the instance.  When the
emulator reports the instance terminated, the process is stopped as the machine's shutdown would
(SIGTERM, then SIGKILL).  ``interrupt`` plays EC2 reclaiming a spot instance: its metadata serves
the interruption notice, and the instance is terminated when the notice says, unless it is gone.
"""

from __future__ import annotations

import base64
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent


class _Metadata(http.server.ThreadingHTTPServer):
    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        self.values = values
        self.token = os.urandom(8).hex()
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    server: _Metadata

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._answer(200, self.server.token)
        else:
            self._answer(400, "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            self._answer(401, "")  # IMDSv2 only
        elif self.path in self.server.values:
            self._answer(200, self.server.values[self.path])
        else:
            self._answer(404, "")

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class Hypervisor:
    """Boots a worker process for each instance of ``fleet`` and kills it when it is terminated."""

    def __init__(self, env: dict[str, str], fleet: str, log_dir: Path) -> None:
        self.env = env
        self.fleet = fleet
        self.log_dir = log_dir
        self.ec2 = boto3.client("ec2", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                aws_access_key_id="testing", aws_secret_access_key="testing")
        self.running: dict[str, tuple[subprocess.Popen, _Metadata]] = {}
        self.booted: list[str] = []
        self.reclaimed: list[str] = []  # spot instances still running when their notice ran out
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def states(self) -> dict[str, str]:
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag:cloudkon:fleet", "Values": [self.fleet]}])
        return {i["InstanceId"]: i["State"]["Name"]
                for page in pages for r in page["Reservations"] for i in r["Instances"]}

    def alive(self) -> list[str]:
        return [i for i, state in self.states().items() if state in ("pending", "running")]

    def kill(self, instance: str) -> None:
        """kill -9 the worker of ``instance``, leaving the instance itself running."""
        self.running[instance][0].send_signal(signal.SIGKILL)

    def interrupt(self, instance: str, seconds: float) -> None:
        """Serve ``instance``'s spot interruption notice, and terminate it ``seconds`` from now (EC2's
        two minutes, scaled down) if it is still running then."""
        at = datetime.now(timezone.utc) + timedelta(seconds=seconds)
        self.running[instance][1].values["/latest/meta-data/spot/instance-action"] = (
            f'{{"action": "terminate", "time": "{at:%Y-%m-%dT%H:%M:%SZ}"}}')
        threading.Thread(target=self._reclaim, args=(instance, seconds), daemon=True).start()

    def _reclaim(self, instance: str, seconds: float) -> None:
        time.sleep(seconds)
        if self.states().get(instance) in ("pending", "running"):
            self.reclaimed.append(instance)
            self.ec2.terminate_instances(InstanceIds=[instance])

    def log(self, instance: str) -> str:
        return (self.log_dir / f"{instance}.log").read_text()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for instance in list(self.running):
            self._shut_down(instance)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for instance, state in self.states().items():
                if state in ("pending", "running") and instance not in self.booted:
                    self._boot(instance)
                elif state not in ("pending", "running") and instance in self.running:
                    self._shut_down(instance)
            self.peak = max(self.peak, len(self.running))

    def _boot(self, instance: str) -> None:
        user_data = self.ec2.describe_instance_attribute(InstanceId=instance, Attribute="userData")
        described = self.ec2.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]
        metadata = _Metadata({
            "/latest/meta-data/instance-id": instance,
            "/latest/meta-data/instance-life-cycle": described.get("InstanceLifecycle", "on-demand"),
            "/latest/meta-data/placement/region": "us-east-1",
            "/latest/user-data": base64.b64decode(user_data["UserData"]["Value"]).decode(),
        })
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({k: v for k, v in self.env.items() if k != "AWS_DEFAULT_REGION" and k != "AWS_REGION"})
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = f"http://127.0.0.1:{metadata.server_address[1]}/"
        log = open(self.log_dir / f"{instance}.log", "w")
        proc = subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "--ec2"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.running[instance] = (proc, metadata)
        self.booted.append(instance)

    def _shut_down(self, instance: str) -> None:
        """As an instance's OS shuts down: SIGTERM, a moment's grace, then SIGKILL."""
        proc, metadata = self.running.pop(instance)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        metadata.shutdown()
        metadata.server_close()
