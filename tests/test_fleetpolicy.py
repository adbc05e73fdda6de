"""The provisioning policy (fleetpolicy): its decisions on small made-up situations, and a fleet on the
hypervisor harness that grows on a backlog and shrinks, idle, by the cost rule."""

import math
import re
import time

import pytest
from conftest import read_results, run_client, wait_until
from test_provisioning import fleet  # noqa: F401  (the fixture)

from cloudkon.fleetpolicy import (
    BootTimes,
    BurstGaps,
    FleetPolicy,
    IdleRule,
    backlog_seconds,
    keep_seconds,
    launch_count,
    retire_at,
    work_per_launch,
)
from cloudkon.jobs import Dispatcher


def test_a_launch_must_pay_for_its_boot():
    # 85% of its paid time running: 45 s of boot pay for 255 s a thread.
    assert work_per_launch(4, 45.0) == pytest.approx(4 * 255.0)
    # A short boot: the billed minimum is what a launch must fill.
    assert work_per_launch(1, 5.0) == pytest.approx(55.0)


@pytest.mark.parametrize("backlog, live_threads, booting, room, launched", [
    (0.0, 0, 0, 10, 0),  # no work: nothing
    (1.0, 0, 0, 10, 1),  # any work and nothing up: one
    (170.0, 4, 0, 10, 0),  # the live threads finish it within a boot (4 x 45 s)
    (4 * 255.0 * 5.5, 0, 0, 10, 5),  # five and a half launches' worth: five
    (4 * 255.0 * 5.5, 0, 2, 10, 3),  # two of them booting already
    (4 * 255.0 * 5.5, 8, 0, 10, 3),  # the live threads take their share of what is left after the boot
    (4 * 255.0 * 50, 0, 0, 7, 7),  # never past the maximum
    (4 * 255.0 * 50, 0, 0, 0, 0),
])
def test_launch_count(backlog, live_threads, booting, room, launched):
    assert launch_count(backlog, live_threads, booting, 4, 45.0, room) == launched


def test_a_lower_useful_share_launches_more_for_the_same_backlog():
    backlog = 4 * 255.0 * 5.5  # five launches' worth at 0.85
    counts = [launch_count(backlog, 0, 0, 4, 45.0, 100, share=share) for share in (0.95, 0.85, 0.5, 0.2)]
    assert counts == sorted(counts) and counts[1] == 5 and counts[-1] > counts[1]


@pytest.mark.parametrize("share", ["0", "1", "1.5", "-0.2", "nan", "half"])
def test_a_useful_share_outside_zero_to_one_is_a_usage_error(share):
    done = run_client("--remote", "--useful-share", share, "-w", "/dev/null")
    assert done.returncode == 2 and "--useful-share" in done.stderr and "Traceback" not in done.stderr


def test_keep_seconds_weighs_idle_time_against_a_relaunch():
    assert keep_seconds([], 45.0) == 45.0  # nothing seen: keep as long as a boot costs
    assert keep_seconds([10.0, 20.0, 30.0], 45.0) == 30.0  # every gap shorter than a boot: keep through
    assert keep_seconds([200.0, 300.0, 250.0], 45.0) == 0.0  # every gap long: retire at once
    # Mostly short gaps and one long one: keeping through the short ones is cheapest.
    assert keep_seconds([5.0, 6.0, 7.0, 8.0, 600.0], 45.0) == 8.0


def test_an_idle_worker_stays_until_its_billed_minimum_ends():
    assert retire_at(last_work=100.0, keep=5.0, paid_until=160.0) == 160.0
    assert retire_at(last_work=200.0, keep=5.0, paid_until=160.0) == 205.0


def test_gaps_are_from_the_backlog_running_out_to_its_next_work():
    gaps = BurstGaps()
    for now, backlog in ((0, 50.0), (5, 0.0), (10, 0.0), (65, 30.0), (70, 0.0), (100, 8.0)):
        gaps.observe(now, backlog)
    assert list(gaps.gaps) == [60.0, 30.0]


def test_boot_time_is_the_median_of_first_heartbeats():
    boots = BootTimes(assumed=45.0)
    assert boots.seconds() == 45.0
    assert boots.seconds(waiting=[50.0, 60.0]) == 50.0, "all have been booting longer than assumed"
    boots.observe("i-0", 100.0, 130.0)
    assert boots.seconds(waiting=[30.0, 30.0, 30.0]) == 45.0, "the first up: the quickest"
    boots = BootTimes(assumed=45.0)
    boots.observe("i-1", 100.0, 130.0)
    boots.observe("i-1", 100.0, 200.0)  # a later heartbeat is no news
    boots.observe("i-2", 100.0, 140.0)
    boots.observe("i-3", 100.0, 190.0)
    assert boots.seconds() == 40.0
    # Two still booting after 100 s: half of the five had booted by 90 s.
    assert boots.seconds(waiting=[100.0, 100.0]) == 90.0


def test_the_workers_are_told_a_keep_time_only_when_it_changes():
    auto = FleetPolicy(4, 1, IdleRule(None))
    assert auto.news(45.0) and not auto.news(46.0) and auto.news(10.0)
    fixed = FleetPolicy(4, 1, IdleRule(60.0))
    assert not fixed.news(60.0), "a fixed timeout is in the user data already"


def test_a_fleet_policy_step():
    policy = FleetPolicy(max_workers=3, threads=1, idle=IdleRule(None, billed_minimum=2.0), assumed_boot=1.0)
    first = policy.decide(0.0, backlog=100.0, live=0, booting=[])
    assert (first.launch, first.keep, first.boot) == (3, 1.0, 1.0)
    policy.decide(5.0, backlog=0.0, live=3, booting=[])
    policy.decide(35.0, backlog=10.0, live=3, booting=[])  # a gap of 30 s, longer than a boot
    assert policy.decide(40.0, backlog=10.0, live=3, booting=[]) == type(first)(0, 0.0, 1.0)


def test_backlog_is_the_estimated_work_of_the_tasks_without_a_result():
    dispatcher = Dispatcher(backend=None, on_results=lambda *_: None, on_finished=lambda _: None)
    job = dispatcher.open_job()
    job.add_tasks(["sleep 2000"] * 10 + ["./never-seen"] * 5)  # sleep N: N ms, known without running
    assert backlog_seconds(dispatcher, unknown=7.0) == pytest.approx(10 * 2.0 + 5 * 7.0, rel=1e-3)
    assert backlog_seconds(Dispatcher(None, lambda *_: None, lambda _: None)) == 0.0


def test_a_fleet_grows_on_a_backlog_and_shrinks_by_the_cost_rule(fleet, workload, tmp_path):  # noqa: F811
    # No --worker-idle-timeout: the cost rule (time scaled down by the fixture: boot and billed minimum 1 s).
    sched = fleet.scheduler("--max-workers", "3", "--worker-threads", "1")
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload([f"sleep 0.5; echo {i}" for i in range(60)]),
                      "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert [r["output"] for r in read_results(out)] == [f"{i}\n" for i in range(60)]
    assert fleet.hyper.peak == 3 and len(fleet.hyper.booted) == 3
    finished = time.monotonic()
    # The fixed default would keep them 300 s; the cost rule, as long as a boot (no gap seen yet).
    wait_until(lambda: not fleet.hyper.alive(), timeout=90)
    assert time.monotonic() - finished < 90
    assert all("terminating this instance" in fleet.hyper.log(i) for i in fleet.hyper.booted)
    sched.stop()
    log = sched.proc.stderr.read()
    kept = [float(k) for k in re.findall(r"idle ones kept (\d+) s", log)]
    assert kept and all(math.isfinite(k) and k < 60 for k in kept), log
