"""The SQLite job store against what an adversarial probe found (issue #15, findings 8, 9 and 11):
a store reached by another name, rows of the wrong shape, empty or foreign files, open modes."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

from conftest import ROOT, read_results, run_client

from cloudkon.jobstore import JobOpened, SQLiteJobStore, TasksAdded


def _start_scheduler_command(*args: str) -> subprocess.CompletedProcess:
    """scheduler.py run until it exits by itself (refused), with its output."""
    return subprocess.run([sys.executable, str(ROOT / "scheduler.py"), "--port", "0", "--local", "1", *args],
                          capture_output=True, text=True, timeout=60)


def test_a_store_reached_through_a_symlink_is_refused_while_in_use(start_scheduler, tmp_path):
    state = tmp_path / "jobs.sqlite"
    start_scheduler("--local", "1", "--state", str(state))
    (tmp_path / "elsewhere").mkdir()
    alias = tmp_path / "elsewhere" / "alias.sqlite"
    alias.symlink_to(state)
    second = _start_scheduler_command("--state", str(alias))
    assert second.returncode == 2, second.stderr
    assert f"job store {alias} (which is {state}) is in use by another scheduler" in second.stderr
    linked_folder = tmp_path / "linked"
    linked_folder.symlink_to(tmp_path)
    third = _start_scheduler_command("--state", str(linked_folder / "jobs.sqlite"))
    assert third.returncode == 2 and "is in use by another scheduler" in third.stderr


def test_an_empty_file_is_refused_not_taken_for_a_new_store(tmp_path):
    state = tmp_path / "jobs.sqlite"
    state.touch()
    refused = _start_scheduler_command("--state", str(state))
    assert refused.returncode == 2
    assert f"job store {state} is an empty file, not a job store" in refused.stderr
    assert state.stat().st_size == 0  # left as it was


def test_a_file_that_is_not_a_database_is_refused_by_name(tmp_path):
    state = tmp_path / "notes.txt"
    state.write_text("these are my notes, not a job store\n" * 100)
    refused = _start_scheduler_command("--state", str(state))
    assert refused.returncode == 2
    assert f"cannot use {state} as the job store: file is not a database" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_new_store_and_its_folder_are_private(start_scheduler, workload, tmp_path):
    state = tmp_path / "made" / "by" / "store" / "jobs.sqlite"
    sched = start_scheduler("--local", "1", "--state", str(state))
    assert run_client("-s", sched.address, "-w", workload(["echo private"])).returncode == 0
    sides = [state.with_name(state.name + suffix) for suffix in ("-wal", "-shm")]
    assert all(side.exists() for side in sides)  # in WAL mode while the scheduler runs
    for path in (state, *sides):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700


BAD_JOBS = ("notstrings", "notjson", "badtimeout", "badresults")


def _store_with_bad_rows(path: str) -> None:
    """Jobs 'good' (two tasks to run), and four whose rows were damaged in different ways."""
    store = SQLiteJobStore(path)
    store.write([JobOpened("good", 1.0, None), TasksAdded("good", 0, ["echo a", "echo b"])])
    for job in BAD_JOBS:
        store.write([JobOpened(job, 2.0, None), TasksAdded(job, 0, ["echo x"])])
    db = store._db
    db.execute("UPDATE tasks SET commands = ? WHERE job = 'notstrings'", (json.dumps([1, {"x": 2}]),))
    db.execute("UPDATE tasks SET commands = ? WHERE job = 'notjson'", ("[\"echo x\", oops",))
    db.execute("UPDATE jobs SET timeout = 'soon' WHERE id = 'badtimeout'")
    db.execute("INSERT INTO results (job, batch) VALUES ('badresults', ?)", (b"\x00not a batch",))
    store.close()


def test_jobs_with_bad_rows_are_skipped_by_name_and_the_others_resume(start_scheduler, workload, tmp_path):
    state = tmp_path / "jobs.sqlite"
    _store_with_bad_rows(str(state))
    sched = start_scheduler("--local", "2", "--state", str(state))
    out = tmp_path / "good.jsonl"
    fetched = run_client("-s", sched.address, "--cursor", "good", "-o", str(out), timeout=30)
    assert fetched.returncode == 0, fetched.stderr
    assert [r["output"] for r in read_results(out)] == ["a\n", "b\n"]
    later = run_client("-s", sched.address, "-w", workload(["echo later"]), "-o", "-", timeout=30)
    assert later.returncode == 0 and json.loads(later.stdout)["output"] == "later\n"
    assert sched.stop() == 0
    log = sched.proc.stderr.read()
    for job in BAD_JOBS:
        assert f"job store: job {job} skipped, its rows are not of the right shape" in log, log
    assert "unfinished resumed" in log
