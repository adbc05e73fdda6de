"""S3 staging: the bucket of job files, input archives up, output archives back.

Owns the remote form of a sandbox's files:
  - the bucket: created by the remote scheduler (like its queues) with a lifecycle
    rule (its own, beside the bucket's others) that expires job data after
    ``--retention-days``;
  - the client's upload of a task's inputs as one archive, before the task is
    queued: ``<prefix>/<job>/in/<sha256>.tar.gz``, content-addressed, so tasks with the
    same inputs share one upload;
  - the worker's download and safe unpacking into the sandbox, and its upload of the
    output sandbox to ``<prefix>/<job>/<task>/out.tar.gz`` (a task run again overwrites
    it: one key per task, never two archives);
  - the client's download of that archive, checked against the size and SHA-256 the
    result carries, and unpacked into ``--outputs DIR/<task id>/``;
  - cleanup: the files under the prefix, and the bucket once nothing else is in it.
Transfers are boto3's managed ones (multipart above 8 MiB).  Archives hold regular
files and directories only.  Before writing anything, unpacking checks every member's
header: a link, a device, or a name that would land outside the target directory is
refused, and so is an input archive whose files add up to more than the job's input
limit (jdl.MAX_INPUT_SANDBOX_BYTES, which the client checked before uploading) or that
holds more than MAX_ARCHIVE_MEMBERS members: a gzip of zeros unpacks 1000 to 1.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from cloudkon import aws
from cloudkon.errors import AlreadyExists, BackendError, ResourceNotFound
from cloudkon.jdl import MAX_INPUT_SANDBOX_BYTES, JobSpec

log = logging.getLogger("cloudkon.s3")

_DOWNLOAD_NAME = ".cloudkon-download"
_ARCHIVE_NAME = ".cloudkon-outputs.tar.gz"

# Members of one archive: each costs an inode once unpacked and a header object while the
# archive is checked.  Far above any real input sandbox or output sandbox.
MAX_ARCHIVE_MEMBERS = 100_000

# An input archive is downloaded before its members can be checked: the inputs plus what gzip
# and tar add to incompressible files (5 bytes per 64 KiB, 1.5 KiB of headers per file).
MAX_INPUT_ARCHIVE_BYTES = MAX_INPUT_SANDBOX_BYTES + MAX_INPUT_SANDBOX_BYTES // 64

# Regular files and directories: no links, devices, FIFOs, or sparse files (whose size on
# disk is not the one their header announces).
_PLAIN_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of an s3://bucket/key URL."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket:
        raise BackendError(f"not an s3://bucket/key URL: {url!r}")
    return bucket, key


def default_bucket() -> str:
    """cloudkon-<account>-<region>: bucket names are global, so the account makes it ours."""
    with aws.aws_errors("finding the AWS account"):
        sts = aws.client("sts")
        return f"cloudkon-{sts.get_caller_identity()['Account']}-{sts.meta.region_name}"


def ensure_bucket(bucket: str, prefix: str, retention_days: int) -> None:
    """Create the staging bucket if needed, and expire what is under ``prefix`` after the retention."""
    s3 = aws.client("s3")
    try:
        with aws.aws_errors(f"creating bucket {bucket}"):
            region = s3.meta.region_name
            options = {} if region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": region}}
            s3.create_bucket(Bucket=bucket, **options)
        log.info("created bucket %s", bucket)
    except AlreadyExists:
        pass
    rule = {"ID": f"cloudkon-expire-{prefix}"[:255], "Filter": {"Prefix": f"{prefix}/"},
            "Status": "Enabled", "Expiration": {"Days": retention_days},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}
    try:  # keep the bucket's other rules (another prefix's, the owner's own)
        with aws.aws_errors(f"creating bucket {bucket}"):
            rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ResourceNotFound:  # no lifecycle configuration yet
        rules = []
    rules = [r for r in rules if r.get("ID") != rule["ID"]] + [rule]
    with aws.aws_errors(f"creating bucket {bucket}"):
        s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})


def remove_staging(bucket: str, prefix: str) -> None:
    """Delete the job files under ``prefix``, then the bucket if nothing else is in it (cleanup)."""
    s3 = aws.client("s3")
    try:
        with aws.aws_errors(f"removing job files from bucket {bucket}"):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            if s3.list_objects_v2(Bucket=bucket, MaxKeys=1).get("KeyCount", 0):
                log.info("bucket %s keeps files outside %s/: not deleted", bucket, prefix)
                return
            s3.delete_bucket(Bucket=bucket)
        log.info("deleted bucket %s", bucket)
    except ResourceNotFound:  # no such bucket: nothing to remove
        pass


class InputUploader:
    """The client's side: each distinct input archive of one job uploaded once."""

    def __init__(self, staging: str, job: str) -> None:
        self.s3 = aws.client("s3")
        self.base = f"{staging.rstrip('/')}/{job}"
        self._uploaded: dict[str, str] = {}  # archive digest -> URL

    def upload(self, spec: JobSpec) -> str:
        """The s3:// URL of an archive of the spec's inputs and prologue scripts."""
        with tempfile.TemporaryDirectory(prefix="cloudkon-stage-") as scratch:
            archive = Path(scratch) / "in.tar.gz"
            size, digest = _archive([(Path(p).name, Path(p)) for p in sorted({*spec.inputs, *spec.prologue})],
                                    archive)
            if digest not in self._uploaded:
                url = f"{self.base}/in/{digest}.tar.gz"
                _upload(archive, url)
                self._uploaded[digest] = url
        return self._uploaded[digest]

    def output_url(self, task_id: int) -> str:
        return f"{self.base}/{task_id}/out.tar.gz"


def fetch_archive(url: str, root: Path) -> None:
    """Download an input archive and unpack it into the sandbox ``root``; BackendError if it is
    over the job's input limit, or holds anything but files and folders inside ``root``."""
    download = root / _DOWNLOAD_NAME
    _download(url, download, MAX_INPUT_ARCHIVE_BYTES)
    try:
        _unpack(download, root, url, MAX_INPUT_SANDBOX_BYTES)
    finally:
        download.unlink()


def fetch_object(url: str, root: Path, max_bytes: int) -> None:
    """Download one s3:// input into the sandbox, under its own name (BackendError if over ``max_bytes``)."""
    _download(url, root / PurePosixPath(split_url(url)[1]).name, max_bytes)


def store_outputs(root: Path, files: list[str], url: str) -> dict[str, Any]:
    """Archive the output files to ``url``: the artifact (url, size, sha256, files) of the result."""
    archive = root / _ARCHIVE_NAME  # inside the sandbox, which is removed afterwards
    size, digest = _archive([(name, root / name) for name in files], archive)
    _upload(archive, url)
    return {"url": url, "size": size, "sha256": digest, "files": files}


def fetch_outputs(artifact: dict[str, Any], target: Path) -> None:
    """Download a result's output archive, check its size and SHA-256, and unpack it as ``target``
    (a folder made afresh beside it, then put in its place: nothing is written through an old one)."""
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        download = fresh / _DOWNLOAD_NAME
        _download(artifact["url"], download)
        size, digest = download.stat().st_size, _sha256(download)
        if size != artifact["size"] or digest != artifact["sha256"]:
            raise BackendError(f"{artifact['url']}: the archive is not the one the task made "
                               f"({size} bytes; size or SHA-256 differs)")
        _unpack(download, fresh, artifact["url"])
        download.unlink()
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        fresh.rename(target)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def _download(url: str, path: Path, max_bytes: int | None = None) -> None:
    bucket, key = split_url(url)
    with aws.aws_errors(f"downloading {url}"):
        s3 = aws.client("s3")
        if max_bytes is not None:
            size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if size > max_bytes:
                raise BackendError(f"{url} is over {max_bytes:,} bytes ({size:,})")
        s3.download_file(bucket, key, str(path))


def _upload(path: Path, url: str) -> None:
    bucket, key = split_url(url)
    with aws.aws_errors(f"uploading {url}"):
        aws.client("s3").upload_file(str(path), bucket, key)


def _archive(members: list[tuple[str, Path]], archive: Path) -> tuple[int, str]:
    """Write a gzipped tar of ``members`` (name in the archive, file) to ``archive``, the same
    bytes for the same files (on disk, not in memory: sandboxes may be large); its size and SHA-256."""
    # Level 1: job files are often images and videos, compressed already.
    with open(archive, "wb") as out, \
            gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=1) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in members:
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return archive.stat().st_size, _sha256(archive)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(archive: Path, target: Path, source: str, max_bytes: int | None = None) -> None:
    """Unpack the gzipped tar ``archive`` (from ``source``) into ``target``, once every member's
    header is checked: BackendError, and nothing written, for a member that is not a plain file
    or folder inside ``target``, more than MAX_ARCHIVE_MEMBERS members, or files adding up to
    more than ``max_bytes``."""
    with tarfile.open(archive, "r:gz") as tar:
        total = 0
        for count, member in enumerate(tar, 1):  # one header at a time: a refused archive is not read whole
            if count > MAX_ARCHIVE_MEMBERS:
                raise BackendError(f"{source}: more than {MAX_ARCHIVE_MEMBERS:,} archive members")
            name = PurePosixPath(member.name)
            if member.type not in _PLAIN_TYPES or name.is_absolute() or ".." in name.parts or member.size < 0:
                raise BackendError(f"{source}: refusing archive member {member.name!r} "
                                   "(an archive holds files and folders, inside its own folder)")
            total += member.size
            if max_bytes is not None and total > max_bytes:
                raise BackendError(f"{source}: its files add up to more than the input limit of "
                                   f"{max_bytes:,} bytes (member {member.name!r} of {member.size:,})")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:  # Python before the extraction filters: the members were checked above
            tar.extractall(target)  # noqa: S202
