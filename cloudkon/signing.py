"""Signed message bodies: only the holder of a published key can put work (or a word) to the
workers, or a result to a scheduler.

Owns the seal on a message body, the scheduler's signing keys and the key ring that checks them::

    scheduler: Signer ----- put signing-key:<id> once (claim table) ------+
        seal(body) = "cloudkon-hmac-sha256 <id> <mac>\\n" + body          |
            | request queue / control topic                              |
    worker:  Keyring.open(text) -- unknown <id>? get signing-key:<id> <--+  (once per key)
             -> body, or RefusedMessage (unsigned, unknown key, forged)
             Keyring.seal(results) -> response queue -> scheduler: Keyring.read + open

The MAC is HMAC-SHA256 over the first line's scheme and key id and the body, so the
seal works for any message (bundles, control messages, results).  A worker verifies
a body in microseconds with the keys it holds; it reads a key from DynamoDB only the
first time a message names it (a new scheduler's key: a worker started before the
key existed finds it then).  A key id looked up and absent is remembered, and lookups
are spaced KEY_LOOKUP_INTERVAL_SECONDS apart, so forged messages cannot make a worker
read the table for each of them.  Key ids are random: a legitimate key is in the
table before any message names it, so an id found absent is forged for good.

Why the claim table, not an SSM SecureString: the scheduler and every worker already
use that table and its IAM grants (no new service, client or permission on the
workers' role); its items expire by the TTL it already has, which is how old keys
go; and a key per scheduler process under its own item lets every scheduler and
every scheduler-less ``client.py --remote`` sharing the workers sign with a key of its
own, without coordinating and without a shared secret to rotate.  The cost: the key
is as private as the table, so only the scheduler may write ``signing-key:*`` items
(iam/worker-policy.json denies the workers that) and only the scheduler and workers
may read the table.  A scheduler makes a new key every KEY_ROTATION_SECONDS; a key
verifies messages for KEY_GRACE_SECONDS more, as long as SQS keeps a message.

HMAC is symmetric: whoever verifies can sign.  The workers can read the keys, but
their role cannot send to the request queue; what a forger needs is both the key
and the right to send.  A replayed genuine bundle finds its claim done and does not
run again (claims are kept as long as messages).

Results go the other way, with the same keys: a worker seals each results message
with the newest key it holds (``Keyring.seal``: the key of a bundle it ran, or a later
one), and the scheduler accepts any unexpired key of the claim table.  A sealed result
so proves that its sender can read the table's key items, i.e. is a worker or a
scheduler of the fleet; anyone else who can send to a response queue forges nothing.
Why not a key per worker: the workers may not write key items (a worker that could
publish a key could sign bundles the whole fleet obeys), so each worker would need a
key handed to it by a scheduler over a channel of its own, for one gain: knowing which
worker sent a result, which a worker of the fleet could still lie about.  This way costs
no call at all on a worker (it holds the key already) and, on the scheduler, one
BatchGetItem per receive that names keys it has not seen (``Keyring.read``): once per
key normally; and a flood of messages naming made-up keys costs one read per 100 of
them, not a spaced read each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from cloudkon import aws
from cloudkon.defaults import RETENTION_SECONDS
from cloudkon.errors import BackendError, RefusedMessage

log = logging.getLogger("cloudkon.signing")

SCHEME = "cloudkon-hmac-sha256"
KEY_ITEM_PREFIX = "signing-key:"
_KEY_ID_BYTES = 8
_SECRET_BYTES = 32
_KEY_ID = re.compile(rf"[0-9a-f]{{{2 * _KEY_ID_BYTES}}}")
_MAC = re.compile(r"[0-9a-f]{64}")
# What a seal adds to a body: the first line (scheme, key id, hex MAC, three separators).
SEAL_BYTES = len(SCHEME) + 2 * _KEY_ID_BYTES + 64 + 3
# A scheduler signs with one key this long, then makes another: a leaked key is worth a day.
KEY_ROTATION_SECONDS = 24 * 3600
# A key still verifies this long after its last use: as long as SQS keeps a message signed with it.
KEY_GRACE_SECONDS = RETENTION_SECONDS
# Keys read from the table at most this often by one worker, so that a flood of messages
# naming made-up keys costs it ten reads a second at most, not one per message.
KEY_LOOKUP_INTERVAL_SECONDS = 0.1
# Made-up key ids remembered (the oldest forgotten first), so each costs one read.
MAX_UNKNOWN_KEY_IDS = 1024
# Keys read in one BatchGetItem call (DynamoDB's limit).
KEYS_PER_BATCH_READ = 100


@dataclasses.dataclass(frozen=True)
class SigningKey:
    id: str
    secret: bytes = dataclasses.field(repr=False)
    expires_at: float  # epoch seconds: after this, the key verifies nothing


def seal(body: str, key: SigningKey) -> str:
    """``body`` behind a first line naming ``key`` and the HMAC-SHA256 of both."""
    header = f"{SCHEME} {key.id} "
    return f"{header}{_mac(key.secret, header, body)}\n{body}"


def unseal(text: str, find_key: Callable[[str], SigningKey | None]) -> str:
    """The body that ``seal`` sealed in ``text``; RefusedMessage if it is unsigned, or its key is
    not one ``find_key`` returns, or the MAC does not match."""
    key_id, mac, body = _parts(text)
    key = find_key(key_id)
    if key is None:
        raise RefusedMessage(f"signed with an unknown or expired key {key_id}")
    if not hmac.compare_digest(mac, _mac(key.secret, f"{SCHEME} {key_id} ", body)):
        raise RefusedMessage(f"forged: its signature does not match key {key_id}")
    return body


def _parts(text: str) -> tuple[str, str, str]:
    """(key id, MAC, body) of a sealed ``text``; RefusedMessage if it has no well-formed seal."""
    first, newline, body = text.partition("\n")
    fields = first.split(" ")
    if not newline or len(fields) != 3 or fields[0] != SCHEME:
        raise RefusedMessage("unsigned message")
    _, key_id, mac = fields
    if not _KEY_ID.fullmatch(key_id) or not _MAC.fullmatch(mac):
        raise RefusedMessage("malformed signature")
    return key_id, mac, body


def _named_key(text: str) -> str | None:
    """The key id a sealed ``text`` names, None if it has no well-formed seal."""
    try:
        return _parts(text)[0]
    except RefusedMessage:
        return None


def _mac(secret: bytes, header: str, body: str) -> str:
    mac = hmac.new(secret, header.encode(), hashlib.sha256)
    mac.update(body.encode("utf-8", "surrogatepass"))
    return mac.hexdigest()


def publish_key(dynamodb: Any, claim_table: str) -> SigningKey:
    """A new key, written to the claim table for the workers to find (never over another)."""
    key = SigningKey(secrets.token_hex(_KEY_ID_BYTES), secrets.token_bytes(_SECRET_BYTES),
                     int(time.time() + KEY_ROTATION_SECONDS + KEY_GRACE_SECONDS))
    with aws.aws_errors("publishing a signing key"):
        dynamodb.put_item(TableName=claim_table, Item={
            "claim": {"S": KEY_ITEM_PREFIX + key.id}, "secret": {"B": key.secret},
            "expires_at": {"N": str(int(key.expires_at))}}, ConditionExpression="attribute_not_exists(claim)")
    log.info("signing messages with key %s", key.id)
    return key


class Signer:
    """The scheduler's side: seals bodies with a key of its own, published at first use."""

    def __init__(self, dynamodb: Any, claim_table: str) -> None:
        self._dynamodb = dynamodb
        self._claim_table = claim_table
        self._key: SigningKey | None = None
        self._lock = threading.Lock()

    def key(self) -> SigningKey:
        """The key to sign with now: a new one at first use and every KEY_ROTATION_SECONDS."""
        with self._lock:
            if self._key is None or time.time() >= self._key.expires_at - KEY_GRACE_SECONDS:
                self._key = publish_key(self._dynamodb, self._claim_table)
            return self._key

    def sign(self, body: str) -> str:
        return seal(body, self.key())

    def republish(self) -> SigningKey:
        """A new key, published now (the claim table was made again: the old key went with it);
        whatever signs with this Signer (bundles, control messages) uses it from now on."""
        with self._lock:
            self._key = publish_key(self._dynamodb, self._claim_table)
            return self._key


class Keyring:
    """The keys of the claim table, each read the first time a message names it: a worker's
    side of bundles and control messages, a scheduler's side of results."""

    def __init__(self, dynamodb: Any, claim_table: str) -> None:
        self._dynamodb = dynamodb
        self._claim_table = claim_table
        self._keys: dict[str, SigningKey] = {}
        self._unknown: dict[str, None] = {}  # key ids looked up and absent, oldest first
        self._lock = threading.Lock()
        self._last_lookup = float("-inf")

    def open(self, text: str) -> str:
        """The body of a sealed message; RefusedMessage if the fleet did not sign it;
        BackendError if a key could not be read (the message may be good: try again later)."""
        return unseal(text, self.find)

    def seal(self, body: str) -> str:
        """``body`` sealed with the newest unexpired key held (a worker's results: the key of a
        bundle it ran, or a later one); BackendError if none is held yet."""
        now = time.time()
        held = [key for key in self._keys.values() if key.expires_at > now]
        if not held:
            raise BackendError("no signing key of the fleet held yet to seal results with")
        return seal(body, max(held, key=lambda key: key.expires_at))

    def read(self, texts: Iterable[str]) -> None:
        """Read at once (one call per KEYS_PER_BATCH_READ) every key the sealed ``texts`` name
        that was never looked up; ``open`` then finds them held, or known to be absent.  A key
        the table did not answer for is left to ``open``'s own lookup.  BackendError if the
        table cannot be read."""
        with self._lock:
            wanted = sorted({key_id for text in texts if (key_id := _named_key(text)) is not None
                             and key_id not in self._keys and key_id not in self._unknown})
            for start in range(0, len(wanted), KEYS_PER_BATCH_READ):
                part = wanted[start:start + KEYS_PER_BATCH_READ]
                with aws.aws_errors("reading signing keys"):
                    answer = self._dynamodb.batch_get_item(RequestItems={self._claim_table: {
                        "Keys": [{"claim": {"S": KEY_ITEM_PREFIX + key_id}} for key_id in part],
                        "ConsistentRead": True}})
                found = {item["claim"]["S"].removeprefix(KEY_ITEM_PREFIX): item
                         for item in answer.get("Responses", {}).get(self._claim_table, [])}
                unanswered = {key["claim"]["S"].removeprefix(KEY_ITEM_PREFIX) for key in
                              answer.get("UnprocessedKeys", {}).get(self._claim_table, {}).get("Keys", [])}
                for key_id in part:
                    if key_id not in unanswered:
                        self._remember(key_id, found.get(key_id, {}))

    def find(self, key_id: str) -> SigningKey | None:
        """Key ``key_id`` if it is in the table and unexpired."""
        key = self._keys.get(key_id)
        if key is None and key_id not in self._unknown:
            key = self._look_up(key_id)
        return key if key is not None and time.time() < key.expires_at else None

    def _look_up(self, key_id: str) -> SigningKey | None:
        with self._lock:  # one read at a time, spaced; another thread may have read this key meanwhile
            if key_id in self._keys or key_id in self._unknown:
                return self._keys.get(key_id)
            time.sleep(max(0.0, self._last_lookup + KEY_LOOKUP_INTERVAL_SECONDS - time.monotonic()))
            self._last_lookup = time.monotonic()
            with aws.aws_errors(f"reading signing key {key_id}"):
                item = self._dynamodb.get_item(TableName=self._claim_table,
                                               Key={"claim": {"S": KEY_ITEM_PREFIX + key_id}},
                                               ConsistentRead=True).get("Item", {})
            return self._remember(key_id, item)

    def _remember(self, key_id: str, item: dict[str, Any]) -> SigningKey | None:
        """Hold the key of claim table ``item`` (empty: not there), or remember ``key_id`` as absent."""
        secret = item.get("secret", {}).get("B")
        expires_at = item.get("expires_at", {}).get("N", "")
        if not isinstance(secret, bytes) or len(secret) != _SECRET_BYTES or not expires_at.isdigit():
            self._unknown[key_id] = None
            if len(self._unknown) > MAX_UNKNOWN_KEY_IDS:
                del self._unknown[next(iter(self._unknown))]
            return None
        now = time.time()
        self._keys = {kid: k for kid, k in self._keys.items() if k.expires_at > now}  # old keys go
        key = self._keys[key_id] = SigningKey(key_id, secret, int(expires_at))
        log.info("verifying messages signed with key %s", key_id)
        return key
