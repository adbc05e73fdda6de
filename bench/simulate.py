"""A discrete-event simulation of the scheduling policy, at 1 to 1,000 simulated workers.

    python bench/simulate.py                          # the full matrix (about 60 s of CPU)
    python bench/simulate.py --workers 1 32 256       # fewer worker counts
    python bench/simulate.py --sqs-latency 0.005 0.010 --dynamodb-latency 0.004 0.008
    python bench/simulate.py --bursty                 # the fleet's provisioning policy (bench/fleetsim.py)

What runs for real (imported from the project, not copied): a ``jobs.Dispatcher`` with its
``estimates.TaskTimes`` (a program's estimate: the longest of its last PROGRAM_SAMPLE_SIZE (256)
runs learned, each batch's longest always among them; fair feed, bundles cut by
``backend.plan_bundle`` from them, never over the even share, the hand-back queue); the
backends' own rules, through ``Backend`` subclasses defined here:
``SimLocalBackend(localworkers.LocalBackend)`` keeps real ``WorkerSlot``s and runs the real
``capacity`` (2 x workers), ``_record``, ``WorkerSlot.takes_more`` (prefetch: PREFETCH_BUNDLES,
PREFETCH_BEHIND_SECONDS) and ``_steal_for_idle`` (victim: the most ``WorkerSlot.stealable``
tasks, unstarted ones of a slot whose last bundle has not been asked for yet; that bundle is
asked back by a real ``hand_back`` frame); only ``_hand_out`` is replaced, by heaps that make the same
choice (fewest bundles held, then longest idle, then slot order) without scanning every slot:
``--verify`` (on by itself at <= 32 workers) runs the real ``_hand_out`` instead and checks
every choice against the heaps'.  Each worker process has a ``runner.TimeBoxes`` whose own
``open`` and ``end`` run, with its ``_Box``es (``_Box.end``: the tasks after the one running
go back; the first task always runs); only its thread (``_watch``) is events here
(``SimTimeBoxes``).  During a run, localworkers' and runner's ``time`` modules are a stand-in
whose ``monotonic()`` is the simulated clock, so idle times, stealing delays and the ends of
time boxes are simulated time.
``SimSQSBackend(sqsbackend.SQSBackend)`` runs the real ``workers``
(``in_flight`` slots), ``capacity`` (one bundle per slot) and ``target_bundle_seconds`` (5 s).
Messages are the real ones: bundles travel as ``protocol`` frames (local) or
``sqsmessages.request_bodies`` (SQS), results as ``response_bodies``, grouped into
SendMessageBatch calls by ``aws._batches``.  Constants come from runner.py
(RESULT_FLUSH_SECONDS), aws.py, service.py (RECEIVE_POLL_SECONDS), sqsbackend.py
(PARALLEL_SQS_CALLS).

What is simulated (a heap of timed events; simulated time, not wall time):
  - a worker running a bundle: runner._run_boxed and _run_bundle step for step (``run_box``):
    before each task its position goes in the box's ``started``, and once the box has ended
    the runner stops there, its last results repeating the tail in ``returned``; the box ends
    on time even while a task runs: at ``start + budget`` TimeBoxes' thread hands back the
    tasks after the running one at once (a duplicate the dispatcher ignores comes with the
    last results; "handed back" counts each bundle's tail once);
  - local: one process per worker, with localprocess._Inbox's rules (a bundle asked back is
    withdrawn whole if it waits behind another, else its box is ended, TimeBoxes.end: the
    running bundle's tail goes back at once, the next one's as soon as its first task has
    started); the tail goes back as a results frame; bundle and hand-back frames reach it,
    and its result batches reach the scheduler, after --ipc seconds (0.1 ms); each task costs
    --task-overhead (1.2 us) beyond its own length; the scheduler reacts at once (its CPU is
    not modelled) and looks again RECEIVE_POLL_SECONDS after its last wake-up, as its receive
    loop does;
  - remote (SQS + DynamoDB): worker.py machines of --threads threads each (the last one
    smaller), every AWS call taking a uniform draw from --sqs-latency or --dynamodb-latency.
    A worker's main loop long-polls for as many messages as it has free threads (up to 10;
    the poll returns when one is visible), sleeps 50 ms at a time while full; each bundle
    then costs what worker.Worker._handle does: GetItem (cancel mark), PutItem (claim), the
    run, the results (its flushed batches joined into one, split only to fit a message) in
    one SendMessageBatch per 10 messages, UpdateItem (done), DeleteMessageBatch; a box that
    ends while a task runs sends its tail from TimeBoxes' thread (Worker._hand_back_rest: one
    SendMessageBatch; that thread ends one machine's due boxes one after another); leases are
    renewed every visibility timeout / 3 (ChangeMessageVisibility + UpdateItem per bundle
    held, one GetItem per job).  The
    scheduler's SQS calls beyond one go through its pool of PARALLEL_SQS_CALLS (8) threads
    (``SimCalls``: shared by the sender and the receiving thread, first come first served; the
    calls of one round end with the slowest, as they are awaited together).  Its sender thread
    sends what is waiting in SendMessageBatch calls of 10 bundles (aws.send_messages: alone in
    the thread if one call, else all through the pool), then looks again; its receive loop
    (SQSBackend.receive) long-polls (1 s) up to 10 result messages; while the last round's
    receives all came back full (``width`` x 10 messages; width 1 at first) and fewer than
    MAX_RECEIVED messages are in hand, the width doubles (up to 8) and that many ReceiveMessage
    calls (WaitTimeSeconds=0) go through the pool at once, each taking up to 10 messages when a
    thread starts it; then it deletes all it
    received in DeleteMessageBatch calls of 10 (aws.delete_messages: through the pool if more than
    one), and hands them to the dispatcher.  Empty receives (long polls that time out, extra ones
    that find nothing) count as calls.
Workloads: uniform 10 ms and 1 s; mixed: log-uniform 1 ms..10 s (whole milliseconds) and
bimodal (90% 0 ms, 10% 10 s), each in random and short-first order, with ``sleep N`` commands
(estimates exact: TaskTimes reads N) and, for the mixed ones, opaque commands of one program
(``./task I``: estimates learned from results, starting from "unknown, so alone").
Sizes: max(--min-tasks, --tasks-per-worker x workers) tasks.

Compared with: the greedy list schedule of the same durations (file order, each task to the
worker that frees first, no overhead at all) and the ideal (sum / workers).  Every task must
run once and get exactly one result.

Left out: failures, redelivery and the visibility timeout; cancels; the job stores; the
scheduler's own CPU (so tasks handed back cost nothing there, even by the million) and the
local machine's cores (1,000 local workers never contend); how soon TimeBoxes' thread wakes;
worker heartbeats, control queues, provisioning and start-up; SQS's occasional empty or
short receives while messages exist; bundle splitting at the 256 KB message limit (the
messages here are far smaller).

Writes bench/results/simulate.csv, simulate.md, simulate_makespan.png and simulate_calls.png.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import itertools
import math
import random
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
from local import machine  # noqa: E402

from cloudkon import aws, localslots, localworkers, protocol, runner  # noqa: E402
from cloudkon.defaults import DEFAULT_VISIBILITY_TIMEOUT  # noqa: E402
from cloudkon.jobs import Dispatcher, Job  # noqa: E402
from cloudkon.localslots import HeldBundle, WorkerSlot  # noqa: E402
from cloudkon.localworkers import LocalBackend  # noqa: E402
from cloudkon.runner import RESULT_FLUSH_SECONDS, TimeBoxes, _Box  # noqa: E402
from cloudkon.service import RECEIVE_POLL_SECONDS  # noqa: E402
from cloudkon.sqsbackend import MAX_RECEIVED, PARALLEL_SQS_CALLS, SQSBackend  # noqa: E402
from cloudkon.sqsmessages import parse_request, request_bodies, response_bodies  # noqa: E402
from cloudkon.tasks import Bundle, ResultBatch  # noqa: E402

TARGET_RATIO = 1.15  # makespan / greedy, at 1,000 workers, mixed workloads
WORKER_FULL_SLEEP = 0.05  # worker.Worker.run: time.sleep(0.05) while every thread holds a bundle
RESPONSE_URL = "https://sqs.simulated/cloudkon-responses-sim"
WORKLOADS = {  # name: orders, estimate kinds
    "uniform-10ms": (["-"], ["exact"]),
    "uniform-1s": (["-"], ["exact"]),
    "loguniform": (["random", "short-first"], ["exact", "learned"]),
    "bimodal": (["random", "short-first"], ["exact", "learned"]),
}
MIXED = ("loguniform", "bimodal")
POLICY_MODULES = [f"cloudkon/{name}.py" for name in (
    "jobs", "estimates", "backend", "tasks", "runner", "localworkers", "localslots", "sqsbackend",
    "sqsmessages", "worker", "aws", "scheduler")]


# --- the clock ---------------------------------------------------------------------------

class Sim:
    """Simulated time and a heap of events (time, sequence, action, arguments)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._sequence = itertools.count()

    def at(self, when: float, action: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._events, (when, next(self._sequence), action, args))

    def run(self, done: Callable[[], bool]) -> None:
        while self._events and not done():
            self.now, _, action, args = heapq.heappop(self._events)
            action(*args)

    def drive(self, steps: Iterator[float], then: Callable[[], None]) -> None:
        """Run a process written as a generator that yields the seconds it waits each time."""
        try:
            delay = next(steps)
        except StopIteration:
            then()
            return
        self.at(self.now + delay, self.drive, steps, then)


@dataclass
class BundleRun:
    """One bundle's life, for the tail diagnosis."""

    number: int
    first: int  # its first task
    tasks: int
    budget: float | None
    expected: float  # its tasks' estimates when it was cut
    submitted: float
    worker: int = -1
    start: float = math.nan
    end: float = math.nan
    ran: int = 0
    returned: int = 0
    work: float = 0.0  # seconds of its tasks that ran
    longest: float = 0.0


class Model:
    """What one simulated run shares: the clock, the tasks, the costs, what happened."""

    def __init__(self, durations: list[float], overhead: float, latencies: dict[str, tuple[float, float]],
                 seed: str) -> None:
        self.sim = Sim()
        self.durations = durations
        self.overhead = overhead
        self.latencies = latencies
        self.rng = random.Random(seed)
        self.executed = [0] * len(durations)
        self.runs: dict[int, BundleRun] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.returned = 0  # tasks handed back unstarted
        self.handed_back_at: dict[int, float] = {}  # task -> when its last hand-back reached the scheduler
        self.gave_back: set[int] = set()  # bundles whose hand-back reached the scheduler
        self.steals = 0  # hand_back frames sent
        self.job: Job | None = None
        self.rounds: list[tuple[float, int, int]] = []  # remote: SQSBackend.receive returned when,
        # with how many messages, how many still waiting on the response queue

    def latency(self, api: str) -> float:
        low, high = self.latencies[api.split(":")[0]]
        return self.rng.uniform(low, high)

    def count(self, side: str, api: str, n: int = 1) -> float:
        """Count an AWS call (``n`` of them); the latency of one."""
        self.calls[side, api] += n
        return self.latency(api)

    def handed_back(self, batches: list[ResultBatch]) -> None:
        for batch in batches:
            # A bundle hands back once (a tail of it), and its last results say so again: the
            # first of the two to arrive counts (the dispatcher ignores the other).
            if not batch.returned or batch.bundle in self.gave_back:
                continue
            self.gave_back.add(batch.bundle)
            self.returned += len(batch.returned)
            for task_id in batch.returned:
                self.handed_back_at[task_id] = self.sim.now

    def submitted(self, bundle: Bundle) -> None:
        assert self.job is not None
        expected = sum(self.job.times.estimates(bundle.commands))  # type: ignore[union-attr]
        self.runs[bundle.bundle] = BundleRun(bundle.bundle, bundle.ids[0], len(bundle.ids), bundle.budget,
                                             expected, self.sim.now)


class SimCondition:
    """Stands in for TimeBoxes._changed (one simulated thread: nothing to lock); notify() wakes
    the simulated watcher."""

    def __init__(self, boxes: SimTimeBoxes) -> None:
        self.boxes = boxes

    def __enter__(self) -> SimCondition:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def notify(self) -> None:
        self.boxes.wake()


class SimTimeBoxes(TimeBoxes):
    """A worker process's runner.TimeBoxes: its own ``open`` and ``end`` and its ``_Box``es (run
    for real, runner's ``time`` being a SimClock), its thread (``_watch``) as simulated events:
    each box due (``ends_at`` passed, not ended) is ended (``_Box.end``) and its unstarted rest
    handed back, one box after another, the thread taking as long as ``hand_back`` says
    (remote: one SendMessageBatch; local: a frame, no wait)."""

    def __init__(self, model: Model, hand_back: Callable[[Bundle, list[int]], float]) -> None:  # no thread
        self.model = model
        self._hand_back = hand_back  # type: ignore[assignment]
        self._boxes: dict[int, _Box] = {}  # by id(bundle)
        self._asked: set[tuple[str, int]] = set()
        self._changed = SimCondition(self)  # type: ignore[assignment]
        self._free_at = 0.0  # the thread is handing back until then
        self._next_look = math.inf
        # TimeBoxes.open notifies only for a box due before the thread's next look; the
        # simulated thread (``wake``) keeps its own next look, so it hears of every box.
        self._looks_at = math.inf

    def wake(self) -> None:
        waiting = [box.ends_at for box in self._boxes.values() if not box.ended]
        if not waiting:
            return
        when = max(self.model.sim.now, self._free_at, min(waiting))
        if when < self._next_look:
            self._next_look = when
            self.model.sim.at(when, self._look, when)

    def _look(self, when: float) -> None:
        """TimeBoxes._watch, one box at a time: the boxes due, ended; their rest handed back."""
        if when != self._next_look:  # stale: a sooner look was scheduled since
            return
        self._next_look = math.inf
        now = self.model.sim.now
        for box in list(self._boxes.values()):
            if box.ends_at <= now and not box.ended:
                rest = box.end()
                if rest:
                    self._free_at = now + self._hand_back(box.bundle, rest)  # type: ignore[func-returns-value]
                    break
        self.wake()


def run_box(model: Model, bundle: Bundle, worker: int, boxes: TimeBoxes,
            emit: Callable[[ResultBatch], None]) -> Iterator[float]:
    """runner._run_boxed: the bundle runs inside its box (the real TimeBoxes.open)."""
    with boxes.open(bundle) as box:
        yield from _run_box(model, bundle, worker, box, emit)


def _run_box(model: Model, bundle: Bundle, worker: int, box: _Box | None,
             emit: Callable[[ResultBatch], None]) -> Iterator[float]:
    """runner._run_bundle, step for step, in simulated time (yields the seconds each task takes).

    With a box (every bundle with a budget, or asked for before it started): before each task,
    its position goes in ``box.started``; once TimeBoxes has ended the box (``box.cut``: after
    the task running then; the first task always runs), the runner stops there and its last
    batch repeats the rest in ``returned``.  Without one (no budget), a box never ends.
    Results are flushed every RESULT_FLUSH_SECONDS.
    """
    sim = model.sim
    trace = model.runs[bundle.bundle]
    trace.worker, trace.start = worker, sim.now
    batch = ResultBatch(bundle.job, bundle.bundle)
    now = sim.now
    flush_at = now + RESULT_FLUSH_SECONDS
    box_ends = math.inf if bundle.budget is None or box is not None else now + bundle.budget
    look_at = min(flush_at, box_ends)
    ids = bundle.ids
    look = True
    for position, task_id in enumerate(ids):
        if look:
            look = False
            if position and now >= box_ends:
                batch.returned = ids[position:]
                break
        if box is not None:
            box.started = position
            if box.ended and box.stops_before(position):
                batch.returned = ids[position:]  # handed back already: said again
                break
        seconds = model.durations[task_id]
        yield seconds + model.overhead
        model.executed[task_id] += 1
        trace.ran += 1
        trace.work += seconds
        trace.longest = max(trace.longest, seconds)
        batch.add(task_id, 0, "", round(seconds * 1e6), None)
        now = sim.now
        if now >= look_at:
            look = True
            if now >= flush_at:
                emit(batch)
                batch = ResultBatch(bundle.job, bundle.bundle)
                flush_at = now + RESULT_FLUSH_SECONDS
            look_at = min(flush_at, box_ends)
    trace.end = sim.now
    trace.returned = len(batch.returned)
    if batch.ids or batch.returned:
        emit(batch)


# --- local mode ----------------------------------------------------------------------------

class SimProcess:
    """A local worker process (localprocess.worker_main: its _Inbox, reader thread and TimeBoxes)."""

    def __init__(self, model: Model, index: int, backend: SimLocalBackend, ipc: float) -> None:
        self.model, self.index, self.backend, self.ipc = model, index, backend, ipc
        self.slot: WorkerSlot | None = None
        self.inbox: deque[Bundle] = deque()
        self.busy = False  # _Inbox._running
        # worker_main: TimeBoxes(lambda bundle, ids: send(ResultBatch(..., returned=ids)))
        self.boxes = SimTimeBoxes(model, self._hand_back_rest)

    def _hand_back_rest(self, bundle: Bundle, ids: list[int]) -> float:
        self.send(ResultBatch(bundle.job, bundle.bundle, returned=ids))
        return 0.0

    def on_frame(self, message: dict) -> None:
        if message["type"] == "hand_back":  # _Inbox.hand_back: a bundle waiting behind another goes
            # back whole; any other (running, or about to) has its box ended (TimeBoxes.end)
            number = message["bundle"]
            for position, bundle in enumerate(self.inbox):
                if bundle.bundle == number and (self.busy or position):
                    del self.inbox[position]
                    self.model.runs[number].returned = len(bundle.ids)
                    self.send(ResultBatch(bundle.job, bundle.bundle, returned=list(bundle.ids)))
                    return
            self.boxes.end(message["job"], number)
            return
        self.inbox.append(protocol.bundle_from_message(message))
        if not self.busy:
            self._take()

    def _take(self) -> None:
        if not self.inbox:
            self.busy = False
            return
        self.busy = True
        bundle = self.inbox.popleft()
        self.model.sim.drive(run_box(self.model, bundle, self.index, self.boxes, self.send), self._take)

    def send(self, batch: ResultBatch) -> None:
        batch.worker = f"local:{self.index}"
        self.model.sim.at(self.model.sim.now + self.ipc, self.backend.deliver, self.index, batch)


class SimPipe:
    """The backend's end of a worker's pipe: frames reach the process after the IPC delay."""

    def __init__(self, process: SimProcess) -> None:
        self.process = process

    def send_bytes(self, data: bytes) -> None:
        message = protocol.decode(data)
        if message["type"] == "hand_back":
            self.process.model.steals += 1
        sim = self.process.model.sim
        sim.at(sim.now + self.process.ipc, self.process.on_frame, message)


class SimLocalBackend(LocalBackend):
    """LocalBackend's own slots and rules, over simulated processes instead of real ones."""

    def __init__(self, model: Model, workers: int, ipc: float, verify: bool) -> None:  # no processes
        self.model, self.verify = model, verify
        self.dispatcher: Dispatcher | None = None
        self._queue: deque[Bundle] = deque()
        self._queue_lock = threading.Lock()
        self._closed = False
        self._processes = [SimProcess(model, i, self, ipc) for i in range(workers)]
        self._slots = [WorkerSlot(process=None, conn=SimPipe(p), progress=None)  # type: ignore[arg-type]
                       for p in self._processes]
        for process, slot in zip(self._processes, self._slots, strict=True):
            process.slot = slot
        # by_held[k]: heap of (idle_since, index) of the slots holding k bundles that may take one
        # more (lazy: entries are checked when they come to the top)
        self._by_held: list[list[tuple[float, int]]] = [[] for _ in range(localslots.PREFETCH_BUNDLES)]
        self._by_held[0] = [(slot.idle_since, i) for i, slot in enumerate(self._slots)]
        self._look_again = 0
        self._sent: list[int] = []

    def wake(self) -> None:
        pass  # no receiving thread to wake: results come as events (deliver)

    def receive(self, timeout: float) -> list[ResultBatch]:
        return []  # results come as events (deliver)

    def cancel(self, job: str) -> None:
        pass

    def close(self, wait: bool = True) -> None:
        pass

    def submit(self, bundle: Bundle) -> None:
        super().submit(bundle)
        self.model.submitted(bundle)

    def _refile(self, index: int) -> None:
        slot = self._slots[index]
        if len(slot.held) < len(self._by_held) and slot.takes_more():
            heapq.heappush(self._by_held[len(slot.held)], (slot.idle_since, index))

    def _pick(self, most: int | None = None) -> int | None:
        """LocalBackend._hand_out's choice: of the live slots that take_more(), the least by
        (len(held), idle_since), the first in slot order among equals; None if none takes more."""
        for held, heap in enumerate(self._by_held[:most]):
            while heap:
                idle_since, index = heap[0]
                slot = self._slots[index]
                if len(slot.held) == held and slot.idle_since == idle_since and slot.takes_more():
                    return index
                heapq.heappop(heap)
        return None

    def _hand_out(self) -> None:
        """LocalBackend._hand_out, its choice found through the heaps (_pick) rather than by a scan
        of every slot; with ``verify``, the real one runs and each of its choices is checked."""
        if self.verify:
            super()._hand_out()
            self._refile_sent()
            return
        while self._queue:
            index = self._pick()
            if index is None:
                return
            slot = self._slots[index]
            bundle = self._queue.popleft()
            self._send(slot, protocol.bundle_message(bundle))
            slot.held[bundle.bundle] = HeldBundle(bundle)
            slot.took_work = True
            self._refile(index)

    def _send(self, slot: WorkerSlot, message: dict) -> bool:  # type: ignore[override]
        if self.verify and message["type"] == "bundle":  # the real _hand_out chose ``slot``
            self._refile_sent()
            index = self._slots.index(slot)
            assert self._pick() == index, f"hand-out: LocalBackend chose slot {index}, _pick {self._pick()}"
            self._sent.append(index)  # refiled once the real _hand_out has recorded the bundle
        return LocalBackend._send(slot, message)

    def _refile_sent(self) -> None:
        while self._sent:
            self._refile(self._sent.pop())

    def deliver(self, index: int, batch: ResultBatch) -> None:
        """A results frame from process ``index`` (LocalBackend._read_results), then the
        dispatcher (scheduler's event loop), then the backend's next look (receive)."""
        self._record(self._slots[index], batch)  # stamps idle_since with simulated time (SimClock)
        self._refile(index)
        self.model.handed_back([batch])
        assert self.dispatcher is not None
        self.dispatcher.handle_results([batch])
        self.step()

    def step(self) -> None:
        """What LocalBackend.receive does before it waits: hand out, steal for an idle worker;
        then it waits RECEIVE_POLL_SECONDS, or less if the stealing rule wants to look again."""
        self._hand_out()
        again: float | None = math.inf
        if not self._queue and self._pick(1) is not None:  # a slot holds nothing: the real rule decides
            again = self._steal_for_idle()  # type: ignore[func-returns-value]
        self._look_again += 1
        wait = RECEIVE_POLL_SECONDS if again is None else min(RECEIVE_POLL_SECONDS, again)
        self.model.sim.at(self.model.sim.now + wait, self._timeout, self._look_again)

    def _timeout(self, token: int) -> None:
        if token == self._look_again:  # receive(RECEIVE_POLL_SECONDS) returned with nothing
            self.step()


class SimClock:
    """Stands in for the ``time`` module inside localworkers during a local run, so that its
    idle times and stealing delays are simulated time."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    def monotonic(self) -> float:
        return self.sim.now

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


# --- remote mode ---------------------------------------------------------------------------

class SimQueue:
    """An SQS queue: messages in order; a receive takes those visible, or long-polls for them."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.messages: deque[tuple[float, str]] = deque()  # (sent at, body)
        self.sent = 0
        self.backlog = 0  # most messages waiting at once
        self.waited = 0.0  # seconds messages spent waiting to be received, all together
        self.waiting: deque[tuple[float, str, int, float, Callable[[list[str]], None]]] = deque()

    def send(self, bodies: list[str]) -> None:
        sim = self.model.sim
        self.messages.extend((sim.now, body) for body in bodies)
        self.sent += len(bodies)
        self.backlog = max(self.backlog, len(self.messages))
        while self.messages and self.waiting:
            issued, side, most, wait, deliver = self.waiting.popleft()
            timeouts = int((sim.now - issued) // wait)  # empty returns, each polled again at once
            latency = (self.model.count(side, "sqs:ReceiveMessage", timeouts) if timeouts
                       else self.model.latency("sqs"))
            sim.at(max(issued + timeouts * wait + latency, sim.now + latency / 2), deliver, self._take(most))

    def receive(self, side: str, most: int, wait: float, deliver: Callable[[list[str]], None]) -> None:
        latency = self.model.count(side, "sqs:ReceiveMessage")
        most = max(1, min(most, aws.SQS_MAX_BATCH))
        if self.messages:
            self.model.sim.at(self.model.sim.now + latency, deliver, self._take(most))
        else:
            self.waiting.append((self.model.sim.now, side, most, wait, deliver))

    def receive_now(self, most: int) -> list[str]:
        """A ReceiveMessage with WaitTimeSeconds=0 as it starts: what is visible, up to ``most``
        (its latency is the caller's)."""
        return self._take(max(1, min(most, aws.SQS_MAX_BATCH)))

    def _take(self, most: int) -> list[str]:
        taken = [self.messages.popleft() for _ in range(min(most, len(self.messages)))]
        self.waited += sum(self.model.sim.now - sent for sent, _ in taken)
        return [body for _, body in taken]

    def close(self) -> None:
        """The run is over: count the empty returns of the polls still waiting."""
        for issued, side, _, wait, _ in self.waiting:
            self.model.calls[side, "sqs:ReceiveMessage"] += int((self.model.sim.now - issued) // wait)


class SimMachine:
    """A worker.py process: Worker.run's receive loop, ``threads`` Worker._handle threads, leases."""

    def __init__(self, model: Model, backend: SimSQSBackend, index: int, threads: int) -> None:
        self.model, self.backend, self.index, self.threads = model, backend, index, threads
        self.held = 0  # messages held (holdings.Holdings)
        self.claimed = 0  # of which claimed: their leases are renewed
        self.sleeping_since: float | None = None
        self.wake_pending = False
        self.boxes = SimTimeBoxes(model, self._hand_back_rest)  # Worker.boxes, one per process
        model.sim.at(model.rng.uniform(0, DEFAULT_VISIBILITY_TIMEOUT / 3), self._renew)

    def loop(self) -> None:
        self.wake_pending = False
        free = self.threads - self.held
        if free <= 0:
            self.sleeping_since = self.model.sim.now
            return
        self.sleeping_since = None
        self.backend.requests.receive("worker", free, aws.SQS_MAX_WAIT_SECONDS, self._received)

    def _received(self, bodies: list[str]) -> None:
        for body in bodies:
            self.held += 1
            self.model.sim.drive(self._handle(body), self._freed)
        self.loop()

    def _freed(self) -> None:
        self.held -= 1
        if self.sleeping_since is not None and not self.wake_pending:  # seen at the next 50 ms tick
            ticks = max(1, math.ceil((self.model.sim.now - self.sleeping_since) / WORKER_FULL_SLEEP - 1e-9))
            self.wake_pending = True
            self.model.sim.at(self.sleeping_since + ticks * WORKER_FULL_SLEEP, self.loop)

    def _handle(self, body: str) -> Iterator[float]:
        """Worker._handle: cancel mark, claim, run, results, done, delete."""
        count = self.model.count
        bundle, _ = parse_request(body)
        yield count("worker", "dynamodb:GetItem")  # Worker._cancelled: the durable cancel mark
        yield count("worker", "dynamodb:PutItem")  # Claims.claim
        self.claimed += 1
        batches: list[ResultBatch] = []
        yield from run_box(self.model, bundle, self.index, self.boxes, batches.append)
        for chunk in aws._batches(self._bodies(bundle.job, batches)):
            yield count("worker", "sqs:SendMessageBatch")
            self.backend.responses.send(chunk)
        yield count("worker", "dynamodb:UpdateItem")  # Claims.finish
        yield count("worker", "sqs:DeleteMessageBatch")
        self.claimed -= 1

    def _bodies(self, job: str, batches: list[ResultBatch]) -> list[str]:
        """Worker._send: the flushed batches as one, split only to fit a message."""
        whole = ResultBatch(job)
        for batch in batches:
            whole.bundle = batch.bundle
            whole.extend(batch)
        whole.worker = f"machine-{self.index}"
        return response_bodies(whole)

    def _hand_back_rest(self, bundle: Bundle, ids: list[int]) -> float:
        """Worker._hand_back_rest, from TimeBoxes' thread: the rest in one SendMessageBatch call (the
        thread waits for it; the message is on the queue when the call returns)."""
        chunks = list(aws._batches(self._bodies(bundle.job, [ResultBatch(bundle.job, bundle.bundle,
                                                                         returned=ids)])))
        when = self.model.sim.now
        for chunk in chunks:
            when += self.model.count("worker", "sqs:SendMessageBatch")
            self.model.sim.at(when, self.backend.responses.send, chunk)
        return when - self.model.sim.now

    def _renew(self) -> None:
        """Holdings.keep_leases (call latencies ignored: a thread of its own)."""
        if self.claimed:
            self.model.calls["worker", "sqs:ChangeMessageVisibility"] += self.claimed
            self.model.calls["worker", "dynamodb:UpdateItem"] += self.claimed
            self.model.calls["worker", "dynamodb:GetItem"] += 1  # one job
        self.model.sim.at(self.model.sim.now + DEFAULT_VISIBILITY_TIMEOUT / 3, self._renew)


class SimCalls:
    """SQSBackend._calls, a ThreadPoolExecutor(PARALLEL_SQS_CALLS): a call submitted starts when a
    thread is free (first come first served, as the executor's queue) and takes its latency."""

    def __init__(self, model: Model, threads: int) -> None:
        self.model = model
        self._free = [0.0] * threads  # when each thread is free again (a heap)

    def submit(self, api: str) -> tuple[float, float]:
        """One scheduler call of ``api`` through the pool, counted: when it starts and ends."""
        start = max(self.model.sim.now, heapq.heappop(self._free))
        end = start + self.model.count("scheduler", api)
        heapq.heappush(self._free, end)
        return start, end


class SimSQSBackend(SQSBackend):
    """SQSBackend's slots and capacity, its sender thread and receive loop, over simulated SQS."""

    def __init__(self, model: Model, slots: int, threads: int) -> None:  # no AWS clients
        self.model = model
        self.dispatcher: Dispatcher | None = None
        self._in_flight = slots  # SQSBackend.workers() returns it; capacity() is workers()
        self.requests, self.responses = SimQueue(model), SimQueue(model)
        self._waiting: list[Bundle] = []
        self._sending = False
        self.calls = SimCalls(model, PARALLEL_SQS_CALLS)  # SQSBackend._calls
        self.machines = [SimMachine(model, self, i, min(threads, slots - start))
                         for i, start in enumerate(range(0, slots, threads))]

    def submit(self, bundle: Bundle) -> None:
        self.model.submitted(bundle)
        self._waiting.append(bundle)
        if not self._sending:  # the sender thread wakes after this dispatcher step
            self._sending = True
            self.model.sim.at(self.model.sim.now, self._send_waiting)

    def _send_waiting(self) -> None:
        """SQSBackend._send_loop and _send: everything waiting, ten bundles to a call
        (aws.send_messages: one call in the sender thread; more, all submitted to the pool at once,
        the sender waiting for the last); each call's messages are on the queue when it returns."""
        if not self._waiting:
            self._sending = False
            return
        bodies = []
        for bundle in self._waiting:
            fitting, too_large = request_bodies(bundle, RESPONSE_URL)
            assert not too_large
            bodies += fitting
        self._waiting = []
        batches = list(aws._batches(bodies))
        done = self.model.sim.now
        for chunk in batches:
            if len(batches) < 2:
                end = done + self.model.count("scheduler", "sqs:SendMessageBatch")
            else:
                _, end = self.calls.submit("sqs:SendMessageBatch")
            self.model.sim.at(end, self.requests.send, chunk)
            done = max(done, end)
        self.model.sim.at(done, self._send_waiting)

    def start(self) -> None:
        for machine_ in self.machines:
            machine_.loop()
        self._poll()

    def _poll(self) -> None:
        self.responses.receive("scheduler", aws.SQS_MAX_BATCH, RECEIVE_POLL_SECONDS, self._received)

    def _received(self, bodies: list[str]) -> None:
        """SQSBackend.receive, after its long poll: more receives while they come back full."""
        self._receive_more(bodies, 1, len(bodies))

    @staticmethod
    def _backlog(last: int, width: int, received: int) -> bool:
        """SQSBackend.receive's loop condition: the last round came back full, and fewer than
        MAX_RECEIVED messages are in hand."""
        return last == width * aws.SQS_MAX_BATCH and received < MAX_RECEIVED

    def _receive_more(self, bodies: list[str], width: int, last: int) -> None:
        """SQSBackend.receive: while a backlog (``_backlog``), ``width`` doubles (up to
        PARALLEL_SQS_CALLS) and that many ReceiveMessage calls (WaitTimeSeconds=0) go through the
        pool at once, the thread waiting for all of them; then the deletes."""
        if not self._backlog(last, width, len(bodies)):
            self._delete(bodies)
            return
        width = min(2 * width, PARALLEL_SQS_CALLS)
        got: list[list[str]] = []
        done = self.model.sim.now
        for _ in range(width):
            start, end = self.calls.submit("sqs:ReceiveMessage")
            self.model.sim.at(start, lambda: got.append(self.responses.receive_now(aws.SQS_MAX_BATCH)))
            done = max(done, end)
        self.model.sim.at(done, lambda: self._receive_more(bodies + [b for part in got for b in part], width,
                                                           sum(map(len, got))))

    def _delete(self, bodies: list[str]) -> None:
        """SQSBackend.receive's aws.delete_messages: ten receipts a call; one call in the receiving
        thread, more all through the pool at once, waited for together; then it returns (decoded)
        and the event loop handles them."""
        chunks = math.ceil(len(bodies) / aws.SQS_MAX_BATCH)
        done = self.model.sim.now
        if chunks == 1:
            done += self.model.count("scheduler", "sqs:DeleteMessageBatch")
        for _ in range(chunks if chunks > 1 else 0):
            done = max(done, self.calls.submit("sqs:DeleteMessageBatch")[1])
        self.model.sim.at(done, self._handle, bodies)

    def _handle(self, bodies: list[str]) -> None:
        self.model.rounds.append((self.model.sim.now, len(bodies), len(self.responses.messages)))
        batches = [protocol.results_from_message(protocol.decode(body.encode())) for body in bodies]
        self.model.handed_back(batches)
        assert self.dispatcher is not None
        self.dispatcher.handle_results(batches)
        self._poll()

    def receive(self, timeout: float) -> list[ResultBatch]:
        return []

    def cancel(self, job: str) -> None:
        pass

    def close(self, wait: bool = True) -> None:
        pass


# --- runs ----------------------------------------------------------------------------------

@dataclass
class Row:
    mode: str
    workload: str
    order: str
    estimates: str
    workers: int
    tasks: int
    makespan: float
    greedy: float
    ideal: float
    ratio: float  # makespan / greedy
    ratio_ideal: float
    bundles: int
    returned: int
    steals: int
    aws_calls: int
    calls_per_task: float
    results_ok: bool
    busy: float  # share of worker-seconds spent running bundles, up to the makespan
    result_messages: float  # remote: result messages per bundle
    result_wait_ms: float  # remote: mean time a result message waited on the response queue
    result_backlog: int  # remote: most result messages waiting at once
    cpu_seconds: float
    tail: list[str] = field(default_factory=list)


def durations_of(workload: str, order: str, n: int, seed: int) -> list[float]:
    rng = random.Random(f"{seed}:{workload}:{n}")
    if workload == "uniform-10ms":
        seconds = [0.010] * n
    elif workload == "uniform-1s":
        seconds = [1.0] * n
    elif workload == "loguniform":  # whole milliseconds, as `sleep N` runs them
        seconds = [round(10 ** rng.uniform(-3, 1), 3) for _ in range(n)]
    else:
        seconds = [10.0 if rng.random() < 0.1 else 0.0 for _ in range(n)]
    return sorted(seconds) if order == "short-first" else seconds


def greedy(durations: list[float], workers: int) -> float:
    """List schedule: tasks in file order, each to the worker that frees first; no overhead."""
    free = [0.0] * workers
    for seconds in durations:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def simulate(mode: str, workload: str, order: str, estimates: str, workers: int,
             args: argparse.Namespace) -> Row:
    cpu = time.process_time()
    n = max(args.min_tasks, args.tasks_per_worker * workers)
    durations = durations_of(workload, order, n, args.seed)
    if estimates == "exact":
        commands = [f"sleep {round(s * 1000)}" for s in durations]
    else:
        commands = [f"./task {i}" for i in range(n)]
    model = Model(durations, args.task_overhead,
                  {"sqs": tuple(args.sqs_latency), "dynamodb": tuple(args.dynamodb_latency)},
                  f"{args.seed}:{mode}:{workload}:{order}:{estimates}:{workers}")
    backend: SimLocalBackend | SimSQSBackend
    clock = localworkers.__dict__.get("time")
    runner.time = SimClock(model.sim)  # type: ignore[attr-defined]  # TimeBoxes.open: when a box ends
    if mode == "local":
        localworkers.time = SimClock(model.sim)  # type: ignore[attr-defined]
        backend = SimLocalBackend(model, workers, args.ipc, args.verify or workers <= 32)
    else:
        backend = SimSQSBackend(model, workers, args.threads)
    try:
        return _simulate(model, backend, mode, workload, order, estimates, workers, commands, cpu)
    finally:
        runner.time = time  # type: ignore[attr-defined]
        if clock is not None:
            localworkers.time = clock  # type: ignore[attr-defined]


def _simulate(model: Model, backend: SimLocalBackend | SimSQSBackend, mode: str, workload: str, order: str,
              estimates: str, workers: int, commands: list[str], cpu: float) -> Row:
    n, durations = len(commands), model.durations
    results = [0] * n
    finished: list[float] = []

    def on_results(job: Job, batch: ResultBatch) -> None:
        for task_id in batch.ids:
            results[task_id] += 1

    dispatcher = Dispatcher(backend, on_results, lambda job: finished.append(model.sim.now))
    backend.dispatcher = dispatcher
    job = model.job = dispatcher.open_job()
    dispatcher.add_tasks(job, commands)
    dispatcher.close_job(job)
    if isinstance(backend, SimLocalBackend):
        backend.step()
    else:
        backend.start()
    model.sim.run(lambda: bool(finished))
    if isinstance(backend, SimSQSBackend):
        backend.requests.close()
        backend.responses.close()
    makespan = finished[0] if finished else math.inf
    best = greedy(durations, workers)
    ideal = sum(durations) / workers
    calls = sum(model.calls.values())
    ok = all(r == 1 for r in results) and all(e == 1 for e in model.executed)
    busy = sum(r.end - r.start for r in model.runs.values() if not math.isnan(r.end)) / (workers * makespan)
    responses = backend.responses if isinstance(backend, SimSQSBackend) else None
    row = Row(mode, workload, order, estimates, workers, n, makespan, best, ideal,
              makespan / best if best else math.inf, makespan / ideal if ideal else math.inf,
              dispatcher._next_bundle, model.returned, model.steals, calls, calls / n, ok, busy,
              responses.sent / dispatcher._next_bundle if responses else 0.0,
              1000 * responses.waited / max(1, responses.sent) if responses else 0.0,
              responses.backlog if responses else 0, time.process_time() - cpu)
    row.tail = tail_facts(model, row, workers)
    return row


def tail_facts(model: Model, row: Row, workers: int) -> list[str]:
    """What ended last and why: the facts behind a makespan over the greedy one."""
    ran = [r for r in model.runs.values() if not math.isnan(r.end)]
    if not ran:
        return []
    last_end: dict[int, float] = {}
    for r in ran:
        last_end[r.worker] = max(last_end.get(r.worker, 0.0), r.end)
    ends = sorted(last_end.values()) + [0.0] * (workers - len(last_end) if row.mode == "local" else 0)
    ends.sort()

    def at(q: float) -> float:
        return ends[min(len(ends) - 1, int(q * len(ends)))]

    unit = "machine" if row.mode == "remote" else "worker"
    facts = [f"makespan {row.makespan:.2f} s, greedy {row.greedy:.2f} s, ideal {row.ideal:.2f} s; "
             f"{unit}s' last work ended: 10% by {at(0.1):.2f} s, half by {at(0.5):.2f} s, "
             f"90% by {at(0.9):.2f} s, all by {ends[-1]:.2f} s"]
    late = [r for r in ran if r.start >= row.greedy - 10.0]
    waited = statistics.mean(r.start - r.submitted for r in ran)
    facts.append(f"{len(ran)} bundles ran ({row.bundles} cut, {row.returned} tasks handed back, "
                 f"{row.steals} steals); mean wait from cut to start {waited * 1000:.0f} ms; "
                 f"{len(late)} started after greedy makespan - 10 s")
    starts = sorted(r.start for r in ran)
    facts.append(f"the first {workers:,} bundles to start had all started by "
                 f"{starts[min(workers, len(starts)) - 1]:.2f} s")
    big = max(ran, key=lambda r: r.tasks)
    facts.append(f"largest bundle cut: #{big.number}, {big.tasks:,} tasks at {big.submitted:.2f} s, "
                 f"estimate {big.expected:.2f} s; it ran {big.ran} ({big.work:.2f} s), handed back "
                 f"{big.returned:,}")
    facts.append("the 5 bundles that ended last (cut at -> start -> end s: tasks run/cut, longest task, "
                 "work s, estimate s, budget s, tasks it handed back; when its first task had been handed "
                 "back by another bundle):")
    for r in sorted(ran, key=lambda r: r.end)[-5:]:
        budget = "none" if r.budget is None else f"{r.budget:.2f}"
        back = model.handed_back_at.get(r.first)
        before = "" if back is None or back > r.submitted else f"; first task handed back at {back:.2f} s"
        facts.append(f"  #{r.number} on {unit} {r.worker}: {r.submitted:.2f} -> {r.start:.2f} -> "
                     f"{r.end:.2f}: "
                     f"{r.ran}/{r.tasks}, {r.longest:.3f}, {r.work:.2f}, {r.expected:.2f}, {budget}, "
                     f"{r.returned}{before}")
    over = [r for r in ran if r.budget is not None and r.end - r.start > r.budget + 1e-3]
    if over:
        facts.append(f"{len(over)} bundles ran past their time box (the task running when it ended), by up "
                     f"to {max(r.end - r.start - r.budget for r in over):.2f} s")
    bins = 10
    width = row.makespan / bins
    profile = [0.0] * bins
    for r in ran:
        for b in range(int(r.start // width), min(bins, int(r.end // width) + 1)):
            profile[b] += max(0.0, min(r.end, (b + 1) * width) - max(r.start, b * width))
    facts.append(f"workers busy, by tenth of the makespan ({width:.1f} s each): "
                 + " ".join(f"{p / width / workers:.0%}" for p in profile))
    if row.mode == "remote" and model.rounds:
        rounds = model.rounds
        behind = [(now - before, n) for (before, _, left), (now, n, _) in itertools.pairwise(rounds) if left]
        fact = (f"scheduler receives: {len(rounds):,}, {statistics.mean(n for _, n, _ in rounds):.1f} "
                f"messages each on average, {max(n for _, n, _ in rounds)} at most")
        if behind:
            fact += (f"; {len(behind):,} began with messages still waiting: {sum(n for _, n in behind):,} "
                     f"messages in {sum(t for t, _ in behind):.2f} s "
                     f"({sum(n for _, n in behind) / sum(t for t, _ in behind):.0f} a second)")
        facts.append(fact)
    if row.mode == "remote":
        facts.append(f"result messages: {row.result_messages:.1f} per bundle, "
                     f"waited {row.result_wait_ms:.0f} ms on average on the response queue, "
                     f"up to {row.result_backlog:,} waiting at once")
        facts.append(f"AWS calls per task ({row.calls_per_task:.3f}): " + ", ".join(
            f"{side} {api} {calls / row.tasks:.3f}" for (side, api), calls in model.calls.most_common()))
    big = sorted(ran, key=lambda r: r.end - r.start)[-3:]
    facts.append("longest-running bundles: " + "; ".join(
        f"#{r.number} {r.end - r.start:.2f} s ({r.ran} tasks, longest {r.longest:.2f} s, "
        f"started {r.start:.2f})" for r in reversed(big)))
    return facts


# --- output --------------------------------------------------------------------------------

COLUMNS = ["mode", "workload", "order", "estimates", "workers", "tasks", "makespan", "greedy", "ideal",
           "ratio", "ratio_ideal", "bundles", "returned", "steals", "aws_calls", "calls_per_task",
           "results_ok", "busy", "result_messages", "result_wait_ms", "result_backlog", "cpu_seconds"]


def table(rows: list[Row]) -> list[str]:
    head = ["mode", "workload", "order", "est.", "workers", "tasks", "makespan s", "greedy s", "ideal s",
            "/greedy", "/ideal", "busy", "bundles", "handed back", "steals", "AWS calls/task",
            "result msgs/bundle", "result wait ms", "1 result each"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 14 + ["---"]) + "|"]
    for r in rows:
        over = " **over**" if is_target(r) and r.ratio > TARGET_RATIO else ""
        remote = (f"{r.calls_per_task:.4f} | {r.result_messages:.1f} | {r.result_wait_ms:.0f}"
                  if r.mode == "remote" else " | | ")
        lines.append(f"| {r.mode} | {r.workload} | {r.order} | {r.estimates} | {r.workers:,} | {r.tasks:,} | "
                     f"{r.makespan:.3f} | {r.greedy:.3f} | {r.ideal:.3f} | {r.ratio:.3f}{over} | "
                     f"{r.ratio_ideal:.3f} | {r.busy:.0%} | {r.bundles:,} | {r.returned:,} | {r.steals:,} | "
                     f"{remote} | {'yes' if r.results_ok else 'NO'} |")
    return lines


def is_target(row: Row) -> bool:
    return row.workers == 1000 and row.workload in MIXED


def label(row: Row) -> str:
    parts = [row.workload] + ([row.order] if row.order != "-" else []) + (
        [row.estimates] if row.workload in MIXED else [])
    return " ".join(parts)


def plots(rows: list[Row], title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ticks = sorted({r.workers for r in rows})
    figure, panes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for axes, mode in zip(panes, ("local", "remote"), strict=True):
        for name in dict.fromkeys(label(r) for r in rows if r.mode == mode):
            points = sorted((r for r in rows if r.mode == mode and label(r) == name), key=lambda r: r.workers)
            axes.plot([r.workers for r in points], [r.ratio for r in points], marker="o",
                      linestyle="-" if "learned" not in name else "--", label=name)
        axes.axhline(TARGET_RATIO, color="red", linestyle=":", label=f"target {TARGET_RATIO} (mixed, 1,000)")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(ticks, [f"{t:,}" for t in ticks])
        axes.set_xlabel("simulated workers (remote: slots)")
        axes.set_title(f"{mode}: makespan / greedy list schedule", fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    panes[0].set_ylabel("makespan / greedy (log)")
    figure.suptitle(textwrap.fill(title, 200), fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "simulate_makespan.png", dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7.5, 5))
    for name in dict.fromkeys(label(r) for r in rows if r.mode == "remote"):
        points = sorted((r for r in rows if r.mode == "remote" and label(r) == name), key=lambda r: r.workers)
        axes.plot([r.workers for r in points], [r.calls_per_task for r in points], marker="o",
                  linestyle="-" if "learned" not in name else "--", label=name)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(ticks, [f"{t:,}" for t in ticks])
    axes.set_xlabel("simulated worker slots")
    axes.set_ylabel("AWS calls per task (log), scheduler + workers")
    axes.set_title("remote: AWS calls per task\n" + textwrap.fill(title, 110), fontsize=7)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "simulate_calls.png", dpi=110)
    plt.close(figure)
    return ["simulate_makespan.png", "simulate_calls.png"]


def code_version() -> str:
    """The commit simulated, and whether the modules whose rules it runs differ from it."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True,
                                  timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", *POLICY_MODULES)
    return f"commit {commit}" + (" with uncommitted changes to " + ", ".join(
        line[3:] for line in dirty.splitlines()) if dirty else "")


def report(rows: list[Row], args: argparse.Namespace, setting: str, files: list[str]) -> str:
    lines = ["# Scheduling policy, simulated", "",
             f"`{' '.join(['python bench/simulate.py', *sys.argv[1:]])}` on {code_version()}", "",
             f"Machine (simulation speed only): {machine()}", "", setting, "",
             "Makespan: job submitted to its last result at the scheduler. Greedy: the same durations "
             "in file order, each to the worker that frees first, no overhead. Ideal: sum / workers. "
             "Busy: share of worker-time spent running bundles. Remote workers are slots (threads), on "
             f"machines of {args.threads} threads; result msgs/bundle: SQS messages a bundle's results "
             "took; result wait: mean time one waited on the response queue "
             "for the scheduler's receive loop.", "", *table(rows), ""]
    targets = [r for r in rows if is_target(r)]
    if targets:
        lines += [f"## Target: makespan <= {TARGET_RATIO} x greedy at 1,000 workers, mixed workloads", ""]
        for r in targets:
            verdict = "met" if r.ratio <= TARGET_RATIO else "**not met**"
            lines.append(f"- {r.mode}, {label(r)}: {r.ratio:.3f} ({verdict})")
        lines.append("")
        for r in targets:
            if r.ratio > TARGET_RATIO:
                lines += [f"### {r.mode}, {label(r)}: {r.ratio:.3f}", "", "```", *r.tail, "```", ""]
    lines += [f"![{name}]({name})" for name in files]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--bursty"]:  # the fleet and its provisioning policy: bench/fleetsim.py
        import fleetsim
        fleetsim.main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="python bench/simulate.py --bursty [OPTIONS]: the provisioning "
                                            "policy on a bursty workload (bench/fleetsim.py --help)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 32, 256, 1000])
    parser.add_argument("--modes", nargs="+", default=["local", "remote"], choices=["local", "remote"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--tasks-per-worker", type=int, default=20)
    parser.add_argument("--min-tasks", type=int, default=400)
    parser.add_argument("--ipc", type=float, default=1e-4, help="local: seconds per frame, each way")
    parser.add_argument("--task-overhead", type=float, default=1.2e-6, help="seconds per task in a worker")
    parser.add_argument("--sqs-latency", type=float, nargs=2, default=[0.010, 0.020], metavar=("LOW", "HIGH"))
    parser.add_argument("--dynamodb-latency", type=float, nargs=2, default=[0.010, 0.020],
                        metavar=("LOW", "HIGH"))
    parser.add_argument("--threads", type=int, default=4, help="remote: threads per worker machine")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verify", action="store_true",
                        help="check every local hand-out against LocalBackend's own scan (always at <= 32)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()

    setting = (f"Local: IPC {args.ipc * 1000:g} ms per frame each way, {args.task_overhead * 1e6:g} us per "
               f"task, target {LocalBackend.target_bundle_seconds} s, capacity 2 x workers, prefetch "
               f"{localslots.PREFETCH_BUNDLES} behind bundles boxed <= "
               f"{localslots.PREFETCH_BEHIND_SECONDS} s. Remote: SQS calls "
               f"{args.sqs_latency[0] * 1000:g}-{args.sqs_latency[1] * 1000:g} ms, DynamoDB calls "
               f"{args.dynamodb_latency[0] * 1000:g}-{args.dynamodb_latency[1] * 1000:g} ms, target "
               f"{SQSBackend.target_bundle_seconds} s, one bundle per slot, {args.threads} threads per "
               f"machine. Tasks: max({args.min_tasks}, {args.tasks_per_worker} x workers); seed {args.seed}.")
    print(f"machine: {machine()}; code: {code_version()}")
    print(setting)
    rows: list[Row] = []
    started = time.process_time()
    for mode in args.modes:
        for workload in args.workloads:
            orders, kinds = WORKLOADS[workload]
            for order, estimates in itertools.product(orders, kinds):
                for workers in args.workers:
                    row = simulate(mode, workload, order, estimates, workers, args)
                    rows.append(row)
                    print(f"  {mode:6} {label(row):32} {workers:5}: makespan {row.makespan:8.3f} s, "
                          f"greedy {row.greedy:8.3f} s, ratio {row.ratio:6.3f}, {row.bundles:6} bundles, "
                          f"{row.calls_per_task:.4f} calls/task, ok {row.results_ok} "
                          f"({row.cpu_seconds:.1f} s CPU)", flush=True)
    print(f"total {time.process_time() - started:.0f} s CPU\n")
    for line in table(rows):
        print(line)
    over = [r for r in rows if is_target(r) and r.ratio > TARGET_RATIO]
    for r in [r for r in rows if is_target(r)]:
        print(f"target {r.mode} {label(r)}: {r.ratio:.3f} {'met' if r.ratio <= TARGET_RATIO else 'NOT MET'}")
    for r in over:
        print(f"\n{r.mode}, {label(r)}:")
        print("\n".join(r.tail))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "simulate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({name: value for name, value in asdict(r).items() if name in COLUMNS})
    files = [] if args.no_plots else plots(rows, f"{machine()}. {setting}")
    (RESULTS / "simulate.md").write_text(report(rows, args, setting, files))
    print("\nwrote " + ", ".join(str(RESULTS / name) for name in ["simulate.csv", "simulate.md", *files]))
    if not all(r.results_ok for r in rows):
        raise SystemExit("some task did not get exactly one result")


if __name__ == "__main__":
    main()
