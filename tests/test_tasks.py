"""Task semantics: the workload format and run_task, shared by every worker."""

import codecs
import time

import pytest
from conftest import running

from cloudkon.errors import WorkloadError
from cloudkon.processes import run_task
from cloudkon.runner import TimeBoxes, run_bundle
from cloudkon.tasks import MAX_COMMAND_BYTES, Bundle, native_sleep_ms, parse_workload_bytes


def test_workload_skips_blanks_and_comments_and_strips():
    data = b"# header\n\n  sleep 5  \r\necho hi\n   # indented comment\n\t\n"
    assert parse_workload_bytes(data) == ["sleep 5", "echo hi"]


def test_workload_not_utf8_names_the_line():
    with pytest.raises(WorkloadError, match=r"w.txt:3: not UTF-8 \(byte 0xff\)"):
        parse_workload_bytes(b"sleep 0\nsleep 1\necho \xff\n", "w.txt")


def test_workload_without_tasks_is_an_error():
    with pytest.raises(WorkloadError, match="no tasks"):
        parse_workload_bytes(b"# only a comment\n\n")


def test_workload_line_over_exec_limit_names_the_line():
    data = b"sleep 0\n" + b"echo " + b"x" * MAX_COMMAND_BYTES + b"\n"
    with pytest.raises(WorkloadError, match=r":2: task longer than"):
        parse_workload_bytes(data, "w.txt")


@pytest.mark.parametrize("command, ms", [("sleep 0", 0), ("sleep 25", 25), ("sleep 1.5", None),
                                         ("sleep -1", None), ("sleep x", None), ("echo sleep 1", None),
                                         ("sleep \u0663", None)])
def test_native_sleep_is_whole_milliseconds_only(command, ms):
    assert native_sleep_ms(command) == ms


def test_sleep_is_milliseconds_and_spawns_nothing():
    start = time.perf_counter()
    code, output, elapsed_us, error = run_task("sleep 30")
    assert (code, output, error) == (0, "", None)
    assert 30_000 <= elapsed_us and time.perf_counter() - start < 1


def test_shell_command_output_and_exit_status():
    assert run_task("echo out; echo err >&2; exit 3")[:2] == (3, "out\nerr\n")
    assert run_task("true")[0] == 0


def test_output_is_capped_and_marked():
    code, output, _, error = run_task("head -c 200000 /dev/zero | tr '\\0' a", output_cap=1000)
    assert code == 0 and error is None
    assert output.startswith("a" * 1000) and "199000 more bytes not kept" in output


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    code, _, _, error = run_task(f"sh -c 'echo $$ > {pidfile}; sleep 30' & sleep 30; wait", timeout=0.5)
    assert code is None and error == "timed out after 0.5 s"
    assert time.monotonic() - start < 5
    grandchild = int(pidfile.read_text())
    time.sleep(0.2)
    assert not running(grandchild)


def test_native_sleep_honours_timeout():
    code, _, elapsed_us, error = run_task("sleep 60000", timeout=0.2)
    assert code is None and error == "timed out after 0.2 s" and elapsed_us < 5_000_000


def test_killed_by_signal_has_no_exit_code():
    code, _, _, error = run_task("kill -9 $$")
    assert code is None and error == "killed by signal 9 (SIGKILL)"


def test_unrunnable_command_is_a_failed_result():
    code, _, _, error = run_task("echo a\0b")
    assert code is None and "could not start" in error


def test_run_bundle_reports_every_task_in_order_and_marks_starts():
    started = []
    bundle = Bundle("job", 7, [10, 11, 12], ["sleep 0", "false", "echo x"])
    batches = list(run_bundle(bundle, before_task=started.append))
    assert started == [10, 11, 12]
    assert all(b.job == "job" and b.bundle == 7 for b in batches)
    ids = [i for b in batches for i in b.ids]
    codes = [c for b in batches for c in b.exit_codes]
    assert ids == [10, 11, 12] and codes == [0, 1, 0]


def test_a_bundle_past_its_time_box_hands_back_the_tasks_it_did_not_start():
    bundle = Bundle("j", 3, [0, 1, 2], ["sleep 120", "sleep 0", "sleep 0"], budget=0.05)
    batches = list(run_bundle(bundle))
    assert [i for batch in batches for i in batch.ids] == [0]  # the first task of a box always runs
    assert batches[-1].returned == [1, 2] and batches[-1].bundle == 3


def test_a_box_that_runs_out_during_a_task_hands_back_the_rest_at_once():
    handed_back: list[tuple[list[int], float]] = []
    boxes = TimeBoxes(lambda bundle, ids: handed_back.append((ids, time.monotonic())))
    bundle = Bundle("j", 5, [0, 1, 2], ["sleep 600", "sleep 0", "sleep 0"], budget=0.05)
    start = time.monotonic()
    batches = list(run_bundle(bundle, boxes=boxes))
    ended = time.monotonic()
    assert [i for batch in batches for i in batch.ids] == [0]
    assert batches[-1].returned == [1, 2]  # said again with the last results
    (ids, when), = handed_back
    assert ids == [1, 2] and when - start < ended - start - 0.3, "not after the running task"


def test_a_bundle_asked_back_runs_its_first_task_and_hands_back_the_rest():
    handed_back: list[list[int]] = []
    boxes = TimeBoxes(lambda bundle, ids: handed_back.append(ids))
    boxes.end("j", 4)  # asked for before it starts
    bundle = Bundle("j", 4, [5, 6, 7], ["sleep 300", "sleep 0", "sleep 0"])
    assert [i for batch in run_bundle(bundle, boxes=boxes) for i in batch.ids] == [5]
    assert handed_back == [[6, 7]]
    other = Bundle("j", 8, [1, 2], ["sleep 0", "sleep 0"])  # the request was for bundle 4 only
    assert [i for batch in run_bundle(other, boxes=boxes) for i in batch.ids] == [1, 2]


@pytest.mark.parametrize("data", [
    codecs.BOM_UTF8 + b"sleep 10\r\necho a\r\n",
    "sleep 10\r\necho a\r\n".encode("utf-16"),  # with its byte order mark, as Notepad saves "Unicode"
    codecs.BOM_UTF16_BE + "sleep 10\necho a\n".encode("utf-16-be"),
])
def test_workloads_saved_with_a_byte_order_mark_read_as_their_text(data):
    assert parse_workload_bytes(data) == ["sleep 10", "echo a"]


@pytest.mark.parametrize("data, message, line", [
    ("echo a\n".encode("utf-16-le"), "NUL", 1),
    (b"echo a\necho \x00b\n", "NUL", 2),
    (codecs.BOM_UTF32_LE + "echo a".encode("utf-32-le"), "UTF-32", None),
    (codecs.BOM_UTF16_LE + b"e\x00\x00", "UTF-16", None),
])
def test_workloads_in_other_encodings_are_refused_naming_it(data, message, line):
    with pytest.raises(WorkloadError, match=message) as refused:
        parse_workload_bytes(data, "w.txt")
    assert refused.value.line == line


def test_an_exception_before_a_task_ends_the_bundle_before_that_task_starts(tmp_path):
    ran = tmp_path / "ran"

    class Fenced(Exception):
        pass

    def fence(task_id: int) -> None:
        if task_id == 2:
            raise Fenced

    bundle = Bundle("job", 1, [0, 1, 2, 3], [f"echo {i} >> {ran}" for i in range(4)])
    with pytest.raises(Fenced):
        list(run_bundle(bundle, before_task=fence))
    assert ran.read_text().split() == ["0", "1"]
