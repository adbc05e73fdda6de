"""The package's own command line: ``cloudkon client|scheduler|worker`` and ``python -m cloudkon``,
run from outside the checkout (the installed package, as a user of ``pip install`` has it)."""

import subprocess
import sys

from conftest import read_results


def _cloudkon(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudkon", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_cloudkon_client_runs_a_job_on_an_embedded_scheduler(tmp_path):
    (tmp_path / "w.txt").write_text("echo hello\nsleep 10\nfalse\n")
    done = _cloudkon("client", "-w", "w.txt", "-o", "r.jsonl", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # one task failed
    results = read_results(tmp_path / "r.jsonl")
    assert [(r["id"], r["status"], r["output"]) for r in results] == [
        (0, "success", "hello\n"), (1, "success", ""), (2, "failed", "")]


def test_each_command_has_its_help_and_a_wrong_one_is_a_usage_error(tmp_path):
    listed = _cloudkon("--help", cwd=tmp_path)
    assert listed.returncode == 0 and all(name in listed.stdout for name in ("client", "scheduler", "worker"))
    for command, option in (("client", "--workload"), ("scheduler", "--local"), ("worker", "--ec2")):
        helped = _cloudkon(command, "--help", cwd=tmp_path)
        assert helped.returncode == 0 and option in helped.stdout, helped.stderr
    wrong = _cloudkon("frobnicate", cwd=tmp_path)
    assert wrong.returncode == 2 and "unknown command 'frobnicate'" in wrong.stderr
    assert _cloudkon(cwd=tmp_path).returncode == 2
    assert "Traceback" not in wrong.stderr
