"""SQS message bodies: what a request and a response message hold, their size rule, and how a
queue's sealed messages are taken off it.

Owns the bodies shared by the scheduler's backend (sqsbackend.py), the remote worker
(remoteworker.py), the control channel (control.py) and the DynamoDB job store
(dynamostore.py, which keeps results as response bodies)::

    request message:  protocol ``bundle`` + ``reply_to`` (the response queue's URL)
    response message: protocol ``results`` (with its ``bundle``)

Both are sealed by their sender (signing.py) and kept within MAX_SQS_MESSAGE_BYTES with
room for the seal, whatever the emulator accepts: a bundle that encodes too large is split
in halves until each part fits (a single task still too large is handed back to the caller
to fail), a result batch likewise, and an output too large to fit even alone is trimmed
(and says so).  A body is checked whole before any of it is used (``parse_request``,
``parse_response``): nothing of a bad message may be run or recorded.

``take_sealed`` is the one reading of sealed messages received from a queue: open the seal,
parse the body, set aside what the fleet did not sign or what holds no valid message, and
delete both; a message whose key could not be read stays.

AWS behaviour relied on: an SQS message body is at most 256 KiB on queues made with the
defaults (aws.MAX_SQS_MESSAGE_BYTES; 1 MiB at most on any queue); a received message that is
not deleted comes back after the queue's visibility timeout.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from cloudkon import aws, protocol
from cloudkon.aws import MAX_SQS_MESSAGE_BYTES
from cloudkon.errors import BackendError, FrameTooLarge, MalformedMessage, ProtocolError
from cloudkon.signing import SEAL_BYTES, Keyring
from cloudkon.tasks import Bundle, ResultBatch

log = logging.getLogger("cloudkon.sqs")

_TRIMMED = "\n[cloudkon: output trimmed to fit an SQS message]"

Parsed = TypeVar("Parsed")
# A message received (boto3's dict: Body, ReceiptHandle, MessageId) and why it is refused.
Refused = tuple[dict[str, Any], str]


def request_body(bundle: Bundle, reply_to: str) -> str:
    """The (unsealed) body of a request message carrying ``bundle``, its results due to ``reply_to``."""
    return protocol.encode_body({**protocol.bundle_message(bundle), "reply_to": reply_to}).decode("ascii")


def _fits(encode: Callable[[], str], limit: int) -> str | None:
    """The encoded body if it is within ``limit`` bytes, else None."""
    try:
        body = encode()
    except FrameTooLarge:
        return None
    return body if len(body) <= limit else None


def parse_request(body: str) -> tuple[Bundle, str]:
    """(bundle, response queue URL) of a request message; MalformedMessage if it is not one."""
    message = protocol.decode(body.encode("utf-8"))
    if message["type"] != "bundle" or not isinstance(message.get("reply_to"), str):
        raise MalformedMessage("a request message is a bundle with a reply_to", body.encode()[:200])
    return protocol.bundle_from_message(message), message["reply_to"]


def request_bodies(bundle: Bundle, reply_to: str,
                   limit: int = MAX_SQS_MESSAGE_BYTES - SEAL_BYTES) -> tuple[list[str], list[Bundle]]:
    """Message bodies carrying ``bundle`` (split in halves until each fits, with room for
    the seal), and any single-task bundles too large for one message."""
    body = _fits(lambda: request_body(bundle, reply_to), limit)
    if body is not None:
        return [body], []
    if len(bundle.ids) == 1:
        return [], [bundle]
    half = len(bundle.ids) // 2
    bodies, too_large = [], []
    for part in (slice(0, half), slice(half, None)):
        more, rejected = request_bodies(dataclasses.replace(bundle, ids=bundle.ids[part],
                                                            commands=bundle.commands[part]), reply_to, limit)
        bodies += more
        too_large += rejected
    return bodies, too_large


def response_bodies(batch: ResultBatch, limit: int = MAX_SQS_MESSAGE_BYTES - SEAL_BYTES) -> list[str]:
    """Message bodies carrying ``batch``, split in halves until each fits (with room for the
    seal); an output too large to fit even alone is trimmed (and says so)."""
    body = _fits(lambda: protocol.encode_body(protocol.results_message(batch)).decode("ascii"), limit)
    if body is not None:
        return [body]
    if len(batch.ids) == 1:
        output = batch.outputs[0]
        size = len(protocol.encode_body(protocol.results_message(batch)))
        keep = max(0, len(output) * limit // size - len(_TRIMMED) - 1024)
        return response_bodies(dataclasses.replace(batch, outputs=[output[:keep] + _TRIMMED]), limit)
    half = len(batch.ids) // 2
    first, rest = batch.select(list(range(half))), batch.select(list(range(half, len(batch.ids))))
    first.returned = batch.returned  # select keeps the worker; the tasks handed back go with one part
    return response_bodies(first, limit) + response_bodies(rest, limit)


def parse_response(body: str) -> ResultBatch:
    """The result batch of an (unsealed) response message; MalformedMessage unless it is one
    whole valid batch: nothing of it may be recorded before all of it is checked."""
    data = body.encode("utf-8", "surrogatepass")
    message = protocol.decode(data)
    if message["type"] != "results":
        raise MalformedMessage(f"a response message holds results, not {message['type']!r}", data)
    batch = protocol.results_from_message(message)
    if len(set(batch.ids)) != len(batch.ids):  # one task counted twice would end its job early
        raise MalformedMessage("results: a task id appears twice", data)
    return batch


def take_sealed(sqs: Any, queue_url: str, messages: list[dict[str, Any]], keyring: Keyring,
                parse: Callable[[str], Parsed], set_aside: Callable[[list[Refused]], None],
                what: str, calls: Executor | None = None) -> list[Parsed]:
    """What ``parse`` makes of each of ``messages`` (received from ``queue_url``) that ``keyring``
    opens, in order.  Those that are not signed by the fleet or hold no valid message go to
    ``set_aside`` with why; then both kinds are deleted (through ``calls`` if given).  One whose
    key could not be read stays on the queue: it comes back after the visibility timeout."""
    parsed, taken, refused = [], [], []
    for message in messages:
        try:
            parsed.append(parse(keyring.open(message["Body"])))
            taken.append(message["ReceiptHandle"])
        except BackendError as exc:
            log.warning("%s %s left on the queue for now: %s", what, message["MessageId"], exc)
        except ProtocolError as exc:  # refused (unsigned, forged) or malformed
            refused.append((message, str(exc)))
        except Exception as exc:  # a message that breaks the parser must not come back forever
            log.exception("%s %s could not be read", what, message["MessageId"])
            refused.append((message, repr(exc)))
    if refused:
        set_aside(refused)
    aws.delete_messages(sqs, queue_url, taken + [message["ReceiptHandle"] for message, _ in refused], calls)
    return parsed
