"""Job descriptions on the local backend: both written forms, every error, sandboxes, staging, Animoto."""

import functools
import http.server
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import animoto_workload, read_results, run_client, validate_videos, wait_until

from cloudkon.errors import WorkloadError
from cloudkon.jdl import MAX_INPUT_SANDBOX_BYTES, parse_jdl, parse_json_spec


@pytest.fixture
def files(tmp_path):
    """Write files under tmp_path: files(name=text, ...) -> tmp_path."""
    def write(**contents: str) -> Path:
        for name, text in contents.items():
            (tmp_path / name).write_text(text)
        return tmp_path
    return write


def test_the_json_and_jdl_forms_read_the_same_job(files):
    base = files(**{"run.sh": "echo", "a.txt": "a", "setup.sh": "true"})
    from_json = parse_json_spec(json.dumps({
        "executable": "run.sh", "arguments": "-x 'two words'", "input_sandbox": ["run.sh", "a.txt",
                                                                              "http://h/b.png"],
        "output_sandbox": ["*.mp4"], "prologue": ["setup.sh"], "env": {"A": "1"}, "timeout": 30}),
        base, ("w.txt", 3))
    from_jdl = parse_jdl('''
        // a comment, and another kind   # and a third
        [ Executable = "run.sh";  Arguments = "-x 'two words'";
          InputSandbox = {"run.sh", "a.txt", "http://h/b.png"};   /* a block
          comment */ OutputSandbox = {"*.mp4"}; Prologue = {"setup.sh"};
          Environment = {"A=1"}; Timeout = 30; ]''', base, "j.jdl")
    assert from_json == from_jdl
    assert from_json.arguments == ["-x", "two words"] and from_json.urls == ["http://h/b.png"]
    assert from_json.inputs == [str(base / "run.sh"), str(base / "a.txt")]


@pytest.mark.parametrize("description, message", [
    ({"executable": "x", "colour": "red"}, "unknown field 'colour'"),
    ({"arguments": ["a"]}, "needs an 'executable'"),
    ({"executable": "x", "input_sandbox": ["nope.txt"]}, "'nope.txt' is not a file"),
    ({"executable": "x", "prologue": ["nope.sh"]}, "'nope.sh' is not a file"),
    ({"executable": "x", "output_sandbox": ["../escape"]}, "must name files inside the sandbox"),
    ({"executable": "x", "input_sandbox": "a.txt"}, "is a list of non-empty strings"),
    ({"executable": "x", "timeout": -1}, "positive number"),
    ({"executable": "x", "env": {"A": 1}}, "object of strings"),
    ({"executable": "x", "input_sandbox": ["big.bin"]}, "over the limit"),
])
def test_each_bad_json_description_is_refused_naming_its_line(files, description, message):
    base = files(**{"a.txt": "a"})
    with open(base / "big.bin", "wb") as f:
        f.truncate(MAX_INPUT_SANDBOX_BYTES + 1)  # sparse: no disk used
    workload = base / "w.txt"
    workload.write_text("echo fine\n# a comment\n\n" + json.dumps(description) + "\n")
    done = run_client("-w", str(workload), "--outputs", str(base / "out"))
    assert done.returncode == 2 and f"{workload}:4: " in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (base / "out").exists(), "nothing ran"


@pytest.mark.parametrize("text, message", [
    ('Executable = "x"', "expected ';'"),
    ('Executable = "x"; Colour = "red";', "unknown attribute 'Colour'"),
    ('Executable = "x"; InputSandbox = {"a", 3};', "a list holds strings"),
    ('Arguments = "a";', "needs an 'executable'"),
    ('Executable = "x"; Environment = {"NOEQUALS"};', "not \"NAME=value\""),
    ('[ Executable = "x";', "without its closing ']'"),
    ('Executable = "x";\nInputSandbox = {"missing.png"};', "j.jdl:2: input_sandbox: 'missing.png'"),
])
def test_each_bad_jdl_file_is_refused(files, text, message):
    base = files(**{"j.jdl": text})
    done = run_client("-j", str(base / "j.jdl"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_outputs_need_a_place_to_go(files):
    base = files(**{"w.txt": json.dumps({"executable": "true", "output_sandbox": ["x"]}) + "\n"})
    done = run_client("-w", str(base / "w.txt"))
    assert done.returncode == 2 and "--outputs DIR" in done.stderr


def test_sandboxes_are_apart_prologues_run_first_and_outputs_come_back(files, tmp_path):
    base = files(**{
        "setup.sh": "echo setting up; echo from-prologue > prologue.txt\n",
        "broken.sh": "echo about to fail; exit 4\n",
        "job.sh": "#!/bin/sh\nmkdir sub; echo $1 > result.txt; echo csv > sub/t.csv; cat prologue.txt\n"
                  "ls -a > listing.txt; echo \"$GREETING\"; sleep 0.5\n",
        "in.txt": "input\n"})
    lines = [json.dumps({"executable": "job.sh", "arguments": [str(i)], "input_sandbox": ["job.sh", "in.txt"],
                         "prologue": ["setup.sh"], "env": {"GREETING": f"hi {i}"},
                         "output_sandbox": ["*.txt", "sub/*.csv"]}) for i in range(4)]
    lines.append(json.dumps({"executable": "job.sh", "input_sandbox": ["job.sh"], "prologue": ["broken.sh"],
                             "output_sandbox": ["result.txt"]}))
    lines.append(json.dumps({"executable": "true", "output_sandbox": ["never-made.txt"]}))
    (base / "w.txt").write_text("\n".join(lines) + "\n")
    out, results = tmp_path / "out", tmp_path / "r.jsonl"
    env = {"TMPDIR": str(tmp_path / "scratch")}  # where the sandboxes go: checked empty afterwards
    (tmp_path / "scratch").mkdir()
    done = run_client("--local", "2", "-w", str(base / "w.txt"), "--outputs", str(out), "-o", str(results),
                      env=env)
    assert done.returncode == 1, done.stderr
    records = read_results(results)
    for i in range(4):
        task = out / str(i)
        assert sorted(p.name for p in task.rglob("*") if p.is_file()) == [
            "in.txt", "listing.txt", "prologue.txt", "result.txt", "t.csv"]
        assert (task / "result.txt").read_text() == f"{i}\n" and (task / "sub" / "t.csv").exists()
        listing = (task / "listing.txt").read_text().split()
        assert listing == [".", "..", "in.txt", "job.sh", "listing.txt", "prologue.txt", "result.txt",
                           "setup.sh", "sub"], \
            "a sandbox holds its own inputs, nothing of another job's"
        assert records[i]["status"] == "success"
        assert records[i]["output"] == f"setting up\nfrom-prologue\nhi {i}\n"
        assert records[i]["outputs"]["files"] == ["in.txt", "listing.txt", "prologue.txt", "result.txt",
                                                  "sub/t.csv"]
    assert records[4]["status"] == "failed" and records[4]["exit_code"] == 4
    assert records[4]["output"] == "about to fail\n" and "prologue broken.sh failed" in records[4]["error"]
    assert not (out / "4").exists()
    assert records[5]["status"] == "failed" and "nothing matches ['never-made.txt']" in records[5]["error"]
    assert records[5]["exit_code"] == 0, "the process ran to completion: its exit code stays"
    assert os.listdir(tmp_path / "scratch") == [], "every sandbox is removed"


def test_inputs_by_url_from_a_loopback_server(files, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "page.txt").write_text("served\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    base = files(**{"w.txt": "\n".join(json.dumps({"executable": "cat", "arguments": ["page.txt"],
                                                   "input_sandbox": [f"{url}/{name}"]})
                                       for name in ("page.txt", "missing.txt")) + "\n"})
    done = run_client("-w", str(base / "w.txt"), "-o", str(tmp_path / "r.jsonl"))
    server.shutdown()
    records = read_results(tmp_path / "r.jsonl")
    assert records[0]["status"] == "success" and records[0]["output"] == "served\n"
    assert records[1]["status"] == "failed" and "404" in records[1]["error"]
    assert done.returncode == 1


def test_animoto_three_videos_on_the_local_backend(tmp_path):
    done = run_client("-w", animoto_workload(tmp_path, 3), "--outputs", str(tmp_path / "out"), timeout=300)
    assert done.returncode == 0, done.stderr
    validate_videos([str(tmp_path / "out" / str(i) / "video.mp4") for i in range(3)])


def test_workload_error_names_the_json_line(files):
    with pytest.raises(WorkloadError, match="w.txt:7: "):
        parse_json_spec("{not json", files(), ("w.txt", 7))


def test_a_job_cannot_touch_the_users_files_or_hand_back_a_link(files, tmp_path):
    base = files(**{"data.txt": "original\n",
                    "run.sh": "echo changed >> data.txt; ln -s /etc/passwd link.txt\n"})
    (base / "run.sh").chmod(0o644)
    (base / "alias.txt").symlink_to(base / "data.txt")
    lines = [json.dumps({"executable": "run.sh", "input_sandbox": ["run.sh", "data.txt"],
                         "output_sandbox": ["data.txt"]}),
             json.dumps({"executable": "run.sh", "input_sandbox": ["run.sh", "data.txt"],
                         "output_sandbox": ["link.txt"]}),
             json.dumps({"executable": "cat", "arguments": ["alias.txt"], "input_sandbox": ["alias.txt"]}),
             "{ echo a shell brace group; }"]
    (base / "w.txt").write_text("\n".join(lines) + "\n")
    done = run_client("-w", str(base / "w.txt"), "--outputs", str(tmp_path / "out"),
                      "-o", str(tmp_path / "r.jsonl"))
    records = read_results(tmp_path / "r.jsonl")
    assert (base / "data.txt").read_text() == "original\n"
    assert (base / "run.sh").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "0" / "data.txt").read_text() == "original\nchanged\n"
    assert records[1]["status"] == "failed" and "nothing matches ['link.txt']" in records[1]["error"]
    assert records[2]["output"] == "original\n", "a linked input keeps the name it was given"
    assert records[3]["output"] == "a shell brace group\n"
    assert done.returncode == 1


def test_timeouts_and_short_downloads_fail_the_task_clearly(files, tmp_path):
    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"only 8 b")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lines = [json.dumps({"executable": "sleep", "arguments": ["5"], "timeout": 0.5}),
             json.dumps({"executable": "true", "input_sandbox": [f"http://127.0.0.1:{server.server_address[1]}/x"]})]
    base = files(**{"w.txt": "\n".join(lines) + "\n"})
    run_client("-w", str(base / "w.txt"), "-o", str(tmp_path / "r.jsonl"))
    server.shutdown()
    records = read_results(tmp_path / "r.jsonl")
    assert records[0]["error"] == "timed out after 0.5 s"
    assert records[1]["status"] == "failed" and "8 bytes arrived of the 100 announced" in records[1]["error"]


@pytest.mark.parametrize("text, message", [
    ('Executable = "a\\.b";', "bad string"),
    ('Executable = "x";\nExecutable = "y";', "Executable is set twice (first on line 1)"),
    ('Executable = "x', "a string without its closing"),
    ('Executable = "x"; /* never closed', "a comment '/*' without its closing"),
])
def test_jdl_syntax_errors_are_clear(files, text, message):
    base = files(**{"j.jdl": text})
    done = run_client("-j", str(base / "j.jdl"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_jdl_brackets_may_end_with_a_semicolon_and_outputs_need_a_writable_folder(files, tmp_path):
    base = files(**{"j.jdl": '[ Executable = "true"; OutputSandbox = {"x"}; ];'})
    (tmp_path / "taken").write_text("a file, not a folder")
    done = run_client("-j", str(base / "j.jdl"), "--outputs", str(tmp_path / "taken"))
    assert done.returncode == 2 and "--outputs" in done.stderr and "Traceback" not in done.stderr


def test_a_workload_from_a_pipe_is_read_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    line = json.dumps({"executable": "echo", "arguments": ["from a pipe"]}) + "\n"
    writer = threading.Thread(target=lambda: fifo.write_text("# a comment\n" + line))
    writer.start()
    done = run_client("-w", str(fifo), "-o", "-")
    writer.join()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == "from a pipe\n"


def test_sandboxes_left_by_dead_processes_of_the_host_are_removed(tmp_path):
    scratch = tmp_path / "scratch"
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()  # reaped
    zombie = subprocess.Popen(["true"])  # dead, not reaped: a killed worker whose parent has yet to look
    wait_until(lambda: _state(zombie.pid) == "Z")
    host = socket.gethostname()
    stale = [scratch / f"cloudkon-sandbox-{host}-{dead}-k1llt9x_",
             scratch / f"cloudkon-sandbox-{host}-{zombie.pid}-z0mb1e_x"]
    kept = [scratch / f"cloudkon-sandbox-{host}-{os.getpid()}-r2nn1ng_",  # a live process's
            scratch / f"cloudkon-sandbox-other{host}-{dead}-a3roadx_",  # another host's (a container's)
            scratch / f"cloudkon-sandbox-{host}-{dead}-{dead}-h4sdash_"]  # host HOST-PID's
    for folder in (*stale, *kept):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "input.bin").write_text("left behind")
    workload = tmp_path / "w.txt"
    workload.write_text(json.dumps({"executable": "true"}) + "\n")
    done = run_client("--local", "1", "-w", str(workload), env={"TMPDIR": str(scratch)})
    zombie.wait()
    assert done.returncode == 0, done.stderr
    assert sorted(scratch.iterdir()) == sorted(kept)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
