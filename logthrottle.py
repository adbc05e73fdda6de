"""Log lines for events that may come by the thousand: the first at once, then a count now and then.

Owns ``ThrottledLog``.  A forged or stray message, a duplicate result, an accept that fails for
want of file descriptors: each is worth a line, but a flood of them must not flood the log (nor
cost a line's formatting each).
"""

from __future__ import annotations

import logging
import math
import time


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
