"""Job descriptions on the remote backend: files staged through the emulator's S3, Animoto end to end."""

import io
import os
import re
import tarfile
import time

import boto3
import pytest
from conftest import animoto_workload, read_results, start_client, validate_videos, wait_until

from cloudkon import s3staging
from cloudkon.errors import BackendError
from cloudkon.jdl import MAX_INPUT_SANDBOX_BYTES, JobSpec
from cloudkon.s3staging import fetch_archive, fetch_object
from cloudkon.sandbox import run_job, staged_command


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

    from cloudkon.s3staging import fetch_outputs  # a changed archive is refused
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


@pytest.fixture
def upload(remote, s3, monkeypatch):
    """Put bytes in the test's bucket: upload(name, data) -> its s3:// URL, for s3staging in this process."""
    for name, value in remote.env.items():
        monkeypatch.setenv(name, value)
    s3.create_bucket(Bucket=remote.bucket)

    def put(name: str, data: bytes) -> str:
        s3.put_object(Bucket=remote.bucket, Key=name, Body=data)
        return f"s3://{remote.bucket}/{name}"
    return put


def _tar_gz(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A gzipped tar of (header, content) pairs; content None writes the header alone (a header
    may claim any size: the archive then ends early, as a crafted one would)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            tar.addfile(info, None if content is None else io.BytesIO(content))
    return buffer.getvalue()


def _member(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


def test_an_archive_whose_header_claims_more_than_the_input_limit_is_refused_unread(upload, tmp_path):
    url = upload("bomb.tar.gz", _tar_gz((_member("big.bin", MAX_INPUT_SANDBOX_BYTES + 1), None)))
    with pytest.raises(BackendError, match=rf"{url}: its files add up to more than the input limit of "
                                           rf"{MAX_INPUT_SANDBOX_BYTES:,} bytes \(member 'big.bin'"):
        fetch_archive(url, tmp_path)
    assert os.listdir(tmp_path) == [], "nothing written, the download removed"


def test_the_input_limit_counts_every_member_together(upload, tmp_path, monkeypatch):
    monkeypatch.setattr(s3staging, "MAX_INPUT_SANDBOX_BYTES", 1000)
    url = upload("two.tar.gz", _tar_gz((_member("a", 600), b"a" * 600), (_member("b", 600), b"b" * 600)))
    with pytest.raises(BackendError, match="more than the input limit of 1,000 bytes"):
        fetch_archive(url, tmp_path)
    assert os.listdir(tmp_path) == []


def test_an_archive_of_too_many_members_is_refused(upload, tmp_path, monkeypatch):
    monkeypatch.setattr(s3staging, "MAX_ARCHIVE_MEMBERS", 5)
    url = upload("many.tar.gz", _tar_gz(*[(_member(f"f{i}"), b"") for i in range(6)]))
    with pytest.raises(BackendError, match="more than 5 archive members"):
        fetch_archive(url, tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("member", [
    _member("link", kind=tarfile.SYMTYPE, link="/etc/passwd"),
    _member("hard", kind=tarfile.LNKTYPE, link="/etc/passwd"),
    _member("null", kind=tarfile.CHRTYPE),
    _member("pipe", kind=tarfile.FIFOTYPE),
    _member("../escape"),
    _member("/tmp/absolute"),
    _member("sparse", kind=tarfile.GNUTYPE_SPARSE),
], ids=lambda member: member.name)
def test_an_archive_member_that_is_not_a_file_inside_the_sandbox_is_refused(upload, tmp_path, member):
    url = upload("odd.tar.gz", _tar_gz((_member("fine.txt", 2), b"ok"), (member, None)))
    with pytest.raises(BackendError, match=rf"refusing archive member '{re.escape(member.name)}'"):
        fetch_archive(url, tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_refused_archive_fails_its_task_with_the_reason(upload):
    url = upload("bomb.tar.gz", _tar_gz((_member("big.bin", MAX_INPUT_SANDBOX_BYTES + 1), None)))
    command = staged_command(JobSpec("true"), "s3://unused/out.tar.gz", archive=url)
    code, output, _, error, artifact = run_job(command, None, 1000, None)
    assert (code, output, artifact) == (None, "", None)
    assert error.startswith(f"sandbox: BackendError: {url}: its files add up to more than the input limit")


def test_an_s3_input_over_the_url_input_limit_is_refused_before_downloading(upload, tmp_path):
    url = upload("big.bin", b"x" * 2000)
    with pytest.raises(BackendError, match=rf"{url} is over 1,000 bytes \(2,000\)"):
        fetch_object(url, tmp_path, 1000)
    assert os.listdir(tmp_path) == []
