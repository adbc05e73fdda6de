"""Ctrl-C as a flag, for the client's main flow to act on.

Owns ``Interrupts``: inside its ``with`` block SIGINT only sets a flag, and the signal's
wakeup fd (``signal.set_wakeup_fd``) makes a socket readable, so a loop that select()s
on it together with its work wakes up and does the asking and cancelling itself: a
signal handler that sent network messages or read stdin would run at any point of the
main flow, in the middle of a frame or of another write to stderr.
"""

from __future__ import annotations

import signal
import socket
from types import FrameType, TracebackType


class Interrupts:
    """Counts Ctrl-C (SIGINT) instead of raising KeyboardInterrupt, inside a ``with`` block."""

    def __init__(self) -> None:
        self.pending = False
        self._previous_handler: signal.Handlers | object = signal.SIG_DFL
        self._previous_fd = -1

    def __enter__(self) -> Interrupts:
        # ``wake``: what the main flow select()s on; the other side gets a byte on each signal.
        self.wake, self._signal_side = socket.socketpair()
        for sock in (self.wake, self._signal_side):
            sock.setblocking(False)  # set_wakeup_fd needs it: a full buffer must not block the signal
        self._previous_handler = signal.signal(signal.SIGINT, self._flag)
        self._previous_fd = signal.set_wakeup_fd(self._signal_side.fileno())
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        signal.signal(signal.SIGINT, self._previous_handler)  # type: ignore[arg-type]
        self.wake.close()
        self._signal_side.close()

    def _flag(self, signum: int, frame: FrameType | None) -> None:
        # Only the flag: the main flow, woken through ``wake``, does the rest.
        self.pending = True

    def take(self) -> bool:
        """Whether Ctrl-C was pressed since the last call; empties ``wake``."""
        try:
            while self.wake.recv(4096):
                pass
        except BlockingIOError:
            pass
        pending, self.pending = self.pending, False
        return pending

    def raise_from_now_on(self) -> None:
        """Make the next Ctrl-C raise KeyboardInterrupt at once (it means: leave now)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
