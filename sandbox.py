"""Sandboxes: how a job description runs, with its files staged in and out.

Owns the staged form of a job (what the client turns a JobSpec into, and what travels
as the task's command) and its run on a worker, local or remote:

  1. a fresh empty directory (removed afterwards, whatever happens);
  2. inputs in: local files hard-linked or copied (local backend), or one archive
     downloaded from S3 and unpacked (remote backend); URL inputs fetched here;
  3. the prologue scripts, in order (one failing fails the task, with its output);
  4. the executable with its arguments and environment, in the sandbox;
  5. outputs out: the files matching the output sandbox moved to a directory (local
     backend) or archived to one S3 key, overwritten if the task runs again (remote).
     The result's artifact says where they went (and, for S3, the archive's size and
     SHA-256, which the client checks).

Nothing outside the sandbox is written except the delivery.  s3staging.py does the
S3 side; tasks.run_bundle calls ``run_job`` for every command starting with ``{``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from jdl import JobSpec, is_url
from tasks import CANCELLED, is_success, run_process

# Largest URL input fetched (the same bound as local inputs, per file).
MAX_URL_INPUT_BYTES = 512 * 1024 * 1024
URL_TIMEOUT_SECONDS = 60.0
_MARK = "cloudkon_job"


def staged_command(spec: JobSpec, deliver: str, archive: str | None = None) -> str:
    """The task command for ``spec``: its files either local paths or one S3 ``archive``
    (of every input and prologue script), its outputs delivered to ``deliver`` (a
    directory, or an s3:// key)."""
    staged: dict[str, Any] = {
        _MARK: 1, "executable": spec.executable, "arguments": spec.arguments, "env": spec.env,
        "timeout": spec.timeout, "urls": spec.urls, "prologue": [Path(p).name for p in spec.prologue],
        "outputs": spec.outputs, "deliver": deliver}
    if archive is None:
        staged["files"] = sorted({*spec.inputs, *spec.prologue})
    else:
        staged["archive"] = archive
    return json.dumps(staged, separators=(",", ":"))


def run_job(command: str, timeout: float | None, output_cap: int,
            cancelled: threading.Event | None) -> tuple[int | None, str, int, str | None, dict | None]:
    """Run a staged job: ``(exit_code, output, elapsed_us, error, artifact)``."""
    start = time.perf_counter_ns()
    try:
        job = json.loads(command)
    except ValueError:
        job = None
    if not isinstance(job, dict) or job.get(_MARK) != 1:
        return None, "", 0, "a job description must be staged by client.py (-w or -j) first", None
    timeout = job.get("timeout") or timeout
    root = tempfile.mkdtemp(prefix="cloudkon-sandbox-")
    try:
        code, output, error, artifact = _run_in(Path(root), job, timeout, output_cap, cancelled)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        code, output, error, artifact = None, "", f"sandbox: {exc}", None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if cancelled is not None and cancelled.is_set() and not is_success(code, error):
        code, error = None, CANCELLED
    return code, output, (time.perf_counter_ns() - start) // 1000, error, artifact


def _run_in(root: Path, job: dict[str, Any], timeout: float | None, output_cap: int,
            cancelled: threading.Event | None) -> tuple[int | None, str, str | None, dict | None]:
    deadline = None if timeout is None else time.monotonic() + timeout
    _stage_in(root, job)
    env = {**os.environ, **job["env"]}
    # The worker's own Python first: a job's scripts find the packages the worker has.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log = []
    for script in job["prologue"]:
        code, output, error = run_process(["/bin/sh", f"./{script}"], _left(deadline), output_cap,
                                          cancelled, cwd=str(root), env=env)
        log.append(output)
        if not is_success(code, error):
            return code, "".join(log), error or f"prologue {script} failed (exit code {code})", None
    executable = job["executable"]
    local = root / executable
    if "/" not in executable and local.is_file():
        local.chmod(local.stat().st_mode | 0o111)
        executable = f"./{executable}"
    code, output, error = run_process([executable, *job["arguments"]], _left(deadline), output_cap,
                                      cancelled, cwd=str(root), env=env)
    log.append(output)
    if not is_success(code, error) or not job["outputs"]:
        return code, "".join(log), error, None
    files, missing = _outputs(root, job["outputs"])
    if missing:
        return None, "".join(log), f"output_sandbox: nothing matches {missing!r}", None
    return code, "".join(log), None, _deliver(root, files, job["deliver"])


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


def _stage_in(root: Path, job: dict[str, Any]) -> None:
    for path in job.get("files", []):
        target = root / Path(path).name
        try:
            os.link(path, target)  # the same file system: no copy
        except OSError:
            shutil.copy2(path, target)
    if job.get("archive"):
        from s3staging import fetch_archive  # boto3 is loaded in remote mode only
        fetch_archive(job["archive"], root)
    for url in job["urls"]:
        _fetch(url, root)


def _fetch(url: str, root: Path) -> None:
    if url.startswith("s3://"):
        from s3staging import fetch_object
        fetch_object(url, root)
        return
    name = Path(url.split("?", 1)[0]).name or "index.html"
    with urllib.request.urlopen(url, timeout=URL_TIMEOUT_SECONDS) as response, \
            open(root / name, "wb") as out:
        size = 0
        while chunk := response.read(1 << 20):
            size += len(chunk)
            if size > MAX_URL_INPUT_BYTES:
                raise ValueError(f"{url} is over {MAX_URL_INPUT_BYTES:,} bytes")
            out.write(chunk)


def _outputs(root: Path, patterns: list[str]) -> tuple[list[str], list[str]]:
    """The files matching the output sandbox (relative paths), and the patterns that match none."""
    files: list[str] = []
    missing = []
    for pattern in patterns:
        matched = sorted(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_file())
        if not matched:
            missing.append(pattern)
        files += [f for f in matched if f not in files]
    return files, missing


def _deliver(root: Path, files: list[str], deliver: str) -> dict[str, Any]:
    if is_url(deliver):
        from s3staging import store_outputs
        return store_outputs(root, files, deliver)
    target = Path(deliver)
    if target.exists():  # a task run again replaces what an earlier run left
        shutil.rmtree(target)
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root / name), target / name)
    target.mkdir(parents=True, exist_ok=True)
    return {"dir": str(target), "files": files}
