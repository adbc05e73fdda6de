"""Prometheus metrics and the dashboard's routes, against real schedulers: the text format parsed with
prometheus_client's parser, the figures checked against the jobs just run."""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request

import pytest
import test_provisioning
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_http import call, poll, start_http, submit

from cloudkon.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, exposition

fleet = test_provisioning.fleet  # the provisioning tests' fleet on the hypervisor harness

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAGES = {"/": "text/html", "/dashboard.css": "text/css", "/dashboard.js": "text/javascript"}


def fetch(url: str, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics answer: (name, sorted labels) -> value, checked to parse."""
    status, answer_headers, body = fetch(f"{url}/metrics", headers)
    assert status == 200 and answer_headers["Content-Type"] == CONTENT_TYPE, (status, body[:200])
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def dashboard_state(url: str) -> dict:
    status, state = call("GET", f"{url}/dashboard/state", headers=AUTH,
                         operation=("/dashboard/state", "get"))  # checked against docs/openapi.json
    assert status == 200
    return state


# --- the text format ------------------------------------------------------------------------


def test_label_values_and_help_are_escaped_and_parse_back():
    awkward = 'back\\slash "quoted"\nnew line'
    counter = Counter("cloudkon_test_total", 'Help with a \\ backslash\nand a "newline"', ["path"])
    counter.inc(2, (awkward,))
    counter.inc(1.5, ("plain",))
    text = exposition([counter]).decode()
    assert '{path="back\\\\slash \\"quoted\\"\\nnew line"} 2\n' in text
    assert '# HELP cloudkon_test_total Help with a \\\\ backslash\\nand a "newline"\n' in text
    (family,) = text_string_to_metric_families(text)
    assert family.documentation == 'Help with a \\ backslash\nand a "newline"'
    assert {sample.labels["path"]: sample.value for sample in family.samples} == {awkward: 2, "plain": 1.5}


def test_a_histogram_counts_batches_as_it_counts_values_one_by_one():
    buckets = (0.005, 0.01, 1, 10)
    by_batch = Histogram("cloudkon_batch_seconds", "by batch", buckets, scale=1e6)
    one_by_one = Histogram("cloudkon_single_seconds", "one by one", buckets, scale=1e6)
    batches = [[0, 10, 4999], [5000, 5001, 10_000, 999_999, 1_000_000, 1_000_001, 10_000_000, 99_000_000], []]
    for batch in batches:
        by_batch.observe_many(batch)
        for value in batch:
            one_by_one.observe(value)
    assert by_batch.snapshot() == one_by_one.snapshot() == ([4, 6, 8, 10, 11], pytest.approx(112.02501))
    samples = {(s.name, s.labels.get("le")): s.value for family in text_string_to_metric_families(
        exposition([by_batch, Gauge("cloudkon_nothing", "a gauge", lambda: math.inf)]).decode())
        for s in family.samples}
    assert samples[("cloudkon_batch_seconds_bucket", "0.005")] == 4
    assert samples[("cloudkon_batch_seconds_bucket", "+Inf")] == 11
    assert samples[("cloudkon_batch_seconds_count", None)] == 11
    assert samples[("cloudkon_nothing", None)] == math.inf


# --- a local scheduler ------------------------------------------------------------------------


def test_metrics_and_dashboard_state_say_what_a_job_did(start_scheduler):
    sched, url = start_http(start_scheduler, "--token", TOKEN, "--metrics-port", "0")
    metrics_url = sched.proc.stdout.readline().strip().removeprefix("metrics on ")
    # The last failure's command is long: the dashboard shows its first 200 characters.
    tasks = [f"echo ok {i}" for i in range(7)] + [f"echo 'bad {i}'; echo more; exit 3" for i in range(3)]
    tasks[-1] += " # " + "x" * 5000
    status, accepted = submit(url, tasks, headers=AUTH)
    assert status == 200
    report = poll(url, accepted["cursor"], headers=AUTH)
    assert (report["done"], report["failed"]) == (10, 3)

    # The metrics' own port needs no token; the API's port does.
    assert fetch(f"{url}/metrics")[0] == 401
    assert fetch(f"{metrics_url}/tasks/result/{accepted['cursor']}")[0] == 404  # nothing else there
    samples = scrape(metrics_url)
    assert scrape(url, AUTH) == samples  # the same metrics on either port
    finished = "cloudkon_tasks_finished_total"
    assert samples[(finished, (("state", "succeeded"),))] == 7
    assert samples[(finished, (("state", "failed"),))] == 3
    assert samples[(finished, (("state", "cancelled"),))] == 0
    assert samples[("cloudkon_tasks_submitted_total", ())] == 10
    assert samples[("cloudkon_task_duration_seconds_count", ())] == 10
    elapsed = sum(task["elapsed_ms"] for task in report["tasks"]) / 1000
    assert samples[("cloudkon_task_duration_seconds_sum", ())] == pytest.approx(elapsed, abs=1e-6)
    assert samples[("cloudkon_task_duration_seconds_bucket", (("le", "+Inf"),))] == 10
    assert samples[("cloudkon_tasks_queued", ())] == samples[("cloudkon_tasks_running", ())] == 0
    assert samples[("cloudkon_bundles_in_flight", ())] == 0
    assert samples[("cloudkon_workers_alive", ())] == samples[("cloudkon_task_slots", ())] == 2
    assert samples[("cloudkon_jobs", (("state", "finished"),))] == 1
    assert samples[("cloudkon_job_store_write_seconds_count", ())] >= 1  # the job's tasks at least
    assert not any(name.startswith(("cloudkon_aws", "cloudkon_fleet")) for name, _ in samples)  # local

    assert call("GET", f"{url}/dashboard/state")[0] == 401
    state = dashboard_state(url)
    assert state["mode"] == "local" and state["backend"] == "local backend: 2 worker processes"
    (job,) = state["jobs"]
    assert job["id"] == accepted["cursor"] and job["state"] == "finished" and "cost" not in job
    assert (job["total"], job["done"], job["failed"], job["cancelled"], job["queued"], job["running"]) == \
        (10, 10, 3, 0, 0, 0)
    assert job["finished_at"] >= job["created_at"] and job["eta_seconds"] is None and job["rate"] > 0
    assert sorted((f["id"], f["command"], f["exit_code"], f["first_line"]) for f in job["failures"]) == \
        [(7 + i, tasks[7 + i][:200], 3, f"bad {i}") for i in range(3)]
    assert {task["worker"] for task in report["tasks"]} <= {worker["id"] for worker in state["workers"]}
    assert all((w["kind"], w["state"], w["running"]) == ("process", "idle", []) for w in state["workers"])
    last = [w["last_results"] for w in state["workers"] if w["last_results"]]
    assert {r["job"] for r in last} == {job["id"]} and sum(r["tasks"] for r in last) <= 10
    assert {int(w["id"].rpartition(":")[2]) for w in state["workers"]} == set(sched.worker_pids())
    assert sum(n for _, n in state["throughput"]) == 10 and len(state["throughput"]) == 120
    assert state["throughput"][-1][0] <= state["now"] < state["throughput"][-1][0] + 5
    assert state["fleet"] is None


def test_the_dashboards_files_need_no_token_and_allow_only_their_own_scripts(start_scheduler):
    _, url = start_http(start_scheduler, "--token", TOKEN)
    for path, content_type in PAGES.items():
        status, headers, body = fetch(f"{url}{path}")
        assert status == 200 and headers["Content-Type"].startswith(content_type) and body, path
        assert headers["Cache-Control"] == "no-cache"
        assert headers["Content-Security-Policy"] == ("default-src 'self'; img-src 'self' data:; "
                                                      "style-src 'self'; script-src 'self'; "
                                                      "frame-ancestors 'none'")
        assert headers["X-Frame-Options"] == "DENY"  # and for browsers without CSP's frame-ancestors
    assert fetch(f"{url}/index.html")[0] == 401  # only the three routes: the rest asks for the token
    assert fetch(f"{url}/index.html", AUTH)[0] == 404


@pytest.mark.timeout(90)
def test_a_running_job_is_cancelled_over_http(start_scheduler):
    _, url = start_http(start_scheduler, "--token", TOKEN)
    status, accepted = submit(url, ["sleep 30000"] * 4, headers=AUTH)
    job_id = accepted["cursor"]
    cancel_url = f"{url}/jobs/{job_id}/cancel"

    def busy() -> bool:
        state = dashboard_state(url)
        return state["jobs"][0]["running"] == 4 and all(w["state"] == "busy" for w in state["workers"])
    wait_until(busy, timeout=20)
    running = {line for worker in dashboard_state(url)["workers"] for line in worker["running"]}
    assert running and all(line.startswith(f"job {job_id} bundle ") for line in running)
    assert call("POST", cancel_url, {})[0] == 401
    started = time.monotonic()
    assert call("POST", cancel_url, {}, headers=AUTH, operation=("/jobs/{id}/cancel", "post")) == \
        (200, {"status": "ok", "cancelled": 4})
    assert time.monotonic() - started < 10
    (job,) = dashboard_state(url)["jobs"]
    assert (job["state"], job["cancelled"], job["failed"], job["done"]) == ("cancelled", 4, 0, 4)
    samples = scrape(url, AUTH)
    assert samples[("cloudkon_tasks_finished_total", (("state", "cancelled"),))] == 4
    assert samples[("cloudkon_task_duration_seconds_count", ())] == 0  # cancelled tasks did not run
    wait_until(lambda: all(w["state"] == "idle" for w in dashboard_state(url)["workers"]), timeout=10)
    # Again: nothing more to cancel.  A finished job, an unknown one, a body that is not {}.
    assert call("POST", cancel_url, headers=AUTH) == (200, {"status": "ok", "cancelled": 0})
    _, done = submit(url, ["true"], headers=AUTH)
    poll(url, done["cursor"], headers=AUTH)
    assert call("POST", f"{url}/jobs/{done['cursor']}/cancel", {}, headers=AUTH,
                operation=("/jobs/{id}/cancel", "post")) == (200, {"status": "ok", "already": "finished"})
    status, answer = call("POST", f"{url}/jobs/0123456789abcdef/cancel", {}, headers=AUTH,
                          operation=("/jobs/{id}/cancel", "post"))
    assert status == 404 and "no job" in answer["error"]
    assert call("POST", cancel_url, {"now": True}, headers=AUTH)[0] == 400
    assert call("GET", cancel_url, headers=AUTH)[0] == 405


def test_cancels_at_once_cancel_once(start_scheduler):
    """Six cancels of one job at the same moment: one answers for its tasks, the others 0 once it
    has (they wait for the cancel under way)."""
    _, url = start_http(start_scheduler, "--token", TOKEN)
    _, accepted = submit(url, ["sleep 30000"] * 1000, headers=AUTH)
    cancel_url = f"{url}/jobs/{accepted['cursor']}/cancel"
    wait_until(lambda: dashboard_state(url)["jobs"][0]["running"] > 0, timeout=20)
    go, answers = threading.Event(), []

    def cancel() -> None:
        go.wait()
        answers.append(call("POST", cancel_url, {}, headers=AUTH)[1]["cancelled"])
    cancels = [threading.Thread(target=cancel) for _ in range(6)]
    for thread in cancels:
        thread.start()
    go.set()
    for thread in cancels:
        thread.join()
    assert sorted(answers) == [0, 0, 0, 0, 0, 1000], answers


# --- remote schedulers on the emulator ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_remote_scheduler_counts_its_aws_requests(remote, workload):
    remote.worker("-t", "2")
    sched = remote.scheduler("--http-port", "0", "--metrics-port", "0")
    url = sched.proc.stdout.readline().strip().removeprefix("HTTP API on ")
    metrics_url = sched.proc.stdout.readline().strip().removeprefix("metrics on ")
    status, accepted = submit(url, ["echo hi", "exit 4"])
    report = poll(url, accepted["cursor"])
    assert (report["done"], report["failed"]) == (2, 1)
    samples = scrape(metrics_url)
    requests = {labels: n for (name, labels), n in samples.items() if name == "cloudkon_aws_requests_total"}
    assert requests[(("operation", "SendMessageBatch"), ("service", "sqs"))] >= 1
    assert requests[(("operation", "ReceiveMessage"), ("service", "sqs"))] >= 1
    assert sum(n for labels, n in requests.items() if ("service", "dynamodb") in labels) >= 1
    assert samples[("cloudkon_tasks_finished_total", (("state", "failed"),))] == 1
    assert not any(name == "cloudkon_fleet_instances" for name, _ in samples)  # no fleet
    state = _state_without_token(url)
    assert state["mode"] == "remote" and state["workers"] == [] and state["fleet"] is None
    (job,) = state["jobs"]
    assert job["state"] == "finished" and job["cost"] == report["cost"]  # as the results carry it


def _state_without_token(url: str) -> dict:
    status, state = call("GET", f"{url}/dashboard/state", operation=("/dashboard/state", "get"))
    assert status == 200
    return state


@pytest.mark.timeout(180)
def test_a_provisioning_scheduler_shows_its_fleet(fleet, workload):
    sched = fleet.scheduler("--max-workers", "2", "--worker-threads", "1", "--worker-idle-timeout", "30",
                            "--http-port", "0")
    url = sched.proc.stdout.readline().strip().removeprefix("HTTP API on ")
    status, accepted = submit(url, [f"sleep 0.5; echo {i}" for i in range(8)])
    assert status == 200

    def instances_running() -> dict:
        samples = scrape(url)
        return {labels[0][1]: n for (name, labels), n in samples.items()
                if name == "cloudkon_fleet_instances"}
    wait_until(lambda: instances_running().get("running", 0) >= 1, timeout=60)
    report = poll(url, accepted["cursor"])
    assert report["done"] == 8 and report["failed"] == 0
    state = wait_until(lambda: (s := _state_without_token(url))["workers"] and s, timeout=30)
    assert state["mode"] == "remote" and state["fleet"]["by_state"].get("running", 0) >= 1
    assert {w["id"] for w in state["workers"]} <= set(fleet.hyper.booted)
    assert all(w["kind"] == "instance" and w["state"] in ("booting", "running") for w in state["workers"])
    assert any(w["state"] == "running" and w["last_heartbeat"] <= state["now"] for w in state["workers"])
    sizes = [size for _, size in state["fleet"]["size"]]
    assert sizes and max(sizes) >= 1 and all(0 <= size <= 2 for size in sizes)
    assert state["fleet"]["cost"]["instances"] >= 1
    assert scrape(url)[("cloudkon_workers_alive", ())] >= 1
