"""A TCP/HTTP fault-injecting proxy for tests: put it in front of moto's S3 server on 127.0.0.1.

Modes (switch at any time with `set_mode`; switching drops the connections already open so the
next request sees the new mode):

* ``pass``  — bytes piped both ways (HTTP keep-alive works);
* ``500``   — each request is read (headers and body) and answered ``500 InternalError``, then
  the connection is closed; ``fail_next(n)`` answers only the next n requests that way;
* ``hang``  — connections are accepted and read, never answered (the client's read timeout fires);
* ``down``  — the listening socket is closed: connection refused, as for a server that is gone.

Counters: ``requests_failed``, ``connections``.
"""

from __future__ import annotations

import socket
import threading
import time

_ERR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
             b"<Message>injected by faultproxy</Message></Error>")


class FaultProxy:
    def __init__(self, upstream_port: int, port: int = 0, host: str = "127.0.0.1"):
        self.upstream = ("127.0.0.1", upstream_port)
        self.host = host
        self.mode = "pass"
        self._fail_left: int | None = None
        self.requests_failed = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self.port = port
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- control -------------------------------------------------------------------------
    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        s.settimeout(0.1)
        self.port = s.getsockname()[1]
        self._listener = s

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "500", "hang", "down"), mode
        with self._lock:
            old, self.mode = self.mode, mode
            self._fail_left = None
            self._drop_all()
            if mode == "down" and self._listener is not None:
                self._listener.close()
                self._listener = None
            elif mode != "down" and old == "down":
                self._listen()

    def fail_next(self, n: int) -> None:
        """The next `n` requests get a 500; afterwards the proxy passes again."""
        with self._lock:
            self.mode = "500"
            self._fail_left = n
            self._drop_all()

    def _drop_all(self) -> None:
        for s in list(self._socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self._socks.clear()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._drop_all()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- serving -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            lst = self._listener
            if lst is None:
                time.sleep(0.05)
                continue
            try:
                c, _ = lst.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                mode = self.mode
                if mode == "500" and self._fail_left is not None:
                    if self._fail_left <= 0:
                        mode = self.mode = "pass"
                        self._fail_left = None
                    else:
                        self._fail_left -= 1
                self.connections += 1
                self._socks.add(c)
            threading.Thread(target=self._serve, args=(c, mode), daemon=True).start()

    def _serve(self, c: socket.socket, mode: str) -> None:
        try:
            if mode == "pass":
                self._pipe(c)
            elif mode == "500":
                self._read_request(c)
                c.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                          b"Connection: close\r\nContent-Length: " + str(len(_ERR_BODY)).encode() + b"\r\n\r\n" + _ERR_BODY)
                with self._lock:
                    self.requests_failed += 1
            elif mode == "hang":
                c.settimeout(0.5)
                while not self._stop.is_set() and c in self._socks:
                    try:
                        if not c.recv(65536):
                            break
                    except socket.timeout:
                        continue
        except OSError:
            pass
        finally:
            with self._lock:
                self._socks.discard(c)
            try:
                c.close()
            except OSError:
                pass

    @staticmethod
    def _read_request(c: socket.socket) -> None:
        c.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = c.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (ln.decode("latin-1").partition(":") for ln in head.split(b"\r\n")[1:])}
        if headers.get("expect", "").lower() == "100-continue":
            return  # answer with the final status at once; the body is never sent
        n = int(headers.get("content-length", "0") or 0)
        while len(body) < n:
            chunk = c.recv(min(1 << 20, n - len(body)))
            if not chunk:
                return
            body += chunk

    def _pipe(self, c: socket.socket) -> None:
        try:
            u = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            return
        u.settimeout(None)
        with self._lock:
            self._socks.add(u)

        def pump(a, b):
            try:
                while True:
                    d = a.recv(1 << 16)
                    if not d:
                        break
                    b.sendall(d)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pump, args=(u, c), daemon=True)
        t.start()
        pump(c, u)
        t.join(5)
        with self._lock:
            self._socks.discard(u)
        u.close()
