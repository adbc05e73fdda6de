"""Job bookkeeping: exactly one result per task, whatever a backend delivers twice."""

import logging
import math

import pytest

from cloudkon.backend import MAX_BUNDLE_TASKS, Backend, plan_bundle
from cloudkon.estimates import TASK_OVERHEAD_SECONDS, JobTimes, TaskTimes
from cloudkon.jobs import Dispatcher, Job
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
    """Keeps what the dispatcher submits: the dispatcher's decisions are what is tested here."""

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


def test_tasks_with_results_from_an_earlier_start_are_not_bundled_again():
    backend = RecordingBackend()
    dispatcher = Dispatcher(backend, lambda job, batch: None, lambda job: None)
    job = dispatcher.open_job()
    dispatcher.add_tasks(job, ["true"] * 6)  # two one-task bundles fill the backend
    dispatcher.close_job(job)
    dispatcher.handle_results([_ok(job.id, 7, [2, 3, 4, 5])])  # a bundle of the previous start
    for bundle in list(backend.submitted):
        dispatcher.handle_results([_ok(job.id, bundle.bundle, bundle.ids)])
    assert [bundle.ids for bundle in backend.submitted] == [[0], [1]]
    assert job.finished and dispatcher.idle and job.undispatched == 0


def test_cancel_gives_every_task_without_a_result_one_cancelled_result():
    backend = RecordingBackend()
    delivered: dict[str, list[tuple[int, str | None]]] = {}
    finished: list[str] = []
    dispatcher = Dispatcher(backend, lambda job, batch: delivered.setdefault(job.id, []).extend(
        zip(batch.ids, batch.errors, strict=True)), lambda job: finished.append(job.id))
    doomed, other = dispatcher.open_job(), dispatcher.open_job()
    dispatcher.add_tasks(doomed, ["true"] * 5)
    dispatcher.add_tasks(other, ["true"] * 2)
    first = backend.submitted[0]  # doomed's first bundle; the backend holds two
    dispatcher.handle_results([_ok(doomed.id, first.bundle, first.ids)])

    submitted_before = len(backend.submitted)
    assert dispatcher.cancel(doomed) == 4
    held = {bundle.job for bundle in backend.submitted if bundle.bundle in dispatcher._in_flight}
    assert held == {other.id}, "the cancelled job's bundles no longer count against the backend's capacity"
    dispatcher.add_tasks(doomed, ["true"] * 2)  # still arriving after the cancel
    dispatcher.close_job(doomed)
    assert doomed.finished and finished == [doomed.id]
    assert sorted(delivered[doomed.id]) == [(0, None)] + [(i, CANCELLED) for i in range(1, 7)]
    assert doomed.counts() == {"total": 7, "queued": 0, "running": 0, "succeeded": 1, "failed": 0,
                               "cancelled": 6}
    assert dispatcher.cancel(doomed) == 0  # a second cancel changes nothing

    # What the backend still held of the cancelled job reports later: dropped, and the
    # other job's tasks are bundled as before.
    for bundle in list(backend.submitted):
        dispatcher.handle_results([_ok(bundle.job, bundle.bundle, bundle.ids)])
    for bundle in list(backend.submitted):
        dispatcher.handle_results([_ok(bundle.job, bundle.bundle, bundle.ids)])
    dispatcher.close_job(other)
    assert len(delivered[doomed.id]) == 7
    assert other.finished and other.counts()["succeeded"] == 2 and dispatcher.idle
    assert {bundle.job for bundle in backend.submitted[submitted_before:]} == {other.id}


def test_handed_back_tasks_run_next_and_only_the_bundle_holding_them_hands_them_back():
    backend = RecordingBackend()
    delivered: list[int] = []
    dispatcher = Dispatcher(backend, lambda job, batch: delivered.extend(batch.ids), lambda job: None)
    job = dispatcher.open_job()
    dispatcher.add_tasks(job, ["sleep 1"] * 100)  # 1 ms each, known: bundles of 20 ms
    dispatcher.close_job(job)
    first, second = backend.submitted
    assert (first.ids, second.ids) == (list(range(20)), list(range(20, 40)))
    assert first.budget == pytest.approx(0.08, rel=0.01)  # twice 20 ms, and the local margin
    # The first bundle runs 5 tasks and hands back the rest: they go out next, before task 40.
    handed_back = _ok(job.id, first.bundle, first.ids[:5])
    handed_back.returned = first.ids[5:]
    dispatcher.handle_results([handed_back])
    third = backend.submitted[2]
    assert third.ids == list(range(5, 20)) and job.undispatched == 60
    assert first.bundle not in dispatcher._in_flight
    # A duplicate of the first bundle (a redelivery) hands the same tasks back again: ignored.
    dispatcher.handle_results([handed_back])
    assert len(backend.submitted) == 3 and job.undispatched == 60
    # The rest of the job completes with exactly one result per task.
    while len(delivered) < 100:
        bundle = next(b for b in backend.submitted if b.bundle in dispatcher._in_flight)
        dispatcher.handle_results([_ok(job.id, bundle.bundle, bundle.ids)])
    assert sorted(delivered) == list(range(100)) and job.finished and dispatcher.idle


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
