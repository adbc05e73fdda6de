"""Bundles out: those a backend sent and has not heard of whole, and how long since it last did.

Owns the bookkeeping behind SQSBackend's recovery of lost bundles: for each bundle sent, its
tasks without news yet (no result, not handed back) and when it was last heard of (sent, or
a result came).  What to do with a bundle not heard of for long (wait, send it again, or
queue its tasks again) is sqsbackend.py's, by the bundle's claim.  The sending and the
receiving threads share it: every change is under one lock.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable

from cloudkon.tasks import Bundle, ResultBatch


@dataclasses.dataclass
class Sent:
    """A bundle sent and not heard of whole: its tasks without news, and when it was last heard of."""

    bundle: Bundle
    due: set[int]
    heard: float


class Outstanding:
    """The bundles sent and not heard of whole, by (job, bundle number)."""

    def __init__(self) -> None:
        self._sent: dict[tuple[str, int | None], Sent] = {}
        self._lock = threading.Lock()

    def sent(self, bundles: Iterable[Bundle]) -> None:
        """Note ``bundles`` as sent now (one sent again starts its wait again)."""
        now = time.monotonic()
        with self._lock:
            for bundle in bundles:
                sent = self._sent.setdefault((bundle.job, bundle.bundle), Sent(bundle, set(bundle.ids), now))
                sent.heard = now  # sent again: its lease starts again

    def hear(self, batches: Iterable[ResultBatch]) -> None:
        """Note the tasks of bundles sent that have news (a result, or handed back)."""
        now = time.monotonic()
        with self._lock:
            for batch in batches:
                sent = self._sent.get((batch.job, batch.bundle))
                if sent is not None:
                    sent.due.difference_update(batch.ids)
                    sent.due.difference_update(batch.returned)
                    sent.heard = now
                    if not sent.due:
                        del self._sent[(batch.job, batch.bundle)]

    def late(self, seconds: float, limit: int) -> list[Sent]:
        """Up to ``limit`` bundles not heard of for over ``seconds``."""
        now = time.monotonic()
        with self._lock:
            return [sent for sent in self._sent.values() if now - sent.heard > seconds][:limit]

    def drop(self, bundle: Bundle) -> None:
        """Wait no more for ``bundle``."""
        with self._lock:
            self._sent.pop((bundle.job, bundle.bundle), None)

    def drop_job(self, job: str) -> None:
        """Wait no more for any bundle of ``job`` (cancelled)."""
        with self._lock:
            for key in [key for key in self._sent if key[0] == job]:
                del self._sent[key]
