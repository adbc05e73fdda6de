"""The fleet's provisioning policy: when to launch worker instances and how long to keep an idle one.

Owns the decisions, as plain functions and classes that make no AWS call (``provisioning.Fleet``
applies them to EC2, ``remoteworker`` to its own idle exit, bench/fleetsim.py to simulated instances):
  - launch (``launch_count``): when the backlog's estimated work exceeds what the live and booting
    workers' threads finish within a launch's boot time, launch enough instances for the excess,
    each given at least the work that makes its paid boot worth it (USEFUL_SHARE of its paid time
    running tasks, and at least the billed minimum); never more than the maximum;
  - retire (``keep_seconds``, ``retire_at``): an idle worker is kept while keeping it is expected to
    cost less than retiring it and booting another for the next burst (the boot's paid seconds):
    the idle time that minimises the expected cost over the gaps between bursts seen so far
    (``BurstGaps``), the boot time itself before any gap is seen (the ski-rental rule: never more
    than twice the best cost in hindsight); and never before the instance's billed minimum ends
    (retiring sooner saves nothing);
  - what the inputs are measured from: the backlog's estimated work (``backlog_seconds``, from the
    dispatcher's jobs and their estimates), the boot time (``BootTimes``, launch to first heartbeat).

Relies on EC2's billing of Linux instances: per second, with a minimum of MINIMUM_BILLED_SECONDS from
launch, whatever the instance did.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cloudkon.costs import MINIMUM_BILLED_SECONDS
from cloudkon.jobs import Dispatcher

# Launch to a worker's first heartbeat, assumed until one is measured: EC2 Linux instances typically
# run their user data 20-40 s after RunInstances; the worker's own start adds a few seconds.
ASSUMED_BOOT_SECONDS = 45.0
# The share of a launched instance's paid time it should spend running tasks: a launch is worth it
# only for work enough to pay for its boot at this share.
USEFUL_SHARE = 0.85
# Gaps between bursts remembered: enough for a distribution, few enough to follow a change of pace.
GAPS_REMEMBERED = 32
# Boot times remembered (their median is the estimate).
BOOTS_REMEMBERED = 64
# The keep time told to the workers again only once it changed by more than this share (each telling
# is one write per worker).
KEEP_TOLERANCE = 0.1
# Commands of a job whose estimates are averaged for its backlog: a sample, as jobs may hold millions.
BACKLOG_SAMPLE = 256


def launch_count(backlog: float, live_threads: int, booting: int, threads: int, boot: float,
                 room: int, billed_minimum: float = MINIMUM_BILLED_SECONDS,
                 share: float = USEFUL_SHARE) -> int:
    """Instances to launch now: none while the live threads finish the ``backlog`` (seconds of
    estimated work) within a boot time ``boot``; else as many as leave every thread, live, booting
    and new, the running time that makes a launch worth it (``work_per_launch``) of what remains
    once they have booted; one if none is up or booting; at most ``room`` (what the maximum leaves)."""
    excess = backlog - live_threads * boot
    if excess <= 0 or room <= 0:
        return 0
    per_launch = work_per_launch(threads, boot, billed_minimum, share)
    shared = excess - (live_threads / max(threads, 1) + booting) * per_launch
    wanted = math.floor(shared / per_launch) if shared > 0 else 0
    return min(room, max(wanted, 1 if not (live_threads or booting) else 0))


def work_per_launch(threads: int, boot: float, billed_minimum: float = MINIMUM_BILLED_SECONDS,
                    share: float = USEFUL_SHARE) -> float:
    """Seconds of task work that make one more instance worth its paid boot: ``share`` of its paid
    time (boot included) running tasks, and at least the billed minimum's worth."""
    running = max(boot * share / (1 - share), billed_minimum - boot)
    return max(threads, 1) * running


def keep_seconds(gaps: Iterable[float], relaunch: float) -> float:
    """How long an idle worker is kept: the idle time ``t`` that minimises the expected cost
    E[min(gap, t)] + P(gap > t) * relaunch over the ``gaps`` seen (paid idle seconds, against a new
    instance's paid boot ``relaunch``); ``relaunch`` itself before any gap is seen."""
    seen = sorted(gaps)
    if not seen:
        return relaunch
    best, best_cost = 0.0, relaunch  # retire at once: every gap costs a relaunch
    for index, keep in enumerate(seen):  # keeping through the gaps up to this one
        waited = sum(seen[:index + 1]) + keep * (len(seen) - index - 1)
        cost = (waited + relaunch * (len(seen) - index - 1)) / len(seen)
        if cost < best_cost:
            best, best_cost = keep, cost
    return best


def retire_at(last_work: float, keep: float, paid_until: float) -> float:
    """When an idle worker whose last work ended at ``last_work`` leaves: after ``keep`` seconds
    idle, never before ``paid_until`` (the end of its billed minimum: leaving sooner saves nothing)."""
    return max(last_work + keep, paid_until)


class BurstGaps:
    """The gaps between bursts of work, as the scheduler sees them: from the backlog running out
    to its next work."""

    def __init__(self) -> None:
        self.gaps: deque[float] = deque(maxlen=GAPS_REMEMBERED)
        self._idle_since: float | None = None

    def observe(self, now: float, backlog: float) -> None:
        if backlog <= 0:
            if self._idle_since is None:
                self._idle_since = now
        elif self._idle_since is not None:
            self.gaps.append(now - self._idle_since)
            self._idle_since = None


class BootTimes:
    """Launch to first heartbeat, per instance: a launch's boot time is their median."""

    def __init__(self, assumed: float = ASSUMED_BOOT_SECONDS) -> None:
        self._median = assumed  # the last one known
        self._seen: dict[str, float] = {}
        self._order: deque[str] = deque()

    def observe(self, instance: str, launched_at: float, heartbeat_at: float) -> None:
        """The first heartbeat seen of an instance measures its boot (later ones are no news)."""
        if instance in self._seen:
            return
        self._seen[instance] = max(0.0, heartbeat_at - launched_at)
        self._order.append(instance)
        if len(self._order) > BOOTS_REMEMBERED:
            del self._seen[self._order.popleft()]

    def seconds(self, waiting: Iterable[float] = ()) -> float:
        """The median boot; ``waiting``: how long the instances not heard of yet have been booting.
        The median is known once half of the instances, those seen and those waiting, have booted;
        before, the first boots seen are the quick ones: the last median (or the assumed boot) holds,
        unless every instance waiting has been booting for longer."""
        seen, waiting = sorted(self._seen.values()), list(waiting)
        half = math.ceil((len(seen) + len(waiting)) / 2)
        if seen and len(seen) >= half:
            self._median = seen[half - 1]
            return self._median
        return max(self._median, min(waiting, default=0.0))


@dataclass
class IdleRule:
    """How the fleet's idle workers retire: ``fixed`` seconds idle (--worker-idle-timeout), or,
    when it is None, the cost rule (``keep_seconds``, the billed minimum kept)."""

    fixed: float | None = None
    billed_minimum: float = MINIMUM_BILLED_SECONDS

    def keep(self, gaps: BurstGaps, boot: float) -> float:
        return self.fixed if self.fixed is not None else keep_seconds(gaps.gaps, boot)


@dataclass
class Decision:
    """One scaling step's decision: instances to launch, how long an idle worker is kept, and the
    boot time they were decided with."""

    launch: int
    keep: float
    boot: float


class FleetPolicy:
    """One fleet's policy and what it has learned (boot times, gaps between bursts)."""

    def __init__(self, max_workers: int, threads: int, idle: IdleRule | None = None,
                 assumed_boot: float = ASSUMED_BOOT_SECONDS, share: float = USEFUL_SHARE) -> None:
        self.max_workers = max_workers
        self.share = share
        self.threads = max(threads, 1)
        self.idle = idle or IdleRule()
        self.gaps = BurstGaps()
        self.boots = BootTimes(assumed_boot)
        self._told: float | None = None  # the keep time the workers were last told

    def decide(self, now: float, backlog: float, live: int, booting: Sequence[float]) -> Decision:
        """The step for ``backlog`` seconds of estimated work and ``live`` workers running; ``booting``:
        when the instances launched and not heard of yet were launched."""
        self.gaps.observe(now, backlog)
        boot = self.boots.seconds(now - launched for launched in booting)
        launch = launch_count(backlog, live * self.threads, len(booting), self.threads, boot,
                              self.max_workers - live - len(booting), self.idle.billed_minimum, self.share)
        return Decision(launch, self.idle.keep(self.gaps, boot), boot)

    def news(self, keep: float) -> bool:
        """Whether ``keep`` differs enough from what the workers were told to tell them (and count
        it told); the first keep time is news only under the cost rule (a fixed one is in user data)."""
        told = self._told if self._told is not None else self.idle.fixed
        if told is not None and abs(keep - told) <= KEEP_TOLERANCE * told:
            return False
        self._told = keep
        return True


def backlog_seconds(dispatcher: Dispatcher, unknown: float = ASSUMED_BOOT_SECONDS) -> float:
    """The estimated work of every task without a result (queued or in a bundle out), by the jobs'
    own estimates averaged over a sample of their next tasks; a task of a program never seen counts
    ``unknown`` seconds (its estimate is "unknown, so alone")."""
    total = 0.0
    for job in list(dispatcher.jobs.values()):
        left = job.total - job.done_count
        if left <= 0 or job.times is None:
            continue
        start = min(job.next_task, max(0, job.total - BACKLOG_SAMPLE))
        sample = [unknown if math.isinf(seconds) else seconds
                  for seconds in job.times.estimates(job.commands[start:start + BACKLOG_SAMPLE])]
        total += left * (sum(sample) / len(sample)) if sample else 0.0
    return total
