"""A fault-injecting TCP proxy for the S3 tests: 127.0.0.1:<port> -> an upstream (moto) server.

Healthy connections are piped byte for byte. ``fail_next(n, mode)`` makes the next ``n`` *new*
connections fail instead, each after the client has sent its request head:

- ``"503"``: answer ``503 Slow Down`` with an S3 XML error body and ``Connection: close``;
- ``"reset"``: reset the connection (RST, the client sees ECONNRESET);
- ``"drop"``: close the connection without an answer (the client sees an empty reply).

Arming faults also cuts the connections that are open at that moment: the client's pooled
keep-alive connections would otherwise carry its next requests past the faults. Every faulted
connection is closed, so the client's retry opens a new one: ``n`` faults = ``n`` failed requests.
``events`` records ``(monotonic time, mode or "pass", request line)`` per connection.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

MODES = ("503", "reset", "drop")

_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTYPROXY0001</RequestId><HostId>faulty-proxy</HostId></Error>"
)
_SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
    b"x-amz-request-id: FAULTYPROXY0001\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_SLOW_DOWN_BODY)).encode() + b"\r\n\r\n" + _SLOW_DOWN_BODY
)


class FaultyProxy:
    """Threaded TCP proxy with switchable faults; ``start()``/``stop()`` or use as a context."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)  # accept() polls, so that stop() ends the loop promptly
        self._stopped = threading.Event()
        self.port: int = self._server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.events: list[tuple[float, str, str]] = []
        self._pending: list[str] = []
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="faulty-proxy", daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FaultyProxy:
        return self.__enter__()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._server.close()
        self._cut_live()

    def fail_next(self, n: int, mode: str) -> None:
        """Fail the next ``n`` connections with ``mode`` (see ``MODES``); clears ``events``."""
        assert mode in MODES, mode
        with self._lock:
            self._pending = [mode] * n
            self.events.clear()
        self._cut_live()

    def faults(self) -> list[tuple[float, str, str]]:
        """The events of faulted connections."""
        return [e for e in self.events if e[1] != "pass"]

    def _cut_live(self) -> None:
        with self._lock:
            live = list(self._live)
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            mode = self._pending.pop(0) if self._pending else None
            self._live.add(conn)
        try:
            if mode is None:
                self._pipe(conn)
            else:
                self._fault(conn, mode)
        except OSError:
            pass
        finally:
            with self._lock:
                self._live.discard(conn)
            conn.close()

    def _record(self, mode: str, head: bytes) -> None:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        with self._lock:
            self.events.append((time.monotonic(), mode, line))

    def _fault(self, conn: socket.socket, mode: str) -> None:
        conn.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        self._record(mode, head)
        if mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "503":
            conn.sendall(_SLOW_DOWN)
            conn.shutdown(socket.SHUT_WR)
            # lingering close: discard what the client still sends (a request body) until it
            # closes, so that our close does not turn into a reset before it read the 503
            conn.settimeout(2)
            while conn.recv(65536):
                pass

    def _pipe(self, conn: socket.socket) -> None:
        up = socket.create_connection(self.upstream, timeout=5)
        up.settimeout(None)
        first = True
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(conn, selectors.EVENT_READ, up)
                sel.register(up, selectors.EVENT_READ, conn)
                while True:
                    for key, _ in sel.select():
                        data = key.fileobj.recv(65536)
                        if not data:
                            return
                        if first and key.fileobj is conn:
                            self._record("pass", data)
                            first = False
                        key.data.sendall(data)
        finally:
            up.close()
