"""The provisioning policy on the hypervisor harness: real worker processes as emulated EC2 instances.

    .venv/bin/python bench/harness_fleet.py                    # the three arms, about 8 minutes
    .venv/bin/python bench/harness_fleet.py --arms policy --count-scale 0.2   # a quick look

Measures issue #18's second target where bench/fleetsim.py only simulates it: ">= 0.85 of paid
instance-seconds spent running tasks, and every job within 1.3 x the makespan of a fleet that was already
at full size", with the real scheduler (``scheduler.py --remote --provision``), the real ``FleetPolicy``
deciding, and a real ``worker.py --ec2`` process per instance that the AWS emulator (moto_server, started
here) reports running (tests/hypervisor.py, behind an emulated IMDSv2).  A boot is the hypervisor seeing
the launch, a process start and the worker's first heartbeat: the scheduler measures it, as on EC2.

Time is scaled down by --time-scale (default 1/10) everywhere it is a knob: the workload of
bench/fleetsim.py (``bursty_workload``: five stages of 10 ms to 1 s tasks, idle gaps of 30 to 300 s)
becomes ``sleep N`` tasks (N ms, run inside the worker) of 1 to 100 ms and gaps of 3 to 30 s; the billed
minimum (60 s), the assumed boot (45 s), the scaling interval and heartbeat (5 s), the baseline's idle
timeout (60 s) and the workers' longest SQS long poll (20 s, a constant of cloudkon.aws set through a
sitecustomize module on the workers' PYTHONPATH; --long-poll 20 keeps SQS's) likewise.  What is not
scaled: the 5 s bundle target of SQSBackend (bundles are 10 x coarser than on EC2, relative to the
tasks), the emulator's own latency, and a boot (a process start, about a second: 10 s of EC2 time).
--count-scale keeps a share of each stage's tasks, to fit a slow machine.

Arms, one after the other on their own queues, tables and fleet (a stage's clients wait for its results,
then the gap is slept; each arm has a scheduler of its own):
  - ``policy``: the defaults (the cost rule, --useful-share 0.85) with the scaled knobs;
  - ``backlog``: launch on backlog with a fixed idle timeout, as near as the scheduler's options come:
    --useful-share 0.05 and --billed-minimum 0.001 (so that any backlog over what the live threads
    finish within a boot launches instances, up to --max-workers: a few tenths of a second of work
    each) and --worker-idle-timeout 6 (60 s scaled);
  - ``fixed``: --max-workers instances launched by a warm-up job before the first stage (the same
    eager launch options) and kept (--worker-idle-timeout 100000): "a fleet already at full size".

The scheduler reaches EC2 through a proxy (``GrantingEC2``) that makes RunInstances grant what it asks
for, as EC2 does with capacity (the emulator launches only MinCount, which the fleet sets to 1).

Figures per arm: instances launched, the peak, paid instance-seconds by EC2's rule with the scaled
minimum (per second from launch to termination, at least --billed-minimum x time scale; launch and
termination as the hypervisor saw them, within one 0.2 s poll), task-seconds (the results' elapsed
times), the *thread share* (task-seconds over paid instance-seconds x threads: bench/fleetsim.py's
"thread share", the stricter of its two shares: the busy share, an instance counted while any thread
runs, is at least as high, and the results carry no start times to measure it), each stage's makespan
(the client's wall time) and its ratio to the fixed fleet's.  The fixed fleet is billed, as in
fleetsim, from the first stage's start to the last one's end (its warm-up left out).

Writes bench/results/fleet_harness.md and fleet_harness.png (instances and backlog over time).  Leaves
no instance, process or temporary file behind: every arm's fleet is cleaned up (scheduler.py --cleanup)
and checked to have no instance running; the temporary folder (worker sandboxes, logs, workloads) is
removed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
from conftest import aws_emulator, read_results, run_client, wait_until  # noqa: E402
from fleetsim import MAKESPAN_TARGET, SHARE_TARGET, bursty_workload  # noqa: E402
from hypervisor import Hypervisor  # noqa: E402
from local import machine  # noqa: E402
from test_capacity import RefusingEC2, _ProxyHandler  # noqa: E402

from cloudkon.connection import list_jobs  # noqa: E402
from cloudkon.costs import MINIMUM_BILLED_SECONDS  # noqa: E402
from cloudkon.defaults import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_SCALE_INTERVAL  # noqa: E402
from cloudkon.fleetpolicy import ASSUMED_BOOT_SECONDS  # noqa: E402

ARMS = ("policy", "backlog", "fixed")
BASELINE_IDLE_TIMEOUT = 60.0  # fleetsim's FIXED_IDLE_TIMEOUT, before scaling
SAMPLE_SECONDS = 0.5  # the timeline's step (instances, backlog)
# Heartbeats are scaled, but the timeout that kills a silent instance is kept well above a loaded
# 2-core machine's stalls: a worker killed for a late heartbeat would be a harness artefact.
HEARTBEAT_TIMEOUT = 6.0
# How long an arm's instances are given to leave by themselves after the last stage (the cost rule's
# keep time is at most a few of the scaled gaps; what is still up then is counted until cleaned up).
RETIRE_WAIT = 60.0


class GrantingEC2(RefusingEC2):
    """test_capacity's proxy before the emulator, refusing nothing, that makes RunInstances grant
    MaxCount as EC2 does when it has the capacity: moto launches only MinCount, and the fleet asks
    for MinCount 1 (a partial grant taken), so on the bare emulator every scaling step launches one
    instance whatever the policy decided."""

    def __init__(self, target: str) -> None:
        super().__init__(target, set())
        self.RequestHandlerClass = _GrantingHandler


class _GrantingHandler(_ProxyHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        wanted = re.search(rb"(?:^|&)MaxCount=(\d+)", body)
        if b"Action=RunInstances" in body and wanted:
            body = re.sub(rb"(^|&)MinCount=\d+", rb"\g<1>MinCount=" + wanted[1], body)
            self.headers.replace_header("Content-Length", str(len(body)))
        self._forward(body)


class TimedHypervisor(Hypervisor):
    """The test harness's hypervisor, also noting when each instance was seen launched and terminated
    (the billing clock: the emulator's own times have whole seconds, coarse at a 6 s minimum)."""

    def __init__(self, env: dict[str, str], fleet: str, log_dir: Path) -> None:
        self.launched: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        super().__init__(env, fleet, log_dir)

    def _boot(self, instance: str) -> None:
        self.launched[instance] = time.time()
        super()._boot(instance)

    def _shut_down(self, instance: str) -> None:
        self.ended.setdefault(instance, time.time())
        super()._shut_down(instance)

    def paid(self, minimum: float, since: float, until: float) -> float:
        """Instance-seconds billed from launch (or ``since``) to termination (or ``until``)."""
        return sum(max(minimum, self.ended.get(i, until) - max(since, launched))
                   for i, launched in self.launched.items())


@dataclass
class Arm:
    """One arm's run: what was launched and paid, what ran, each stage's makespan, the timeline."""

    name: str
    launched: int = 0
    peak: int = 0
    paid: float = 0.0
    task_seconds: float = 0.0
    makespans: list[float] = field(default_factory=list)
    timeline: list[tuple[float, int, float]] = field(default_factory=list)  # (s, instances, backlog s)
    boot: str = "?"  # the scheduler's last logged boot estimate
    leftover: int = 0  # instances still up RETIRE_WAIT after the last stage (cleaned up)


def scaled_workload(args: argparse.Namespace) -> list[tuple[float, list[int]]]:
    """fleetsim's bursty workload, time scaled: (gap before the stage, s; task durations, ms)."""
    stages = []
    for gap, durations in bursty_workload(args.seed):
        kept = durations[:max(1, round(len(durations) * args.count_scale))]  # drawn independently
        stages.append((gap * args.time_scale, [max(1, round(d * 1000 * args.time_scale)) for d in kept]))
    return stages


class Scheduler:
    """scheduler.py --remote --provision for one arm, its log in a file (a pipe would fill and block it)."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path) -> None:
        self.log = folder / "scheduler.log"
        self.out = folder / "scheduler.out"
        with open(self.out, "w") as out, open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "scheduler.py"), "--port", "0", *args],
                                         stdout=out, stderr=err, env={**os.environ, **env})
        line = wait_until(lambda: self.out.read_text().partition("\n")[0] if "\n" in self.out.read_text()
                          else None, timeout=60)
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"scheduler did not start: {line!r} {self.log.read_text()[-2000:]}")
        self.address = line.removeprefix("listening on ")
        host, port = self.address.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def boot_estimate(self) -> str:
        found = re.findall(r"boot (\d+) s\)", self.log.read_text())
        return found[-1] if found else "?"


def worker_env(args: argparse.Namespace, scratch: Path) -> dict[str, str]:
    """What the worker processes get beyond the emulator's settings: SQS's longest long poll (20 s)
    scaled like the rest, through a sitecustomize module (a constant of cloudkon.aws, no option)."""
    site = scratch / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        f"import cloudkon.aws\ncloudkon.aws.SQS_MAX_WAIT_SECONDS = {args.long_poll}\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def arm_options(name: str, args: argparse.Namespace, suffix: str) -> list[str]:
    """The scheduler's options for an arm: its own resources, the scaled time knobs, the arm's rule."""
    scale = args.time_scale
    options = ["--request-queue", f"req-{suffix}", "--table", f"claims-{suffix}", "--control-topic",
               f"control-{suffix}", "--bucket", f"cloudkon-bench-{suffix}", "--provision",
               "--ami", "ami-0123456789abcdef0", "--instance-type", "t3.micro",
               "--fleet", f"fleet-{suffix}", "--fleet-table", f"fleet-{suffix}-registry",
               "--max-workers", str(args.max_workers), "--worker-threads", str(args.threads),
               "--scale-interval", f"{DEFAULT_SCALE_INTERVAL * scale:g}",
               "--heartbeat-seconds", f"{DEFAULT_HEARTBEAT_SECONDS * scale:g}",
               "--heartbeat-timeout", f"{HEARTBEAT_TIMEOUT:g}",
               "--boot-seconds", f"{ASSUMED_BOOT_SECONDS * scale:g}",
               # Leases: a bundle (up to 5 s, unscaled) is renewed while it runs; 3 s as the tests use.
               "--visibility-timeout", "3"]
    minimum = f"{MINIMUM_BILLED_SECONDS * scale:g}"
    if name == "policy":
        return [*options, "--billed-minimum", minimum]
    # Launch on any backlog: a few tenths of a second of work pay for a launch (fleetpolicy's
    # work_per_launch with share 0.05 and no billed minimum), so --max-workers go up at once.
    eager = ["--useful-share", "0.05", "--billed-minimum", "0.001"]
    if name == "backlog":
        return [*options, *eager, "--worker-idle-timeout", f"{BASELINE_IDLE_TIMEOUT * scale:g}"]
    return [*options, *eager, "--worker-idle-timeout", "100000"]


def sample(sched: Scheduler, hyper: TimedHypervisor, means: dict[str, float], start: float,
           timeline: list[tuple[float, int, float]], stop: threading.Event) -> None:
    """Every SAMPLE_SECONDS: the instances up (worker processes) and the backlog (tasks without a
    result x their stage's mean duration, seconds of work; ``means[""]``: the running stage's, for a
    job whose id is not known yet)."""
    while not stop.wait(SAMPLE_SECONDS):
        try:
            jobs = list_jobs(sched.host, sched.port, None)["jobs"]
        except Exception:  # noqa: BLE001 - a sample missed is no reason to stop the run
            continue
        backlog = sum((job["queued"] + job["running"]) * means.get(job["job"], means.get("", 0.0))
                      for job in jobs)
        timeline.append((time.time() - start, len(hyper.running), backlog))


def run_stage(sched: Scheduler, durations: list[int], folder: Path, index: int) -> tuple[float, float, str]:
    """One stage as a job of its own: (makespan, task-seconds, job id)."""
    workload = folder / f"stage{index}.txt"
    workload.write_text("".join(f"sleep {ms}\n" for ms in durations))
    out = folder / f"stage{index}.jsonl"
    done = run_client("-s", sched.address, "-w", str(workload), "-o", str(out), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"stage {index + 1} failed: {done.stderr[-2000:]}")
    wall = float(re.search(r"([\d.]+) s wall", done.stderr)[1])
    results = read_results(out)
    if len(results) != len(durations) or {r["status"] for r in results} != {"success"}:
        raise RuntimeError(f"stage {index + 1}: {len(results)} results for {len(durations)} tasks")
    jobs = list_jobs(sched.host, sched.port, None)["jobs"]
    return wall, sum(r["elapsed_ms"] for r in results) / 1000, jobs[-1]["job"]


def warm_up(sched: Scheduler, hyper: TimedHypervisor, args: argparse.Namespace, folder: Path) -> None:
    """The fixed arm: a job worth launching --max-workers instances at once, then all of them up."""
    tasks = [f"sleep {round(20_000 * args.time_scale)}"] * (args.max_workers * args.threads * 2)
    (folder / "warmup.txt").write_text("\n".join(tasks) + "\n")
    done = run_client("-s", sched.address, "-w", str(folder / "warmup.txt"), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"warm-up failed: {done.stderr[-2000:]}")
    wait_until(lambda: len(hyper.running) >= args.max_workers, timeout=120)
    wait_until(lambda: all("threads on" in hyper.log(i) for i in hyper.running), timeout=60)


def run_arm(name: str, env: dict[str, str], ec2_url: str, args: argparse.Namespace,
            stages: list[tuple[float, list[int]]], scratch: Path) -> Arm:
    """One arm from an empty fleet to an empty fleet (cleaned up whatever happens); the scheduler
    reaches EC2 at ``ec2_url`` (the granting proxy)."""
    suffix = f"{name}-{uuid.uuid4().hex[:6]}"
    folder = scratch / name
    folder.mkdir()
    options = arm_options(name, args, suffix)
    hyper = TimedHypervisor({**env, **worker_env(args, scratch)}, f"fleet-{suffix}", folder)
    arm, stop = Arm(name), threading.Event()
    sched = sampler = None
    try:
        sched = Scheduler(["--remote", *options], {**env, "AWS_ENDPOINT_URL_EC2": ec2_url}, folder)
        if name == "fixed":
            warm_up(sched, hyper, args, folder)
        means: dict[str, float] = {}
        start = time.time()
        sampler = threading.Thread(target=sample, args=(sched, hyper, means, start, arm.timeline, stop),
                                   daemon=True)
        sampler.start()
        for index, (gap, durations) in enumerate(stages):
            if index:
                time.sleep(gap)
            means[""] = sum(durations) / len(durations) / 1000
            wall, task_seconds, job = run_stage(sched, durations, folder, index)
            means[job] = means[""]
            arm.makespans.append(wall)
            arm.task_seconds += task_seconds
            print(f"  {name}: stage {index + 1} ({len(durations)} tasks) in {wall:.1f} s, "
                  f"{len(hyper.running)} instance(s) up", flush=True)
        end = time.time()
        minimum = MINIMUM_BILLED_SECONDS * args.time_scale
        if name == "fixed":
            arm.paid = args.max_workers * max(minimum, end - start)
        else:
            try:
                wait_until(lambda: not hyper.running, timeout=RETIRE_WAIT, interval=0.5)
            except AssertionError:
                arm.leftover = len(hyper.running)
            arm.paid = hyper.paid(minimum, 0.0, time.time())
        arm.launched, arm.peak = len(hyper.booted), hyper.peak
        arm.boot = sched.boot_estimate()
    except BaseException:
        if sched is not None:  # what the scheduler said is the first thing to look at
            print(f"  {name}: scheduler log ends:\n{sched.log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
        if sched is not None:
            sched.stop()
        cleanup = subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--remote", "--cleanup",
                                  *options], capture_output=True, text=True, timeout=180,
                                 env={**os.environ, **env})
        wait_until(lambda: not hyper.alive(), timeout=60)
        hyper.stop()
        if cleanup.returncode != 0:
            print(f"  {name}: cleanup failed: {cleanup.stderr[-1000:]}", file=sys.stderr)
    return arm


def running_instances(env: dict[str, str]) -> list[str]:
    """Every instance the emulator runs, of any fleet."""
    ec2 = boto3.client("ec2", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    return [i["InstanceId"] for page in ec2.get_paginator("describe_instances").paginate()
            for r in page["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] in ("pending", "running")]


def report(arms: dict[str, Arm], stages: list[tuple[float, list[int]]], args: argparse.Namespace,
           runtime: float) -> str:
    reference = arms["fixed"].makespans if "fixed" in arms else None
    lines = [f"# Provisioning on the hypervisor harness (bench/harness_fleet.py, seed {args.seed})", "",
             f"Machine: {machine()}. Run: {runtime:.0f} s. Time scaled by {args.time_scale:g}: billed "
             f"minimum {MINIMUM_BILLED_SECONDS * args.time_scale:g} s, scaling every "
             f"{DEFAULT_SCALE_INTERVAL * args.time_scale:g} s; {args.threads} threads an instance, at most "
             f"{args.max_workers} instances.", "",
             "Workload (bench/fleetsim.py's, scaled): " + "; ".join(
                 f"stage {i + 1}: {len(d):,} tasks ({sum(d) / 1000:,.1f} s of work)"
                 + (f" after {gap:.1f} s idle" if i else "") for i, (gap, d) in enumerate(stages)), "",
             "| arm | launched | peak | boot s (scheduler's) | paid instance-s | task-s | thread share "
             "| worst makespan / fixed | makespans s | ratios to fixed |",
             "| --- |" + " ---: |" * 9]
    for arm in arms.values():
        share = arm.task_seconds / (arm.paid * args.threads)
        ratios = [m / f for m, f in zip(arm.makespans, reference, strict=True)] if reference else []
        worst = f"{max(ratios):.2f}{mark(max(ratios) <= MAKESPAN_TARGET)}" if ratios else "-"
        lines.append(f"| {arm.name} | {arm.launched} | {arm.peak} | {arm.boot} | {arm.paid:,.1f} | "
                     f"{arm.task_seconds:,.1f} | {share:.3f}{mark(share >= SHARE_TARGET)} | {worst} | "
                     + " ".join(f"{m:.1f}" for m in arm.makespans) + " | "
                     + (" ".join(f"{r:.2f}" for r in ratios) or "-") + " |")
    if "fixed" in arms:  # the harness's ceiling: how busy threads are while a stage runs, all up
        busy = [sum(d) / 1000 / (args.max_workers * args.threads * m)
                for (_, d), m in zip(stages, arms["fixed"].makespans, strict=True)]
        lines += ["", "The fixed fleet's threads ran tasks for " + ", ".join(f"{b:.2f}" for b in busy)
                  + " of each stage's makespan (work / (instances x threads x makespan)): the harness's "
                  "ceiling for any arm's thread share (bundle overheads on the emulator, the last "
                  "bundles' tail)."]
    left = [f"{arm.name}: {arm.leftover}" for arm in arms.values() if arm.leftover]
    lines += ["", f"Targets: thread share >= {SHARE_TARGET}, every stage within {MAKESPAN_TARGET} x the "
              "fixed full-size fleet's makespan (**not met** marks a miss)."]
    if left:
        lines.append(f"Instances still up {RETIRE_WAIT:g} s after the last stage (billed until cleaned up): "
                     + ", ".join(left) + ".")
    if not args.no_plot:
        lines += ["", "![fleet_harness.png](fleet_harness.png)"]
    return "\n".join(lines) + "\n"


def mark(met: bool) -> str:
    return "" if met else " **not met**"


def plot(arms: dict[str, Arm], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(arms), 1, figsize=(10, 2.6 * len(arms)), sharex=True, squeeze=False)
    for axis, arm in zip(axes[:, 0], arms.values(), strict=True):
        times = [t for t, _, _ in arm.timeline]
        axis.step(times, [n for _, n, _ in arm.timeline], where="post", color="tab:blue")
        axis.set_ylabel("instances", color="tab:blue")
        axis.set_ylim(bottom=0)
        twin = axis.twinx()
        twin.plot(times, [b for _, _, b in arm.timeline], color="tab:red", alpha=0.7)
        twin.set_ylabel("backlog, s of work", color="tab:red")
        twin.set_ylim(bottom=0)
        axis.set_title(arm.name, fontsize=10)
    axes[-1, 0].set_xlabel("time since the first stage, s (scaled)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=4, help="bundles each instance runs at once")
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--count-scale", type=float, default=0.5, help="share of each stage's tasks kept")
    parser.add_argument("--long-poll", type=int, default=2, metavar="SECONDS",
                        help="the workers' longest SQS long poll (SQS: 20 s; default: 20 s scaled, "
                             "rounded; a worker whose other threads still run waits this long in a "
                             "poll before it sees that it is idle); 20 as SQS has it")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    print(f"machine: {machine()}", flush=True)
    stages = scaled_workload(args)
    began = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="cloudkon-harness-fleet-"))
    # Every process started here (scheduler, workers, clients) puts its temporary files in the scratch
    # folder, removed at the end whatever happens.
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = None
    arms: dict[str, Arm] = {}
    try:
        with aws_emulator() as env:
            proxy = GrantingEC2(env["AWS_ENDPOINT_URL"])
            try:
                for name in args.arms:
                    print(f"arm {name}", flush=True)
                    arms[name] = run_arm(name, env, proxy.url, args, stages, scratch)
            finally:
                proxy.close()
            running = running_instances(env)
            if running:
                raise RuntimeError(f"instances left running: {running}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = report(arms, stages, args, time.time() - began)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        plot(arms, RESULTS / "fleet_harness.png")
    (RESULTS / "fleet_harness.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
