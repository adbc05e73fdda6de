"""Job bookkeeping: exactly one result per task, whatever a backend delivers twice."""

from backend import MAX_BUNDLE_TASKS, bundle_size
from jobs import Job
from tasks import ResultBatch


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
