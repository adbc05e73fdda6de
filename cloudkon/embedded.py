"""The scheduler a client starts for itself when it is given none (no ``-s``).

Owns starting that scheduler as a child process (``python -m cloudkon.scheduler``, on a
free loopback port, with a secret of its own and ``--exit-with-parent``), waiting a
bounded time for it to say where it listens, and stopping it: first SIGTERM (finish
what is in flight), then SIGKILL.  Not which options it gets (client.py), nor the
scheduler itself.
"""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cloudkon.connection import parse_address
from cloudkon.errors import CloudKonError

# Long enough for a slow first start (imports, with --remote AWS queues and tables made);
# short enough that a scheduler stuck before listening is reported, not waited on forever.
EMBEDDED_START_TIMEOUT_SECONDS = 60.0
# How long each of the two SIGTERMs gets before the next step.
STOP_WAIT_SECONDS = 5.0
_LISTENING = "listening on "


@contextmanager
def embedded_scheduler(options: list[str]) -> Iterator[tuple[str, int, str]]:
    """A scheduler process of our own on a free loopback port, with ``options``: (host, port, token).

    CloudKonError if it does not say where it listens within EMBEDDED_START_TIMEOUT_SECONDS;
    the process is stopped and reaped on the way out, whatever happened.
    """
    token = secrets.token_hex(16)
    command = [sys.executable, "-m", "cloudkon.scheduler", "--port", "0",
               "--no-state", "--quiet", "--exit-with-parent", str(os.getpid()), *options]
    # This package is importable there as here, installed or run from a checkout.
    package_home = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, [package_home, os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "CLOUDKON_TOKEN": token, "PYTHONPATH": python_path})
    try:
        host, port = _listening_address(proc, time.monotonic() + EMBEDDED_START_TIMEOUT_SECONDS)
        yield host, port, token
    finally:
        _stop_process(proc)
        proc.stdout.close()  # type: ignore[union-attr]


def _listening_address(proc: subprocess.Popen, deadline: float) -> tuple[str, int]:
    """The address in the scheduler's first line of output, read by ``deadline``."""
    line = _first_line(proc.stdout.fileno(), deadline)  # type: ignore[union-attr]
    if line is None:
        raise CloudKonError(f"embedded scheduler did not start within {EMBEDDED_START_TIMEOUT_SECONDS:.0f} s")
    if not line.startswith(_LISTENING):
        try:  # it said something else, or nothing: it is (most likely) on its way out
            code = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise CloudKonError(f"embedded scheduler did not start within "
                                f"{EMBEDDED_START_TIMEOUT_SECONDS:.0f} s") from None
        raise CloudKonError(f"embedded scheduler did not start (exit code {code})")
    return parse_address(line.removeprefix(_LISTENING))


def _first_line(fd: int, deadline: float) -> str | None:
    """The first line written to the pipe ``fd`` (without its end; all there is at end of file),
    None if it is not complete by ``deadline``.  Raw reads: a buffered readline cannot be
    given a deadline."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace").strip()


def _stop_process(proc: subprocess.Popen) -> None:
    # First signal: finish what is in flight; second: stop now.
    for _ in range(2):
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_WAIT_SECONDS)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()
