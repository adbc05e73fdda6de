"""Job bookkeeping: exactly one result per task, whatever a backend delivers twice."""

from backend import MAX_BUNDLE_TASKS, Backend, bundle_size
from jobs import Dispatcher, Job
from tasks import CANCELLED, Bundle, ResultBatch


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


def test_bundle_size_rule():
    assert bundle_size(None, 1000, 8, 0.02) == 1  # nothing known yet: tasks may be long
    assert bundle_size(1.0, 10**6, 8, 0.02) == MAX_BUNDLE_TASKS  # instant tasks: as many as allowed
    assert bundle_size(10_000, 10**6, 8, 0.02) == 2  # 10 ms tasks: 20 ms worth
    assert bundle_size(1_000, 40, 16, 0.02) == 3  # near the end: an even share of what is left
    assert bundle_size(1_000, 5, 16, 0.02) == 2  # but not under an eighth of the target


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
