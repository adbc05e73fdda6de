"""The HTTP API, against a real scheduler, with every answer checked against docs/openapi.json."""

from __future__ import annotations

import asyncio
import http.client
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import jsonschema
import pytest
from conftest import ROOT, read_results, run_client, wait_until
from openapi_spec_validator import validate as validate_spec

from cloudkon import httpapi, httpserver

SPEC = json.loads((ROOT / "docs" / "openapi.json").read_text())
WORKLOAD = ["sleep 10", "echo hi", "exit 3", "printf 'a\\nb'", "sleep 0", "echo $((6 * 7))"]


def start_http(start_scheduler, *args: str):
    sched = start_scheduler("--local", "2", "--http-port", "0", *args)
    line = sched.proc.stdout.readline().strip()
    assert line.startswith("HTTP API on http://"), line
    return sched, line.removeprefix("HTTP API on ")


def call(method: str, url: str, body: object = None, headers: dict | None = None,
         operation: tuple[str, str] | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a request, the body checked against the spec for ``operation``."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, payload = error.code, json.loads(error.read())
    if operation is not None:
        check_answer(*operation, status, payload)
    return status, payload


def check_answer(path: str, method: str, status: int, payload: dict) -> None:
    responses = SPEC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, not in the spec"
    response = responses[str(status)]
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = {**response["content"]["application/json"]["schema"], "components": SPEC["components"]}
    jsonschema.Draft202012Validator(schema).validate(payload)


def submit(url: str, tasks: list, **kwargs) -> tuple[int, dict]:
    return call("POST", f"{url}/tasks/submit", {"count": len(tasks), "tasks": tasks},
                operation=("/tasks/submit", "post"), **kwargs)


def poll(url: str, cursor: str, **kwargs) -> dict:
    answers = []

    def completed() -> bool:
        status, body = call("GET", f"{url}/tasks/result/{cursor}",
                            operation=("/tasks/result/{cursor}", "get"), **kwargs)
        assert status == 200
        answers.append(body)
        return body["status"] == "completed"
    wait_until(completed, timeout=60, interval=0.05)
    return answers[-1]


def test_the_openapi_document_is_valid():
    validate_spec(SPEC)


def test_http_job_matches_the_same_workload_over_tcp(start_scheduler, workload, tmp_path):
    sched, url = start_http(start_scheduler)
    status, accepted = submit(url, WORKLOAD)
    assert status == 200 and accepted["status"] == "ok"
    status, early = call("GET", f"{url}/tasks/result/{accepted['cursor']}")
    assert status == 200 and early["tasks"] == [] and early["total"] == len(WORKLOAD)
    report = poll(url, accepted["cursor"])
    assert (report["total"], report["done"], report["failed"]) == (6, 6, 1)

    out = tmp_path / "tcp.jsonl"
    assert run_client("-s", sched.address, "-w", workload(WORKLOAD), "-o", str(out)).returncode == 1
    over_tcp = read_results(out)
    assert [t["command"] for t in report["tasks"]] == [r["command"] for r in over_tcp] == WORKLOAD
    assert [t["result"] for t in report["tasks"]] == [r["status"] for r in over_tcp]
    assert [t["output"] for t in report["tasks"]] == [r["output"] for r in over_tcp]
    assert [t["exit_code"] for t in report["tasks"]] == [0, 0, 3, 0, 0, 0]
    workers = [t["worker"] for t in report["tasks"]]  # where each ran: host:pid of a worker process
    assert {w.rpartition(":")[0] for w in workers} == {socket.gethostname()}
    assert {int(w.rpartition(":")[2]) for w in workers} <= set(sched.worker_pids())

    # The cursor is the job id of the TCP protocol too.
    again = tmp_path / "again.jsonl"
    fetched = run_client("-s", sched.address, "--cursor", accepted["cursor"], "-o", str(again))
    assert fetched.returncode == 1 and [r["output"] for r in read_results(again)] == \
        [t["output"] for t in report["tasks"]]
    assert [r["worker"] for r in read_results(again)] == workers


@pytest.mark.parametrize("body, error", [
    (b"{not json", "not JSON"),
    (b"[" * 100_000, "nested too deeply"),
    ({"count": 3, "tasks": ["true"]}, "count is 3 but 1 tasks"),
    ({"count": 1, "tasks": [7]}, "tasks must be strings"),
    ({"tasks": ["true"]}, '"count" is required'),
    (["true"], "the body must be"),
    ({"count": 1, "tasks": ["x" * 200_000]}, "longer than"),
])
def test_bad_bodies_are_400_with_the_reason(start_scheduler, body, error):
    _, url = start_http(start_scheduler)
    status, answer = call("POST", f"{url}/tasks/submit", body, operation=("/tasks/submit", "post"))
    assert status == 400 and error in answer["error"]


def test_limits_routes_and_unknown_cursors(start_scheduler):
    sched, url = start_http(start_scheduler)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # announced, never sent
        sock.sendall(b"POST /tasks/submit HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # then the server hangs up
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
        check_answer("/tasks/submit", "post", 413, json.loads(rest.partition(b"\r\n\r\n")[2]))
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/tasks/submit")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411
    check_answer("/tasks/submit", "post", 411, json.loads(response.read()))
    connection.close()
    status, answer = call("GET", f"{url}/tasks/result/0123456789abcdef",
                          operation=("/tasks/result/{cursor}", "get"))
    assert status == 404 and "no job with cursor" in answer["error"]
    assert call("GET", f"{url}/tasks/nothing")[0] == 404
    assert call("DELETE", f"{url}/tasks/submit")[0] == 405
    assert sched.proc.poll() is None


def test_the_token_is_required_as_a_bearer(start_scheduler):
    _, url = start_http(start_scheduler, "--token", "s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, answer = submit(url, ["true"], headers=headers)
        assert status == 401 and "token" in answer["error"]
    status, accepted = submit(url, ["echo ok"], headers={"Authorization": "Bearer s3cret"})
    assert status == 200
    assert call("GET", f"{url}/tasks/result/{accepted['cursor']}")[0] == 401
    report = poll(url, accepted["cursor"], headers={"Authorization": "Bearer s3cret"})
    assert report["tasks"][0]["output"] == "ok\n"


def test_a_completed_job_can_be_read_in_pages(start_scheduler):
    _, url = start_http(start_scheduler)
    _, accepted = submit(url, [f"echo {i}" for i in range(6)])
    whole = poll(url, accepted["cursor"])
    assert "offset" not in whole and [t["output"] for t in whole["tasks"]] == [f"{i}\n" for i in range(6)]
    pages, offset = [], 0
    while offset is not None:
        status, page = call("GET", f"{url}/tasks/result/{accepted['cursor']}?offset={offset}&limit=4",
                            operation=("/tasks/result/{cursor}", "get"))
        assert status == 200 and page["offset"] == offset
        pages.append([t["id"] for t in page["tasks"]])
        offset = page["next_offset"]
    assert pages == [[0, 1, 2, 3], [4, 5]]
    # limit=0 would give a next_offset equal to the offset: a pager would loop
    for query in ("limit=-1", "limit=0", "offset=" + "9" * 5000, "limit=1&limit=2"):
        status, answer = call("GET", f"{url}/tasks/result/{accepted['cursor']}?{query}",
                              operation=("/tasks/result/{cursor}", "get"))
        assert status == 400 and query.partition("=")[0] + " must be" in answer["error"], query


def http_address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def read_answer(sock: socket.socket, has_body: bool = True) -> tuple[int, dict[str, str], dict | None, int]:
    """One answer on a raw connection: (status, headers, JSON body, recv calls it took)."""
    data, pieces = b"", 0
    while True:
        head, found, body = data.partition(b"\r\n\r\n")
        if found:
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines)
            if not has_body:
                return int(status_line.split()[1]), headers, None, pieces
            if len(body) >= int(headers["Content-Length"]):
                return int(status_line.split()[1]), headers, json.loads(body), pieces
        chunk = sock.recv(1 << 20)
        assert chunk, f"the connection closed before a whole answer: {data!r}"
        data, pieces = data + chunk, pieces + 1


def test_a_kept_alive_answer_leaves_in_one_piece(start_scheduler):
    # Headers and body written apart met Nagle's algorithm and the client's delayed ACK:
    # 43 ms for each answer on a kept-alive connection.  One write per answer avoids it.
    _, url = start_http(start_scheduler)
    _, accepted = submit(url, ["echo hi"])
    poll(url, accepted["cursor"])
    with socket.create_connection(http_address(url), timeout=30) as sock:
        for _ in range(20):
            sock.sendall(f"GET /tasks/result/{accepted['cursor']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, _, body, pieces = read_answer(sock)
            assert (status, body["status"], pieces) == (200, "completed", 1)


def test_slow_clients_hold_no_slot_a_fast_one_needs(start_scheduler):
    _, url = start_http(start_scheduler)
    slow = []
    try:
        for i in range(3 * httpapi.MAX_CONCURRENT_REQUESTS):  # bodies and request lines sent 1 byte in 100
            slow.append(socket.create_connection(http_address(url), timeout=30))
            slow[-1].sendall(b"POST /tasks/submit HTTP/1.1\r\nContent-Length: 100\r\n\r\n{" if i % 3 else
                             b"GET /tasks/res")
        time.sleep(1)  # for the server to take them in (before the fix, the bodies held every slot)
        status, accepted = submit(url, ["echo fast"])
        assert status == 200, accepted
        assert poll(url, accepted["cursor"])["tasks"][0]["output"] == "fast\n"
    finally:
        for sock in slow:
            sock.close()


ADVERSARIAL_REQUESTS = [  # (request, status, headers expected in the answer)
    (b"HEAD /tasks/submit HTTP/1.1\r\n\r\n", 405, {"Allow": "POST"}),
    (b"OPTIONS /tasks/result/abc HTTP/1.1\r\n\r\n", 405, {"Allow": "GET"}),
    (b"PUT /tasks/submit HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405, {"Allow": "POST"}),
    (b"POST /tasks/result/abc HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405, {"Allow": "GET"}),
    (b"BREW /tasks/submit HTTP/1.1\r\n\r\n", 501, {"Connection": "close"}),
    (b"garbage\r\n\r\n", 400, {"Connection": "close"}),
    (b"GET /tasks/submit HTTP/2.0\r\n\r\n", 505, {}),
    (b"GET /tasks/" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 431, {"Connection": "close"}),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, {}),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431, {}),
    (b"POST /tasks/submit HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400, {}),
    (b"POST /tasks/submit HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, {}),
    (b"POST /tasks/submit HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, {}),
    (b"POST /tasks/submit HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411,
     {"Connection": "close"}),
    (b"POST /tasks/submit HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello", 400, {}),
    (b'POST /tasks/submit HTTP/1.1\r\nContent-Length: 33\r\n\r\n{"count": 1, "tasks": ["\\ud800"]}', 400, {}),
    (b"POST /tasks/submit HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", 400, {}),  # then the client stops
    ("GET /tasks/result/é☃%00 HTTP/1.1\r\n\r\n".encode(), 404, {}),
    (b"GET /tasks/result/abc?offset=1&offset=2 HTTP/1.1\r\n\r\n", 400, {}),
    (b"GET /nothing\r\n", 404, {}),  # HTTP/0.9
]


def test_every_refusal_is_json_and_the_server_carries_on(start_scheduler):
    sched, url = start_http(start_scheduler)
    for request, expected, expected_headers in ADVERSARIAL_REQUESTS:
        with socket.create_connection(http_address(url), timeout=30) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            status, headers, body, _ = read_answer(sock, has_body=not request.startswith(b"HEAD"))
        assert status == expected and expected_headers.items() <= headers.items(), (request[:80], headers)
        assert headers["Content-Type"] == "application/json"
        if body is not None:
            assert body["status"] == "failed" and body["error"], body
    status, accepted = submit(url, ["echo still here"])
    assert status == 200 and poll(url, accepted["cursor"])["tasks"][0]["output"] == "still here\n"
    sched.stop()
    assert "Traceback" not in sched.proc.stderr.read()


class FakeService:
    """A scheduler that takes every job and reports any as finished, with no tasks."""

    async def submit_job(self, tasks: list) -> str:
        return "c0ffee"

    async def job_report(self, cursor: str):
        return ({"total": 0, "done": 0, "failed": 0}, [], []) if cursor == "c0ffee" else None


@pytest.fixture
def local_api(monkeypatch):
    """Start an HttpApi in this process, on a FakeService, with limits of the test's choosing."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started = []

    def start(**limits) -> str:
        for name, value in limits.items():
            monkeypatch.setattr(httpserver, name, value)
        api = httpapi.HttpApi("127.0.0.1", 0, None, FakeService(), loop)
        api.start()
        started.append(api)
        host, port = api.address
        return f"http://{host}:{port}"

    yield start
    for api in started:
        api.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def trickle_until_answered(sock: socket.socket, start: bytes) -> None:
    """Send ``start``, then a byte at a time, until the server answers (at most 15 s)."""
    sock.sendall(start)

    def answered() -> bool:
        if select.select([sock], [], [], 0.2)[0]:
            return True
        sock.sendall(b" ")
        return False
    wait_until(answered, timeout=15, interval=0)


def test_a_request_that_trickles_in_gets_408_and_its_connection_is_freed(local_api):
    url = local_api(REQUEST_DEADLINE_SECONDS=1, IDLE_SECONDS=1, MAX_CONNECTIONS=2)
    for start in (b"POST /tasks/submit HTTP/1.1\r\nContent-Length: 1000\r\n\r\n", b"GET /tasks/res"):
        with socket.create_connection(http_address(url), timeout=30) as sock:
            trickle_until_answered(sock, start)
            status, headers, body, _ = read_answer(sock)
            assert (status, headers["Connection"]) == (408, "close") and "in time" in body["error"]
            assert sock.recv(1) == b""
    with socket.create_connection(http_address(url), timeout=30) as idle:  # closed without a word
        assert idle.recv(1) == b""
    assert call("GET", f"{url}/tasks/result/c0ffee")[0] == 200


def test_connections_over_the_cap_are_turned_away_with_503(local_api):
    url = local_api(MAX_CONNECTIONS=2)
    held = [socket.create_connection(http_address(url), timeout=30) for _ in range(2)]
    try:
        with socket.create_connection(http_address(url), timeout=30) as extra:
            extra.sendall(b"GET /tasks/result/c0ffee HTTP/1.1\r\n\r\n")
            status, headers, body, _ = read_answer(extra)
        assert (status, headers["Connection"]) == (503, "close") and "2 connections" in body["error"]
        held.pop().close()
        wait_until(lambda: call("GET", f"{url}/tasks/result/c0ffee")[0] == 200, timeout=15)
    finally:
        for sock in held:
            sock.close()


def test_bodies_held_at_once_stay_within_their_budget(local_api):
    url = local_api(MAX_BODY_BYTES_HELD=1500)
    padded = json.dumps({"count": 1, "tasks": ["true"]}).encode().ljust(1000)
    with socket.create_connection(http_address(url), timeout=30) as slow:
        slow.sendall(b"POST /tasks/submit HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")  # holds 1000 bytes

        def refused() -> bool:
            status, answer = call("POST", f"{url}/tasks/submit", padded)
            return status == 503 and "bytes held at once" in answer["error"]
        wait_until(refused, timeout=15)
    wait_until(lambda: call("POST", f"{url}/tasks/submit", padded)[0] == 200, timeout=15)
