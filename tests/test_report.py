"""Readable results: client.py --summary and --report (the report's tables), --format csv."""

import csv
import json
import re

import pytest
from conftest import read_results, run_client

from cloudkon.report import MAX_GROUPS, OTHER_GROUP, JobReport

BAD_INPUT = 'echo "bad, \\"input\\""; exit 3'  # prints: bad, "input"
MIXED = ["sleep 0.2", BAD_INPUT, "echo x; exit 1", "sleep 0.2", BAD_INPUT, "echo ok", "echo x; exit 1",
         BAD_INPUT, "printf 'a,b\\n\"q\"\\r\\nz'"]

# Outputs a CSV cell must carry whole: newlines, CRs, commas, quotes, bytes that are not UTF-8 (the
# worker keeps them as U+FFFD), a NUL, escape sequences, tabs, other scripts, no output at all.
AWKWARD = ["printf 'a,b\\n\"q\"\\r\\nz'", "printf '\\377\\376\\000bin'", "printf '\\033[31mred\\t \\n'",
           "echo 'héllo ✓, \"x\"'; exit 5", "true", "printf '\\r\\n'", "echo '  lead,'", "kill -9 $$",
           "sleep 20"]


def _section(report: str, title: str) -> list[str]:
    """The lines of the report's section whose title starts with ``title`` (title line first)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_summary_reports_slowest_failures_and_workers(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    out = tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", workload(MIXED), "-o", str(out), "--summary", "--top", "3")
    assert done.returncode == 1, done.stderr
    summary = done.stderr.index("9 tasks: 4 succeeded, 5 failed")
    report = done.stderr[summary:].split("\n", 2)[2]  # the summary line, the blank line, the report
    assert all(len(line) <= 80 for line in report.splitlines()), report
    assert re.match(r"9 tasks: 4 succeeded, 5 failed, 0 cancelled\nwall time [\d.]+ s\n"
                    r"task time [\d.]+ s in all \([\d.]+ times the wall time\)\n\n", report), report

    slowest = _section(report, "Slowest tasks")
    assert slowest[0] == "Slowest tasks (3 of 9)"
    assert _cells(slowest[1]) == ["ID", "ELAPSED", "WORKER", "COMMAND"]
    assert [_cells(row)[3] for row in slowest[2:4]] == ["sleep 0.2", "sleep 0.2"]
    assert {_cells(row)[0] for row in slowest[2:4]} == {"0", "3"}
    assert float(_cells(slowest[2])[1].removesuffix(" s")) >= 0.2

    failures = _section(report, "Failures")
    assert failures[0] == "Failures: 5 tasks in 2 groups"
    assert [_cells(row) for row in failures[2:]] == [["3", "exit 3", "1, 4, 7", 'bad, "input"'],
                                                    ["2", "exit 1", "2, 6", "x"]]

    workers = _section(report, "Time per worker")
    rows = [_cells(row) for row in workers[2:]]
    ran_on = {r["worker"] for r in read_results(out)}  # both workers, most likely: not a promise
    assert workers[0].startswith(f"Time per worker ({len(ran_on)} worker")
    assert {row[0] for row in rows} == ran_on
    assert sum(int(row[1]) for row in rows) == 9
    assert sum(float(row[3].removesuffix("%")) for row in rows) == pytest.approx(100, abs=0.15)

    # The same results read back from the file, as JSONL (a path, standard input) or CSV: the same
    # tables; only the wall time is not in a file.
    again = run_client("--report", str(out), "--top", "3")
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert again.stdout.startswith("9 tasks: 4 succeeded, 5 failed, 0 cancelled\ntask time ")
    assert again.stdout.split("\n\n", 1)[1] == report.split("\n\n", 1)[1]
    piped = run_client("--report", "-", "--top", "3", input=out.read_text())
    assert piped.returncode == 0 and piped.stdout == again.stdout


def test_report_reads_csv_and_cuts_long_tables(workload, tmp_path):
    out = tmp_path / "r.csv"
    done = run_client("-w", workload([f"echo line {i}; exit {i % 4}" for i in range(12)]), "--local", "2",
                      "-o", str(out), "--format", "csv", "-q")
    assert done.returncode == 1 and done.stderr == "", done.stderr
    report = run_client("--report", str(out), "--top", "2")
    assert report.returncode == 0, report.stderr
    failures = _section(report.stdout, "Failures")
    assert failures[0] == "Failures: 9 tasks in 9 groups"
    assert len(failures) == 5
    assert re.fullmatch(r"  \.\.\. and 7 more groups \(7 tasks, [\d.]+ s\)", failures[-1]), failures
    assert len(_section(report.stdout, "Slowest tasks")) == 4


GOOD = json.dumps({"id": 0, "command": "true", "status": "success", "exit_code": 0, "output": "",
                   "elapsed_ms": 1.5, "worker": "host:1"})


@pytest.mark.parametrize(("content", "error"), [
    (None, "No such file or directory: {path}"),
    (b"", "{path}: no results in it (an empty file)"),
    (b"hello\n", "{path}:1: not a results file: neither a JSON object (a line of JSONL results) nor the "
                 "header of --format csv"),
    (b'{"id": 0}\n', "{path}:1: not a results record (no 'command', 'status', 'exit_code', 'output', "
                     "'elapsed_ms', 'worker')"),
    (b"\xff\xfe\x00garbage", "{path}:1: not a results file"),
    (f"{GOOD}\n\n{GOOD}\n{{oops\n", "{path}:4: not JSON (Expecting property name enclosed in double quotes"),
    (f"{GOOD}\n" + GOOD.replace('"success"', '"fine"'), "{path}:2: not a results record (status 'fine')"),
    (f"{GOOD}\n[1, 2]\n", "{path}:2: not a results record (not a JSON object)"),
    (f"{GOOD}\n" + GOOD.replace('"id": 0', '"id": true'), "{path}:2: not a results record ('id' is true)"),
    (b"id,command,status\r\n", "{path}:1: not a results file"),
    (b"id,command,status,exit_code,elapsed_ms,worker,error,output\r\n0,a,success,0,1.5,w,,\r\n1,b,failed\r\n",
     "{path}:3: 3 cells under a header of 8"),
    (b"id,command,status,exit_code,elapsed_ms,worker,error,output\r\n0,a,success,0,1.5,w,,\"open",
     "{path}:2: not CSV (unexpected end of data)"),
    # JSON nested past the parser's depth, and a lone surrogate escape: not results the client writes.
    (b'{"id": ' + b"[" * 100_000 + b"\n", "{path}:1: not JSON (JSON nested too deeply)"),
    (GOOD.replace('"output": ""', '"output": "\\udfff"'), "{path}:1: not JSON ("),
    # A row of 17 million empty cells: refused before csv.reader holds them all.
    (b"id,command,status,exit_code,elapsed_ms,worker,error,output\r\n" + b"," * (17 * 1024 * 1024) + b"\r\n",
     "{path}:2: a record longer than 16 MiB: not a results record"),
])
def test_report_on_a_bad_file_is_one_line_and_exit_2(tmp_path, content, error):
    path = tmp_path / "results.jsonl"
    if content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    done = run_client("--report", str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("client.py: error: " + error.format(path=path)), done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_csv_holds_every_field_of_the_jsonl(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    tasks = workload(AWKWARD)
    as_csv, as_jsonl = tmp_path / "r.csv", tmp_path / "r.jsonl"
    done = run_client("-s", sched.address, "-w", tasks, "-o", str(as_csv), "--format", "csv")
    assert done.returncode == 1, done.stderr
    job = re.search(r"client.py: job ([0-9a-f]+)", done.stderr).group(1)
    fetched = run_client("-s", sched.address, "--cursor", job, "-o", str(as_jsonl), "--summary")
    assert fetched.returncode == 1, fetched.stderr  # the same results, and their report (no wall time)
    assert "Failures: 2 tasks in 2 groups" in fetched.stderr and "wall time" not in fetched.stderr

    with open(as_csv, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["id", "command", "source", "status", "exit_code", "elapsed_ms", "worker", "error",
                      "output"]
    records = read_results(as_jsonl)
    assert len(rows) == len(records) == len(AWKWARD)
    for row, record in zip(rows, records, strict=True):
        cells = dict(zip(header, row, strict=True))
        assert cells.pop("source") == f"{tasks}:{record['id'] + 1}"  # --cursor's lines have none
        expected = {"error": None, **record}  # a success has no error key
        assert _as_json(cells) == {key: expected[key] for key in cells}
    outputs = [r["output"] for r in records]
    assert outputs[0] == 'a,b\n"q"\r\nz' and outputs[1] == "\ufffd\ufffd\x00bin" and outputs[4] == ""
    assert records[7]["exit_code"] is None and records[7]["error"].startswith("killed by signal 9")

    # The CSV's report is the JSONL's; it may go to standard output (compared as text: run_client reads
    # CRLF and CR as LF, and so does read_text).
    assert run_client("--report", str(as_csv)).stdout == run_client("--report", str(as_jsonl)).stdout
    fetched_csv = tmp_path / "fetched.csv"
    run_client("-s", sched.address, "--cursor", job, "-o", str(fetched_csv), "--format", "csv", "-q")
    piped = run_client("-s", sched.address, "--cursor", job, "-o", "-", "--format", "csv", "-q")
    assert piped.stdout.startswith("id,command,status,")
    assert piped.stdout == fetched_csv.read_text(encoding="utf-8")


def _as_json(cells: dict[str, str]) -> dict:
    """A CSV row's cells as the JSONL's values: numbers, and null for an empty exit code, worker, error."""
    return {**cells, "id": int(cells["id"]), "elapsed_ms": float(cells["elapsed_ms"]),
            "exit_code": int(cells["exit_code"]) if cells["exit_code"] else None,
            "worker": cells["worker"] or None, "error": cells["error"] or None}


def test_report_memory_is_bounded_and_the_slowest_kept_in_order():
    report = JobReport(top=3)
    for task_id in range(5000):
        report.add({"id": task_id, "command": f"task {task_id}", "status": "failed", "exit_code": 1,
                    "output": f"distinct {task_id}\n", "elapsed_ms": float(task_id % 1000), "worker": None})
    text = report.render()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    slowest = _section(text, "Slowest tasks")
    assert [_cells(row)[0] for row in slowest[2:]] == ["999", "1999", "2999"]  # of equals, the first
    failures = _section(text, "Failures")
    assert failures[0] == f"Failures: 5000 tasks in {MAX_GROUPS + 1} groups"  # then counted together
    assert _cells(failures[2])[:3] == [str(5000 - MAX_GROUPS), OTHER_GROUP[0], "1000, 1001, 1002, ..."]
    assert _cells(_section(text, "Time per worker")[2])[:2] == ["(no worker)", "5000"]
