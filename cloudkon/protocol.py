"""The wire format: frames, the message schema, and their encoding.

Owns every byte that crosses a socket, a pipe to a worker process or (later) a
queue.  Nothing else in CloudKon-py calls ``json`` on network data, and nothing is
ever unpickled.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8
JSON holding one object with a ``type``.  The length is checked against the frame
limit before any buffer of that size is allocated.  docs/protocol.md documents every
message type with an example.

This module validates shapes (types of fields, matching column lengths); what a
message means is the business of the scheduler and the client.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

from cloudkon.errors import FrameTooLarge, IncompleteFrame, MalformedMessage, RemoteError
from cloudkon.tasks import Bundle, ResultBatch

PROTOCOL_VERSION = 1

# Largest frame accepted or sent.  Bounds the memory one peer can make another
# allocate; batches of tasks and results are split well below it.
MAX_FRAME_BYTES = 16 * 1024 * 1024

# Tasks per ``tasks`` message, and their bytes: frames well under the frame limit,
# few enough that a million tasks is ~120 frames.
TASKS_PER_MESSAGE = 8192
TASK_BYTES_PER_MESSAGE = 4 * 1024 * 1024

_HEADER = struct.Struct(">I")
HEADER_BYTES = _HEADER.size

_RESULT_COLUMNS = ("ids", "exit_codes", "outputs", "elapsed_us", "errors")

# A lone surrogate escape (``\ud800``) is valid JSON but no valid text: it cannot be written
# to a file or passed to a process.  Frames are ASCII, so surrogates can arrive only this way.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

# Longest ``worker`` name a results message may carry (host:pid, or a remote worker's identity).
MAX_WORKER_NAME = 256

# Required fields of each message type and their JSON types.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"version": int},
    "welcome": {"version": int, "backend": str, "workers": int},
    "job_open": {},
    "job_opened": {"job": str},
    "tasks": {"job": str, "tasks": list},
    "job_close": {"job": str, "count": int},
    "job_accepted": {"job": str, "count": int},
    "results": {"job": str, **{column: list for column in _RESULT_COLUMNS}},
    "job_done": {"job": str, "total": int, "succeeded": int, "failed": int},
    "fetch": {"job": str},
    "cancel": {"job": str},
    "cancelled": {"job": str, "count": int},
    "list_jobs": {},
    "jobs": {"jobs": list},
    "drain": {},
    "shutdown": {},
    "ready": {"job": str, "nonce": str},
    "error": {"code": str, "message": str},
    "bundle": {"job": str, "bundle": int, "ids": list, "commands": list},
    "hand_back": {"job": str, "bundle": int},
}




def is_cost(value: object) -> bool:
    """True if ``value`` is a cost report (costs.py): ``task_seconds``, ``requests`` by service,
    ``usd`` (null: an instance type without a price), ``prices`` (their source) and, with a fleet
    the scheduler launched, ``instance_seconds`` and ``worker_requests`` by service."""
    def number(x: object) -> bool:
        return type(x) in (int, float)

    def by_service(x: object) -> bool:
        return isinstance(x, dict) and all(type(n) is int for n in x.values())
    return (isinstance(value, dict) and number(value.get("task_seconds"))
            and (value.get("usd") is None or number(value["usd"])) and isinstance(value.get("prices"), str)
            and (value.get("instance_seconds") is None or number(value["instance_seconds"]))
            and by_service(value.get("requests"))
            and (value.get("worker_requests") is None or by_service(value["worker_requests"])))


# Optional fields checked when present, by message type.
_OPTIONAL: dict[str, dict[str, Callable[[object], bool]]] = {"job_done": {"cost": is_cost},
                                                              "jobs": {"fleet": is_cost}}


def encode(message: dict[str, Any], max_frame: int = MAX_FRAME_BYTES) -> bytes:
    """One frame holding ``message``.  Raises FrameTooLarge rather than send an oversized frame."""
    body = encode_body(message, max_frame)
    return _HEADER.pack(len(body)) + body


def encode_body(message: dict[str, Any], max_frame: int = MAX_FRAME_BYTES) -> bytes:
    """The JSON body of a frame, for carriers that delimit messages themselves (pipes, SQS)."""
    body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii")
    if len(body) > max_frame:
        raise FrameTooLarge(len(body), max_frame)
    return body


def frame_length(header: bytes, max_frame: int = MAX_FRAME_BYTES) -> int:
    """The body length announced by a 4-byte header, checked against the limit."""
    (length,) = _HEADER.unpack(header)
    if length > max_frame:
        raise FrameTooLarge(length, max_frame)
    return length


def decode(body: bytes) -> dict[str, Any]:
    """The message in a frame body.  Raises MalformedMessage for anything but a valid message."""
    try:
        message = parse_json(body)
    except ValueError as exc:
        raise MalformedMessage(f"frame is not UTF-8 JSON: {exc}", body) from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise MalformedMessage("a message must be a JSON object with a string 'type'", body)
    fields = _SCHEMA.get(message["type"])
    if fields is None:
        raise MalformedMessage(f"unknown message type {message['type']!r}", body)
    for name, kind in fields.items():
        value = message.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MalformedMessage(
                f"{message['type']}: field {name!r} must be {_type_name(kind)}", body)
    for name, check in _OPTIONAL.get(message["type"], {}).items():
        if name in message and not check(message[name]):
            raise MalformedMessage(f"{message['type']}: field {name!r} is not a cost report", body)
    return message


def parse_json(data: bytes | bytearray) -> Any:
    """The JSON value in ``data``, which must be UTF-8 JSON holding only text and finite numbers.

    ValueError (UnicodeError included) says what is wrong otherwise: not UTF-8, not JSON,
    NaN or Infinity, a lone surrogate, or nesting too deep for the parser."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        if _SURROGATE_ESCAPE.search(data):  # rare: a pair is fine, a lone one is not
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _type_name(kind: type | tuple[type, ...]) -> str:
    return {int: "an integer", str: "a string", list: "a list"}.get(kind, str(kind))  # type: ignore[arg-type]


# --- message constructors and readers -------------------------------------------

def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def raise_if_error(message: dict[str, Any], expected: str) -> dict[str, Any]:
    """``message`` if it is of type ``expected``; RemoteError if the peer sent an error."""
    if message["type"] == "error":
        raise RemoteError(message["code"], message["message"])
    if message["type"] != expected:
        raise MalformedMessage(f"expected {expected!r}, got {message['type']!r}")
    return message


def bundle_message(bundle: Bundle) -> dict[str, Any]:
    return {"type": "bundle", "job": bundle.job, "bundle": bundle.bundle, "ids": bundle.ids,
            "commands": bundle.commands, "timeout": bundle.timeout, "budget": bundle.budget}


def bundle_from_message(message: dict[str, Any]) -> Bundle:
    ids, commands = message["ids"], message["commands"]
    if len(ids) != len(commands) or not _are_text(commands):
        raise MalformedMessage("bundle: 'commands' must be strings, one per id")
    if not _are_whole(ids):
        raise MalformedMessage("bundle: 'ids' must be non-negative integers")
    return Bundle(message["job"], message["bundle"], ids, commands,
                  _seconds(message, "timeout"), _seconds(message, "budget"))


def _seconds(message: dict[str, Any], name: str) -> float | None:
    """An optional field holding a finite, non-negative number of seconds (or null)."""
    value = message.get(name)
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value) or value < 0):
        raise MalformedMessage(f"{message['type']}: {name!r} must be a non-negative number or null")
    return value


def task_messages(job: str, tasks: list[str]) -> Iterator[dict[str, Any]]:
    """``tasks`` messages carrying ``tasks`` in order, each within the per-message limits."""
    start = 0
    while start < len(tasks):
        end, size = start, 0
        while end < len(tasks) and end - start < TASKS_PER_MESSAGE and size < TASK_BYTES_PER_MESSAGE:
            size += len(tasks[end]) + 8
            end += 1
        yield {"type": "tasks", "job": job, "tasks": tasks[start:end]}
        start = end


def results_message(batch: ResultBatch) -> dict[str, Any]:
    message = {"type": "results", "job": batch.job, "ids": batch.ids,
               "exit_codes": batch.exit_codes, "outputs": batch.outputs,
               "elapsed_us": batch.elapsed_us, "errors": batch.errors}
    if batch.bundle is not None:
        message["bundle"] = batch.bundle
    if batch.artifacts is not None:
        message["artifacts"] = batch.artifacts
    if batch.worker is not None:
        message["worker"] = batch.worker
    if batch.returned:  # only when some: results by the million go without it
        message["returned"] = batch.returned
    return message


def results_from_message(message: dict[str, Any]) -> ResultBatch:
    columns = [message[name] for name in _RESULT_COLUMNS]
    if len({len(column) for column in columns}) != 1:
        raise MalformedMessage("results: columns of different lengths")
    if not _are_whole(message["ids"]):
        raise MalformedMessage("results: task ids must be non-negative integers")
    for name, valid, meaning in (("exit_codes", _are_exit_codes, "integers or nulls"),
                                 ("outputs", _are_text, "strings"),
                                 ("elapsed_us", _are_whole, "non-negative integers"),
                                 ("errors", _are_errors, "strings or nulls")):
        if not valid(message[name]):
            raise MalformedMessage(f"results: {name!r} must hold {meaning}")
    bundle = message.get("bundle")
    if bundle is not None and (not isinstance(bundle, int) or isinstance(bundle, bool)):
        raise MalformedMessage("results: 'bundle' must be an integer")
    artifacts = message.get("artifacts")
    if artifacts is not None and (not isinstance(artifacts, list) or len(artifacts) != len(columns[0])
                                  or not all(a is None or isinstance(a, dict) for a in artifacts)):
        raise MalformedMessage("results: 'artifacts' must be a list of objects or nulls, one per id")
    worker = message.get("worker")
    if worker is not None and (not isinstance(worker, str) or len(worker) > MAX_WORKER_NAME):
        raise MalformedMessage(f"results: 'worker' must be a string of at most {MAX_WORKER_NAME} characters")
    returned = message.get("returned")
    if returned is None:
        returned = []
    elif not isinstance(returned, list) or not all(type(i) is int and i >= 0 for i in returned):  # a few
        raise MalformedMessage("results: 'returned' must be a list of non-negative task ids")
    return ResultBatch(message["job"], bundle, *columns, artifacts, worker, returned)


# These checks run on every results message, thousands of tasks each, in the scheduler and the
# client: each is a pass or two in C (a set of the elements' types; JSON's true and false are
# bools, which are ints to Python but no task id, count or exit code).
_INT, _INT_OR_NULL = {int}, {int, type(None)}


def _are_whole(column: list[Any]) -> bool:
    """Non-negative integers every one."""
    return set(map(type, column)) <= _INT and (not column or min(column) >= 0)


def _are_text(column: list[Any]) -> bool:
    try:
        "".join(column)
    except TypeError:
        return False
    return True


def _are_exit_codes(column: list[Any]) -> bool:
    """Integers or nulls (null: no process ran to completion)."""
    return set(map(type, column)) <= _INT_OR_NULL


def _are_errors(column: list[Any]) -> bool:
    """Nulls (the usual case) or strings."""
    return column.count(None) == len(column) or _are_text([e for e in column if e is not None])


# --- reading and writing frames -------------------------------------------------

def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def receive(sock: socket.socket, max_frame: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """The next message from a blocking socket.  IncompleteFrame if the peer closed mid-frame."""
    length = frame_length(_receive_exactly(sock, HEADER_BYTES), max_frame)
    return decode(_receive_exactly(sock, length))


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise IncompleteFrame(bytes(buffer[:got]), size)
        got += n
    return bytes(buffer)


async def read_message(reader: asyncio.StreamReader,
                       max_frame: int = MAX_FRAME_BYTES) -> dict[str, Any] | None:
    """The next message from a stream, or None at a clean end of stream between frames."""
    try:
        header = await reader.readexactly(HEADER_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise IncompleteFrame(exc.partial, HEADER_BYTES) from None
    length = frame_length(header, max_frame)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise IncompleteFrame(exc.partial, length) from None
    return decode(body)
