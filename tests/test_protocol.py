"""Framing and message schema, then the scheduler's handling of bad frames over real sockets."""

import socket
import struct

import pytest

import protocol
from errors import FrameTooLarge, IncompleteFrame, MalformedMessage
from tasks import Bundle, ResultBatch


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
