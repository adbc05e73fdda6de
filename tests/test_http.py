"""The HTTP API, against a real scheduler, with every answer checked against docs/openapi.json."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request

import jsonschema
import pytest
from conftest import ROOT, read_results, run_client, wait_until
from openapi_spec_validator import validate as validate_spec

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
    ({"tasks": ["true"]}, "count is None"),
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
    status, answer = call("GET", f"{url}/tasks/result/{accepted['cursor']}?limit=-1",
                          operation=("/tasks/result/{cursor}", "get"))
    assert status == 400 and "limit must be" in answer["error"]
