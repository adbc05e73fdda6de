"""A TCP proxy between boto3 and the AWS emulator that plays network faults, for set windows.

Point a process's ``AWS_ENDPOINT_URL`` at ``proxy.url`` instead of the emulator's, then::

    proxy.fault("refuse", 15)      # nothing listens: connections are refused (an endpoint restart)
    proxy.fault("blackhole", 15)   # connections are taken and never answered (a network partition)
    proxy.fault("delay", 15, 0.5)  # every chunk, both ways, waits 0.5 s first (a slow link)
    proxy.heal()                   # back to passing traffic now, whatever the window said

A fault cuts (resets) the connections open when it starts, as a blip or a restart does to
keep-alive connections: a client cannot go on through a connection it opened before.  A
black-holed connection is closed when its window ends.  Threads of the standard library
only; ``close()`` stops them all and closes every socket.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

MODES = ("pass", "refuse", "blackhole", "delay")
_CHUNK_BYTES = 65_536
# How often the threads look at the mode and their deadline.
_TICK_SECONDS = 0.05


class FaultProxy:
    """Forwards 127.0.0.1:port to ``target_host:target_port`` unless a fault window is on."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._lock = threading.Lock()
        self._mode, self._until, self._delay = "pass", 0.0, 0.0
        self._connections: set[socket.socket] = set()
        self._held: list[socket.socket] = []  # black-holed, closed when the window ends
        self._closed = threading.Event()
        self._listener: socket.socket | None = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def mode(self) -> str:
        """The fault on now ("pass" once its window is over)."""
        with self._lock:
            if self._mode != "pass" and time.monotonic() >= self._until:
                self._mode = "pass"
            return self._mode

    def fault(self, mode: str, seconds: float, delay: float = 0.0) -> None:
        """Play ``mode`` for ``seconds`` from now (``delay``: seconds each chunk waits, for "delay")."""
        if mode not in MODES:
            raise ValueError(f"unknown fault {mode!r} (one of {', '.join(MODES)})")
        with self._lock:
            self._mode, self._until, self._delay = mode, time.monotonic() + seconds, delay
            cut, self._connections = self._connections, set()
        for sock in cut:
            _reset(sock)

    def heal(self) -> None:
        """End the fault now."""
        with self._lock:
            self._mode, self._until = "pass", 0.0

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        with self._lock:
            cut, self._connections = self._connections, set()
        for sock in [*cut, *self._held]:
            _reset(sock)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        return listener

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            mode = self.mode
            if mode != "blackhole" and self._held:
                for sock in self._held:
                    _reset(sock)
                self._held = []
            if mode == "refuse":  # nothing listens: the kernel refuses every connection
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                time.sleep(_TICK_SECONDS)
                continue
            if self._listener is None:
                self._listener = self._listen(self.port)
            if not select.select([self._listener], [], [], _TICK_SECONDS)[0]:
                continue
            client, _ = self._listener.accept()
            if self.mode == "blackhole":
                self._held.append(client)
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)  # the connect's timeout would cut a long poll (up to 20 s of silence)
        with self._lock:
            self._connections.update((client, upstream))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                chunk = source.recv(_CHUNK_BYTES)
                if not chunk:
                    break
                if self.mode == "delay":
                    time.sleep(self._delay)
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            with self._lock:
                self._connections.discard(sock)
            _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` at once with a reset (no lingering FIN handshake), waking any thread in recv."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
