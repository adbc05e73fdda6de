"""Workloads from several files and from standard input: real client.py and scheduler.py processes.

One job of several files and a pipe (ids, order, sources), a slow generator whose tasks run before
it ends, bad lines (in a file: nothing submitted; on a pipe after tasks went out: the job cancelled),
an empty or BOM/CRLF standard input, Ctrl-C on a streamed job, and -j FILE.jdl as before.
"""

import json
import re
import signal
import subprocess
import sys
import textwrap

from conftest import ROOT, read_results, run_client, start_client, wait_until

# A generator of tasks, as a user pipes one in: it writes each line of a JSON list, flushed, and
# after a line "FILE|TASK" (a task to create FILE), waits for that file (up to 60 s) before going
# on; it writes the time it ended to END last.
GENERATOR = textwrap.dedent("""
    import json, os, sys, time
    with open(sys.argv[1]) as f:
        lines = json.load(f)
    end = sys.argv[2]
    for line in lines:
        wait_for, _, line = line.partition("|") if "|" in line else ("", "", line)
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()
        deadline = time.time() + 60
        while wait_for and not os.path.exists(wait_for) and time.time() < deadline:
            time.sleep(0.05)
    with open(end, "w") as f:
        f.write(repr(time.time()))
""")


def _generator(tmp_path, *lines: str) -> subprocess.Popen:
    given = tmp_path / "generator.json"  # a file: a line of 128 KiB is over an argument's limit
    given.write_text(json.dumps(lines))
    end = tmp_path / "generator.end"
    return subprocess.Popen([sys.executable, "-c", GENERATOR, str(given), str(end)], stdout=subprocess.PIPE)


def _client(*args: str, data: bytes) -> subprocess.CompletedProcess:
    """client.py given ``data`` (bytes) on its standard input."""
    return subprocess.run([sys.executable, str(ROOT / "client.py"), *args], input=data,
                          capture_output=True, timeout=120)


def _jobs(sched) -> dict[str, list[str]]:
    listing = run_client("-s", sched.address, "--jobs")
    assert listing.returncode == 0, listing.stderr
    return {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}


def test_two_files_and_stdin_make_one_job_in_the_order_given(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    first = workload(["echo a1", "# a comment", "", "echo a2"])
    second = workload(["echo b1", "echo b2"])
    third = workload(["echo c1"])
    out = tmp_path / "out.jsonl"
    done = run_client("-s", sched.address, "-w", first, "-", second, "-w", third, "-o", str(out),
                      input="echo s1\n\necho s2\n")
    assert done.returncode == 0, done.stderr
    job = re.search(r"job ([0-9a-f]+) \(its results again: --cursor \1\)", done.stderr)[1]
    results = read_results(out)
    assert [(r["id"], r["command"], r["source"], r["output"]) for r in results] == [
        (0, "echo a1", f"{first}:1", "a1\n"), (1, "echo a2", f"{first}:4", "a2\n"),
        (2, "echo s1", "-:1", "s1\n"), (3, "echo s2", "-:3", "s2\n"),
        (4, "echo b1", f"{second}:1", "b1\n"), (5, "echo b2", f"{second}:2", "b2\n"),
        (6, "echo c1", f"{third}:1", "c1\n")]
    assert list(results[0])[:3] == ["id", "command", "source"]
    assert _jobs(sched)[job][1:2] + _jobs(sched)[job][4:5] == ["finished", "7"]
    fetched = tmp_path / "fetched.jsonl"  # a fetch by cursor knows no sources: it leaves them out
    assert run_client("-s", sched.address, "--cursor", job, "-o", str(fetched)).returncode == 0
    assert [r["command"] for r in read_results(fetched)] == [r["command"] for r in results]
    assert all("source" not in r for r in read_results(fetched))


def test_a_slow_generators_first_task_runs_before_it_ends(start_scheduler, tmp_path):
    sched = start_scheduler("--local", "2")
    ran = tmp_path / "ran"
    # The generator waits (up to 60 s) for the first task's file before it writes its last line and
    # ends: had the client waited for the end of its input, the task would run after the generator.
    stamp = f"python3 -c 'import time; print(repr(time.time()))' > {ran}.part && mv {ran}.part {ran}"
    generator = _generator(tmp_path, f"{ran}|{stamp}", "echo last")
    out = tmp_path / "out.jsonl"
    client = start_client("-s", sched.address, "-w", "-", "-o", str(out), stdin=generator.stdout)
    generator.stdout.close()
    assert generator.wait(90) == 0
    assert client.wait(60) == 0, client.stderr.read()
    assert float(ran.read_text()) < float((tmp_path / "generator.end").read_text())
    assert [r["source"] for r in read_results(out)] == ["-:1", "-:2"]
    for stream in (client.stdout, client.stderr):
        stream.close()


def test_a_bad_line_in_the_second_file_submits_nothing(start_scheduler, workload, tmp_path):
    sched = start_scheduler("--local", "2")
    touched = tmp_path / "touched"
    good = workload([f"touch {touched}"])
    bad = workload(["echo fine", "echo " + "x" * (128 * 1024)])
    done = run_client("-s", sched.address, "-w", good, bad, "-o", str(tmp_path / "out.jsonl"))
    assert done.returncode == 2
    assert f"client.py: error: {bad}:2: task longer than 131071 bytes" in done.stderr
    assert "Traceback" not in done.stderr
    assert _jobs(sched) == {}
    assert not touched.exists() and not (tmp_path / "out.jsonl").exists()


def test_a_bad_line_on_stdin_after_tasks_went_out_cancels_the_job(start_scheduler, tmp_path):
    sched = start_scheduler("--local", "2")
    ran = tmp_path / "ran"
    # The first task runs (its file appears) before the bad third line is written.
    generator = _generator(tmp_path, f"{ran}|touch {ran}", "sleep 60000", "echo " + "x" * (128 * 1024))
    client = start_client("-s", sched.address, "-w", "-", stdin=generator.stdout)
    generator.stdout.close()
    assert generator.wait(90) == 0
    assert client.wait(60) == 2
    stderr = client.stderr.read()
    job = re.search(r"job ([0-9a-f]+) ", stderr)[1]
    assert (f"client.py: error: -:3: task longer than 131071 bytes; job {job} was cancelled" in stderr)
    # JOB STATE DATE TIME TOTAL QUEUED IN-FLIGHT SUCCEEDED FAILED CANCELLED
    assert _jobs(sched)[job][1:2] + _jobs(sched)[job][4:] == ["cancelled", "2", "0", "0", "1", "0", "1"]
    for stream in (client.stdout, client.stderr):
        stream.close()


def test_an_empty_stdin_is_a_clear_error_and_submits_nothing(start_scheduler):
    sched = start_scheduler("--local", "1")
    for given in ("", "\n# only a comment\n\n"):
        done = run_client("-s", sched.address, "-w", "-", input=given)
        assert done.returncode == 2
        assert done.stderr == ("client.py: error: -: no tasks on standard input (it was empty, or only "
                               "blank lines and # comments)\n")
    assert _jobs(sched) == {}
    twice = run_client("-w", "-", "-", input="true\n")
    assert twice.returncode == 2 and "standard input ('-') may be given once" in twice.stderr


def test_stdin_is_read_as_a_file_is_bom_crlf_utf16_and_bad_bytes(tmp_path, workload):
    text = "echo one\r\n\r\n# skipped\r\necho two\r\n"
    out = tmp_path / "out.jsonl"
    for data in (b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16")):
        done = _client("-w", "-", "-o", str(out), data=data)
        assert done.returncode == 0, done.stderr
        assert [(r["command"], r["source"], r["output"]) for r in read_results(out)] == [
            ("echo one", "-:1", "one\n"), ("echo two", "-:4", "two\n")]
        as_file = run_client("-w", workload(data), "-o", str(out))  # the same bytes in a file
        assert [r["command"] for r in read_results(out)] == ["echo one", "echo two"], as_file.stderr
    bad = _client("-w", "-", data=b"true\n\xff\n")
    assert bad.returncode == 2 and b"client.py: error: -:2: not UTF-8 (byte 0xff)" in bad.stderr
    described = run_client("-w", "-", input='{"executable": "true"}\n')
    assert described.returncode == 2 and "-:1: a job description: those are read from workload files" \
        in described.stderr


def test_ctrl_c_with_yes_cancels_a_streamed_job_still_reading(start_scheduler, tmp_path):
    sched = start_scheduler("--local", "2")
    ran = tmp_path / "ran"
    # A generator that never ends by itself: the cancel must end the job without the end of its input.
    generator = _generator(tmp_path, f"{ran}|touch {ran}", f"{tmp_path / 'never'}|sleep 60000")
    client = start_client("-s", sched.address, "-y", "-w", "-", stdin=generator.stdout)
    job = re.search(r"job ([0-9a-f]+) ", client.stderr.readline())[1]
    wait_until(lambda: ran.exists() and _jobs(sched)[job][4] == "2")
    client.send_signal(signal.SIGINT)
    assert client.wait(30) == 3
    assert f"job {job} cancelled" in client.stderr.read()
    assert _jobs(sched)[job][1] == "cancelled"
    generator.kill()
    generator.wait()
    for stream in (client.stdout, client.stderr, generator.stdout):
        stream.close()


def test_a_jdl_file_runs_as_before_with_its_file_as_source(tmp_path):
    (tmp_path / "hello.sh").write_text("echo hello from \"$1\"\n")
    jdl = tmp_path / "job.jdl"
    jdl.write_text('Executable = "/bin/sh"; Arguments = "hello.sh world"; InputSandbox = {"hello.sh"};\n')
    out = tmp_path / "out.jsonl"
    done = run_client("-j", str(jdl), "-o", str(out))
    assert done.returncode == 0, done.stderr
    [record] = read_results(out)
    assert (record["command"], record["source"], record["output"]) == (
        f"# job description {jdl}", str(jdl), "hello from world\n")
    assert json.loads(json.dumps(record))["status"] == "success"
