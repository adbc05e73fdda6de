"""Scheduling where it meets shutdowns, shared queues and split messages (each found by a
review of the time-boxed bundles and failing before its fix): tasks handed back while a
scheduler without a store shuts down, bundles numbered alike by two schedulers, a bundle too
large for one SQS message, and no AWS call on the scheduler's event loop."""

from __future__ import annotations

import signal

from conftest import read_results, start_client, wait_until
from test_jobs import RecordingBackend, _ok
from test_scheduling import _process_running

from cloudkon.jobs import Dispatcher
from cloudkon.tasks import ResultBatch

# --- 1. Shutdown without a store: tasks handed back after fail_undispatched get no result ----------

def test_tasks_handed_back_during_shutdown_get_a_result():
    """scheduler._drain (no store) calls fail_undispatched, then waits for the bundles in flight;
    one of them hands back its tail (time box): those tasks get their result at once, not a
    place in a queue that nothing reads any more."""
    backend = RecordingBackend()  # capacity 2
    results: dict[int, str | None] = {}
    def keep(job, batch):
        results.update(zip(batch.ids, batch.errors, strict=True))

    dispatcher = Dispatcher(backend, keep, lambda job: None)
    dispatcher.task_times.learn("./p 1", 0.001)  # taken for 1 ms runs: bundles of 20
    job = dispatcher.open_job()
    dispatcher.add_tasks(job, ["./p 1"] * 100)
    dispatcher.close_job(job)
    dispatcher.fail_undispatched("scheduler shut down before this task started")
    first = backend.submitted[0]
    # Its first task took 5 s: the box ran out, the other 19 come back (now each taken for 5 s).
    dispatcher.handle_results([ResultBatch(job.id, first.bundle, [first.ids[0]], [0], [""], [5_000_000],
                                           [None], returned=first.ids[1:])])
    dispatcher.fail_in_flight("scheduler stopped before this task finished")  # the grace ran out
    missing = sorted(set(range(100)) - set(results))
    assert not missing, f"{len(missing)} task(s) never got a result: {missing}"
    assert job.finished


def test_sigterm_without_a_store_fails_handed_back_tasks_too(start_scheduler, workload, tmp_path):
    """The same with the real programs: one worker; a command taken for a ~5 ms one (its first
    20 runs) takes 2 s from its 21st run on, so the bundle holding that run hands back its
    tail during the grace, one slot frees and the rest of the tail waits in _ready."""
    turn = tmp_path / "turn"
    turn.write_text('#!/bin/sh\nn=$(cat "$0.count" 2>/dev/null || echo 0)\necho $((n + 1)) > "$0.count"\n'
                    '[ "$n" -lt 20 ] || exec sleep 2.0625\n')
    turn.chmod(0o755)
    sched = start_scheduler("--local", "1", "--no-state", "--grace", "4")
    out = tmp_path / "r.jsonl"
    client = start_client("-s", sched.address, "-w", workload([str(turn)] * 40), "-o", str(out))
    wait_until(lambda: _process_running("sleep 2.0625"), timeout=60)  # not another test's sleep 2...
    assert sched.stop(signal.SIGTERM) == 0
    code = client.wait(60)
    stderr = client.stderr.read()
    client.stdout.close()
    client.stderr.close()
    rows = read_results(out) if out.exists() else []
    # As test_sigterm_without_a_store_finishes_in_flight_and_fails_the_rest: exit 1, every row.
    assert (code, len(rows)) == (1, 40), stderr


# --- 2. SQSBackend.workers(): AWS calls on the scheduler's event loop -------------------------------

def test_sqs_backend_makes_no_aws_call_on_the_event_loop(remote, monkeypatch):
    """Dispatcher.pump runs on the scheduler's event loop and calls backend.capacity() and
    backend.workers(); without --in-flight, SQSBackend.workers() lists the topic's
    subscriptions and batch-reads the claim table right there (every second while no worker
    is subscribed, every 30 s otherwise), with 8 retries of backoff on a throttle: every client
    of the scheduler waits meanwhile."""
    import asyncio

    from cloudkon.sqsbackend import SQSBackend

    for name, value in remote.env.items():
        monkeypatch.setenv(name, value)
    backend = SQSBackend(request_queue=remote.request_queue, claim_table=remote.table,
                         control_topic=remote.topic)
    on_loop: list[str] = []

    def record(model, **_):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        on_loop.append(f"{model.service_model.service_name}.{model.name}")

    for client in (backend._control.sns, backend._dynamodb):
        client.meta.events.register("before-call", record)
    dispatcher = Dispatcher(backend, lambda job, batch: None, lambda job: None)

    async def submit() -> None:  # what Scheduler.submit_job does, on its loop
        job = dispatcher.open_job()
        dispatcher.add_tasks(job, ["sleep 1"] * 10)
        dispatcher.close_job(job)

    try:
        asyncio.run(submit())
    finally:
        backend.close(wait=False)
    assert not on_loop, f"AWS calls made on the event loop: {on_loop}"


# --- 3. (pre-existing, made no better) a bundle split over several request messages ---------------

def test_remote_bundle_split_over_several_messages_runs_every_task(remote, workload, tmp_path):
    """request_bodies splits a bundle too large for one SQS message into parts that keep its
    number; the worker claims `job:bundle`, so the part that comes second finds the claim held
    or done and is deleted unrun: its tasks never get a result and the job never finishes.
    Non-ASCII commands are 6 bytes a character in the message (\\uXXXX), so 128 KiB of
    command characters (MAX_BUNDLE_COMMAND_BYTES counts characters) needs up to 768 KiB."""
    sched = remote.scheduler("--in-flight", "1")
    worker = remote.worker("-t", "1", "--visibility-timeout", "5")
    out = tmp_path / "r.jsonl"
    tasks = [f"echo {i} " + "\u00e9" * 3000 for i in range(40)]
    client = start_client("-s", sched.address, "-w", workload(tasks), "-o", str(out), env=remote.env)
    try:
        code = client.wait(90)
    except Exception:
        client.kill()
        code = None
    client.stdout.close()
    client.stderr.close()
    worker.kill()
    log = [line for line in worker.stderr.read().splitlines() if "bundle" in line.lower()]
    assert code == 0, "the job did not finish: its second part never ran: " + "\n".join(log[-5:])


# --- 4. Bundle numbers are not unique across schedulers, but TimeBoxes / Worker._reply_to / ---------
# ---    Dispatcher._in_flight are keyed by the number alone ---------------------------------------

def test_time_boxes_of_two_bundles_with_the_same_number():
    """Schedulers sharing the request queue (README: 'shared by every scheduler and worker') all
    number bundles from `starts << 32` (1 << 32 at each one's first start, 0 without a store),
    so a remote worker with -t 2 can run two bundles numbered alike at once.  TimeBoxes keys its
    boxes by number: the second replaces the first, and the first to end deletes the other's
    box, so the second raises KeyError (worker.py then drops its results: 'left for redelivery')."""
    from cloudkon.runner import TimeBoxes, run_bundle
    from cloudkon.tasks import Bundle

    boxes = TimeBoxes(lambda bundle, ids: None)
    first = run_bundle(Bundle("job-a", 1 << 32, [0, 1], ["sleep 0"] * 2, None, 10.0), boxes=boxes)
    second = run_bundle(Bundle("job-b", 1 << 32, [0, 1], ["sleep 0"] * 2, None, 10.0), boxes=boxes)
    assert next(first).ids == [0, 1]
    assert next(second).ids == [0, 1]
    assert list(first) == []
    assert list(second) == []  # KeyError: 4294967296


def test_a_hand_back_for_another_job_does_not_lose_this_jobs_tasks():
    """Worker._hand_back_rest sends the early hand-back to self._reply_to[bundle number]: with two
    bundles numbered alike (two schedulers), to the other scheduler's queue.  There,
    Dispatcher.handle_results matches the in-flight bundle by number only, and _take_back takes
    the ids out of *its* bundle's due set (job None: nothing queued again).  When that bundle
    later hands back the same ids, they are no longer due: never queued again, the job never
    finishes."""
    backend = RecordingBackend()
    dispatcher = Dispatcher(backend, lambda job, batch: None, lambda job: None)
    job = dispatcher.open_job()
    dispatcher.add_tasks(job, ["sleep 1"] * 20)
    dispatcher.close_job(job)
    bundle = backend.submitted[0]
    stray = ResultBatch("another-schedulers-job", bundle.bundle, returned=bundle.ids[1:])
    dispatcher.handle_results([stray])
    own = _ok(job.id, bundle.bundle, bundle.ids[:1])
    own.returned = bundle.ids[1:]
    dispatcher.handle_results([own])
    while dispatcher._in_flight:
        number, (out, due) = next(iter(dispatcher._in_flight.items()))
        dispatcher.handle_results([_ok(job.id, number, [i for i in out.ids if i in due])])
    assert job.finished, f"stuck: {job.counts()}"
