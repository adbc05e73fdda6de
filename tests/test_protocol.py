"""Framing and message schema, then the scheduler's handling of bad frames over real sockets."""

import json
import socket
import struct

import pytest

from cloudkon import protocol
from cloudkon.errors import FrameTooLarge, IncompleteFrame, MalformedMessage
from cloudkon.tasks import Bundle, ResultBatch


def test_frame_is_big_endian_length_then_json():
    frame = protocol.encode({"type": "fetch", "job": "j"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert protocol.decode(frame[4:]) == {"type": "fetch", "job": "j"}


def test_oversized_length_is_refused_before_reading_the_body():
    with pytest.raises(FrameTooLarge) as info:
        protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME_BYTES + 1))
    assert info.value.size == protocol.MAX_FRAME_BYTES + 1


def test_encoder_refuses_to_build_an_oversized_frame():
    with pytest.raises(FrameTooLarge):
        protocol.encode({"type": "tasks", "job": "j", "tasks": ["x" * 100]}, max_frame=50)


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe", "not UTF-8 JSON"), (b"{not json", "not UTF-8 JSON"), (b"[1, 2]", "JSON object"),
    (b'{"type": "launch_missiles"}', "unknown message type"),
    (b'{"type": "fetch", "job": 5}', "'job' must be a string"),
    (b'{"type": "job_close", "job": "j", "count": true}', "'count' must be an integer"),
])
def test_malformed_bodies_are_refused(body, reason):
    with pytest.raises(MalformedMessage, match=reason):
        protocol.decode(body)


def _through_the_wire(message):
    return protocol.decode(protocol.encode_body(message))


def test_bundle_and_results_round_trip():
    bundle = Bundle("j", 3, [0, 1], ["sleep 1", "echo é"], 2.5)
    assert protocol.bundle_from_message(_through_the_wire(protocol.bundle_message(bundle))) == bundle
    batch = ResultBatch("j", 3, [0, 1], [0, None], ["", "é\n"], [10, 20], [None, "timed out"])
    assert protocol.results_from_message(_through_the_wire(protocol.results_message(batch))) == batch


def test_results_with_ragged_columns_are_refused():
    message = protocol.results_message(ResultBatch("j", None, [0, 1], [0, 0], [""], [1, 1], [None, None]))
    with pytest.raises(MalformedMessage, match="columns"):
        protocol.results_from_message(message)


def test_receive_reports_a_partial_frame():
    left, right = socket.socketpair()
    left.sendall(protocol.encode({"type": "fetch", "job": "abc"})[:-3])
    left.close()
    with pytest.raises(IncompleteFrame) as info:
        protocol.receive(right)
    assert info.value.expected > len(info.value.partial) > 0


def test_results_with_non_integer_ids_are_refused():
    message = protocol.results_message(ResultBatch("j", None, ["0"], [0], [""], [1], [None]))
    with pytest.raises(MalformedMessage, match="integers"):
        protocol.results_from_message(message)


def test_worker_returned_and_budget_round_trip():
    bundle = Bundle("j", 3, [0, 1], ["sleep 1", "echo 1"], None, 2.5)
    assert protocol.bundle_from_message(_through_the_wire(protocol.bundle_message(bundle))) == bundle
    batch = ResultBatch("j", 3, [0], [0], [""], [10], [None], worker="buildhost:4121", returned=[1, 2])
    assert protocol.results_from_message(_through_the_wire(protocol.results_message(batch))) == batch


def test_results_carry_worker_and_returned_only_when_set():
    message = protocol.results_message(ResultBatch("j", None, [0], [0], [""], [1], [None]))
    assert "worker" not in message and "returned" not in message  # millions of results: no extra bytes
    batch = protocol.results_from_message(_through_the_wire(message))
    assert batch.worker is None and batch.returned == []
    older = {**message, "worker": None, "returned": None}  # null says the same as absent
    assert protocol.results_from_message(older) == batch


@pytest.mark.parametrize("field, value", [
    ("budget", -1), ("budget", 1e400), ("budget", "1"), ("budget", True),
    ("timeout", -0.5), ("timeout", -1e400), ("timeout", False),
])
def test_bundles_with_a_bad_budget_or_timeout_are_refused(field, value):
    message = {**protocol.bundle_message(Bundle("j", 0, [0], ["true"])), field: value}
    body = json.dumps(message).replace("Infinity", "1e400").encode()  # how JSON says infinity
    with pytest.raises(MalformedMessage, match=field):
        protocol.bundle_from_message(protocol.decode(body))


@pytest.mark.parametrize("body", [
    b'{"type":"job_open","timeout":NaN}', b'{"type":"job_open","timeout":-Infinity}',
    b'{"type":"hello","version":1,"token":"\\ud800"}', b'{"type":"hello","version":1,"token":"\\udc00x"}',
    b'[' * 100_000 + b']' * 100_000, b'{"type":"x","a":' * 50_000 + b'1' + b'}' * 50_000,
])
def test_frames_no_text_or_number_can_hold_are_malformed(body):
    with pytest.raises(MalformedMessage):
        protocol.decode(body)


def test_a_surrogate_pair_is_text():
    assert protocol.decode(b'{"type":"hello","version":1,"token":"\\ud83d\\ude00"}')["token"] == "\U0001f600"


def test_nan_is_never_sent():
    with pytest.raises(ValueError):
        protocol.encode({"type": "job_open", "timeout": float("nan")})


def test_bundles_take_a_zero_or_whole_budget():
    for budget in (0, 3, 0.25):
        message = {**protocol.bundle_message(Bundle("j", 0, [0], ["true"])), "budget": budget}
        assert protocol.bundle_from_message(_through_the_wire(message)).budget == budget


@pytest.mark.parametrize("field, value", [
    ("worker", 7), ("worker", ["h:1"]), ("worker", "h" * (protocol.MAX_WORKER_NAME + 1)),
    ("returned", 3), ("returned", [-1]), ("returned", [True]), ("returned", ["1"]), ("returned", [1.0]),
])
def test_results_with_a_bad_worker_or_returned_are_refused(field, value):
    message = {**protocol.results_message(ResultBatch("j", 0, [0], [0], [""], [1], [None])), field: value}
    with pytest.raises(MalformedMessage, match=field):
        protocol.results_from_message(_through_the_wire(message))


def test_a_worker_name_of_the_longest_length_is_taken():
    name = "h" * protocol.MAX_WORKER_NAME
    message = {**protocol.results_message(ResultBatch("j", 0, [0], [0], [""], [1], [None])), "worker": name}
    assert protocol.results_from_message(_through_the_wire(message)).worker == name
