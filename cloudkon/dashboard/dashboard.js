// CloudKon dashboard: polls GET dashboard/state every 2 s and shows it; cancels a job with
// POST jobs/JOB/cancel.  No framework, nothing loaded from elsewhere, nothing inline (the page's
// Content-Security-Policy allows scripts and styles from the scheduler only).  The token, when the
// scheduler asks for one (401), is kept in sessionStorage (this tab only) and sent as
// "Authorization: Bearer", never in a URL.
"use strict";

(function () {
  const POLL_MS = 2000;
  const REQUEST_TIMEOUT_MS = 8000;
  const TOKEN_KEY = "cloudkon-dashboard-token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const THROUGHPUT_WINDOW_S = 600;
  const BUCKET_S = 5;

  const $ = (id) => document.getElementById(id);
  const jobViews = new Map();  // job id -> its view (elements updated in place between polls)
  let token = readToken();
  let latest = null;           // {state, received}: the last answer and when it came (Date.now())
  let timer = null;
  let sequence = 0;            // polls started; an answer to an older one is dropped
  let signingIn = false;       // a token just typed, not yet answered
  let lastContact = null;
  let toastTimer = null;
  let confirming = null;       // the job the confirm dialog asks about

  // ---- token --------------------------------------------------------------------------------

  function readToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (e) {
      return null;
    }
  }

  function keepToken(value) {
    token = value;
    try {
      if (value === null) sessionStorage.removeItem(TOKEN_KEY);
      else sessionStorage.setItem(TOKEN_KEY, value);
    } catch (e) { /* storage off: the token lives in this page only */ }
  }

  function headers(extra) {
    const all = Object.assign({ Accept: "application/json" }, extra || {});
    if (token) all.Authorization = "Bearer " + token;
    return all;
  }

  async function request(path, options) {
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      return await fetch(path, Object.assign({ cache: "no-store", credentials: "omit",
                                               signal: controller.signal }, options));
    } finally {
      clearTimeout(timeout);
    }
  }

  // ---- polling ------------------------------------------------------------------------------

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    clearTimeout(timer);
    const mine = ++sequence;
    let response;
    try {
      response = await request("dashboard/state", { headers: headers() });
    } catch (e) {
      if (mine !== sequence) return;
      unreachable(e && e.name === "AbortError" ? "It did not answer within 8 s." : "No answer from it.");
      return schedule();
    }
    if (mine !== sequence) return;
    if (response.status === 401) return needLogin();
    if (!response.ok) {
      unreachable("It answered HTTP " + response.status + ".");
      return schedule();
    }
    let state;
    try {
      state = await response.json();
    } catch (e) {
      if (mine !== sequence) return;
      unreachable("Its answer was not JSON.");
      return schedule();
    }
    if (mine !== sequence) return;
    signingIn = false;
    lastContact = Date.now();
    latest = { state: state, received: Date.now() };
    showBoard();
    render(state);
    schedule();
  }

  function unreachable(detail) {
    connection("Unreachable", "down");
    $("unreachable-detail").textContent = detail + " Retrying every 2 s" +
      (latest ? "; the figures below are from its last answer, at " + clockTime(lastContact / 1000) + "."
        : ".");
    $("unreachable").hidden = false;
    $("board").classList.toggle("stale", latest !== null);
    if (signingIn) $("login-submit").disabled = false;  // not checked yet: retried with the next poll
  }

  function showBoard() {
    $("unreachable").hidden = true;
    $("board").classList.remove("stale");
    $("login").hidden = true;
    $("board").hidden = false;
    $("logout").hidden = !token;
    connection("Live", "live");
    $("updated").textContent = "; last update " + clockTime(Date.now() / 1000);
  }

  function connection(text, kind) {  // changed only when it changes: a screen reader says it once
    const conn = $("conn");
    if (conn.textContent !== text) conn.textContent = text;
    conn.className = "pill conn " + kind;
  }

  // ---- sign in ------------------------------------------------------------------------------

  function needLogin() {
    clearTimeout(timer);
    let message = "";
    if (signingIn) message = "Wrong token: the scheduler refused it. Check the --token it was started with.";
    else if (token) message = "The scheduler no longer accepts the saved token: sign in again.";
    signingIn = false;
    keepToken(null);
    latest = null;
    $("board").hidden = true;
    $("unreachable").hidden = true;
    $("logout").hidden = true;
    $("mode").hidden = true;
    $("login").hidden = false;
    connection("Sign-in needed", "");
    const error = $("login-error");
    error.textContent = message;
    error.hidden = !message;
    $("login-submit").disabled = false;
    const input = $("token");
    input.setAttribute("aria-invalid", message ? "true" : "false");
    if (message) input.select();
    input.focus();
  }

  function signIn(event) {
    event.preventDefault();
    const value = $("token").value.trim();
    const error = $("login-error");
    if (!value) {
      error.textContent = "Enter the token.";
      error.hidden = false;
      $("token").focus();
      return;
    }
    if (!/^[\x20-\x7e]+$/.test(value)) {  // what an HTTP header can carry
      error.textContent = "That token has characters an HTTP header cannot carry.";
      error.hidden = false;
      $("token").focus();
      return;
    }
    error.hidden = true;
    $("login-submit").disabled = true;
    keepToken(value);
    signingIn = true;
    poll();
  }

  function signOut() {
    keepToken(null);
    $("token").value = "";
    sequence++;  // an answer in flight is for the old token
    needLogin();
  }

  // ---- rendering ----------------------------------------------------------------------------

  function render(state) {
    const remote = state.mode === "remote";
    $("backend").textContent = state.backend || "";
    const mode = $("mode");
    mode.textContent = remote ? "Remote" : "Local";
    mode.hidden = false;
    renderSummary(state);
    renderJobs(state);
    renderWorkers(state);
    renderThroughput(state);
    renderFleet(state);
  }

  function renderSummary(state) {
    const jobs = state.jobs || [];
    const workers = state.workers || [];
    $("sum-jobs").textContent = number(jobs.filter(unfinished).length);
    const minute = (state.throughput || []).filter((p) => p[0] > state.now - 60)
      .reduce((sum, p) => sum + p[1], 0);
    $("sum-rate").textContent = rate(minute / 60);
    // A remote scheduler does not know which instance holds which bundle: it counts instances up.
    const remote = state.mode === "remote";
    $("sum-workers-label").textContent = remote ? "Workers up" : "Workers busy";
    const counted = workers.filter((w) => remote ? w.state === "running"
      : (w.running || []).length > 0 || w.state === "busy").length;
    $("sum-workers").textContent = number(counted) + " / " + number(workers.length);
    const fleet = state.fleet;
    $("sum-fleet-card").hidden = !fleet;
    $("sum-cost-card").hidden = !fleet;
    if (fleet) {
      const size = fleet.size && fleet.size.length ? fleet.size[fleet.size.length - 1][1] : 0;
      $("sum-fleet").textContent = plural(size, "instance");
      $("sum-cost").textContent = money(fleet.cost);
    }
  }

  function unfinished(job) {
    return job.state === "open" || job.state === "running";
  }

  function renderJobs(state) {
    const jobs = state.jobs || [];
    const list = $("jobs");
    const seen = new Set();
    jobs.forEach((job, index) => {
      seen.add(job.id);
      let view = jobViews.get(job.id);
      if (!view) {
        view = jobView(job.id);
        jobViews.set(job.id, view);
      }
      updateJob(view, job, state.now);
      if (list.children[index] !== view.root) list.insertBefore(view.root, list.children[index] || null);
    });
    for (const [id, view] of jobViews) {
      if (!seen.has(id)) {
        view.root.remove();
        jobViews.delete(id);
      }
    }
    $("no-jobs").hidden = jobs.length > 0;
    $("jobs-count").textContent = jobs.length ? "(" + number(jobs.length) + ")" : "";
  }

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function jobView(id) {
    const root = make("li", "job");
    root.dataset.job = id;
    const head = make("div", "job-head");
    const name = make("span", "job-id mono", id);
    const badge = make("span", "badge");
    const when = make("span", "job-when muted");
    const cancel = make("button", "cancel", "Cancel…");
    cancel.type = "button";
    cancel.setAttribute("aria-label", "Cancel job " + id);
    cancel.addEventListener("click", () => askCancel(id));
    head.append(name, badge, when, cancel);

    const bar = make("div", "progress");
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-label", "Progress of job " + id);
    bar.setAttribute("aria-valuemin", "0");
    const segments = {};
    for (const kind of ["ok", "failed", "cancelled", "running"]) {
      segments[kind] = make("span", "seg " + kind);
      bar.append(segments[kind]);
    }

    const figures = make("dl", "figures");
    const values = {};
    const figureNames = [["done", "Done"], ["failed", "Failed"], ["cancelled", "Cancelled"],
                         ["queued", "Queued"], ["running", "Running"], ["rate", "Rate"],
                         ["eta", "ETA"], ["cost", "Cost"]];
    const rows = {};
    for (const [key, label] of figureNames) {
      const row = make("div", "figure-" + key);
      values[key] = make("dd", "value-" + key);
      row.append(make("dt", "", label), values[key]);
      figures.append(row);
      rows[key] = row;
    }

    const failures = make("details", "failures");
    failures.open = true;
    const summary = make("summary");
    const failureList = make("ul");
    failures.append(summary, failureList);

    root.append(head, bar, figures, failures);
    return { root, badge, when, cancel, bar, segments, values, rows, failures, summary, failureList,
             failuresKey: null, cancelling: false };
  }

  function updateJob(view, job, now) {
    const total = Math.max(job.total || 0, 0);
    const failed = job.failed || 0;
    const cancelled = job.cancelled || 0;
    const done = job.done || 0;
    const succeeded = Math.max(done - failed - cancelled, 0);
    const running = job.running || 0;
    const withFailures = failed > 0;

    view.root.dataset.state = job.state;
    view.badge.textContent = job.state;
    view.badge.className = "badge " + job.state + (withFailures ? " with-failures" : "");
    const started = "started " + clockTime(job.created_at);
    const took = job.finished_at ? ", took " + duration(job.finished_at - job.created_at)
      : " (" + duration(now - job.created_at) + " ago)";
    view.when.textContent = started + took;

    const open = unfinished(job);
    view.cancel.hidden = !open;
    if (!open) view.cancelling = false;
    view.cancel.disabled = view.cancelling;
    view.cancel.textContent = view.cancelling ? "Cancelling…" : "Cancel…";

    const share = (n) => (total ? (100 * n) / total : 0) + "%";
    view.segments.ok.style.width = share(succeeded);
    view.segments.failed.style.width = share(failed);
    view.segments.cancelled.style.width = share(cancelled);
    view.segments.running.style.width = share(open ? Math.min(running, total - done) : 0);
    view.bar.setAttribute("aria-valuemax", String(total));
    view.bar.setAttribute("aria-valuenow", String(done));
    view.bar.setAttribute("aria-valuetext", number(done) + " of " + number(total) + " tasks done");

    view.values.done.textContent = number(done) + " / " + number(total);
    view.values.failed.textContent = number(failed);
    view.values.failed.classList.toggle("bad", withFailures);
    view.values.cancelled.textContent = number(cancelled);
    view.values.queued.textContent = number(job.queued || 0);
    view.values.running.textContent = number(running);
    const lifetime = (job.finished_at || now) - job.created_at;
    view.values.rate.textContent = open ? rate(job.rate || 0)
      : (lifetime > 0 ? rate(done / lifetime) + " on average" : "–");
    view.values.eta.textContent = job.eta_seconds === null || job.eta_seconds === undefined
      ? (open ? "unknown" : "–") : duration(job.eta_seconds);
    view.rows.cancelled.hidden = !cancelled;
    view.rows.queued.hidden = !open;
    view.rows.running.hidden = !open;
    view.rows.eta.hidden = !open;
    view.rows.cost.hidden = !job.cost;
    if (job.cost) view.values.cost.textContent = money(job.cost);

    const list = (job.failures || []).slice().sort((a, b) => a.id - b.id);
    view.failures.hidden = list.length === 0;
    const key = JSON.stringify(list) + "|" + failed;
    if (key !== view.failuresKey) {
      view.failuresKey = key;
      view.summary.textContent = failed > list.length
        ? plural(failed, "failed task") + " (the first " + list.length + " below)"
        : plural(failed || list.length, "failed task");
      view.failureList.replaceChildren(...list.map(failureItem));
    }
  }

  function failureItem(failure) {
    const item = make("li", "failure");
    const what = "task " + failure.id + (failure.exit_code !== null && failure.exit_code !== undefined
      ? ", exit " + failure.exit_code : "") + ": ";
    const line = make("div");
    line.append(document.createTextNode(what), make("code", "", failure.command || ""));
    item.append(line);
    const output = failure.error || failure.first_line;
    if (output) item.append(make("pre", "", output));
    return item;
  }

  function renderWorkers(state) {
    const workers = state.workers || [];
    const body = $("workers-body");
    const age = (latest ? (Date.now() - latest.received) / 1000 : 0);
    body.replaceChildren(...workers.map((worker) => {
      const row = make("tr");
      row.dataset.worker = worker.id;
      const cell = (label, content, className) => {
        const td = make("td", className || "");
        td.dataset.label = label;
        if (typeof content === "string") td.textContent = content;
        else td.append(content);
        row.append(td);
        return td;
      };
      cell("Worker", worker.id + (worker.kind === "instance" ? " (instance)" : ""), "mono");
      cell("State", worker.state || "", worker.state === "idle" ? "idle" : "");
      const running = worker.running || [];
      if (running.length) {
        const list = make("ul");
        for (const what of running) list.append(make("li", "", what));
        cell("Running", list);
      } else if (worker.kind === "instance") {
        // Which bundles an instance holds is not known to the scheduler: its last results are.
        const last = worker.last_results;
        cell("Running", last ? "last results: job " + last.job + ", " + plural(last.tasks, "task") + ", " +
          ago(Math.max(0, state.now - last.at + age)) : "not known to the scheduler", "muted");
      } else {
        cell("Running", "nothing", "idle");
      }
      if (worker.last_heartbeat === null || worker.last_heartbeat === undefined) {
        cell("Last heartbeat", "–", "muted");
      } else {
        const seconds = Math.max(0, state.now - worker.last_heartbeat + age);
        cell("Last heartbeat", ago(seconds), seconds > 60 ? "stale-beat" : "");
      }
      return row;
    }));
    $("no-workers").hidden = workers.length > 0;
    $("workers").hidden = workers.length === 0;
    $("workers-count").textContent = workers.length ? "(" + number(workers.length) + ")" : "";
  }

  // ---- charts -------------------------------------------------------------------------------

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const name in attributes) node.setAttribute(name, String(attributes[name]));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function chartFrame(container, label) {
    const width = Math.max(container.clientWidth, 200);
    const height = Math.max(container.clientHeight, 100);
    const root = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": label });
    root.append(svg("title", {}, label));
    container.replaceChildren(root);
    return { root, width, height, left: 38, right: width - 6, top: 8, bottom: height - 20 };
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * magnitude) return step * magnitude;
    }
    return 10 * magnitude;
  }

  function axes(frame, top, xLabels) {
    const { root, left, right, bottom } = frame;
    const middle = (frame.top + bottom) / 2;
    for (const [y, value] of [[frame.top, top], [middle, top / 2], [bottom, 0]]) {
      root.append(svg("line", { class: "grid", x1: left, x2: right, y1: y, y2: y }));
      root.append(svg("text", { class: "axis", x: left - 6, y: y + 4, "text-anchor": "end" },
                      shortNumber(value)));
    }
    for (const [x, text, anchor] of xLabels) {
      root.append(svg("text", { class: "axis", x: x, y: frame.height - 4, "text-anchor": anchor }, text));
    }
  }

  function renderThroughput(state) {
    const container = $("throughput-chart");
    const points = (state.throughput || []).filter((p) => p[0] >= state.now - THROUGHPUT_WINDOW_S - BUCKET_S);
    const perSecond = points.map((p) => [p[0], p[1] / BUCKET_S]);
    const peak = perSecond.reduce((m, p) => Math.max(m, p[1]), 0);
    const total = points.reduce((sum, p) => sum + p[1], 0);
    const frame = chartFrame(container, "Throughput: " + number(total) +
      " tasks finished in the last 10 minutes, at most " + rate(peak));
    const top = niceMax(peak);
    const start = state.now - THROUGHPUT_WINDOW_S;
    const span = frame.right - frame.left;
    const x = (t) => frame.left + ((t - start) / THROUGHPUT_WINDOW_S) * span;
    const y = (v) => frame.bottom - (v / top) * (frame.bottom - frame.top);
    axes(frame, top, [[frame.left, "10 min ago", "start"], [x(start + 300), "5 min", "middle"],
                      [frame.right, "now", "end"]]);
    const barWidth = Math.max((BUCKET_S / THROUGHPUT_WINDOW_S) * span - 1, 1);
    for (const [t, value] of perSecond) {
      if (value <= 0) continue;
      const left = Math.max(x(t), frame.left);
      const right = Math.min(x(t) + barWidth, frame.right);
      if (right <= left) continue;
      const bar = svg("rect", { class: "column", x: left, y: y(value), width: right - left,
                                height: frame.bottom - y(value) });
      bar.append(svg("title", {}, clockTime(t) + ": " + rate(value)));
      frame.root.append(bar);
    }
    if (total === 0) {
      frame.root.append(svg("text", { class: "empty", x: (frame.left + frame.right) / 2,
                                      y: (frame.top + frame.bottom) / 2, "text-anchor": "middle" },
                            "No tasks finished in the last 10 minutes"));
    }
  }

  function renderFleet(state) {
    const fleet = state.fleet;
    $("fleet").hidden = !fleet;
    if (!fleet) return;
    const sizes = (fleet.size || []).filter((p) => p[0] >= state.now - 3600);
    const states = Object.entries(fleet.by_state || {}).filter((e) => e[1] > 0)
      .map((e) => number(e[1]) + " " + e[0]);
    $("fleet-states").textContent = "Now: " + (states.length ? states.join(", ") : "no instances");
    $("fleet-cost").textContent = "Cost so far: " + money(fleet.cost) + costDetail(fleet.cost);
    const current = sizes.length ? sizes[sizes.length - 1][1] : 0;
    const frame = chartFrame($("fleet-chart"), "Fleet size: " + plural(current, "instance") + " now");
    const peak = sizes.reduce((m, p) => Math.max(m, p[1]), 0);
    const top = niceMax(Math.max(peak, 1));
    const start = Math.min(sizes.length ? sizes[0][0] : state.now - 60, state.now - 60);
    const span = Math.max(state.now - start, 1);
    const x = (t) => frame.left + ((t - start) / span) * (frame.right - frame.left);
    const y = (v) => frame.bottom - (v / top) * (frame.bottom - frame.top);
    axes(frame, top, [[frame.left, clockTime(start, true), "start"], [frame.right, "now", "end"]]);
    if (!sizes.length) return;
    let path = "M" + x(sizes[0][0]) + "," + y(sizes[0][1]);
    for (let i = 1; i < sizes.length; i++) {
      path += " H" + x(sizes[i][0]) + " V" + y(sizes[i][1]);
    }
    path += " H" + x(state.now);
    const area = path + " V" + frame.bottom + " H" + x(sizes[0][0]) + " Z";
    frame.root.append(svg("path", { class: "area", d: area }), svg("path", { class: "line", d: path }));
  }

  // ---- cancel -------------------------------------------------------------------------------

  function askCancel(id) {
    confirming = id;
    $("confirm-job").textContent = id;
    const dialog = $("confirm");
    dialog.returnValue = "";
    if (typeof dialog.showModal === "function") {
      dialog.showModal();
    } else if (window.confirm("Cancel job " + id + "? Its unfinished tasks are stopped.")) {
      cancelJob(id);
    }
  }

  function confirmClosed() {
    const id = confirming;
    confirming = null;
    if (id && $("confirm").returnValue === "cancel") cancelJob(id);
  }

  async function cancelJob(id) {
    const view = jobViews.get(id);
    if (view) {
      view.cancelling = true;
      view.cancel.disabled = true;
      view.cancel.textContent = "Cancelling…";
    }
    let response;
    try {
      response = await request("jobs/" + encodeURIComponent(id) + "/cancel", {
        method: "POST", headers: headers({ "Content-Type": "application/json" }), body: "{}" });
    } catch (e) {
      if (view) view.cancelling = false;
      toast("Could not cancel job " + id + ": the scheduler did not answer.");
      return poll();
    }
    let answer = {};
    try {
      answer = await response.json();
    } catch (e) { /* not JSON: said by the status below */ }
    if (response.status === 401) {
      if (view) view.cancelling = false;
      return needLogin();
    }
    if (!response.ok) {
      if (view) view.cancelling = false;
      toast("Could not cancel job " + id + ": " + (answer.error || "HTTP " + response.status) + ".");
    } else if (answer.already) {
      toast("Job " + id + " had " + answer.already + " already.");
    } else {
      toast("Job " + id + " cancelled: " + plural(answer.cancelled || 0, "task") + " stopped.");
    }
    poll();
  }

  function toast(message) {
    const node = $("toast");
    node.textContent = message;
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.hidden = true; }, 6000);
  }

  // ---- formatting ---------------------------------------------------------------------------

  function number(n) {
    return Number(n).toLocaleString("en-US");
  }

  function shortNumber(n) {
    if (n >= 1e6) return +(n / 1e6).toFixed(1) + "M";
    if (n >= 1e4) return +(n / 1e3).toFixed(1) + "k";
    return String(+n.toFixed(2));
  }

  function plural(n, word) {
    return number(n) + " " + word + (n === 1 ? "" : "s");
  }

  function rate(perSecond) {
    const digits = perSecond >= 100 ? 0 : perSecond >= 10 ? 1 : 2;
    return Number(perSecond).toLocaleString("en-US", { maximumFractionDigits: digits }) + " tasks/s";
  }

  function duration(seconds) {
    seconds = Math.max(0, seconds);
    if (seconds < 10) return (Math.round(seconds * 10) / 10) + " s";
    if (seconds < 60) return Math.round(seconds) + " s";
    const s = Math.round(seconds);
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function ago(seconds) {
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    return Math.floor(seconds / 3600) + " h ago";
  }

  function clockTime(epochSeconds, short) {
    const date = new Date(epochSeconds * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    const hm = pad(date.getHours()) + ":" + pad(date.getMinutes());
    return short ? hm : hm + ":" + pad(date.getSeconds());
  }

  function money(cost) {
    if (!cost) return "–";
    if (cost.usd === null || cost.usd === undefined) return "no price";
    const usd = cost.usd;
    return "$" + usd.toLocaleString("en-US", { minimumFractionDigits: usd < 1 ? 4 : 2,
                                               maximumFractionDigits: usd < 1 ? 4 : 2 });
  }

  function costDetail(cost) {
    if (!cost) return "";
    const parts = [];
    if (cost.instance_seconds !== undefined) parts.push(number(Math.round(cost.instance_seconds)) +
                                                        " instance-s paid");
    if (cost.task_seconds !== undefined) parts.push(number(Math.round(cost.task_seconds)) + " task-s");
    if (cost.unpriced && cost.unpriced.length) parts.push("no price for " + cost.unpriced.join(", "));
    return parts.length ? " (" + parts.join(", ") + ")" : "";
  }

  // ---- start --------------------------------------------------------------------------------

  function start() {
    $("login-form").addEventListener("submit", signIn);
    $("logout").addEventListener("click", signOut);
    $("confirm").addEventListener("close", confirmClosed);
    let resizing = null;
    document.addEventListener("visibilitychange", () => {  // back to the tab: fresh figures at once
      if (!document.hidden && $("login").hidden) poll();
    });
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => {
        if (latest && !$("board").hidden) {
          renderThroughput(latest.state);
          renderFleet(latest.state);
        }
      }, 150);
    });
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
