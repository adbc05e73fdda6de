"""Failures and events that repeat: told in a few log lines, retried at a growing pace.

Owns ``ThrottledLog`` (an event that may come by the thousand: a forged or stray message, a
duplicate result: the first logged at once, then a count now and then) and ``Outage`` (something
tried again while it fails: a store, receiving results, sending bundles: the pause before each
try, and one line when the failure starts and one when it ends).
"""

from __future__ import annotations

import logging
import math
import random
import time

from cloudkon.errors import CloudKonError

# A failure that lasts is logged again this often, so that a long one is not silence.
OUTAGE_REMINDER_SECONDS = 300.0


class ThrottledLog:
    """Occurrences of one kind of event: the first logged at once, then at most once every
    ``seconds``, saying how many came meanwhile and the last one's detail."""

    def __init__(self, logger: logging.Logger, level: int, what: str, seconds: float) -> None:
        self._log, self._level = logger, level
        self._what = what
        self._seconds = seconds
        self._unlogged = 0
        self._detail = ""
        self._logged_at = -math.inf

    def add(self, count: int, detail: str) -> None:
        self._unlogged += count
        self._detail = detail
        if time.monotonic() - self._logged_at >= self._seconds:
            self.flush()

    def flush(self) -> None:
        """Log what came since the last line, if anything (at the end, say)."""
        if self._unlogged:
            self._log.log(self._level, "%s: %d (last: %s; logged at most every %g s)", self._what,
                          self._unlogged, self._detail, self._seconds)
            self._unlogged, self._logged_at = 0, time.monotonic()


class Outage:
    """Something tried again while it fails (a store, receiving results): the pause before the
    next try, capped, exponential and jittered (schedulers that lost AWS together do not come back
    in step); the failure logged once (reminded every OUTAGE_REMINDER_SECONDS) and its end once."""

    def __init__(self, what: str, pauses: tuple[float, float], logger: logging.Logger,
                 expected: tuple[type[BaseException], ...] = (CloudKonError, OSError)) -> None:
        self.what = what
        self._expected = expected  # failures logged without their traceback
        self._pauses = pauses
        self._pause = pauses[0]
        self._log = logger
        self.since: float | None = None  # monotonic time of the first failure in a row
        self._reminded = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note a failure; the seconds to wait before trying again."""
        now = time.monotonic()
        expected = isinstance(exc, self._expected)
        if self.since is None:
            self.since = self._reminded = now
            self._log.error("%s failed: %s (retrying; logged once until it works)", self.what, exc,
                            exc_info=None if expected else exc)
        elif now - self._reminded >= OUTAGE_REMINDER_SECONDS:
            self._reminded = now
            self._log.error("%s still failing after %.0f s: %s", self.what, now - self.since, exc)
        pause = random.uniform(self._pause / 2, self._pause)
        self._pause = min(self._pause * 2, self._pauses[1])
        return pause

    def ended(self) -> None:
        """Note a success: the end of an outage, if there was one."""
        if self.since is not None:
            self._log.warning("%s works again, after %.1f s", self.what, time.monotonic() - self.since)
            self.since, self._pause = None, self._pauses[0]
