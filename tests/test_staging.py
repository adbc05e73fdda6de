"""Job descriptions on the remote backend: files staged through the emulator's S3, Animoto end to end."""

import re
import time

import boto3
import pytest
from conftest import animoto_workload, read_results, start_client, validate_videos, wait_until

from errors import BackendError


@pytest.fixture
def s3(remote):
    return boto3.client("s3", endpoint_url=remote.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _keys(s3, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_animoto_through_s3_one_checked_archive_per_task(remote, s3, tmp_path, monkeypatch):
    sched = remote.scheduler()
    remote.worker("-t", "2")
    out = tmp_path / "out"
    client = start_client("-s", sched.address, "-w", animoto_workload(tmp_path, 3), "--outputs", str(out),
                          "-o", str(tmp_path / "r.jsonl"), env=remote.env)
    _, stderr = client.communicate(timeout=180)
    assert client.returncode == 0, stderr
    job = re.search(r"job ([0-9a-f]+) ", stderr)[1]
    validate_videos([str(out / str(i) / "video.mp4") for i in range(3)])
    keys = _keys(s3, remote.bucket)
    assert [k for k in keys if k.endswith("/out.tar.gz")] == [f"jobs/{job}/{i}/out.tar.gz" for i in range(3)]
    assert len([k for k in keys if re.fullmatch(rf"jobs/{job}/in/[0-9a-f]{{64}}\.tar\.gz", k)]) == 3
    rules = s3.get_bucket_lifecycle_configuration(Bucket=remote.bucket)["Rules"]
    assert rules[0]["Filter"] == {"Prefix": "jobs/"} and rules[0]["Expiration"] == {"Days": 7}
    artifact = read_results(tmp_path / "r.jsonl")[0]["outputs"]
    assert artifact["files"] == ["video.mp4"] and artifact["url"].endswith(f"/{job}/0/out.tar.gz")

    import os

    from s3staging import fetch_outputs  # a changed archive is refused
    os.environ.update(remote.env)
    with pytest.raises(BackendError, match="not the one the task made"):
        fetch_outputs({**artifact, "sha256": "0" * 64}, tmp_path / "tampered")


def test_a_worker_killed_mid_job_still_yields_one_valid_video_per_job(remote, s3, tmp_path):
    sched = remote.scheduler("--visibility-timeout", "3")
    doomed = remote.worker("-t", "3", "--visibility-timeout", "3")
    out = tmp_path / "out"
    client = start_client("-s", sched.address, "-w", animoto_workload(tmp_path, 3, slow_seconds=4),
                          "--outputs", str(out), "-o", str(tmp_path / "r.jsonl"), env=remote.env)
    job = re.search(r"job ([0-9a-f]+) ", client.stderr.readline())[1]
    wait_until(lambda: len([k for k in _keys(s3, remote.bucket) if "/in/" in k]) == 3, timeout=60)
    time.sleep(2)  # the doomed worker is in the prologues of all three jobs
    doomed.kill()
    remote.worker("-t", "3", "--visibility-timeout", "3")
    assert client.wait(180) == 0, client.stderr.read()
    records = read_results(tmp_path / "r.jsonl")
    assert [r["id"] for r in records] == [0, 1, 2] and {r["status"] for r in records} == {"success"}
    assert [k for k in _keys(s3, remote.bucket) if k.endswith("/out.tar.gz")] == \
        [f"jobs/{job}/{i}/out.tar.gz" for i in range(3)]
    validate_videos([str(out / str(i) / "video.mp4") for i in range(3)])
    client.stdout.close()
    client.stderr.close()
