"""Property-based tests of everything that reads bytes from outside: frames, messages, workloads, JDL.

The property everywhere: whatever the input, the reader returns a well-formed value or raises its
module's documented error (ProtocolError for the wire format, WorkloadError naming file and line
for workloads and job descriptions), and the error's text can be printed.  Any other exception
(TypeError, KeyError, RecursionError, UnicodeError, OverflowError...) is a defect.  Where an encoder
exists, a valid value survives the round trip.

Inputs: arbitrary bytes; valid JSON of the wrong shape (wrong types, deep nesting, huge numbers, NaN,
lone surrogates such as "\\ud800", long strings); mutations of valid frames and files.

The budget is bounded and the examples derandomized, so that CI runs the same examples every time in
a few seconds, and no example database is written.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import math
import os
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from cloudkon import jdl, protocol
from cloudkon.errors import CloudKonError, MalformedMessage, ProtocolError, WorkloadError
from cloudkon.tasks import (
    MAX_COMMAND_BYTES,
    MAX_TASK_TIMEOUT_SECONDS,
    Bundle,
    ResultBatch,
    decode_workload,
    parse_workload_bytes,
)

# Same examples on every run (derandomize), no example database (database=None),
# no per-example deadline: a busy 2-core CI machine is slow, not wrong.
BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEWER = settings(BOUNDED, max_examples=60)  # examples that run an event loop or build 128 KiB lines

# Hypothesis caches Unicode tables and the constants of our modules under ./.hypothesis, from the
# collection on (before any fixture runs): keep them in a folder removed when pytest exits.
_HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="cloudkon-hypothesis-")
atexit.register(_HYPOTHESIS_HOME.cleanup)
set_hypothesis_home_dir(_HYPOTHESIS_HOME.name)

# The message types and required fields, as the protocol defines them (kept in step by using them).
MESSAGE_FIELDS = protocol._SCHEMA
OPTIONAL_FIELDS = ("timeout", "budget", "bundle", "artifacts", "worker", "returned", "token", "reply_to")


# --- strategies ------------------------------------------------------------------------------------

# Strings that trip encoders and decoders: lone surrogates, NUL, a BOM, non-BMP, long ones.
AWKWARD_STRINGS = st.sampled_from(["", "\ud800", "\udfff", "a\udc80b", "\x00", "a\x00b", "\ufeff",
                                   "\U0001f600", "\u2028", "=", "..", "/", "#", "{", "\\", '"',
                                   "x" * 70_000, "é" * 40_000])
STRINGS = st.text(max_size=20) | AWKWARD_STRINGS
HUGE_NUMBERS = st.sampled_from([2**63, -(2**63) - 1, 10**300, -(10**300), 10**4000, 1e308, -1e308, 5e-324,
                                math.nan, math.inf, -math.inf, -0.0])
NUMBERS = st.integers() | st.floats() | HUGE_NUMBERS
JSON_SCALARS = st.none() | st.booleans() | NUMBERS | STRINGS
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4),
    max_leaves=12)
# Depths past the decoder's recursion limit (about 1,000) and far past it.
NESTING_DEPTHS = st.integers(1, 3000) | st.sampled_from([990, 1000, 1010, 100_000])


def _to_json(value: Any, raw: bool) -> str:
    """JSON text of ``value``; ``raw`` writes non-ASCII (lone surrogates too) as characters, not escapes."""
    return json.dumps(value, ensure_ascii=not raw, separators=(",", ":"))


def _to_bytes(text: str) -> bytes:
    """UTF-8 bytes of ``text``; a lone surrogate becomes the invalid bytes a careless peer would send."""
    return text.encode("utf-8", "surrogatepass")


@st.composite
def json_texts(draw: st.DrawFn, values: st.SearchStrategy[Any] = JSON_VALUES) -> str:
    return _to_json(draw(values), raw=draw(st.booleans()))


@st.composite
def deeply_nested(draw: st.DrawFn, around: str = "{}") -> str:
    """JSON arrays or objects nested many levels deep, closed or not, in place of the ``{}`` of ``around``."""
    depth = draw(NESTING_DEPTHS)
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opening * depth + ("1" + closing * depth if draw(st.booleans()) else "")
    return around.replace("{}", nested, 1)


@st.composite
def mutated(draw: st.DrawFn, originals: st.SearchStrategy[bytes]) -> bytes:
    """``originals`` with a few bytes flipped, cut out, inserted or repeated."""
    data = bytearray(draw(originals))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        if how == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b'"', b"\\", b"\\ud800", b"[", b"{", b",", b"\n", b"#", b"\xff", b"\xed\xa0\x80", b"NaN"]))
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


def _field_value(kind: type | tuple[type, ...]) -> st.SearchStrategy[Any]:
    """A valid value for a required field of this JSON type (text without lone surrogates)."""
    valid = {int: st.integers(-(2**63), 2**63), str: st.text(max_size=30), float: st.floats(-1e9, 1e9),
             list: st.lists(st.text(max_size=10) | st.integers(0, 2**31), max_size=5),
             dict: st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)}
    return st.one_of(*(valid[k] for k in kind)) if isinstance(kind, tuple) else valid[kind]


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(MESSAGE_FIELDS)))
    message = {"type": kind}
    message.update({name: draw(_field_value(field)) for name, field in MESSAGE_FIELDS[kind].items()})
    return message


@st.composite
def wrongly_typed_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A known message type whose fields, required or optional, hold any JSON at all."""
    kind = draw(st.sampled_from(sorted(MESSAGE_FIELDS)))
    names = [*MESSAGE_FIELDS[kind], *OPTIONAL_FIELDS]
    message = {"type": kind}
    for name in draw(st.lists(st.sampled_from(names), unique=True)):
        message[name] = draw(JSON_VALUES)
    if draw(st.booleans()):  # the rest right, so that the wrong one is reached
        message.update({name: draw(_field_value(field)) for name, field in MESSAGE_FIELDS[kind].items()
                        if name not in message})
    return message


TASK_IDS = st.integers(0, 2**31)
TEXT = st.text(max_size=40)  # valid Unicode: no lone surrogates
SECONDS = st.none() | st.floats(0, 86400) | st.integers(0, 86400)


@st.composite
def bundles(draw: st.DrawFn) -> Bundle:
    count = draw(st.integers(0, 6))
    ids = draw(st.lists(TASK_IDS, min_size=count, max_size=count))
    commands = draw(st.lists(TEXT, min_size=count, max_size=count))
    return Bundle(draw(TEXT), draw(st.integers(0, 2**53)), ids, commands, draw(SECONDS), draw(SECONDS))


@st.composite
def result_batches(draw: st.DrawFn) -> ResultBatch:
    count = draw(st.integers(0, 6))

    def column(values: st.SearchStrategy[Any]) -> list[Any]:
        return draw(st.lists(values, min_size=count, max_size=count))

    artifacts = draw(st.none() | st.just(column(st.none() | st.dictionaries(TEXT, TEXT, max_size=2))))
    return ResultBatch(draw(TEXT), draw(st.none() | st.integers(0, 2**53)), column(TASK_IDS),
                       column(st.none() | st.integers(-255, 255)), column(TEXT),
                       column(st.integers(0, 2**40)),
                       column(st.none() | TEXT), artifacts, draw(st.none() | st.text(max_size=50)),
                       draw(st.lists(TASK_IDS, max_size=4)))


def bodies_of(messages: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Frame bodies holding ``messages``, written with escapes or as raw (possibly invalid) UTF-8."""
    return st.builds(lambda message, raw: _to_bytes(_to_json(message, raw)), messages, st.booleans())


ANY_BODY = (st.binary(max_size=200) | bodies_of(wrongly_typed_messages()) | json_texts().map(_to_bytes)
            | deeply_nested().map(_to_bytes)
            | deeply_nested('{"type":"tasks","job":"j","tasks":{}}').map(_to_bytes)
            | mutated(bodies_of(valid_messages())))


# --- checks ----------------------------------------------------------------------------------------

def _assert_printable(error: Exception) -> None:
    """An error's text can be written to a UTF-8 log or terminal (a lone surrogate cannot)."""
    str(error).encode("utf-8")


def _strings_in(value: Any) -> list[str]:
    """Every string in a JSON value, keys included (iteratively: values may be nested deep)."""
    found, pending = [], [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
    return found


def _decode_or_refuse(body: bytes) -> dict[str, Any] | None:
    """The message ``decode`` gives, checked against the schema; None if it said MalformedMessage."""
    try:
        message = protocol.decode(body)
    except MalformedMessage as exc:
        _assert_printable(exc)
        return None
    assert isinstance(message, dict) and message["type"] in MESSAGE_FIELDS
    for name, kind in MESSAGE_FIELDS[message["type"]].items():
        assert isinstance(message[name], kind) and not isinstance(message[name], bool)
    return message


def _is_task_id(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_seconds(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and math.isfinite(value) and value >= 0)


def _assert_well_typed_bundle(bundle: Bundle) -> None:
    assert isinstance(bundle.job, str) and type(bundle.bundle) is int
    assert all(map(_is_task_id, bundle.ids)), f"task ids must be non-negative integers: {bundle.ids!r}"
    assert len(bundle.commands) == len(bundle.ids) and all(isinstance(c, str) for c in bundle.commands)
    assert _is_seconds(bundle.timeout) and _is_seconds(bundle.budget)


def _assert_well_typed_batch(batch: ResultBatch) -> None:
    assert isinstance(batch.job, str) and (batch.bundle is None or type(batch.bundle) is int)
    assert len({len(batch.ids), len(batch.exit_codes), len(batch.outputs), len(batch.elapsed_us),
                len(batch.errors)}) == 1
    assert all(map(_is_task_id, batch.ids)), f"task ids must be non-negative integers: {batch.ids!r}"
    assert all(c is None or type(c) is int for c in batch.exit_codes), f"exit codes: {batch.exit_codes!r}"
    assert all(isinstance(o, str) for o in batch.outputs), f"outputs must be strings: {batch.outputs!r}"
    assert all(map(_is_task_id, batch.elapsed_us)), f"elapsed_us: {batch.elapsed_us!r}"
    assert all(e is None or isinstance(e, str) for e in batch.errors), f"errors: {batch.errors!r}"
    assert batch.artifacts is None or (len(batch.artifacts) == len(batch.ids)
                                       and all(a is None or isinstance(a, dict) for a in batch.artifacts))
    assert batch.worker is None or isinstance(batch.worker, str)
    assert all(map(_is_task_id, batch.returned))


def _read_stream(data: bytes, max_frame: int) -> list[dict[str, Any]]:
    """Every message ``read_message`` finds in ``data`` up to a clean end (or its error)."""
    async def read_all() -> list[dict[str, Any]]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        messages = []
        while (message := await protocol.read_message(reader, max_frame)) is not None:
            messages.append(message)
        return messages
    return asyncio.run(read_all())


def _receive_all(data: bytes, max_frame: int) -> list[dict[str, Any]]:
    """Every message the blocking ``receive`` finds in ``data`` (sent whole, then the end of stream)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(10)  # a reader waiting for bytes that never come fails instead of hanging
        theirs.sendall(data)  # small enough for the socket buffer: no writer thread needed
        theirs.shutdown(socket.SHUT_WR)
        messages = []
        while ours.recv(1, socket.MSG_PEEK):
            messages.append(protocol.receive(ours, max_frame))
        return messages


# --- the frame decoder -----------------------------------------------------------------------------

@BOUNDED
@given(header=st.binary(min_size=4, max_size=4), max_frame=st.integers(0, 2**32))
def test_a_header_gives_a_length_within_the_limit_or_frame_too_large(header, max_frame):
    try:
        length = protocol.frame_length(header, max_frame)
    except ProtocolError as exc:
        _assert_printable(exc)
        assert struct.unpack(">I", header)[0] > max_frame
    else:
        assert length == struct.unpack(">I", header)[0] <= max_frame


def _frame(body: bytes, announced: int | None = None) -> bytes:
    return struct.pack(">I", len(body) if announced is None else announced) + body


FRAME_PIECES = (st.builds(protocol.encode, valid_messages()) | ANY_BODY.map(_frame)
                | st.builds(_frame, st.binary(max_size=50), st.integers(0, 2**32 - 1))  # a wrong length
                | st.binary(max_size=12))


@FEWER
@given(pieces=st.lists(FRAME_PIECES, max_size=5), cut=st.none() | st.integers(0, 2**16),
       max_frame=st.sampled_from([protocol.MAX_FRAME_BYTES, 64, 0]))
def test_any_byte_stream_reads_as_messages_then_a_clean_end_or_a_protocol_error(pieces, cut, max_frame):
    data = b"".join(pieces)[:cut]
    for read_all in (_read_stream, _receive_all):
        try:
            messages = read_all(data[:65536], max_frame)
        except ProtocolError as exc:
            _assert_printable(exc)
        else:
            assert all(isinstance(m, dict) and m["type"] in MESSAGE_FIELDS for m in messages)


@FEWER
@given(messages=st.lists(valid_messages(), max_size=5))
def test_frames_written_one_after_another_read_back_in_order(messages):
    data = b"".join(map(protocol.encode, messages))
    assert _read_stream(data, protocol.MAX_FRAME_BYTES) == messages


# --- message validation ----------------------------------------------------------------------------

@BOUNDED
@given(body=ANY_BODY)
def test_any_body_decodes_to_a_message_of_the_schema_or_malformed_message(body):
    _decode_or_refuse(body)


@BOUNDED
@given(body=(deeply_nested() | deeply_nested('{"type":"fetch","job":"j","x":{}}')).map(_to_bytes))
def test_json_nested_deeper_than_the_stack_is_a_malformed_message(body):
    _decode_or_refuse(body)


@BOUNDED
@given(body=bodies_of(wrongly_typed_messages()) | mutated(bodies_of(valid_messages())))
def test_a_decoded_message_holds_only_text_that_can_be_written_as_utf8(body):
    # Frames are UTF-8 JSON; JSON's "\ud800" escape decodes to a lone surrogate, which is no text:
    # a job id or command holding one breaks whatever writes it to a file, a log or a process.
    message = _decode_or_refuse(body)
    for text in _strings_in(message):
        text.encode("utf-8")


@BOUNDED
@given(message=valid_messages())
def test_every_valid_message_survives_encode_then_decode(message):
    assert protocol.decode(protocol.encode(message)[protocol.HEADER_BYTES:]) == message


@BOUNDED
@given(body=ANY_BODY)
def test_an_answer_is_the_expected_message_or_a_protocol_error(body):
    message = _decode_or_refuse(body)
    if message is not None:
        try:
            assert protocol.raise_if_error(message, "results") is message
        except ProtocolError as exc:
            _assert_printable(exc)


@st.composite
def bundle_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A bundle message, valid but for a few fields of any JSON value."""
    message = protocol.bundle_message(draw(bundles()))
    count = len(message["ids"])  # the columns' length, before any field is spoilt
    names = ["ids", "commands", "timeout", "budget", "bundle", "job"]
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=2)):
        message[name] = draw(JSON_VALUES)
    for name in draw(st.lists(st.sampled_from(["ids", "commands"]), unique=True, max_size=2)):
        message[name] = [draw(JSON_SCALARS) for _ in range(count)]  # right length, wrong items
    return message


@BOUNDED
@given(body=bodies_of(bundle_messages()) | mutated(bodies_of(st.builds(protocol.bundle_message, bundles()))))
def test_a_bundle_message_gives_a_well_typed_bundle_or_malformed_message(body):
    message = _decode_or_refuse(body)
    if message is None or message["type"] != "bundle":
        return
    try:
        bundle = protocol.bundle_from_message(message)
    except MalformedMessage as exc:
        _assert_printable(exc)
    else:
        _assert_well_typed_bundle(bundle)


@st.composite
def results_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A results message, valid but for a few fields (or a column's items) of any JSON value."""
    message = protocol.results_message(draw(result_batches()))
    count = len(message["ids"])  # the columns' length, before any field is spoilt
    names = [*protocol._RESULT_COLUMNS, "bundle", "artifacts", "worker", "returned"]
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=2)):
        message[name] = draw(JSON_VALUES)
    for name in draw(st.lists(st.sampled_from(names[:5]), unique=True, max_size=2)):
        message[name] = [draw(JSON_SCALARS) for _ in range(count)]  # right length, wrong items
    return message


@BOUNDED
@given(body=bodies_of(results_messages())
       | mutated(bodies_of(st.builds(protocol.results_message, result_batches()))))
def test_a_results_message_gives_a_well_typed_batch_or_malformed_message(body):
    message = _decode_or_refuse(body)
    if message is None or message["type"] != "results":
        return
    try:
        batch = protocol.results_from_message(message)
    except MalformedMessage as exc:
        _assert_printable(exc)
    else:
        _assert_well_typed_batch(batch)


@BOUNDED
@given(bundle=bundles())
def test_a_bundle_survives_the_wire(bundle):
    body = protocol.encode_body(protocol.bundle_message(bundle))
    assert protocol.bundle_from_message(protocol.decode(body)) == bundle


@BOUNDED
@given(batch=result_batches())
def test_a_result_batch_survives_the_wire(batch):
    body = protocol.encode_body(protocol.results_message(batch))
    assert protocol.results_from_message(protocol.decode(body)) == batch


@BOUNDED
@given(tasks=st.lists(st.text(max_size=30), max_size=40), per_message=st.integers(1, 8),
       bytes_per_message=st.integers(1, 200))
def test_task_messages_carry_every_task_once_in_order(tasks, per_message, bytes_per_message):
    with mock.patch.object(protocol, "TASKS_PER_MESSAGE", per_message), \
         mock.patch.object(protocol, "TASK_BYTES_PER_MESSAGE", bytes_per_message):
        messages = list(protocol.task_messages("j", tasks))
    assert all(0 < len(m["tasks"]) <= per_message for m in messages)
    carried = [task for m in messages for task in _decode_or_refuse(protocol.encode_body(m))["tasks"]]
    assert carried == tasks


# --- the workload reader ---------------------------------------------------------------------------

WORKLOAD_LINES = (st.text(max_size=30) | st.sampled_from(["", "#", "# comment", "  \t", "sleep 10", "\r",
                                                         "\x85", '{"executable": "x"}', "echo \x00"]))
WORKLOADS = st.lists(WORKLOAD_LINES, max_size=12).map(lambda lines: "\n".join(lines).encode())


# A line of one 1- to 4-byte character, from just under MAX_COMMAND_BYTES bytes to just over (a
# few characters more or fewer than fit), as a task or as a comment.  Drawn as its recipe, so that a
# failing example prints as (prefix, character, difference), not as 128 KiB.
LONG_LINE_RECIPES = st.tuples(st.sampled_from(["", "  ", "#"]),
                              st.sampled_from(["x", "é", "€", "\U0001f600"]), st.integers(-2, 2))


def _long_line(prefix: str, char: str, difference: int) -> str:
    return prefix + char * (MAX_COMMAND_BYTES // len(char.encode()) + difference)


def _read_workload_or_refuse(data: bytes) -> list[str] | None:
    """The tasks read from ``data``, checked; None if it said WorkloadError, checked to name the line."""
    try:
        tasks = parse_workload_bytes(data, "w.txt")
    except WorkloadError as exc:
        _assert_printable(exc)
        assert exc.path == "w.txt"
        if exc.line is not None:
            line = data.split(b"\n")[exc.line - 1]  # an IndexError here: a line number past the end
            assert exc.line >= 1
            try:
                task = line.decode("utf-8").strip()
            except UnicodeDecodeError:
                return None  # the line at fault is not UTF-8
            if "\x00" in task:
                return None  # no task can hold a NUL, nor a file of text (it is UTF-16 without its mark)
            assert not task.startswith("#"), f"line {exc.line} is a comment: it is no task to run"
            assert len(task.encode()) > MAX_COMMAND_BYTES, f"line {exc.line} is not over the limit"
        return None
    assert tasks, "an empty workload must be refused"
    for task in tasks:
        assert task == task.strip() and task and not task.startswith("#") and "\n" not in task
        assert len(task.encode("utf-8")) <= MAX_COMMAND_BYTES
    return tasks


@BOUNDED
@given(data=st.binary(max_size=300) | WORKLOADS | mutated(WORKLOADS))
def test_any_bytes_give_tasks_or_a_workload_error_naming_the_line(data):
    _read_workload_or_refuse(data)


@FEWER
@given(lines=st.lists(WORKLOAD_LINES | LONG_LINE_RECIPES, min_size=1, max_size=4))
def test_a_task_over_the_command_limit_is_refused_by_line_number(lines):
    data = "\n".join(_long_line(*line) if isinstance(line, tuple) else line for line in lines).encode()
    tasks = _read_workload_or_refuse(data)
    text = data.decode("utf-8-sig")  # a byte order mark is no part of the first line
    lines = [line.strip() for line in text.split("\n")]
    task_lines = [line for line in lines if line and not line.startswith("#")]
    too_long = any(len(line.encode()) > MAX_COMMAND_BYTES for line in task_lines)
    # A long comment is skipped like any other; a NUL anywhere refuses the file.
    assert (tasks is None) == (too_long or not task_lines or "\x00" in text)


@BOUNDED
@given(tasks=st.lists(st.text(st.characters(exclude_characters="\n\x00\ufeff"), min_size=1, max_size=30)
                      .map(str.strip).filter(lambda task: task and task[0] != "#"), min_size=1, max_size=10),
       separator=st.sampled_from(["\n", "\r\n", "\n\n# a comment\n", "\n   \n"]),
       indent=st.sampled_from(["", " \t"]))
def test_task_lines_written_out_read_back_the_same(tasks, separator, indent):
    data = separator.join(indent + task for task in tasks).encode()
    assert parse_workload_bytes(data) == tasks


# --- the JDL parser --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def job_folder():
    """A folder with the inputs job descriptions name (removed afterwards: nothing is left in /tmp)."""
    with tempfile.TemporaryDirectory(prefix="cloudkon-properties-") as folder:
        root = Path(folder)
        (root / "input.txt").write_text("data\n")
        (root / "setup.sh").write_text("echo ready\n")
        (root / "data").mkdir()
        (root / "data" / "input.txt").write_text("other data\n")  # same name: a clash in the sandbox
        yield root


def _assert_well_formed_spec(spec: jdl.JobSpec) -> None:
    """A spec the sandbox can run: text a process can take, existing inputs, a usable timeout."""
    assert isinstance(spec.executable, str) and spec.executable.strip()
    texts = [spec.executable, *spec.arguments, *spec.urls, *spec.outputs, *spec.env, *spec.env.values(),
             *spec.inputs, *spec.prologue]
    for text in texts:
        assert isinstance(text, str) and "\0" not in text, f"{text!r} cannot reach a process"
        text.encode("utf-8")
    for path in (*spec.inputs, *spec.prologue):
        assert os.path.isabs(path) and Path(path).is_file()
    for pattern in spec.outputs:
        assert not os.path.isabs(pattern) and ".." not in Path(pattern).parts
    assert all(name and "=" not in name for name in spec.env)
    assert spec.timeout is None or (type(spec.timeout) in (int, float)
                                    and 0 < spec.timeout <= MAX_TASK_TIMEOUT_SECONDS)


def _json_spec_or_refuse(text: str, base: Path) -> jdl.JobSpec | None:
    try:
        spec = jdl.parse_json_spec(text, base, ("w.txt", 7))
    except WorkloadError as exc:
        _assert_printable(exc)
        assert (exc.path, exc.line) == ("w.txt", 7)
        return None
    _assert_well_formed_spec(spec)
    return spec


SPEC_VALUES = (JSON_VALUES | st.sampled_from(["input.txt", "setup.sh", "data/input.txt", "/", "..",
                                               "x" * 5000, "http://example.com/a", "s3://bucket", "s3://b/k/"])
               | st.lists(STRINGS | st.sampled_from(["input.txt", "setup.sh", "data/input.txt", "*.log",
                                                     "http://h/input.txt", "../x", "x" * 5000]), max_size=3))


@st.composite
def json_job_descriptions(draw: st.DrawFn) -> dict[str, Any]:
    """Any fields (mostly known ones) holding any values, around a usable executable."""
    names = st.sampled_from(jdl._FIELDS) | STRINGS
    values = draw(st.dictionaries(names, SPEC_VALUES, max_size=4))
    if draw(st.booleans()):
        values.setdefault("executable", draw(st.sampled_from(["/bin/echo", "run.sh", "\ud800", "a\x00"])))
    return values


JSON_JOB_TEXTS = (st.text(max_size=60).map(lambda text: '{"' + text) | json_job_descriptions().map(json.dumps)
                  | deeply_nested('{"executable":"x","arguments":{}}')
                  | mutated(json_job_descriptions().map(lambda v: json.dumps(v).encode())).map(
                      lambda data: data.decode("utf-8", "replace")))


@BOUNDED
@given(text=JSON_JOB_TEXTS)
def test_any_json_job_description_gives_a_runnable_spec_or_a_workload_error(job_folder, text):
    _json_spec_or_refuse(text, job_folder)


@BOUNDED
@given(timeout=NUMBERS | JSON_VALUES, digits=st.integers(0, 10**30) | st.decimals(0, 10**30, places=6))
def test_a_timeout_of_any_value_is_usable_or_refused(job_folder, timeout, digits):
    # 1e308, 10**4000 or 30 nines run into OverflowError in the worker's timers; NaN never ends.
    _json_spec_or_refuse(json.dumps({"executable": "x", "timeout": timeout}), job_folder)
    _jdl_spec_or_refuse(f'Executable = "x"; Timeout = {digits};', job_folder)


@BOUNDED
@given(field=st.sampled_from(["input_sandbox", "prologue", "output_sandbox", "arguments"]),
       names=st.lists(STRINGS | st.sampled_from(["n" * 256, "n" * 5000, "d/" * 3000, "input.txt/x", "data",
                                                 "\udcff", "setup.sh\x00"]), max_size=3))
def test_files_of_any_name_are_usable_or_refused(job_folder, field, names):
    # A name past NAME_MAX makes Path.is_file() raise (ENAMETOOLONG) instead of answering False.
    _json_spec_or_refuse(json.dumps({"executable": "x", field: names}), job_folder)


def _jdl_spec_or_refuse(text: str, base: Path) -> jdl.JobSpec | None:
    try:
        spec = jdl.parse_jdl(text, base, "job.jdl")
    except WorkloadError as exc:
        _assert_printable(exc)
        assert exc.path == "job.jdl"
        assert exc.line is None or 1 <= exc.line <= text.count("\n") + 1
        return None
    _assert_well_formed_spec(spec)
    return spec


JDL_TOKENS = st.sampled_from([
    "Executable", "Arguments", "InputSandbox", "OutputSandbox", "Prologue", "Environment", "Timeout",
    "executable", "Other", "=", ";", "{", "}", ",", "[", "]", '"x"', '"input.txt"', '"setup.sh"',
    '"data/input.txt"', '"A=b"', '"\\ud800"', '"\\u0000"', '"\\x"', '"', "12", "-3", "1.5",
    "9" * 30 + "." + "9" * 30, "٣", "# c\n", "// c\n", "/* c */", "/*", "\n", " ", "\t", "\r\n"])
JDL_TEXTS = (st.text(max_size=80) | st.lists(JDL_TOKENS, max_size=30).map(" ".join)
             | st.lists(JDL_TOKENS, max_size=30).map("".join))


def _jdl_form(values: dict[str, Any]) -> str:
    """``values`` (JSON field names) written in the classic JDL syntax, one attribute a line."""
    names = {field: spelling for spelling, field in zip(jdl._jdl_spellings(), jdl._FIELDS, strict=True)}
    lines = []
    for field, value in values.items():
        if field == "env":
            value = [f"{name}={setting}" for name, setting in value.items()]
        if isinstance(value, list):
            rendered = "{" + ", ".join(map(json.dumps, value)) + "}"
        else:
            rendered = json.dumps(value) if isinstance(value, str) else repr(value)
        lines.append(f"{names[field]} = {rendered};")
    return "[\n" + "\n".join(lines) + "\n]"


PLAIN_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=20)


@st.composite
def valid_job_descriptions(draw: st.DrawFn) -> dict[str, Any]:
    values: dict[str, Any] = {"executable": draw(PLAIN_TEXT.filter(str.strip))}
    optional = {
        "arguments": st.lists(PLAIN_TEXT, max_size=3),
        "input_sandbox": st.lists(st.sampled_from(["input.txt", "setup.sh", "http://example.com/a.tar",
                                                   "s3://bucket/key.bin"]), unique=True, max_size=4),
        "output_sandbox": st.lists(st.sampled_from(["out.txt", "*.log", "results/*.csv"]), unique=True),
        "prologue": st.lists(st.just("setup.sh"), max_size=1),
        "env": st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), PLAIN_TEXT,
                               max_size=3),
        "timeout": st.integers(1, 30 * 86400) | st.integers(1, 10**6).map(lambda n: n / 1000),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        values[name] = draw(optional[name])
    return values


@BOUNDED
@given(text=JDL_TEXTS | mutated(valid_job_descriptions().map(lambda v: _jdl_form(v).encode())).map(
    lambda data: data.decode("utf-8", "replace")))
def test_any_jdl_text_gives_a_runnable_spec_or_a_workload_error_naming_the_line(job_folder, text):
    _jdl_spec_or_refuse(text, job_folder)


@BOUNDED
@given(values=valid_job_descriptions())
def test_a_job_reads_the_same_in_its_json_and_its_jdl_form(job_folder, values):
    from_json = _json_spec_or_refuse(json.dumps(values), job_folder)
    from_jdl = _jdl_spec_or_refuse(_jdl_form(values), job_folder)
    assert from_json is not None and from_json == from_jdl
    assert from_json.executable == values["executable"]
    assert from_json.arguments == values.get("arguments", [])
    assert from_json.env == values.get("env", {}) and from_json.timeout == values.get("timeout")
    assert from_json.outputs == values.get("output_sandbox", [])
    local = [name for name in values.get("input_sandbox", []) if not jdl.is_url(name)]
    assert from_json.inputs == [str(job_folder / name) for name in local]


@BOUNDED
@given(data=WORKLOADS | mutated(st.lists(JSON_JOB_TEXTS | WORKLOAD_LINES, max_size=4).map(
    lambda lines: "\n".join(lines).encode())))
def test_a_workload_gives_its_job_descriptions_or_an_error_naming_their_line(job_folder, data):
    tasks = _read_workload_or_refuse(data)
    if tasks is None:
        return
    path = str(job_folder / "w.txt")
    try:
        specs = jdl.workload_specs(path, decode_workload(data), tasks)
    except WorkloadError as exc:
        _assert_printable(exc)
        text = decode_workload(data)
        assert exc.path == path and jdl.is_job_description(text.split("\n")[exc.line - 1].strip())
    else:
        assert sorted(specs) == [i for i, task in enumerate(tasks) if jdl.is_job_description(task)]
        for spec in specs.values():
            _assert_well_formed_spec(spec)


def test_a_job_description_timeout_has_the_limit_of_any_task(tmp_path):
    def spec(timeout: float) -> str:
        return json.dumps({"executable": "/bin/true", "timeout": timeout})

    assert jdl.parse_json_spec(spec(MAX_TASK_TIMEOUT_SECONDS), tmp_path, ("w.txt", 1)).timeout == \
        MAX_TASK_TIMEOUT_SECONDS
    with pytest.raises(WorkloadError, match="timeout"):
        jdl.parse_json_spec(spec(MAX_TASK_TIMEOUT_SECONDS * 1.001), tmp_path, ("w.txt", 1))


def test_errors_are_of_the_documented_hierarchy():
    # The properties above accept exactly these: keep them what the modules document.
    assert issubclass(MalformedMessage, ProtocolError) and issubclass(ProtocolError, CloudKonError)
    assert issubclass(WorkloadError, CloudKonError)
