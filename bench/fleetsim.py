"""The provisioning policy on a bursty workload: a fleet of EC2 workers simulated at up to 1,000 instances.

    python bench/simulate.py --bursty                     # 10, 100 and 1,000 instances (a few s of CPU)
    python bench/fleetsim.py --max-workers 1000 --seed 2  # the same, run directly

What runs for real (imported from the project, not copied): the policy, ``fleetpolicy.FleetPolicy``
(``launch_count``, the cost rule ``keep_seconds`` through ``IdleRule``, ``BurstGaps``, ``BootTimes``), as
``provisioning.Fleet.scale`` calls it every DEFAULT_SCALE_INTERVAL (5 s); ``fleetpolicy.retire_at``, by which
a worker leaves (``remoteworker.Worker._idle_left``); bundles cut by ``backend.plan_bundle`` with
``SQSBackend``'s target (5 s) and time-box margin, each no more than the even share over the live
threads (the dispatcher's rule).

What is simulated (simulated time): the workload of the issue: five stages of 1,000 to 10,000 tasks
of 10 ms to 1 s (uniform, whole milliseconds), each submitted an idle gap of 30 to 300 s after the
previous one finished (a pipeline's stages); an instance boots in a uniform draw from --boot
(RunInstances to the worker's first heartbeat, which the scheduler reads as its boot time), then runs
--threads bundles at once, each costing --bundle-overhead beyond its tasks (the six SQS and DynamoDB
calls of worker.Worker._handle, 15 ms each); an idle thread takes the next bundle at once (SQS's long
poll); the backlog the policy sees is the exact work left (``sleep N`` tasks: estimates are exact).
Billing: per second from launch to termination, at least --billed-minimum (EC2 Linux).

Policies, in the same run on the same workload:
  - ``policy``: fleetpolicy (launch by backlog over the boot time; idle workers kept by the cost rule,
    never before their billed minimum);
  - ``backlog-60s``: the rule before it (launch while the live workers' threads are fewer than the
    bundles in flight: the work waiting in 5 s bundles plus the bundles running, at most
    --max-workers x --threads; an idle worker leaves after a fixed 60 s);
  - ``fixed``: --max-workers instances up and booted from the start, stopped when the last job ends
    (the reference: "a fleet already at full size").

Figures: the share of paid instance-seconds with a task running (an instance counts while any of
its threads runs a task), the share of paid thread-seconds running tasks (stricter: a thread idle on
a busy instance counts as waste), each job's makespan over the fixed fleet's.  Left out: failures,
spot, the scheduler's own delays, SQS's empty receives; the workers hear a new keep time at once
(in the system: at their next heartbeat, 5 s).

Writes bench/results/fleet.md, fleet.csv and fleet_<N>.png (instances and backlog over time).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import itertools
import math
import random
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
from controlplane import control_table  # noqa: E402
from local import machine  # noqa: E402

from cloudkon.backend import plan_bundle  # noqa: E402
from cloudkon.costs import MINIMUM_BILLED_SECONDS  # noqa: E402
from cloudkon.defaults import DEFAULT_SCALE_INTERVAL  # noqa: E402
from cloudkon.fleetpolicy import FleetPolicy, IdleRule, retire_at  # noqa: E402
from cloudkon.sqsbackend import SQSBackend  # noqa: E402

BASELINES = ("backlog-60s", "fixed")
FIXED_IDLE_TIMEOUT = 60.0  # the baseline's --worker-idle-timeout
LOOK_TASKS = 600  # tasks looked at to cut a bundle: more than 5 s of 10 ms tasks
SHARE_TARGET, MAKESPAN_TARGET = 0.85, 1.3


def bursty_workload(seed: int, scale: int = 1) -> list[tuple[float, list[float]]]:
    """Five stages: (idle gap before it, its task durations); ``scale`` x as many tasks."""
    rng = random.Random(seed)
    return [(0.0 if stage == 0 else rng.uniform(30, 300),
             [rng.randint(10, 1000) / 1000 for _ in range(rng.randint(1000, 10_000) * scale)])
            for stage in range(5)]


@dataclass
class Machine:
    launched: float
    ready: float
    ended: float | None = None
    busy: int = 0  # threads running a bundle
    busy_since: float = 0.0
    busy_seconds: float = 0.0  # with any thread running
    last_work: float = 0.0
    version: int = 0  # a retirement check made before its last bundle is stale


@dataclass
class Run:
    """One policy's run: what was paid, what ran, each job's makespan, the timeline."""

    policy: str
    machines: list[Machine] = field(default_factory=list)
    makespans: list[float] = field(default_factory=list)
    timeline: list[tuple[float, int, float]] = field(default_factory=list)  # (time, instances, backlog)
    work: float = 0.0
    end: float = 0.0


class FleetSim:
    """A fleet under one policy running the bursty workload, as timed events."""

    def __init__(self, policy: str, workload: list[tuple[float, list[float]]], args: argparse.Namespace,
                 seed: int) -> None:
        self.kind, self.workload, self.args = policy.split("@")[0], workload, args
        self.rng = random.Random(seed)
        self.run = Run(policy)
        share = float(policy.split("@")[1]) if "@" in policy else 0.0
        self.events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self.sequence = itertools.count()
        self.now = 0.0
        self.policy = FleetPolicy(args.max_workers, args.threads, IdleRule(None, args.billed_minimum),
                                  share=share or 0.85)
        self.keep = self.policy.idle.keep(self.policy.gaps, self.policy.boots.seconds())
        self.free: deque[Machine] = deque()  # one entry per idle thread (a retired one's are skipped)
        self.live = 0  # instances booted and not retired
        self.stage = -1
        self.tasks: list[float] = []
        self.next_task = self.done = 0
        self.left = 0.0  # seconds of work of the current job not finished
        self.running = 0  # bundles out
        self.submitted = 0.0

    def at(self, when: float, action: Callable[..., None], *args: object) -> None:
        heapq.heappush(self.events, (when, next(self.sequence), action, args))

    def simulate(self) -> Run:
        if self.kind == "fixed":
            for _ in range(self.args.max_workers):
                self._start(Machine(0.0, 0.0))
        self.at(0.0, self._scale)
        self.at(0.0, self._submit)
        while self.events:
            self.now, _, action, args = heapq.heappop(self.events)
            action(*args)
        return self.run

    # --- the jobs -------------------------------------------------------------------------

    def _submit(self) -> None:
        self.stage += 1
        self.tasks = self.workload[self.stage][1]
        self.next_task = self.done = 0
        self.left = sum(self.tasks)
        self.run.work += self.left
        self.submitted = self.now
        self._feed()

    def _feed(self) -> None:
        """Idle threads take the next bundles (cut by the dispatcher's rule over the live threads)."""
        slots = self.live * self.args.threads
        while self.free and self.next_task < len(self.tasks):
            machine = self.free.popleft()
            if machine.ended is not None:
                continue
            even_share = -(-(len(self.tasks) - self.done) // max(slots, 1))
            times = self.tasks[self.next_task:self.next_task + LOOK_TASKS]
            count, _ = plan_bundle(times, SQSBackend.target_bundle_seconds, even_share,
                                   SQSBackend.time_box_margin)
            self.next_task += count
            if not machine.busy:
                machine.busy_since = self.now
            machine.busy += 1
            machine.version += 1
            self.running += 1
            work = sum(times[:count])
            self.at(self.now + work + self.args.bundle_overhead, self._bundle_done, machine, count, work)

    def _bundle_done(self, machine: Machine, count: int, work: float) -> None:
        self.done += count
        self.left -= work
        self.running -= 1
        machine.busy -= 1
        self.free.append(machine)
        if not machine.busy:
            machine.busy_seconds += self.now - machine.busy_since
            machine.last_work = self.now
            self._check_retire(machine, machine.version)
        if self.done == len(self.tasks):
            self.run.makespans.append(self.now - self.submitted)
            if self.stage + 1 < len(self.workload):
                self.at(self.now + self.workload[self.stage + 1][0], self._submit)
            else:
                self._last_job_done()
        self._feed()

    def _last_job_done(self) -> None:
        self.run.end = self.now
        if self.kind == "fixed":  # stopped by its user with the last results
            for machine in self.run.machines:
                machine.ended = self.now

    # --- the fleet ------------------------------------------------------------------------

    def _start(self, machine: Machine) -> None:
        self.run.machines.append(machine)
        self.at(machine.ready, self._ready, machine)

    def _ready(self, machine: Machine) -> None:
        machine.last_work = self.now
        self.live += 1
        self.free.extend([machine] * self.args.threads)
        self._check_retire(machine, machine.version)
        self._feed()

    def _check_retire(self, machine: Machine, version: int) -> None:
        """A worker's idle exit (remoteworker: retire_at with the keep time it was told)."""
        if self.kind == "fixed" or machine.ended is not None or machine.busy or version != machine.version:
            return
        keep, paid_until = ((self.keep, machine.launched + self.args.billed_minimum) if self.kind == "policy"
                            else (FIXED_IDLE_TIMEOUT, 0.0))
        due = retire_at(machine.last_work, keep, paid_until)
        if self.now >= due - 1e-9:
            machine.ended = self.now
            self.live -= 1
        else:
            self.at(due, self._check_retire, machine, version)

    def _scale(self) -> None:
        """Fleet.scale: every scale interval, as long as there is a job to come or an instance up."""
        alive = [m for m in self.run.machines if m.ended is None]
        booting = [m.launched for m in alive if m.ready > self.now]
        backlog = max(0.0, self.left) if self.stage >= 0 and self.done < len(self.tasks) else 0.0
        for up in alive:
            if up.ready <= self.now:
                self.policy.boots.observe(str(id(up)), up.launched, up.ready)
        if self.kind == "policy":
            decision = self.policy.decide(self.now, backlog, len(alive) - len(booting), booting)
            told, self.keep, launch = self.keep, decision.keep, decision.launch
            for machine in alive if told != self.keep else ():  # a new keep time: an idle one may be due
                self._check_retire(machine, machine.version)
        elif self.kind == "fixed":  # only watched
            launch = 0
        else:  # the rule before: threads for the bundles in flight
            queued = sum(self.tasks[self.next_task:]) if backlog else 0.0
            in_flight = min(self.args.max_workers * self.args.threads,
                            math.ceil(queued / SQSBackend.target_bundle_seconds) + self.running)
            want = min(self.args.max_workers, -(-in_flight // self.args.threads))
            launch = max(0, want - len(alive))
        for _ in range(launch):
            self._start(Machine(self.now, self.now + self.rng.uniform(*self.args.boot)))
        self.run.timeline.append((self.now, len(alive) + launch, backlog))
        if self.stage + 1 < len(self.workload) or self.done < len(self.tasks) or \
                any(m.ended is None for m in self.run.machines):
            self.at(self.now + DEFAULT_SCALE_INTERVAL, self._scale)


def paid(run: Run, billed_minimum: float) -> float:
    """Instance-seconds billed: per second, at least the minimum."""
    return sum(max(billed_minimum, math.ceil((m.ended if m.ended is not None else run.end) - m.launched))
               for m in run.machines)


def figures(runs: dict[str, Run], own: dict[str, Run], args: argparse.Namespace) -> list[dict[str, object]]:
    """Per policy: shares of paid time, makespans over the fixed full fleet's, and over those of a
    fixed fleet of the policy's own peak size, already up (``own``)."""
    rows = []
    reference = runs["fixed"].makespans
    for name, run in runs.items():
        bill = paid(run, args.billed_minimum)
        ratios = [mine / full for mine, full in zip(run.makespans, reference, strict=True)]
        at_peak = [mine / full for mine, full in zip(run.makespans, own[name].makespans, strict=True)]
        rows.append({
            "max_workers": args.max_workers, "policy": name, "instances_launched": len(run.machines),
            "paid_instance_s": round(bill), "busy_share": sum(m.busy_seconds for m in run.machines) / bill,
            "thread_share": run.work / (bill * args.threads), "worst_makespan_ratio": max(ratios),
            "peak": max(n for _, n, _ in run.timeline), "worst_ratio_at_peak": max(at_peak),
            "makespans": " ".join(f"{m:.1f}" for m in run.makespans),
            "ratios": " ".join(f"{r:.2f}" for r in ratios)})
    return rows


def plot(runs: dict[str, Run], max_workers: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), sharex=True)
    for axis, (name, run) in zip(axes, runs.items(), strict=True):
        times = [t for t, _, _ in run.timeline]
        count = [n for _, n, _ in run.timeline]
        backlog = [b for _, _, b in run.timeline]
        axis.step(times, count, where="post", color="tab:blue", label="instances")
        axis.set_ylabel("instances", color="tab:blue")
        axis.set_ylim(bottom=0)
        twin = axis.twinx()
        twin.plot(times, backlog, color="tab:red", alpha=0.7, label="backlog (s of work)")
        twin.set_ylabel("backlog, s of work", color="tab:red")
        twin.set_ylim(bottom=0)
        axis.set_title(f"{name} (max {max_workers} instances)", fontsize=10)
    axes[-1].set_xlabel("simulated time, s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def simulate_scale(args: argparse.Namespace) -> list[dict[str, object]]:
    workload = bursty_workload(args.seed, args.task_scale)
    names = [f"policy@{share:g}" for share in args.shares] + list(BASELINES)
    runs = {name: FleetSim(name, workload, args, args.seed * 7919 + index).simulate()
            for index, name in enumerate(names)}
    own = {}
    for name, run in runs.items():
        peak = max(n for _, n, _ in run.timeline)
        sized = argparse.Namespace(**{**vars(args), "max_workers": peak})
        own[name] = FleetSim("fixed", workload, sized, args.seed).simulate() if name != "fixed" else run
    if not args.no_plots:
        plot(runs, args.max_workers, RESULTS / f"fleet{tag(args)}_{args.max_workers}.png")
    return figures(runs, own, args)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-workers", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--threads", type=int, default=4, help="bundles each instance runs at once")
    parser.add_argument("--boot", type=float, nargs=2, default=[30.0, 60.0], metavar=("LOW", "HIGH"),
                        help="seconds from launch to a running worker, uniform")
    parser.add_argument("--bundle-overhead", type=float, default=0.09, help="seconds per bundle")
    parser.add_argument("--billed-minimum", type=float, default=MINIMUM_BILLED_SECONDS)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.85, 0.5, 0.2],
                        help="the policy's useful share (fleetpolicy.USEFUL_SHARE is 0.85), one run each")
    parser.add_argument("--task-scale", type=int, default=1,
                        help="stages of this many times 1,000 to 10,000 tasks (work for 1,000 instances)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def report(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    lines = [f"# Provisioning on a bursty workload (bench/fleetsim.py, seed {args.seed})", "",
             f"Machine: {machine()}. Simulated time; boot {args.boot[0]:g}-{args.boot[1]:g} s, "
             f"{args.threads} threads an instance, {args.bundle_overhead * 1000:.0f} ms a bundle, billed per "
             f"second, at least {args.billed_minimum:g} s.", "",
             "Workload: " + "; ".join(f"stage {i + 1}: {len(tasks):,} tasks ({sum(tasks):,.0f} s of work)"
                                      + (f" after {gap:.0f} s idle" if i else "")
                                      for i, (gap, tasks) in enumerate(bursty_workload(args.seed,
                                                                                       args.task_scale))), "",
             "| max instances | policy | launched | peak | paid instance-s | busy share | thread share "
             "| worst makespan / full fleet | worst / own peak fleet | makespans s | ratios to full fleet |",
             "| ---: | --- |" + " ---: |" * 9]
    for row in rows:
        busy, thread, worst = row["busy_share"], row["thread_share"], row["worst_makespan_ratio"]
        own = row["worst_ratio_at_peak"]
        lines.append(f"| {row['max_workers']:,} | {row['policy']} | {row['instances_launched']:,} | "
                     f"{row['peak']:,} | {row['paid_instance_s']:,} | "
                     f"{busy:.3f}{mark(busy >= SHARE_TARGET)} | "
                     f"{thread:.3f} | {worst:.2f}{mark(worst <= MAKESPAN_TARGET)} | "
                     f"{own:.2f}{mark(own <= MAKESPAN_TARGET)} | {row['makespans']} | {row['ratios']} |")
    lines += ["", f"Targets: busy share >= {SHARE_TARGET}, every job within {MAKESPAN_TARGET} x the "
              "makespan of the fixed full-size fleet (**not met** marks a miss).", "",
              "## Control plane, requests a minute by fleet size", "", control_table(), ""]
    lines += [f"![fleet{tag(args)}_{n}.png](fleet{tag(args)}_{n}.png)" for n in args.max_workers
              if not args.no_plots]
    return "\n".join(lines) + "\n"


def tag(args: argparse.Namespace) -> str:
    """What names the files of a run with more tasks than the issue's workload."""
    return "" if args.task_scale == 1 else f"_x{args.task_scale}"


def mark(met: bool) -> str:
    return "" if met else " **not met**"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    rows = []
    for size in args.max_workers:
        rows.extend(simulate_scale(argparse.Namespace(**{**vars(args), "max_workers": size})))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"fleet{tag(args)}.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = report(rows, args)
    (RESULTS / f"fleet{tag(args)}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
