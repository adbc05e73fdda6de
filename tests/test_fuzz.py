"""A live-server fuzz test (issue #15): random and mutated frames and HTTP requests against a running
scheduler for a bounded time; then it is alive, has logged no traceback, holds no more memory or
file descriptors than before, and a normal job gets every result.

The fuzz is reproducible per thread: each of FUZZ_THREADS threads draws from ``Random(seed + n)``;
the seed is printed (run with ``-s`` to see it) and may be set with $CLOUDKON_FUZZ_SEED.  What
threads interleave with each other is up to the machine.

Task texts the fuzz sends are drawn from SAFE_COMMANDS (or are refused): a mutated message that
the scheduler accepts runs its tasks for real, in the test's working directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import threading
import time
from collections import Counter

from conftest import read_results, run_client, wait_until

from cloudkon import protocol

SEED = int(os.environ.get("CLOUDKON_FUZZ_SEED", "1515"))
TOKEN = "fuzz-token"
TCP_SECONDS = 14.0
HTTP_SECONDS = 4.0
FUZZ_THREADS = 6
# Partial frames declared huge and cut short (16 MiB headers with up to 2 MiB of body), at most
# this many per thread: enough to show partial buffers are freed on close, few enough to run fast.
BIG_PARTIAL_FRAMES_PER_THREAD = 4
# What the scheduler may have grown by once every fuzz connection is closed and every fuzz job has
# finished.  The largest buffer a connection can make it hold is one frame, 16 MiB after hello
# (64 KiB before); that all of them are freed shows in a growth well below a few such frames.
# Allocator slack (arenas, the SQLite page cache, a thread stack or two of the HTTP server) is a
# few MiB; the defects of #15 grew the scheduler by 1 GiB and more.
RSS_GROWTH_LIMIT_MIB = 64
# Descriptors the scheduler may hold beyond its count before the fuzz, once every connection is
# closed (SQLite may open its journal; nothing else should stay).
FD_SLACK = 4

SAFE_COMMANDS = ["true", ":", "echo fuzz", "exit 3", "sleep 0", "echo 'été ☃'", "echo $((6 * 7))"]
CLIENT_TYPES = ["hello", "job_open", "tasks", "job_close", "fetch", "cancel", "list_jobs"]
OTHER_TYPES = ["welcome", "job_opened", "job_accepted", "results", "job_done", "cancelled", "jobs",
               "drain", "shutdown", "ready", "error", "bundle", "hand_back", "", "HELLO", "hello ",
               "\u00e9", "x" * 300]
JOB_ID = re.compile(rb'"job":"([0-9a-zA-Z_-]{1,64})"')


class Raw(str):
    """JSON text put in a body as it is: what json.dumps would refuse or spell otherwise."""


def dump(value: object) -> str:
    """JSON text of ``value``, with Raw parts as they are (NaN, lone surrogates, deep nesting...)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{dump(k) if isinstance(k, Raw) else json.dumps(str(k))}:{dump(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


class Fuzz:
    """What the fuzz threads share: the scheduler's addresses, job ids seen, and a tally."""

    def __init__(self, host: str, port: int, http: tuple[str, int], callback_port: int) -> None:
        self.host, self.port, self.http = host, port, http
        self.callback_port = callback_port
        self.jobs: list[str] = []
        self.tally: Counter[str] = Counter()
        self.http_statuses: Counter[str] = Counter()
        self.lock = threading.Lock()

    def count(self, what: str) -> None:
        with self.lock:
            self.tally[what] += 1

    def job(self, rng: random.Random) -> object:
        with self.lock:
            known = list(self.jobs[-50:])
        if known and rng.random() < 0.7:
            return rng.choice(known)
        return rng.choice(["", "0" * 16, "nosuchjob", "x" * 1000, Raw('"\\ud800"'), "../../etc"])

    def harvest(self, data: bytes) -> None:
        found = [m.decode() for m in JOB_ID.findall(data)]
        if found:
            with self.lock:
                self.jobs.extend(found)
                del self.jobs[:-200]


# --- values and messages ----------------------------------------------------------------

def weird(rng: random.Random, fuzz: Fuzz) -> object:
    """A value of a wrong type, out of range, or no valid JSON text at all."""
    depth = rng.choice([50, 1000, 100_000])
    return rng.choice([
        None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, 2 ** 64 + 1, -(2 ** 70), 10 ** 400, Raw("1" * 5000),
        0.5, -0.0, 1e308, 5e-324, Raw("1e999"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"),
        Raw("-Infinity"), Raw("1.5e-99999"), "", "x" * rng.choice([1, 300, 70_000]), "\u00e9\u2603\U0001f600",
        "\x00\x01", Raw('"\\ud800"'), Raw('"\\udfff\\ud800"'), Raw('"\\ud83d\\ude00"'), Raw('"a\\u0000b"'),
        [], [1, 2, 3], list(rng.choices(SAFE_COMMANDS, k=3)), ["true", 5, None], [Raw('"\\ud800"')],
        Raw("[" * depth + "]" * depth), Raw('{"a":' * depth + "1" + "}" * depth), {}, {"type": "hello"},
        {"port": fuzz.callback_port, "nonce": "n"}, fuzz.job(rng),
    ])


def valid_message(kind: str, rng: random.Random, fuzz: Fuzz) -> dict:
    if kind == "hello":
        return {"type": "hello", "version": protocol.PROTOCOL_VERSION, "token": TOKEN}
    if kind == "job_open":
        message: dict = {"type": "job_open"}
        if rng.random() < 0.3:
            message["timeout"] = rng.choice([1, 5.5, 60])
        if rng.random() < 0.3:
            message["stream"] = rng.random() < 0.5
        if rng.random() < 0.1:  # only ever our own listener: other ports on loopback are not ours
            message["callback"] = {"port": fuzz.callback_port, "nonce": "fuzz"}
        return message
    if kind == "tasks":
        tasks = rng.choices(SAFE_COMMANDS, k=rng.randint(0, 8))
        return {"type": "tasks", "job": fuzz.job(rng), "tasks": tasks}
    if kind == "job_close":
        return {"type": "job_close", "job": fuzz.job(rng), "count": rng.randint(0, 10)}
    if kind == "fetch":
        return {"type": "fetch", "job": fuzz.job(rng), "commands": rng.random() < 0.5}
    if kind == "cancel":
        return {"type": "cancel", "job": fuzz.job(rng)}
    if kind == "list_jobs":
        return {"type": "list_jobs", **({"limit": rng.randint(1, 5)} if rng.random() < 0.5 else {})}
    return {"type": kind}


def mutated(message: dict, rng: random.Random, fuzz: Fuzz) -> object:
    message = dict(message)
    for _ in range(rng.randint(1, 3)):
        what = rng.randrange(7)
        if what == 0 and message:
            message[rng.choice(list(message))] = weird(rng, fuzz)
        elif what == 1 and message:
            del message[rng.choice(list(message))]
        elif what == 2:
            message[rng.choice(["x", "", "type ", "tasks", "job", "count", "limit", "version", "token"])] = \
                weird(rng, fuzz)
        elif what == 3:
            message["type"] = rng.choice([*OTHER_TYPES, weird(rng, fuzz)])
        elif what == 4:
            message["version"] = rng.choice([0, 2, -1, "1", 1.0, 2 ** 64, None, Raw("NaN")])
        elif what == 5:
            message["token"] = rng.choice(["", "wrong", TOKEN + "x", TOKEN[:-1], 7, None, Raw('"\\ud800"'),
                                           "x" * 70_000])
        else:
            return rng.choice([[message], message.get("type"), {"type": message}, Raw(dump(message) * 2)])
    return message


def body_of(value: object, rng: random.Random) -> bytes:
    body = dump(value).encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:  # bytes that are no UTF-8
        cut = rng.randrange(len(body) + 1)
        body = body[:cut] + bytes([rng.choice([0x80, 0xC0, 0xFF, 0xED])]) + body[cut:]
    return body


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --- TCP connections ----------------------------------------------------------------------

def drain(sock: socket.socket, fuzz: Fuzz, wait: float = 0.01) -> bytes:
    """What the scheduler has sent, read for at most ``wait`` seconds without blocking longer."""
    got = bytearray()
    sock.settimeout(wait)
    try:
        while len(got) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    fuzz.harvest(bytes(got))
    return bytes(got)


def connection(rng: random.Random, fuzz: Fuzz, big_left: list[int]) -> None:
    kind = rng.choices(["noise", "lengths", "before_hello", "session", "valid_job"], [2, 2, 3, 8, 3])[0]
    fuzz.count(kind)
    sock = socket.create_connection((fuzz.host, fuzz.port), timeout=2)
    try:
        sock.settimeout(2)
        if kind == "noise":
            sock.sendall(rng.randbytes(rng.randint(0, 3000)))
        elif kind == "lengths":
            length = rng.choice([0, 1, 4, 100, 65536, 65537, 2 ** 24, 2 ** 24 + 1, 2 ** 32 - 1,
                                 rng.randrange(2 ** 32)])
            sock.sendall(struct.pack(">I", length) + rng.randbytes(rng.randint(0, min(length, 70_000))))
        elif kind == "before_hello":
            for _ in range(rng.randint(1, 3)):
                message = valid_message(rng.choice(CLIENT_TYPES + OTHER_TYPES[:5]), rng, fuzz)
                if rng.random() < 0.7:
                    message = mutated(message, rng, fuzz)
                sock.sendall(frame(body_of(message, rng)))
        else:
            sock.sendall(frame(body_of(valid_message("hello", rng, fuzz), rng)))
            drain(sock, fuzz, 0.1)
            if kind == "valid_job":
                valid_job(sock, rng, fuzz)
            else:
                session(sock, rng, fuzz)
            ending = rng.randrange(4)
            if ending == 1:  # a frame cut short
                body = body_of(valid_message(rng.choice(CLIENT_TYPES), rng, fuzz), rng)
                sock.sendall(frame(body)[:rng.randint(1, len(body) + 3)])
            elif ending == 2 and big_left[0] > 0:  # a huge frame cut short: its buffer must go with it
                big_left[0] -= 1
                fuzz.count("big_partial")
                sock.sendall(struct.pack(">I", protocol.MAX_FRAME_BYTES) + b"[" * rng.randint(0, 2 << 20))
        if rng.random() < 0.5:
            sock.shutdown(socket.SHUT_WR)
            drain(sock, fuzz, 0.05)
    except OSError:  # the scheduler may close first, or stop reading: both are its right
        fuzz.count("cut_off")
    finally:
        sock.close()


def session(sock: socket.socket, rng: random.Random, fuzz: Fuzz) -> None:
    """Messages after hello: valid, mutated, raw; some answers read, some never."""
    for _ in range(rng.randint(1, 25)):
        message = valid_message(rng.choice(CLIENT_TYPES + OTHER_TYPES[:10]), rng, fuzz)
        if rng.random() < 0.3:
            message = mutated(message, rng, fuzz)
        body = body_of(message, rng)
        if rng.random() < 0.05:  # a header that lies about the body's length
            sock.sendall(struct.pack(">I", max(0, len(body) + rng.choice([-5, -1, 1, 7]))) + body)
        else:
            sock.sendall(frame(body))
        if rng.random() < 0.5:
            drain(sock, fuzz)


def valid_job(sock: socket.socket, rng: random.Random, fuzz: Fuzz) -> None:
    """A job submitted properly but for a mutation or two (so that later fetches and cancels find it)."""
    open_message = valid_message("job_open", rng, fuzz)
    sock.sendall(frame(body_of(open_message, rng)))
    answer = drain(sock, fuzz, 0.3)
    found = JOB_ID.findall(answer)
    if not found:
        return
    job = found[-1].decode()
    sent = 0
    for _ in range(rng.randint(0, 3)):
        tasks = rng.choices(SAFE_COMMANDS, k=rng.randint(0, 20))
        message: object = {"type": "tasks", "job": job, "tasks": tasks}
        if rng.random() < 0.2:
            message = mutated(message, rng, fuzz)
        else:
            sent += len(tasks)
        sock.sendall(frame(body_of(message, rng)))
    if rng.random() < 0.8:
        close = {"type": "job_close", "job": job, "count": sent if rng.random() < 0.8 else sent + 1}
        sock.sendall(frame(body_of(close, rng)))
    follow = rng.choice(["fetch", "cancel", "list_jobs", None])
    if follow:
        sock.sendall(frame(body_of({**valid_message(follow, rng, fuzz), "job": job}, rng)))
    drain(sock, fuzz, rng.choice([0, 0.05, 0.5]))


def tcp_fuzz(n: int, fuzz: Fuzz, deadline: float) -> None:
    rng = random.Random(SEED + n)
    big_left = [BIG_PARTIAL_FRAMES_PER_THREAD]
    while time.monotonic() < deadline:
        connection(rng, fuzz, big_left)


# --- HTTP requests ------------------------------------------------------------------------

def http_request(rng: random.Random, fuzz: Fuzz) -> bytes:
    """A valid submit or result request with each part (method, path, version, headers, body) replaced
    by a random or malformed one at some odds."""
    odds = rng.choice([0.0, 0.15, 0.5])
    with fuzz.lock:
        cursor = rng.choice(fuzz.jobs[-50:] or ["nosuchjob"])
    tasks = rng.choices(SAFE_COMMANDS, k=rng.randint(0, 10))
    submit = rng.random() < 0.5
    method = "POST" if submit else "GET"
    path = "/tasks/submit" if submit else f"/tasks/result/{cursor}"
    body = json.dumps({"count": len(tasks), "tasks": tasks}).encode() if submit else b""
    if rng.random() < odds:
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT",
                             "BREW", "get", "", "G\x00T", "POST" * 100])
    if rng.random() < odds:
        path = rng.choice(["/tasks/submit", "/tasks/result/", "/", "//", "/tasks/result/a/b", "*",
                           "/..%2f..%2fetc/passwd", "/%ff%fe", "/" + "a" * 70_000, "http://example.com/",
                           f"/tasks/result/{cursor}%00", f"/tasks/result/{cursor}/"])
    if rng.random() < odds:
        path += rng.choice(["?offset=0&limit=1", "?limit=0", "?offset=" + "9" * 5000, "?offset=-1", "?%zz",
                            "?limit=1&limit=2", "?offset=1e3", "?offset=99&limit=99", "?" + "&" * 1000])
    version = "HTTP/1.1"
    if rng.random() < odds:
        version = rng.choice(["HTTP/1.0", "HTTP/2.0", "HTTP/9", "", "HTTP/1.1 extra", "http/1.1"])
    if rng.random() < odds:
        body = rng.choice([body_of(mutated({"count": 2, "tasks": ["true", "echo fuzz"]}, rng, fuzz), rng),
                           rng.randbytes(rng.randint(0, 5000)), b"", b"{" * 100_000,
                           json.dumps({"count": 1, "tasks": ["true"], "x": [None] * 1000}).encode()])
    headers = [f"Host: {fuzz.http[0]}"]
    if rng.random() > odds / 2:
        headers.append(f"Authorization: Bearer {TOKEN}")
    elif rng.random() < 0.7:
        headers.append(rng.choice(["Authorization: Bearer wrong", "Authorization: Bearer ",
                                   "Authorization: Basic Zm9vOmJhcg==", "Authorization: Bearer " + "x" * 5000,
                                   f"Authorization: bearer {TOKEN}", f"authorization:Bearer {TOKEN}"]))
    length: str | None = str(len(body)) if body or submit else None
    if rng.random() < odds:
        length = rng.choice(["", "-1", "9" * 5000, "0x10", str(len(body) + 100), "1e3", " 5", str(2 ** 40),
                             "0", None])
    if length is not None:
        headers.append(f"Content-Length: {length}")
    for extra, chance in (("Content-Length: 3", 0.1), ("Transfer-Encoding: chunked", 0.1),
                          ("Expect: 100-continue", 0.1), ("X-Big: " + "h" * 70_000, 0.05),
                          ("Connection: keep-alive", 0.2), ("Broken header without colon", 0.05),
                          ("X-Folded: a\r\n b", 0.05), ("Content-Type: text/plain", 0.1)):
        if rng.random() < chance * odds * 3:
            headers.append(extra)
    if rng.random() < 0.05 * odds:
        headers.extend(f"X-{i}: {i}" for i in range(150))
    head = f"{method} {path} {version}".rstrip() + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    data = head.encode("utf-8", "surrogatepass") + body
    if rng.random() < 0.2 * odds:  # cut short
        data = data[:rng.randrange(len(data) + 1)]
    return data


def http_fuzz(n: int, fuzz: Fuzz, deadline: float) -> None:
    rng = random.Random(SEED + 1000 + n)
    while time.monotonic() < deadline:
        fuzz.count("http")
        try:
            with socket.create_connection(fuzz.http, timeout=2) as sock:
                sock.sendall(http_request(rng, fuzz))
                if rng.random() < 0.3:
                    sock.shutdown(socket.SHUT_WR)
                answer = drain(sock, fuzz, rng.choice([0.01, 0.3]))
        except OSError:
            fuzz.count("http_cut_off")
            continue
        status = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
        with fuzz.lock:
            fuzz.http_statuses[status.group(1).decode() if status else "none" if not answer else "other"] += 1


# --- the test -------------------------------------------------------------------------------

def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _all_jobs_done(sched) -> bool:
    sock = sched.hello(TOKEN)
    try:
        protocol.send(sock, {"type": "list_jobs", "limit": 1_000_000})
        jobs = protocol.receive(sock)["jobs"]
    finally:
        sock.close()
    return all(job["state"] in ("finished", "cancelled") for job in jobs)


def _http_get(address: tuple[str, int], path: str) -> tuple[int, dict]:
    import http.client
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _normal_job(sched, workload, tmp_path, name: str, count: int) -> str:
    out = tmp_path / f"{name}.jsonl"
    done = run_client("-s", sched.address, "--token", TOKEN, "-w",
                      workload([f"echo {name} {i}" for i in range(count)]), "-o", str(out))
    assert done.returncode == 0, done.stderr
    results = read_results(out)
    assert [r["id"] for r in results] == list(range(count))
    assert all(r["status"] == "success" and r["output"] == f"{name} {r['id']}\n" for r in results), \
        [r for r in results if r["status"] != "success"][:3]
    return re.search(r"job (\S+)", done.stderr).group(1)


def test_fuzzed_frames_and_requests_leave_the_scheduler_serving(start_scheduler, workload, tmp_path):
    print(f"fuzz seed {SEED} (set $CLOUDKON_FUZZ_SEED to change it)")
    sched = start_scheduler("--local", "2", "--token", TOKEN, "--http-port", "0")
    line = sched.proc.stdout.readline().strip()
    assert line.startswith("HTTP API on http://"), line
    http_host, http_port = line.removeprefix("HTTP API on http://").rsplit(":", 1)
    log: list[str] = []  # the scheduler's stderr, read all along so that its logging never blocks
    reader = threading.Thread(target=lambda: log.extend(sched.proc.stderr), daemon=True)
    reader.start()
    callback = socket.create_server(("127.0.0.1", 0))  # where fuzzed job_open callbacks may call
    callback.settimeout(0.2)
    stop_callbacks = threading.Event()

    def answer_callbacks() -> None:
        while not stop_callbacks.is_set():
            try:
                callback.accept()[0].close()
            except OSError:
                pass

    callbacks = threading.Thread(target=answer_callbacks, daemon=True)
    callbacks.start()
    fuzz = Fuzz(sched.host, sched.port, (http_host, int(http_port)), callback.getsockname()[1])
    try:
        # Warm up both ports (lazy imports, the store, the HTTP server's first threads), then measure.
        cursor = _normal_job(sched, workload, tmp_path, "warmup", 50)
        assert _http_get(fuzz.http, f"/tasks/result/{cursor}")[0] == 200
        time.sleep(1)
        rss_before, fds_before = _rss_mib(sched.proc.pid), _fds(sched.proc.pid)

        for phase, seconds in ((tcp_fuzz, TCP_SECONDS), (http_fuzz, HTTP_SECONDS)):
            deadline = time.monotonic() + seconds
            threads = [threading.Thread(target=phase, args=(n, fuzz, deadline)) for n in range(FUZZ_THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        print(f"fuzz: {dict(fuzz.tally)}; HTTP statuses {dict(fuzz.http_statuses)}")
        assert sched.proc.poll() is None, "the scheduler died under the fuzz"

        # Every fuzz connection is closed on our side; the scheduler must close its own and finish
        # the jobs the fuzz submitted (harmless commands) before the memory is measured.
        wait_until(lambda: _fds(sched.proc.pid) <= fds_before + FD_SLACK, timeout=45, interval=0.2)
        wait_until(lambda: _all_jobs_done(sched), timeout=45, interval=0.5)
        time.sleep(1)
        grown = _rss_mib(sched.proc.pid) - rss_before
        print(f"scheduler RSS {rss_before:.1f} MiB before the fuzz, grew by {grown:.1f} MiB; "
              f"descriptors {fds_before} before, {_fds(sched.proc.pid)} after")
        assert grown < RSS_GROWTH_LIMIT_MIB, f"the scheduler grew by {grown:.0f} MiB under the fuzz"

        cursor = _normal_job(sched, workload, tmp_path, "after", 200)
        status, report = _http_get(fuzz.http, f"/tasks/result/{cursor}")
        assert status == 200 and report["status"] == "completed" and len(report["tasks"]) == 200
        assert "500" not in fuzz.http_statuses, "an HTTP request met an internal error"
        assert sched.proc.poll() is None
    finally:
        stop_callbacks.set()
        callbacks.join()
        callback.close()
        code = sched.stop(signal.SIGTERM)
        reader.join(30)
    text = "".join(log)
    assert "Traceback" not in text, text[text.index("Traceback") - 2000:][:6000]
    assert code == 0, text[-3000:]
