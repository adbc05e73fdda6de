"""The dashboard (GET / on the HTTP port) in a real headless Chromium driven by Selenium, against a
real scheduler: signing in, a job seen from start to finish, a cancel from the page, a phone's width,
the scheduler gone; and a remote scheduler's fleet and cost, from a canned state and from a real one
provisioning instances on the hypervisor harness (tests/hypervisor.py).  Debian's
``chromium`` and ``chromium-driver`` (.ci/install-browser) and no download: Selenium Manager is never
asked, the driver's path is given.  Where they are missing the tests skip, saying why (and fail under
CI=true, where .ci/install-browser installs them).

``CLOUDKON_DASHBOARD_PNG=docs/dashboard.png pytest -n 0 tests/test_dashboard.py -k screenshot``
makes the README's screenshot anew (a longer run first, for a throughput chart with some history).
"""

from __future__ import annotations

import http.server
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import test_provisioning
from conftest import ROOT, run_client, start_client, wait_until
from test_http import call

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PAGE = ROOT / "cloudkon" / "dashboard"
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
TOKEN = "dashboard-secret"
WAIT_SECONDS = 20  # the page polls every 2 s; a step seen in a few polls

fleet = test_provisioning.fleet  # the provisioning tests' fleet on the hypervisor harness


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"no {path}: Debian's {package} is not installed (bash .ci/install-browser, as root)"
    return None


MISSING = _missing()
if MISSING and not os.environ.get("CI"):
    pytest.skip(MISSING, allow_module_level=True)
# Under CI, .ci/install-browser should have installed them: each test fails instead (the browser fixture).

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # CI without selenium: said by MISSING
    pass

# What the page shows of each job, read in one go (the page updates its elements in place).
JOBS_SCRIPT = """
return Array.from(document.querySelectorAll('#jobs li.job')).map(li => ({
  id: li.dataset.job, state: li.dataset.state,
  badge: li.querySelector('.badge').textContent,
  done: li.querySelector('.value-done').textContent,
  failed: li.querySelector('.value-failed').textContent,
  cancelled: li.querySelector('.value-cancelled').textContent,
  cancellable: !li.querySelector('button.cancel').hidden,
  progress: Number(li.querySelector('[role=progressbar]').getAttribute('aria-valuenow')),
  failures: Array.from(li.querySelectorAll('.failures li')).map(f => f.textContent),
}));
"""


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """A headless Chromium of this test's own (profile and temporary files under tmp_path)."""
    if MISSING:
        pytest.fail(f"CI=true but {MISSING}", pytrace=False)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, were it ever asked, fetches nothing
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-breakpad", "--hide-scrollbars", "--window-size=1280,900",
                     "--force-color-profile=srgb", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    home = tmp_path / "home"  # what Chromium writes outside its profile (crash reports, dconf) goes here
    environment = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                   "XDG_CACHE_HOME": str(home / ".cache")}
    service = Service(CHROMEDRIVER, log_output=subprocess.DEVNULL, env=environment)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_url(sched) -> str:
    """The page's URL, from the line a scheduler started with --http-port prints after its address."""
    line = sched.proc.stdout.readline().strip()
    assert line.startswith("HTTP API on http://"), line
    return line.removeprefix("HTTP API on ").rstrip("/") + "/"


def start_dashboard(start_scheduler, *args: str):
    """A scheduler with the HTTP API (so the dashboard) and a token; it and the page's URL."""
    sched = start_scheduler("--local", "2", "--http-port", "0", "--token", TOKEN, *args)
    return sched, page_url(sched)


def wait(driver, seconds: float = WAIT_SECONDS) -> WebDriverWait:
    return WebDriverWait(driver, seconds, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,))


def sign_in(driver, url: str, token: str = TOKEN) -> None:
    driver.get(url)
    field = wait(driver).until(shown.visibility_of_element_located((By.ID, "token")))
    field.clear()
    field.send_keys(token, Keys.ENTER)
    wait(driver).until(shown.visibility_of_element_located((By.ID, "board")))


def jobs(driver) -> list[dict]:
    return driver.execute_script(JOBS_SCRIPT)


def the_job(driver, condition=lambda job: True) -> dict:
    """The page's only job, once it meets ``condition``."""
    def check(driver):
        found = jobs(driver)
        return len(found) == 1 and condition(found[0]) and found[0]
    return wait(driver).until(check)


def page_errors(driver) -> list[str]:
    """The console's errors but the 401s of signing in: a CSP violation, a script error."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "status of 401" not in entry["message"]]


def jobs_listing(address: str) -> str:
    listed = run_client("-s", address, "--token", TOKEN, "--jobs")
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


def test_sign_in_refuses_a_wrong_token_keeps_the_right_one_in_the_tab_and_says_when_the_scheduler_goes(
        start_scheduler, browser):
    sched, url = start_dashboard(start_scheduler)
    browser.get(url)
    field = wait(browser).until(shown.visibility_of_element_located((By.ID, "token")))
    assert browser.find_element(By.CSS_SELECTOR, "label[for=token]").text == "Token"
    assert not browser.find_element(By.ID, "board").is_displayed()

    field.send_keys("not-the-token", Keys.ENTER)
    error = wait(browser).until(shown.visibility_of_element_located((By.ID, "login-error")))
    assert "Wrong token" in error.text
    assert not browser.find_element(By.ID, "board").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0

    sign_in(browser, url)
    assert browser.execute_script("return sessionStorage.getItem('cloudkon-dashboard-token')") == TOKEN
    assert browser.execute_script("return localStorage.length") == 0
    assert TOKEN not in browser.current_url
    assert "2 worker processes" in browser.find_element(By.ID, "backend").text
    wait(browser).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#workers-body tr")) == 2)
    assert browser.find_element(By.ID, "no-jobs").is_displayed()
    assert page_errors(browser) == []

    browser.refresh()  # the token kept for the tab: no second sign-in
    wait(browser).until(shown.visibility_of_element_located((By.ID, "board")))
    assert not browser.find_element(By.ID, "login").is_displayed()

    sched.proc.kill()
    sched.proc.wait()
    banner = wait(browser).until(shown.visibility_of_element_located((By.ID, "unreachable")))
    assert "Scheduler unreachable" in banner.text
    assert browser.find_element(By.ID, "conn").text == "Unreachable"
    assert browser.find_element(By.ID, "board").is_displayed()  # the last figures stay, dimmed

    browser.find_element(By.ID, "logout").click()
    wait(browser).until(shown.visibility_of_element_located((By.ID, "token")))
    assert browser.execute_script("return sessionStorage.length") == 0


def test_a_job_appears_progresses_and_finishes_with_the_counts_and_failures_of_the_client(
        start_scheduler, browser, workload):
    sched, url = start_dashboard(start_scheduler)
    sign_in(browser, url)
    lines = ["sleep 150"] * 60 + ["echo 'boom: disk full' >&2; echo more; exit 3"] * 2
    client = start_client("-s", sched.address, "--token", TOKEN, "-w", workload(lines))

    running = the_job(browser, lambda job: job["state"] in ("open", "running") and job["progress"] > 0)
    assert running["cancellable"] and running["progress"] < len(lines)
    finished = the_job(browser, lambda job: job["state"] == "finished")
    _, err = client.communicate(timeout=60)
    assert client.returncode == 1, err
    assert "62 tasks: 60 succeeded, 2 failed" in err
    assert finished["done"] == "62 / 62" and finished["failed"] == "2"
    assert not finished["cancellable"]
    assert len(finished["failures"]) == 2 and all("exit 3" in f and "boom: disk full" in f
                                                  for f in finished["failures"])
    listed = jobs_listing(sched.address)
    row = next(line.split() for line in listed.splitlines() if line.startswith(finished["id"]))
    assert row[1] == "finished" and row[4:] == ["62", "0", "0", "60", "2", "0"], listed
    assert page_errors(browser) == []


def test_a_job_cancelled_from_the_page_ends_cancelled(start_scheduler, browser, workload):
    sched, url = start_dashboard(start_scheduler)
    sign_in(browser, url)
    client = start_client("-s", sched.address, "--token", TOKEN, "-w", workload(["sleep 30000"] * 6))
    job = the_job(browser, lambda job: job["state"] == "running" and job["cancellable"])
    cancel = browser.find_element(By.CSS_SELECTOR, f'li.job[data-job="{job["id"]}"] button.cancel')

    cancel.click()  # asked first: keeping it running sends nothing
    dialog = wait(browser).until(shown.visibility_of_element_located((By.ID, "confirm")))
    assert job["id"] in dialog.text
    browser.find_element(By.ID, "confirm-no").click()
    wait(browser).until(shown.invisibility_of_element_located((By.ID, "confirm")))
    assert client.poll() is None and the_job(browser)["state"] == "running"

    cancel.click()
    wait(browser).until(shown.visibility_of_element_located((By.ID, "confirm")))
    browser.find_element(By.ID, "confirm-yes").click()
    toast = wait(browser).until(shown.visibility_of_element_located((By.ID, "toast")))
    assert re.search(rf"Job {job['id']} cancelled: \d+ tasks? stopped", toast.text), toast.text
    cancelled = the_job(browser, lambda job: job["state"] == "cancelled")
    assert cancelled["badge"] == "cancelled" and not cancelled["cancellable"]
    assert cancelled["done"] == "6 / 6" and cancelled["cancelled"] == "6" and cancelled["failed"] == "0"
    assert client.wait(timeout=30) == 3
    listed = jobs_listing(sched.address)
    row = next(line.split() for line in listed.splitlines() if line.startswith(job["id"]))
    assert row[1] == "cancelled" and row[4:] == ["6", "0", "0", "0", "0", "6"], listed
    assert page_errors(browser) == []


def test_at_a_phone_s_width_nothing_overflows(start_scheduler, browser, workload):
    sched, url = start_dashboard(start_scheduler)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 375, "height": 812, "deviceScaleFactor": 2, "mobile": True})

    def fits(driver) -> bool:
        return driver.execute_script(
            "return innerWidth === 375 && document.documentElement.scrollWidth <= innerWidth")

    browser.get(url)
    wait(browser).until(shown.visibility_of_element_located((By.ID, "token")))
    assert fits(browser)
    sign_in(browser, url)
    long_line = "printf '%s\\n' " + "a-very-long-unbroken-argument-" * 8 + "; exit 1"
    client = start_client("-s", sched.address, "--token", TOKEN, "-w", workload([long_line, "sleep 30000"]))
    the_job(browser, lambda job: job["failures"] and job["cancellable"])
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#workers-body tr"))
    assert fits(browser)
    browser.find_element(By.CSS_SELECTOR, "li.job button.cancel").click()
    dialog = wait(browser).until(shown.visibility_of_element_located((By.ID, "confirm")))
    assert dialog.rect["width"] <= 375 and fits(browser)
    browser.find_element(By.ID, "confirm-no").click()
    assert page_errors(browser) == []
    client.kill()
    client.communicate()


def remote_state() -> dict:
    """A remote scheduler's state as the contract gives it: a fleet grown to 3 instances, its cost."""
    now = time.time()
    cost = {"task_seconds": 812.5, "requests": {"sqs": 1200, "dynamodb": 300}, "usd": 0.0421,
            "prices": "default prices", "instance_seconds": 5400.0, "worker_requests": {"sqs": 900}}
    job = {"id": "5f0c2a9e1d7b4c33", "state": "finished", "total": 500, "done": 500, "failed": 0,
           "cancelled": 0, "queued": 0, "running": 0, "created_at": now - 400, "finished_at": now - 100,
           "rate": 0.0, "eta_seconds": None, "failures": [], "cost": {**cost, "usd": 0.0123}}
    return {"mode": "remote", "now": now, "backend": "SQS queue cloudkon-requests, fleet of up to 3",
            "jobs": [job],
            "workers": [{"id": f"i-0abc{n}", "kind": "instance", "state": "running", "running": [],
                         "last_heartbeat": now - 4} for n in range(3)],
            "throughput": [[now - 600 + 5 * n, n % 7] for n in range(120)],
            "fleet": {"size": [[now - 1800 + 300 * n, min(n, 3)] for n in range(7)],
                      "by_state": {"running": 3, "pending": 0}, "cost": cost}}


@pytest.fixture
def canned_scheduler():
    """The page's files and a fixed /dashboard/state (no token) from a server in this process, for what a
    local scheduler never shows (a fleet); the URL of its page."""
    pages = {"/": ("index.html", "text/html"), "/dashboard.css": ("dashboard.css", "text/css"),
             "/dashboard.js": ("dashboard.js", "text/javascript")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/dashboard/state":
                kind, data = "application/json", json.dumps(remote_state()).encode()
            elif self.path in pages:
                kind, data = pages[self.path][1], (PAGE / pages[self.path][0]).read_bytes()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def test_remote_mode_shows_the_fleet_over_time_and_its_cost(canned_scheduler, browser):
    browser.get(canned_scheduler)  # no token asked: no sign-in form
    fleet = wait(browser).until(shown.visibility_of_element_located((By.ID, "fleet")))
    assert browser.find_element(By.ID, "mode").text == "Remote"
    assert not browser.find_element(By.ID, "login").is_displayed()
    assert not browser.find_element(By.ID, "logout").is_displayed()
    assert browser.find_element(By.ID, "sum-cost").text == "$0.0421"
    assert browser.find_element(By.ID, "sum-fleet").text == "3 instances"
    assert "3 running" in fleet.text and "5,400 instance-s paid" in fleet.text
    line = browser.find_element(By.CSS_SELECTOR, "#fleet-chart svg path.line")
    assert line.get_attribute("d").count("V") == 6  # a step at each of the 6 later scaling passes
    assert "3 instances now" in browser.find_element(By.CSS_SELECTOR, "#fleet-chart svg").get_attribute(
        "aria-label")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#throughput-chart rect.column")) > 50
    job = the_job(browser)
    assert job["state"] == "finished" and not job["cancellable"]
    assert browser.find_element(By.CSS_SELECTOR, "li.job .value-cost").text == "$0.0123"
    heartbeats = browser.find_elements(By.CSS_SELECTOR, "#workers-body td[data-label='Last heartbeat']")
    assert [re.fullmatch(r"\d+ s ago", cell.text) is not None for cell in heartbeats] == [True] * 3
    assert page_errors(browser) == []


# The workers' table, a row a worker: its id and its cells by their label.
WORKERS_SCRIPT = """
return Array.from(document.querySelectorAll('#workers-body tr')).map(tr => Object.assign(
  {id: tr.dataset.worker},
  Object.fromEntries(Array.from(tr.cells).map(td => [td.dataset.label, td.textContent]))));
"""


def dollars(text: str) -> float:
    """A figure of the page's money(): $ and 4 decimals under a dollar."""
    assert re.fullmatch(r"\$0\.\d{4}", text), text
    return float(text[1:])


def shows(text: str, usd: float) -> bool:
    """The page's ``text`` is ``usd`` to its 4 decimals (however a half is rounded)."""
    return abs(dollars(text) - usd) <= 0.00005 + 1e-9


def test_a_real_remote_scheduler_shows_its_fleet_its_instances_and_a_job_s_cost(fleet, browser, workload,
                                                                                 tmp_path):
    prices = tmp_path / "prices.json"  # $0.001 an instance-second and requests free: once its instances
    prices.write_text(json.dumps({"instances": {"t3.micro": 3.6}, "requests": {  # are gone, the fleet's
        service: 0 for service in ("sqs", "dynamodb", "sns", "s3", "ec2")}}))  # figure stays put
    # Idle instances stay up 4 s after the job: a few of the page's polls see them.
    sched = fleet.scheduler("--max-workers", "2", "--worker-threads", "1", "--worker-idle-timeout", "4",
                            "--instance-type", "t3.micro", "--prices", str(prices), "--http-port", "0",
                            "--token", TOKEN)
    url = page_url(sched)
    sign_in(browser, url)
    assert browser.find_element(By.ID, "mode").text == "Remote"
    assert browser.find_element(By.ID, "fleet").is_displayed()
    assert browser.find_element(By.ID, "sum-cost-card").is_displayed()
    client = start_client("-s", sched.address, "--token", TOKEN, "-w",
                          workload([f"sleep 0.2; echo {i}" for i in range(16)]))

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def chart_label() -> str:
        return browser.find_element(By.CSS_SELECTOR, "#fleet-chart svg").get_attribute("aria-label")

    wait(browser).until(lambda d: re.search(r"\b[1-9]\d* running", text("fleet-states")))
    wait(browser).until(lambda d: re.fullmatch(r"Fleet size: [1-9]\d* instances? now", chart_label()))
    assert re.fullmatch(r"[1-9]\d* instances?", text("sum-fleet"))
    instance = wait(browser).until(lambda d: next(
        (w for w in d.execute_script(WORKERS_SCRIPT) if w["State"] == "running"
         and re.fullmatch(r"\d+ s ago", w["Last heartbeat"])), None))
    assert instance["Worker"] == f"{instance['id']} (instance)" and instance["id"] in fleet.hyper.booted
    # Which instance holds which bundle is not known to the scheduler: its last results are, once in.
    assert re.fullmatch(r"not known to the scheduler|last results: job [0-9a-f]+, \d+ tasks?, \d+ s ago",
                        instance["Running"]), instance
    assert text("sum-workers-label") == "Workers up"  # not "busy": not known either
    assert re.fullmatch(r"[1-9]\d* / [1-9]\d*", text("sum-workers"))

    finished = the_job(browser, lambda job: job["state"] == "finished")
    assert finished["done"] == "16 / 16" and finished["failed"] == "0" and not finished["cancellable"]
    # Until its idle timeout ends it (4 s after the job, two polls of the page at least).
    wait(browser).until(lambda d: any(worker["Running"].startswith(f"last results: job {finished['id']}, ")
                                      for worker in d.execute_script(WORKERS_SCRIPT)))
    _, err = client.communicate(timeout=60)
    assert client.returncode == 0 and "16 tasks: 16 succeeded" in err, err
    job_cost = browser.find_element(By.CSS_SELECTOR, f'li.job[data-job="{finished["id"]}"] .value-cost')
    assert job_cost.is_displayed()

    wait_until(lambda: fleet.hyper.booted and not fleet.hyper.alive(), timeout=60)  # idle: gone
    assert set(fleet.hyper.states().values()) == {"terminated"}
    wait(browser).until(lambda d: text("sum-fleet") == "0 instances" and "terminated" in text("fleet-states")
                        and not re.search(r"running|pending", text("fleet-states")))
    assert chart_label() == "Fleet size: 0 instances now"
    assert browser.find_element(By.ID, "no-workers").is_displayed()
    steps = browser.find_element(By.CSS_SELECTOR, "#fleet-chart svg path.line").get_attribute("d")
    assert steps.count("V") >= 2, steps  # up to the fleet, and down to none

    listed = jobs_listing(sched.address)
    row = next(line.split() for line in listed.splitlines() if line.startswith(finished["id"]))
    assert row[1] == "finished" and row[4:-1] == ["16", "0", "0", "16", "0", "0"], listed
    assert float(row[-1]) > 0 and shows(job_cost.text, float(row[-1])), (job_cost.text, listed)
    fleet_usd = float(re.search(r"^since the scheduler started: .*; about \$([\d.]+) at the ", listed,
                                re.MULTILINE)[1])

    def state() -> dict:
        status, answer = call("GET", f"{url}dashboard/state", headers={"Authorization": f"Bearer {TOKEN}"},
                              operation=("/dashboard/state", "get"))  # checked against docs/openapi.json
        assert status == 200, answer
        return answer["fleet"]["cost"]

    def page_has(cost: dict) -> dict | None:
        return cost if shows(text("sum-cost"), cost["usd"]) else None

    cost = wait(browser).until(lambda d: page_has(state()))  # the page's figure, polled anew: the same
    assert cost["usd"] == pytest.approx(fleet_usd, abs=1e-6) and cost["usd"] >= float(row[-1])
    rounded = {key: f"{math.floor(cost[key] + 0.5):,}" for key in ("instance_seconds", "task_seconds")}
    assert text("fleet-cost") == (f"Cost so far: {text('sum-cost')} ({rounded['instance_seconds']} "  # JS's
                                  f"instance-s paid, {rounded['task_seconds']} task-s)")  # Math.round
    assert page_errors(browser) == []


def test_screenshot_of_a_run_with_a_few_jobs(start_scheduler, browser, workload, tmp_path):
    """A mid-run page as the README shows it: a finished job with failures, two running."""
    target = os.environ.get("CLOUDKON_DASHBOARD_PNG")
    sched, url = start_dashboard(start_scheduler)
    submit = ("-s", sched.address, "--token", TOKEN)
    clients = []
    if target:  # a history for the throughput chart, at three paces
        paces = ["sleep 30"] * 800 + ["sleep 80"] * 400 + ["sleep 15"] * 1200
        warm = run_client(*submit, "-w", workload(paces))
        assert warm.returncode == 0, warm.stderr
    failing = [f"./render.sh frame{n:03d}.png" for n in (7, 42, 311)]
    done = run_client(*submit, "-w", workload(["sleep 20"] * 120 + failing))
    assert done.returncode == 1, done.stderr
    clients.append(start_client(*submit, "-w", workload(["sleep 100"] * 400)))
    clients.append(start_client(*submit, "-w", workload(["sleep 250"] * 300)))
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",  # no bar caught mid-transition
                            {"features": [{"name": "prefers-reduced-motion", "value": "reduce"}]})
    sign_in(browser, url)
    least = 150 if target else 1  # the README's: well under way
    wait(browser, 30).until(lambda d: len(jobs(d)) >= 3 and least <= jobs(d)[1]["progress"] < 400)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the whole page, at once
                            {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    wait(browser).until(lambda d: d.execute_script("return innerHeight") == height)
    path = Path(target) if target else tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(path if path.is_absolute() else ROOT / path))
    from PIL import Image
    with Image.open(path if path.is_absolute() else ROOT / path) as image:
        assert image.width >= 1280 and image.height >= 600
    for client in clients:
        client.kill()
        client.communicate()
    wait_until(lambda: all(c.returncode is not None for c in clients))
