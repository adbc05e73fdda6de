"""Sandboxes: how a job description runs, with its files staged in and out.

Owns the staged form of a job (what the client turns a JobSpec into, and what travels
as the task's command) and its run on a worker, local or remote:

  1. a fresh empty directory in the temporary folder ($TMPDIR), named after the host and
     process (removed afterwards, whatever happens; one left by a process that was killed
     is removed by the next process of the host to make a sandbox);
  2. inputs in: local files copied (local backend: never linked, so a job cannot
     change the user's files), or one archive
     downloaded from S3 and unpacked (remote backend); URL inputs fetched here;
  3. the prologue scripts, in order (one failing fails the task, with its output);
  4. the executable with its arguments and environment, in the sandbox;
  5. outputs out: the regular files matching the output sandbox (never a symbolic
     link, nothing outside the sandbox) moved to a directory (local backend) or
     archived to one S3 key, overwritten if the task runs again (remote).
     The result's artifact says where they went (and, for S3, the archive's size and
     SHA-256, which the client checks).

Nothing outside the sandbox is written except the delivery.  s3staging.py does the
S3 side; runner.run_bundle calls ``run_job`` for every job description (``{"...``).  Each
step runs as a process of processes.py (deadline, output cap, cancel).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cloudkon.jdl import JobSpec, is_url, url_name
from cloudkon.processes import cancel_overrides, run_process, timeout_error
from cloudkon.tasks import is_success

# Largest URL input fetched (the same bound as local inputs, per file).
MAX_URL_INPUT_BYTES = 512 * 1024 * 1024
URL_TIMEOUT_SECONDS = 60.0
_MARK = "cloudkon_job"
_SANDBOX_PREFIX = "cloudkon-sandbox-"


def staged_command(spec: JobSpec, deliver: str, archive: str | None = None) -> str:
    """The task command for ``spec``: its files either local paths or one S3 ``archive``
    (of every input and prologue script), its outputs delivered to ``deliver`` (a
    directory, or an s3:// key)."""
    staged: dict[str, Any] = {
        _MARK: 1, "executable": spec.executable, "arguments": spec.arguments, "env": spec.env,
        "timeout": spec.timeout, "urls": spec.urls, "prologue": [Path(p).name for p in spec.prologue],
        "outputs": spec.outputs, "deliver": deliver}
    if archive is None:
        staged["files"] = sorted({(Path(path).name, path) for path in (*spec.inputs, *spec.prologue)})
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
    root = _new_sandbox()
    try:
        code, output, error, artifact = _run_in(root, job, timeout, output_cap, cancelled)
    except _TimedOut:
        code, output, error, artifact = None, "", timeout_error(timeout), None
    except Exception as exc:  # whatever the job or its staging did, the task fails, the worker lives
        code, output, error, artifact = None, "", f"sandbox: {type(exc).__name__}: {exc}", None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    code, error = cancel_overrides(code, error, cancelled)
    return code, output, (time.perf_counter_ns() - start) // 1000, error, artifact


def _run_in(root: Path, job: dict[str, Any], timeout: float | None, output_cap: int,
            cancelled: threading.Event | None) -> tuple[int | None, str, str | None, dict | None]:
    deadline = None if timeout is None else time.monotonic() + timeout
    _stage_in(root, job, deadline, cancelled)
    env = {**os.environ, **job["env"]}
    # The worker's own Python first: a job's scripts find the packages the worker has.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log = []
    for script in job["prologue"]:
        code, output, error = run_process(["/bin/sh", f"./{script}"], _left(deadline), output_cap,
                                          cancelled, cwd=str(root), env=env)
        log.append(output)
        if not is_success(code, error):
            failure = _reason(error, timeout) or f"prologue {script} failed (exit code {code})"
            return code, "".join(log), failure, None
    argv = [job["executable"], *job["arguments"]]
    local = root / job["executable"]
    if "/" not in job["executable"] and local.is_file():
        local.chmod(local.stat().st_mode | 0o111)
        argv[0] = f"./{job['executable']}"
        with open(local, "rb") as f:
            head = f.read(4)
        if not head.startswith(b"#!") and head != b"\x7fELF":  # as a shell would: no #!, run by sh
            argv.insert(0, "/bin/sh")
    code, output, error = run_process(argv, _left(deadline), output_cap, cancelled, cwd=str(root), env=env)
    log.append(output)
    if not is_success(code, error) or not job["outputs"]:
        return code, "".join(log), _reason(error, timeout), None
    files, missing = _outputs(root, job["outputs"])
    if missing:
        return code, "".join(log), f"output_sandbox: nothing matches {missing!r}", None  # it exited 0
    return code, "".join(log), None, _deliver(root, files, job["deliver"])


def _new_sandbox() -> Path:
    """A fresh empty directory, named ``cloudkon-sandbox-HOST-PID-*`` so that one whose process
    was killed (SIGKILL leaves no chance to remove it) is known for what it is."""
    _remove_stale_sandboxes()
    return Path(tempfile.mkdtemp(prefix=f"{_SANDBOX_PREFIX}{socket.gethostname()}-{os.getpid()}-"))


@functools.cache  # once per process: the processes that died before it started
def _remove_stale_sandboxes() -> None:
    """Remove the sandboxes this user's processes on this host left when they died.

    The host in the name keeps apart processes that share the folder but not the process ids
    (containers); a process id in use again keeps its old sandbox, which errs on the safe side.
    """
    mine = f"{_SANDBOX_PREFIX}{socket.gethostname()}-"
    for path in Path(tempfile.gettempdir()).glob(f"{glob.escape(mine)}*"):
        pid, _, suffix = path.name[len(mine):].partition("-")  # PID-<mkdtemp's letters, no dash>
        try:
            if pid.isdigit() and suffix and "-" not in suffix and not _running(int(pid)) \
                    and path.lstat().st_uid == os.getuid():
                shutil.rmtree(path)  # which refuses a symbolic link
        except OSError:  # removed meanwhile by another process of the host, or not a folder of ours
            pass


def _running(pid: int) -> bool:
    """False if no process ``pid`` exists, or it is a zombie (killed, its parent yet to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:  # no /proc (not Linux), or gone just now: keep its sandbox, to be safe
        return True


class _TimedOut(Exception):
    """The job's time ran out while its inputs were being fetched."""


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


def _reason(error: str | None, timeout: float | None) -> str | None:
    """``error``, naming the job's whole timeout rather than the part of it left for one step."""
    if error is not None and error.startswith("timed out") and timeout is not None:
        return timeout_error(timeout)
    return error


def _stage_in(root: Path, job: dict[str, Any], deadline: float | None,
              cancelled: threading.Event | None) -> None:
    for name, path in job.get("files", []):
        shutil.copyfile(path, root / name)  # a copy: what the job writes never reaches the user's file
        shutil.copymode(path, root / name)
    if job.get("archive"):
        from cloudkon.s3staging import fetch_archive  # boto3 is loaded in remote mode only
        fetch_archive(job["archive"], root)
    for url in job["urls"]:
        _fetch(url, root, deadline, cancelled)


def _fetch(url: str, root: Path, deadline: float | None, cancelled: threading.Event | None) -> None:
    if url.startswith("s3://"):
        from cloudkon.s3staging import fetch_object
        fetch_object(url, root, MAX_URL_INPUT_BYTES)
        return
    # Here, not at the top: every worker process (and the local scheduler) loads this module
    # through runner.py, few tasks fetch a URL, and urllib.request (http.client, email) takes
    # tens of milliseconds to import.
    import urllib.request

    name = url_name(url)
    timeout = URL_TIMEOUT_SECONDS if deadline is None else min(URL_TIMEOUT_SECONDS, _left(deadline))
    with urllib.request.urlopen(url, timeout=timeout) as response, open(root / name, "wb") as out:
        expected = response.headers.get("Content-Length")
        size = 0
        while chunk := response.read(1 << 16):
            if cancelled is not None and cancelled.is_set():
                raise ValueError("cancelled while fetching inputs")
            if deadline is not None and time.monotonic() > deadline:
                raise _TimedOut
            size += len(chunk)
            if size > MAX_URL_INPUT_BYTES:
                raise ValueError(f"{url} is over {MAX_URL_INPUT_BYTES:,} bytes")
            out.write(chunk)
    if expected is not None and expected.isdigit() and size != int(expected):
        raise ValueError(f"{url}: {size} bytes arrived of the {expected} announced")


def _outputs(root: Path, patterns: list[str]) -> tuple[list[str], list[str]]:
    """The files matching the output sandbox (relative paths), and the patterns that match none.

    Only regular files inside the sandbox count: a symbolic link (to a file or through a
    directory) could make the framework move or upload something outside it.
    """
    inside = root.resolve()
    found: dict[str, None] = {}
    missing = []
    for pattern in patterns:
        matched = sorted(str(p.relative_to(root)) for p in root.glob(pattern)
                         if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(inside))
        if not matched:
            missing.append(pattern)
        found.update(dict.fromkeys(matched))
    return list(found), missing


def _deliver(root: Path, files: list[str], deliver: str) -> dict[str, Any]:
    if is_url(deliver):
        from cloudkon.s3staging import store_outputs
        return store_outputs(root, files, deliver)
    target = Path(deliver)
    if target.exists():  # a task run again replaces what an earlier run left
        shutil.rmtree(target)
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root / name), target / name)
    target.mkdir(parents=True, exist_ok=True)
    return {"dir": str(target), "files": files}
