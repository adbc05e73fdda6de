"""Job bookkeeping: exactly one result per task, whatever a backend delivers twice."""

import logging
import math
import time
from collections.abc import Callable

import pytest

from cloudkon.backend import MAX_BUNDLE_TASKS, Backend, plan_bundle
from cloudkon.estimates import TASK_OVERHEAD_SECONDS, JobTimes, TaskTimes
from cloudkon.jobs import Dispatcher, Job
from cloudkon.localworkers import LocalBackend
from cloudkon.tasks import CANCELLED, Bundle, ResultBatch


def _job(n: int) -> Job:
    job = Job("j", None)
    job.add_tasks(["true"] * n)
    job.closed = True
    return job


def test_second_result_for_a_task_is_ignored():
    job = _job(3)
    first = job.keep_new(ResultBatch("j", 0, [0, 1], [0, 1], ["a", "b"], [5, 5], [None, None]))
    again = job.keep_new(ResultBatch("j", 0, [1, 2, 9], [0, 0, 0], ["B", "c", "x"], [5, 5, 5], [None] * 3))
    assert first.ids == [0, 1] and again.ids == [2] and again.outputs == ["c"]  # 1 kept, 9 unknown
    assert (job.done_count, job.failed_count, job.finished) == (3, 1, True)
    assert [i for batch in job.results for i in batch.ids] == [0, 1, 2]


def test_bundle_rule_cuts_by_estimated_time():
    inf = math.inf
    assert plan_bundle([inf] * 5, 0.02, 100, 0.005) == (1, None)  # nothing known: alone, with no time box
    assert plan_bundle([1e-6] * MAX_BUNDLE_TASKS, 0.02, 10**6, 0.005)[0] == MAX_BUNDLE_TASKS
    # 10 ms tasks: 20 ms worth, boxed at twice that and the backend's margin
    assert plan_bundle([0.01] * 100, 0.02, 10**6, 0.005) == (2, pytest.approx(0.045))
    assert plan_bundle([0.001] * 100, 0.02, 3, 0.005)[0] == 3  # near the end: an even share of what is left
    assert plan_bundle([0.0] * 100, 0.02, 5, 0.005)[0] == 5  # even if estimated to cost nothing
    assert plan_bundle([0.001, 10.0, 0.001], 0.02, 100, 0.005)[0] == 1  # a long task is not bundled behind
    assert plan_bundle([10.0, 0.001], 0.02, 100, 0.005) == (1, pytest.approx(20.005))  # goes alone
    # Taken for instant tasks, a bundle is boxed at the margin (remotely, a quarter of the
    # target): one that meets a long task hands back the rest that soon, not after it.
    assert plan_bundle([0.0] * 50, 5.0, 20, 1.25) == (20, 1.25)


def test_estimates_come_from_the_task_then_what_was_seen_then_the_job():
    times = TaskTimes()
    job = JobTimes(times)
    assert job.estimates(["sleep 250", "./sim 1"]) == [0.25 + TASK_OVERHEAD_SECONDS, math.inf]
    job.learn(["./sim 1", "./sim 2", "other"], ResultBatch("j", 0, [0, 2], [0, 0], ["", ""],
                                                          [2_000_000, 30_000], [None, None]))
    assert job.estimates(["./sim 1", "./sim 9"]) == [2.0, 2.0]  # the command, then its program
    fresh = JobTimes(times)
    assert fresh.estimates(["unseen"]) == [math.inf]  # another job knows nothing of its own yet
    assert job.estimates(["unseen"]) == [2.0]  # this job: the high percentile of its results
    # A program whose runs vary is taken for its long ones, not its mean.
    for seconds in (0.01, 0.01, 0.01):
        times.learn("./sim 3", seconds)
    assert times.known("./sim 4") > 1.0
    # Tasks that never ran teach nothing.
    job.learn(["late"], ResultBatch("j", None, [0], [None], [""], [0], [CANCELLED]))
    assert times.known("late") is None


class RecordingBackend(Backend):
    """Keeps what the dispatcher submits and runs nothing: for dispatcher tests fed results that no
    backend produces on demand (a restart's, a stray scheduler's).  Tests of what the dispatcher
    does with a backend's own results run on the real LocalBackend (the ``local`` fixture)."""

    name = "recording"

    def __init__(self) -> None:
        self.submitted: list[Bundle] = []

    def workers(self) -> int:
        return 1

    def submit(self, bundle: Bundle) -> None:
        self.submitted.append(bundle)

    def receive(self, timeout: float) -> list[ResultBatch]:
        return []

    def cancel(self, job: str) -> None:
        pass

    def close(self, wait: bool = True) -> None:
        pass


def _ok(job: str, bundle: int, ids: list[int]) -> ResultBatch:
    return ResultBatch(job, bundle, ids, [0] * len(ids), [""] * len(ids), [1] * len(ids), [None] * len(ids))


@pytest.fixture
def local():
    """One real local worker process: the dispatcher fills it with two bundles (its capacity)."""
    backend = LocalBackend(1)
    yield backend
    backend.close(wait=False)


def _drive(dispatcher: Dispatcher, backend: Backend, done: Callable[[], bool],
           timeout: float = 20) -> list[ResultBatch]:
    """Hand the backend's results to the dispatcher, as the scheduler's receiving thread does,
    until ``done()``; the batches received."""
    received: list[ResultBatch] = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done in {timeout} s"
        batches = backend.receive(0.2)
        received += batches
        dispatcher.handle_results(batches)
    return received


def test_tasks_with_results_from_an_earlier_start_are_not_bundled_again(local, tmp_path):
    ran = tmp_path / "ran"
    dispatcher = Dispatcher(local, lambda job, batch: None, lambda job: None)
    job = dispatcher.open_job()
    dispatcher.add_tasks(job, [f"echo {i} >> {ran}" for i in range(6)])  # two one-task bundles fill it
    dispatcher.close_job(job)
    dispatcher.handle_results([_ok(job.id, 7, [2, 3, 4, 5])])  # a bundle of the previous start
    _drive(dispatcher, local, lambda: job.finished)
    assert ran.read_text().split() == ["0", "1"]
    assert dispatcher.idle and job.undispatched == 0


def test_cancel_gives_every_task_without_a_result_one_cancelled_result(local):
    delivered: dict[str, list[tuple[int, str | None]]] = {}
    finished: list[str] = []
    dispatcher = Dispatcher(local, lambda job, batch: delivered.setdefault(job.id, []).extend(
        zip(batch.ids, batch.errors, strict=True)), lambda job: finished.append(job.id))
    doomed, other = dispatcher.open_job(), dispatcher.open_job()
    dispatcher.add_tasks(doomed, ["echo first"] + ["sleep 30000"] * 4)  # a bundle each; the backend holds two
    dispatcher.add_tasks(other, ["true"] * 2)
    # Its first task done, its second bundle runs and a third waits in the backend.
    received = _drive(dispatcher, local, lambda: doomed.done_count == 1)
    doomed_bundles = {batch.bundle for batch in received} | {
        number for number, (bundle, _) in dispatcher._in_flight.items() if bundle.job == doomed.id}

    assert dispatcher.cancel(doomed) == 4
    local.cancel(doomed.id)  # as the scheduler does: the backend stops what it holds of the job
    held = {bundle.job for bundle, _ in dispatcher._in_flight.values()}
    assert held == {other.id}, "the cancelled job's bundles no longer count against the backend's capacity"
    dispatcher.add_tasks(doomed, ["true"] * 2)  # still arriving after the cancel
    dispatcher.close_job(doomed)
    assert doomed.finished and finished == [doomed.id]
    assert sorted(delivered[doomed.id]) == [(0, None)] + [(i, CANCELLED) for i in range(1, 7)]
    assert doomed.counts() == {"total": 7, "queued": 0, "running": 0, "succeeded": 1, "failed": 0,
                               "cancelled": 6}
    assert dispatcher.cancel(doomed) == 0  # a second cancel changes nothing

    # What the backend still held of the cancelled job reports later (cancelled): dropped, and the
    # other job's tasks run as before, on the worker the cancel freed.
    dispatcher.close_job(other)
    received = _drive(dispatcher, local, lambda: other.finished)
    assert len(delivered[doomed.id]) == 7
    assert other.counts()["succeeded"] == 2 and dispatcher.idle
    assert {batch.bundle for batch in received if batch.job == doomed.id} <= doomed_bundles, \
        "no bundle of the cancelled job went out after the cancel"


def test_handed_back_tasks_run_next_and_only_the_bundle_holding_them_hands_them_back(local):
    delivered: list[int] = []
    dispatcher = Dispatcher(local, lambda job, batch: delivered.extend(batch.ids), lambda job: None)
    slow = "sleep 0.5; echo slow"  # half a second, taken for 1 ms like the rest
    dispatcher.task_times.learn(slow, 0.001)
    job = dispatcher.open_job()
    dispatcher.add_tasks(job, [slow] + ["sleep 1"] * 99)  # 1 ms each, known: bundles of 20 ms
    dispatcher.close_job(job)
    (first, _), (second, _) = dispatcher._in_flight.values()
    assert (first.ids, second.ids) == (list(range(20)), list(range(20, 40)))
    assert first.budget == pytest.approx(2 * local.target_bundle_seconds + local.time_box_margin, rel=0.01)
    # The first bundle's box runs out during its first task: the worker hands back the other 19
    # at once, and they wait at the front of the job while the first task runs on.
    received = _drive(dispatcher, local, lambda: job.undispatched > 60)
    handed_back = next(batch for batch in received if batch.returned)
    assert (handed_back.bundle, handed_back.returned) == (first.bundle, list(range(1, 20)))
    assert job.undispatched == 79 and first.bundle in dispatcher._in_flight
    # Once the first task is done, the next bundle out is the tasks handed back, before task 40.
    _drive(dispatcher, local, lambda: 0 in delivered)
    assert dispatcher._in_flight[second.bundle + 1][0].ids == list(range(1, 20))
    # A duplicate of the first bundle's hand-back (a redelivery) hands the same tasks back again: ignored.
    in_flight, undispatched = set(dispatcher._in_flight), job.undispatched
    dispatcher.handle_results([handed_back])
    assert (set(dispatcher._in_flight), job.undispatched) == (in_flight, undispatched)
    # The rest of the job completes with exactly one result per task.
    _drive(dispatcher, local, lambda: job.finished)
    assert sorted(delivered) == list(range(100)) and dispatcher.idle


def test_a_handed_back_task_given_a_result_meanwhile_is_not_run_again():
    backend = RecordingBackend()
    dispatcher = Dispatcher(backend, lambda job, batch: None, lambda job: None)
    job = dispatcher.open_job()
    dispatcher.add_tasks(job, ["sleep 1"] * 60)
    dispatcher.close_job(job)
    first = backend.submitted[0]
    handed_back = ResultBatch(job.id, first.bundle, returned=list(first.ids))
    dispatcher.handle_results([_ok(job.id, 99, [0, 1])])  # results of an earlier start, say
    dispatcher.handle_results([handed_back])
    # 2..19 went out again at once (the first bundle's place was free), 20..39 are out, 40..59 queued.
    assert backend.submitted[2].ids == list(range(2, 20))
    assert job.undispatched == 20 and job.counts()["running"] == 38


def test_results_not_recorded_are_counted_in_the_log_a_line_per_kind(caplog):
    caplog.set_level(logging.INFO, logger="cloudkon.jobs")
    dispatcher = Dispatcher(RecordingBackend(), lambda job, batch: None, lambda job: None)
    job = dispatcher.open_job()
    dispatcher.add_tasks(job, ["true"] * 3)
    dispatcher.handle_results([_ok(job.id, 0, [0])])
    for _ in range(100):  # a flood: three lines, not three hundred
        dispatcher.handle_results([_ok("no-such-job", 0, [0]), _ok(job.id, 0, [0, 7]), _ok(job.id, 0, [0])])
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    assert any(line.startswith("results for no job held here, dropped: 1 (last: job 'no-such-job'")
               for line in lines)
    assert any(line.startswith(f"results for no task of their job, dropped: 1 (last: job {job.id}, 3 tasks")
               for line in lines)
    assert any(line.startswith(f"results for tasks that had one, dropped: 1 (last: job {job.id}")
               for line in lines)
    assert job.done_count == 1
