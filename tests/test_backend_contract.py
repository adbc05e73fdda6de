"""The Backend contract (cloudkon/backend.py), one suite run against every backend.

What the scheduler may count on, whatever runs the tasks: LocalBackend with real worker
processes, and SQSBackend on the AWS emulator with real ``worker.py`` processes.  Each test
is run once per backend (the ``subject`` fixture); where the two differ by design, the test
says so through what the subject declares of itself, never by a hidden branch: whether wake()
cuts a receive short (SQSBackend keeps Backend's default, its long poll runs its course) and
whether close stops the workers (remote workers belong to the fleet, not to one scheduler), and
whether it lists its workers (a remote backend lists a fleet's instances: workers started by hand, as
here, register nowhere; tests/test_metrics.py checks a fleet's).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import boto3
import pytest
from botocore.exceptions import ClientError
from conftest import processes_mentioning, wait_until

from cloudkon.backend import Backend
from cloudkon.localworkers import LocalBackend
from cloudkon.sqsbackend import SQSBackend
from cloudkon.tasks import Bundle, ResultBatch

# Tasks each backend runs at once: two local worker processes, or one worker.py with two threads.
SLOTS = 2
# The shortest lease worker.py takes (--visibility-timeout): a killed worker's bundle runs again soon.
VISIBILITY_SECONDS = 3
# What a loaded two-core machine may add to "at once" or "soon".
SLACK_SECONDS = 1.5


@dataclass
class Subject:
    """A backend under test, and what the test must know of it that the interface leaves open."""

    backend: Backend
    add_worker: Callable[[], None]  # one more worker, to take over from a killed one (if needed)
    released: Callable[[], bool]  # whether close gave back what the backend held
    wake_interrupts: bool  # wake() cuts a receive short (by default it returns within its timeout)
    close_stops_workers: bool  # close stops the workers (remote ones belong to the fleet, not to it)
    lists_workers: bool  # worker_states lists these workers (remote: only a fleet's instances)


def _local_subject() -> Subject:
    backend = LocalBackend(SLOTS)

    def released() -> bool:
        return not any(slot.process.is_alive() for slot in backend._slots)

    def replaces_its_dead_workers() -> None:
        return None

    return Subject(backend, replaces_its_dead_workers, released, wake_interrupts=True,
                   close_stops_workers=True, lists_workers=True)


def _sqs_subject(remote, monkeypatch) -> Subject:
    for name, value in remote.env.items():  # boto3 in this process reaches the emulator
        monkeypatch.setenv(name, value)

    def add_worker(threads: int = 1) -> None:
        remote.worker("-t", str(threads), "--visibility-timeout", str(VISIBILITY_SECONDS))

    backend = SQSBackend(request_queue=remote.request_queue, claim_table=remote.table,
                         control_topic=remote.topic, visibility_timeout=VISIBILITY_SECONDS)
    # Only now: a worker and a backend that both find the request queue missing both create it,
    # and the one that comes second fails (QueueAlreadyExists, from aws.ensure_request_queue).
    add_worker(SLOTS)
    sqs = boto3.client("sqs")

    def released() -> bool:
        try:
            sqs.get_queue_url(QueueName=backend.response_queue)
        except ClientError:
            return True
        return False

    return Subject(backend, add_worker, released, wake_interrupts=False, close_stops_workers=False,
                   lists_workers=False)


@pytest.fixture(params=["local", "sqs"])
def subject(request, monkeypatch):
    made = _local_subject() if request.param == "local" else _sqs_subject(
        request.getfixturevalue("remote"), monkeypatch)
    yield made
    made.backend.close(wait=False)  # again, if the test closed it: harmless


def _receive_until(backend: Backend, done: Callable[[list[ResultBatch]], bool],
                   timeout: float = 20) -> list[ResultBatch]:
    """Every batch received until ``done(batches so far)``; AssertionError after ``timeout``."""
    batches: list[ResultBatch] = []
    deadline = time.monotonic() + timeout
    while not done(batches):
        assert time.monotonic() < deadline, f"not done in {timeout} s: {batches}"
        batches += backend.receive(1.0)
    return batches


def _first_results(batches: list[ResultBatch]) -> dict[tuple[str, int], tuple]:
    """(job, task id) -> (bundle, exit code, output, error) of the first result of each task: a
    remote backend may deliver one twice, and the caller keeps the first."""
    first: dict[tuple[str, int], tuple] = {}
    for batch in batches:
        for row in zip(batch.ids, batch.exit_codes, batch.outputs, batch.errors, strict=True):
            first.setdefault((batch.job, row[0]), (batch.bundle, *row[1:]))
    return first


def _has_results(*keys: tuple[str, int]) -> Callable[[list[ResultBatch]], bool]:
    return lambda batches: set(keys) <= set(_first_results(batches))


def _collect(backend: Backend, bundles: list[Bundle], timeout: float = 30) -> list[ResultBatch]:
    """Receive until every task of ``bundles`` (submitted) has a result; tasks a bundle hands
    back go out again in a bundle of their own, as the dispatcher sends them.  Checks on the way
    that a batch speaks only of tasks its bundle holds."""
    held = {(bundle.job, bundle.bundle): bundle for bundle in bundles}
    commands = {(bundle.job, task): command for bundle in bundles
                for task, command in zip(bundle.ids, bundle.commands, strict=True)}
    number = max(bundle.bundle for bundle in bundles)
    pending, batches = set(commands), []
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"no result in {timeout} s for {sorted(pending)}"
        for batch in backend.receive(1.0):
            bundle = held[(batch.job, batch.bundle)]
            assert set(batch.ids) | set(batch.returned) <= set(bundle.ids), "tasks of another bundle"
            batches.append(batch)
            pending -= {(batch.job, i) for i in batch.ids}
            back = [i for i in batch.returned if (batch.job, i) in pending]
            if back:
                number += 1
                again = Bundle(batch.job, number, back, [commands[batch.job, i] for i in back],
                               bundle.timeout)
                held[(again.job, again.bundle)] = again
                backend.submit(again)
    return batches


def _pid_running(marker: str) -> int:
    """The pid of the one process whose command line holds ``marker`` (a task's shell)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read() and int(pid) != os.getpid():
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process runs {marker!r}")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# --- submit and receive ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_every_task_of_every_bundle_gets_a_result_carrying_its_bundle_number(subject):
    backend = subject.backend
    busy = [Bundle("busy", n, [n], ["sleep 1000"]) for n in range(SLOTS)]  # every slot busy for a second
    bundles = [Bundle("job-a", n, [3 * n, 3 * n + 1, 3 * n + 2], [f"echo a{3 * n + k}" for k in range(3)])
               for n in range(SLOTS, SLOTS + 8)]
    bundles.append(Bundle("job-b", SLOTS + 8, [0], ["printf 'b\\n0'"]))
    started = time.monotonic()
    for bundle in busy + bundles:
        backend.submit(bundle)
    assert time.monotonic() - started < SLACK_SECONDS, "submit waited for a worker"
    batches = _collect(backend, busy + bundles)
    first = _first_results(batches)
    job_a = range(3 * SLOTS, 3 * SLOTS + 24)
    assert set(first) == {("busy", n) for n in range(SLOTS)} | {("job-a", i) for i in job_a} | {("job-b", 0)}
    assert all(first["job-a", i][1:] == (0, f"a{i}\n", None) for i in job_a)
    assert first["job-b", 0] == (SLOTS + 8, 0, "b\n0", None)
    # Results carry the number of the bundle that held the task (the first one sent, here: no
    # hand-back without a time box, unless a local worker idled and took the tail of another).
    resent = {i for batch in batches if batch.job == "job-a" for i in batch.returned}
    assert all(first["job-a", i][0] == i // 3 for i in job_a if i not in resent)
    assert all(batch.worker for batch in batches if batch.ids), "each result names where it ran"
    # What the backend says of itself: how many tasks run at once (remote workers are counted as
    # they subscribe, again while results are due), how many bundles to keep out, and its name.
    wait_until(lambda: backend.receive(0.5) == [] and backend.workers() == SLOTS, timeout=20)
    assert backend.capacity() >= backend.workers()
    assert backend.describe().startswith(f"{backend.name} backend") and "\n" not in backend.describe()
    assert backend.target_bundle_seconds > 0 and backend.time_box_margin >= 0


@pytest.mark.timeout(60)
def test_worker_states_say_what_each_worker_holds_and_when_it_was_last_heard_of(subject):
    backend = subject.backend
    bundle = Bundle("listed", 0, [0], ["sleep 1.5"])
    backend.submit(bundle)
    received: list[ResultBatch] = []

    def holding() -> bool:
        received.extend(backend.receive(0.2))
        return any(worker["state"] == "busy" and worker["running"] == ["job listed bundle 0 (1 task)"]
                   for worker in backend.worker_states())
    if subject.lists_workers:
        wait_until(holding, timeout=10)
    batches = received + _collect(backend, [bundle])
    states = backend.worker_states()
    assert all(set(worker) == {"id", "kind", "state", "running", "last_heartbeat"} for worker in states)
    if not subject.lists_workers:
        assert states == []
        return
    assert len(states) == SLOTS
    assert {batch.worker for batch in batches if batch.ids} <= {worker["id"] for worker in states}
    assert all(w["kind"] == "process" and w["state"] == "idle" and w["running"] == [] for w in states)
    # A sign of life of this test's (the idle one's: its start), not an old one.
    assert all(time.time() - 10 * SLACK_SECONDS < w["last_heartbeat"] <= time.time() for w in states)


@pytest.mark.timeout(60)
def test_a_failing_task_is_a_result_with_its_exit_code_output_and_error(subject, tmp_path):
    backend = subject.backend
    backend.submit(Bundle("failing", 0, [0, 1, 2], ["echo out; echo err >&2; exit 3",
                                                    "cloudkon-no-such-program", "exit 0"]))
    backend.submit(Bundle("failing", 1, [3], [f"sleep 5; echo {tmp_path}"], timeout=0.5))
    first = _first_results(_receive_until(backend, _has_results(*[("failing", i) for i in range(4)])))
    assert first["failing", 0] == (0, 3, "out\nerr\n", None)
    assert first["failing", 1][1] == 127 and "not found" in first["failing", 1][2]
    assert first["failing", 2] == (0, 0, "", None)
    assert first["failing", 3][1:] == (None, "", "timed out after 0.5 s")
    assert not processes_mentioning(str(tmp_path)), "a task that timed out is stopped"
    # The worker goes on: a failing task fails its own result, not the worker.
    backend.submit(Bundle("failing", 2, [4], ["echo after"]))
    first = _first_results(_receive_until(backend, _has_results(("failing", 4))))
    assert first["failing", 4] == (2, 0, "after\n", None)


@pytest.mark.timeout(30)
def test_receive_returns_within_its_timeout_and_wake_ends_it_sooner(subject):
    backend = subject.backend
    for timeout in (0.0, 0.3, 1.0):  # nothing out: an empty list, within the timeout
        started = time.monotonic()
        assert backend.receive(timeout) == []
        assert time.monotonic() - started < timeout + SLACK_SECONDS
    # wake() from another thread: a backend that implements it returns at once, any other within
    # its timeout (Backend.wake); a long timeout only where wake cuts it short, to keep this quick.
    timeout = 3.0 if subject.wake_interrupts else 1.0
    took: list[float] = []

    def receive() -> None:
        started = time.monotonic()
        assert backend.receive(timeout) == []
        took.append(time.monotonic() - started)

    receiver = threading.Thread(target=receive)
    receiver.start()
    time.sleep(0.2)
    backend.wake()
    receiver.join(timeout + SLACK_SECONDS)
    assert took, "receive did not return within its timeout"
    assert took[0] < (0.2 + SLACK_SECONDS if subject.wake_interrupts else timeout + SLACK_SECONDS)


@pytest.mark.timeout(60)
def test_a_receive_waiting_idle_receive_seconds_returns_as_soon_as_a_result_arrives(subject):
    backend = subject.backend
    assert backend.idle_receive_seconds > 0
    warm = Bundle("warm", 0, [0], ["true"])
    backend.submit(warm)
    _collect(backend, [warm])  # the workers are up
    backend.submit(Bundle("warm", 1, [1], ["echo now"]))
    started = time.monotonic()
    batches: list[ResultBatch] = []
    while not batches:  # a local backend may return early with nothing; it must not wait it out
        batches = backend.receive(backend.idle_receive_seconds)
    waited = time.monotonic() - started
    assert _first_results(batches)["warm", 1] == (1, 0, "now\n", None)
    assert waited < min(backend.idle_receive_seconds, SLACK_SECONDS + 1), waited


# --- time boxes, cancel, dead workers --------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_time_boxed_bundle_hands_back_the_tasks_it_has_not_started_at_once(subject):
    backend = subject.backend
    # Half a second of box, a first task of one and a half: the rest goes back while it runs.
    backend.submit(Bundle("boxed", 7, [0, 1, 2, 3], ["sleep 1500", "echo 1", "echo 2", "echo 3"], None, 0.5))
    batches = _receive_until(backend, _has_results(("boxed", 0)))
    handed_back = [batch for batch in batches if batch.returned]
    # Said at once, and (local worker or remote) said again with the bundle's last results, so that
    # a hand-back lost on the way loses nothing: the caller takes back only tasks a bundle still holds.
    assert handed_back and all(sorted(batch.returned) == [1, 2, 3] for batch in handed_back)
    assert {batch.bundle for batch in handed_back} == {7}
    assert set(_first_results(batches)) == {("boxed", 0)}, "a task handed back does not run"
    assert _first_results(batches)["boxed", 0] == (7, 0, "", None)
    assert batches.index(handed_back[0]) < max(i for i, batch in enumerate(batches) if batch.ids), \
        "handed back before the task in hand ends, not after"


@pytest.mark.timeout(60)
def test_cancel_drops_a_jobs_queued_bundles_stops_its_running_ones_and_spares_other_jobs(subject, tmp_path):
    backend = subject.backend
    marker = f"{tmp_path}/doomed"  # in the command line of every doomed task, and no other

    def doomed_task(task: int) -> str:
        return f"touch {marker}-{task}; sleep 30; touch {marker}-{task}-end"

    doomed = [Bundle("doomed", n, [2 * n, 2 * n + 1], [doomed_task(2 * n), doomed_task(2 * n + 1)])
              for n in range(SLOTS + 2)]
    for bundle in doomed:
        backend.submit(bundle)
    wait_until(lambda: backend.receive(0.2) == [] and len(list(tmp_path.iterdir())) == SLOTS, timeout=30)
    started = {path.name for path in tmp_path.iterdir()}  # the first task of each bundle running
    canceller = threading.Thread(target=backend.cancel, args=("doomed",))  # any thread may cancel
    canceller.start()
    canceller.join(10)
    backend.submit(Bundle("spared", SLOTS + 2, [0], ["echo spared"]))
    # The slots were all busy with 30 s tasks: the other job's result comes only once they stop.
    batches = _receive_until(backend, _has_results(("spared", 0)), timeout=15)
    assert _first_results(batches)["spared", 0][1:] == (0, "spared\n", None)
    wait_until(lambda: not processes_mentioning(marker), timeout=10)
    backend.receive(0.5)  # what may still come of the doomed job: its caller drops it
    ran = {path.name for path in tmp_path.iterdir()}
    assert not any(name.endswith("-end") for name in ran), "a task of the cancelled job ran on"
    assert ran == started, "a task of the cancelled job started after the cancel"


@pytest.mark.timeout(60)
def test_a_task_whose_worker_dies_runs_again(subject, tmp_path):
    backend = subject.backend
    starts = tmp_path / "starts"
    command = f"echo x >> {starts}; sleep 1; echo done"
    backend.submit(Bundle("orphaned", 0, [0], [command]))
    wait_until(lambda: backend.receive(0.2) == [] and starts.exists(), timeout=30)
    worker = _parent(_pid_running(str(starts)))
    subject.add_worker()
    os.kill(worker, signal.SIGKILL)
    first = _first_results(_receive_until(backend, _has_results(("orphaned", 0)), timeout=30))
    assert first["orphaned", 0][1:] == (0, "done\n", None)
    assert starts.read_text() == "x\nx\n", "run again after its worker died, once"


# --- close ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_close_waiting_lets_the_workers_finish_the_task_in_hand(subject, tmp_path):
    backend = subject.backend
    backend.submit(Bundle("closing", 0, [0], [f"touch {tmp_path}/started; sleep 1; touch {tmp_path}/ended"]))
    wait_until(lambda: backend.receive(0.2) == [] and (tmp_path / "started").exists(), timeout=30)
    backend.close(wait=True)
    wait_until(lambda: (tmp_path / "ended").exists(), timeout=10)
    assert subject.released()
    backend.close()  # a second close is harmless


@pytest.mark.timeout(60)
def test_close_without_waiting_returns_at_once(subject, tmp_path):
    backend = subject.backend
    command = f"touch {tmp_path}/started; sleep 3; touch {tmp_path}/ended"
    backend.submit(Bundle("closing", 0, [0], [command]))
    wait_until(lambda: backend.receive(0.2) == [] and (tmp_path / "started").exists(), timeout=30)
    started = time.monotonic()
    backend.close(wait=False)
    assert time.monotonic() - started < 5 + SLACK_SECONDS
    assert subject.released()
    if subject.close_stops_workers:  # the task in hand is stopped, not finished
        wait_until(lambda: not processes_mentioning(str(tmp_path)), timeout=10)
        assert not (tmp_path / "ended").exists()
