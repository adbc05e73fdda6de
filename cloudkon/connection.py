"""The client's connection to a scheduler, over the TCP protocol of protocol.py.

Owns the requests a client makes: the hello (with the scheduler's secret), submitting a
job's tasks and reading its results as they stream back, the one-shot requests
(``cancel_job``, ``list_jobs``, ``fetch_job``), submitting and waiting for the
scheduler's call back (``run_with_callback``) and reading ``HOST:PORT``.  Not the
command line (client.py), not what the results become (results.py).
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
import sys
from collections.abc import Callable
from typing import Any

from cloudkon import protocol
from cloudkon.errors import ConfigError, MalformedMessage, ProtocolError
from cloudkon.jobfiles import JobFiles
from cloudkon.results import Results

log = logging.getLogger("cloudkon.client")

CONNECT_TIMEOUT_SECONDS = 10.0


class SchedulerConnection:
    """A connection to a scheduler, past the hello."""

    def __init__(self, host: str, port: int, token: str | None) -> None:
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello: dict[str, Any] = {"type": "hello", "version": protocol.PROTOCOL_VERSION}
        if token:
            hello["token"] = token
        self.send(hello)
        self.welcome = self.expect("welcome")

    def send(self, message: dict[str, Any]) -> None:
        protocol.send(self.sock, message)

    def receive(self) -> dict[str, Any]:
        return protocol.receive(self.sock)

    def expect(self, kind: str) -> dict[str, Any]:
        return protocol.raise_if_error(self.receive(), kind)

    def close(self) -> None:
        self.sock.close()

    def submit(self, tasks: list[str], timeout: float | None = None, stream: bool = True,
               callback: dict[str, Any] | None = None,
               prepare: Callable[[str], list[str]] | None = None) -> str:
        """Send a job's tasks; its id.  With ``stream``, results follow on this connection.

        ``prepare(job)``, if given, turns the tasks into what is sent once the job's id is
        known (staging the files of job descriptions).
        """
        job = self.open_job(timeout, stream, callback)
        if prepare is not None:
            tasks = prepare(job)
        for message in protocol.task_messages(job, tasks):
            self.send(message)
        self.send({"type": "job_close", "job": job, "count": len(tasks)})
        return job

    def open_job(self, timeout: float | None = None, stream: bool = True,
                 callback: dict[str, Any] | None = None) -> str:
        """Open a job (its tasks are sent next, by submit or, streamed, workloads.TaskSender); its id."""
        opening: dict[str, Any] = {"type": "job_open", "stream": stream}
        if timeout is not None:
            opening["timeout"] = timeout
        if callback is not None:
            opening["callback"] = callback
        self.send(opening)
        return self.expect("job_opened")["job"]

    def collect(self, job: str, results: Results,
                on_progress: Callable[[Results], None] | None = None,
                on_tasks: Callable[[list[str]], None] | None = None,
                wake: socket.socket | None = None, on_wake: Callable[[], None] | None = None) -> None:
        """Read this job's results (and tasks, for a fetch) until the scheduler says it is done.

        With ``wake`` and ``on_wake``, each message is waited for together with ``wake``
        becoming readable, which calls ``on_wake`` (it must read ``wake``): so a Ctrl-C is
        acted on between messages, never with a frame half read.
        """
        while True:
            if wake is not None and on_wake is not None and not self._wait(wake):
                on_wake()
                continue
            message = self.receive()
            kind = message["type"]
            if kind == "results":
                results.add(protocol.results_from_message(message))
                if on_progress is not None:
                    on_progress(results)
            elif kind == "tasks" and on_tasks is not None:
                on_tasks(message["tasks"])
            elif kind == "job_done":
                if not results.complete:
                    raise MalformedMessage(f"job {job} done with {results.received} of "
                                           f"{results.total} results")
                results.cost = message.get("cost")
                return
            elif kind != "job_accepted":
                protocol.raise_if_error(message, "results")

    def _wait(self, wake: socket.socket) -> bool:
        """Block until a message starts to arrive (True) or ``wake`` is readable (False)."""
        ready, _, _ = select.select([self.sock, wake], [], [])
        return wake not in ready


def request(host: str, port: int, token: str | None, message: dict[str, Any], answer: str) -> dict[str, Any]:
    """Send one request on a connection of its own; the answer of type ``answer``."""
    conn = SchedulerConnection(host, port, token)
    try:
        conn.send(message)
        return conn.expect(answer)
    finally:
        conn.close()


def cancel_job(host: str, port: int, token: str | None, job: str) -> dict[str, Any]:
    """Cancel a job: the scheduler's ``cancelled`` answer (``count``: tasks stopped; ``state``)."""
    return request(host, port, token, {"type": "cancel", "job": job}, "cancelled")


def list_jobs(host: str, port: int, token: str | None) -> dict[str, Any]:
    """The ``jobs`` answer: the jobs a scheduler holds, with their task counts by state (and, remote,
    their cost), and a remote scheduler's ``fleet`` figures."""
    return request(host, port, token, {"type": "list_jobs"}, "jobs")


def fetch_job(host: str, port: int, token: str | None, job: str,
              commands: bool = False) -> tuple[list[str], Results]:
    """A job's tasks (if ``commands``) and all its results, once it is finished."""
    conn = SchedulerConnection(host, port, token)
    try:
        conn.send({"type": "fetch", "job": job, "commands": commands})
        results = Results(conn.expect("job_accepted")["count"])
        tasks: list[str] = []
        conn.collect(job, results, on_tasks=tasks.extend)
        if commands and len(tasks) != results.total:
            raise MalformedMessage(f"job {job}: {len(tasks)} tasks sent for {results.total}")
        return tasks, results
    finally:
        conn.close()


def get_task_result(host: str, port: int, token: str | None, job: str) -> Results:
    """All results of a job (the cursor ``job``), waiting for it to finish if needed."""
    return fetch_job(host, port, token, job)[1]


def run_with_callback(host: str, port: int, token: str | None, tasks: list[str],
                      listen_port: int, timeout: float | None, files: JobFiles,
                      announce: bool = True) -> Results:
    """Submit, hang up, wait for the scheduler to call back at ``listen_port``, then fetch;
    ``announce`` the job's id on stderr."""
    conn = SchedulerConnection(host, port, token)
    nonce = secrets.token_hex(16)
    with socket.create_server((conn.sock.getsockname()[0], listen_port)) as listener:
        callback = {"port": listener.getsockname()[1], "nonce": nonce}
        try:
            job = conn.submit(tasks, timeout, stream=False, callback=callback,
                              prepare=files.preparer(tasks, conn.welcome.get("staging")))
            conn.expect("job_accepted")
        finally:
            conn.close()
        if announce:
            print(f"client.py: job {job} (its results again: --cursor {job}); waiting for the scheduler "
                  f"to call back on port {callback['port']}", file=sys.stderr)
        while True:
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(CONNECT_TIMEOUT_SECONDS)
                try:
                    ready = protocol.raise_if_error(protocol.receive(peer), "ready")
                except (ProtocolError, OSError) as exc:
                    log.warning("ignoring a bad call on the listening port: %s", exc)
                    continue
            if ready["job"] == job and secrets.compare_digest(ready["nonce"], nonce):
                break
    return get_task_result(host, port, token, job)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets or not) as (host, port); ConfigError if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)
