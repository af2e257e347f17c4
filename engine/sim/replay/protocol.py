"""`ReplayProtocol`: what one exchange says on the replay exchange, behind one interface.

The server core (`server.py`) owns the playback clock, the feed loop, faults, connections, the
WebSocket and HTTP plumbing and the time shifts (`at_present`, looped passes); it never asks which
exchange it serves. A protocol owns the rest: what it learns from the capture before playback, how
a captured frame changes its books and reaches the subscribed clients, the client's command
session, the REST answers and the URL paths. Protocols are registered by name in
`engine.sim.registry`; the server builds one instance per server (`protocol_cls(server)`).

Also here: the small helpers protocols share (JSON codec, JSON HTTP responses, moving an RFC 3339
time by whole seconds).
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from engine.collect.sources import parse_ts

if TYPE_CHECKING:  # pragma: no cover
    from engine.sim.replay.conn import Conn
    from engine.sim.replay.server import ReplayServer


class WireRows(NamedTuple):
    """Rows of one table and market carried by one sent frame: `seq` is the sequence number they
    carry into the lake (None: none), `snapshot` whether they are book snapshot rows."""

    table: str  # "l2" or "trades"
    market: str  # the lake's `market` column
    rows: int
    snapshot: bool
    seq: int | None

dec = msgspec.json.decode
enc = msgspec.json.Encoder().encode  # -> bytes; `.decode()` for a text frame


class ReplayProtocol:
    """One exchange's side of the replay exchange; subclass and register it (engine.sim.registry).

    Hooks, in the order the server calls them:

    * `prescan(records)` once, off the event loop, before listening: learn what the capture holds
      (products, markets) and return its first `recv_ns` (the clock's start, the `at_present` shift).
    * `is_preamble(frame)` (only when `has_preamble`): frames applied before any client connects,
      so a first subscribe is answered at once (Kalshi's acks and initial snapshot burst).
    * `on_meta(meta)` for each capture meta line, `on_frame(text)` for each captured frame, in
      playback order: update the protocol's state and hand the clients their frames through
      `server.deliver(targets, make)` (which applies drops). When `server.shift_ns` is non-zero,
      `on_frame` moves the frame's exchange times with `shift(obj)` (the `at_present` shift plus
      whole capture lengths on looped passes; `server.shift_pass` counts the passes).
    * `new_conn_state()` per connection (kept as `conn.state`), `session(conn)` runs the client's
      command loop until it leaves; `is_subscribed(conn)` tells the clock whether to run;
      `jump_seq(conn, k)` applies a `seq_jump` fault, `corrupt(k)` a `corrupt` fault (book
      messages damaged so the venue's checksum fails; only for a venue that sends one).
    * `wire_rows(text)` (optional, for benchmarks): the rows a collector stores from a sent frame.
    * HTTP: `rest(path, query)` answers GETs under `rest_prefix` (when set); `check_request(path,
      request)` may refuse a WebSocket upgrade (wrong path, bad auth) with a `Response`.
    """

    ws_path: str = ""  # the WebSocket path clients connect to ("" = the server root; any path is accepted)
    rest_prefix: str = ""  # GETs under this path go to `rest()` ("" = no REST)
    has_preamble: bool = False  # apply the capture's leading `is_preamble` frames before clients connect

    def __init__(self, server: ReplayServer):
        self.server = server

    # ------------------------------------------------------------------------------------------ capture

    def prescan(self, records: Iterable[dict]) -> int | None:
        """The capture's first `recv_ns` (None if it has none); override to learn more on the way."""
        for rec in records:
            if "recv_ns" in rec:
                return rec["recv_ns"]
        return None

    def is_preamble(self, frame: str) -> bool:
        return False

    def on_meta(self, meta: dict) -> None:
        """A capture meta line (`connect` / `disconnect`)."""

    def on_frame(self, text: str) -> None:
        raise NotImplementedError

    def shift(self, obj: dict) -> None:
        """Move a captured message's exchange times by `server.shift_ns` (in place)."""

    def wire_rows(self, text: str) -> list[WireRows]:
        """The canonical rows a collector stores from a frame this exchange sent (benchmarks count
        rows in on the wire with it, to compare with the rows stored). Default: none."""
        return []

    # ------------------------------------------------------------------------------------------ connections

    def new_conn_state(self) -> Any:
        return None

    def is_subscribed(self, conn: Conn) -> bool:
        raise NotImplementedError

    def jump_seq(self, conn: Conn, k: int) -> None:
        """A `seq_jump` fault: the connection's sequence numbers jump by `k`."""

    def corrupt(self, k: int) -> bool:
        """A `corrupt` fault: the next `k` book messages go out with a level changed, their checksum
        kept, so the subscriber's book checksum fails (counted in `server.counters["corrupted"]`).
        False: this exchange sends no checksum, the fault is not supported."""
        return False

    async def session(self, conn: Conn) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ HTTP

    def rest(self, path: str, query: dict[str, list[str]]) -> Response:
        return json_response(404, {"error": {"code": "not_found", "message": path}})

    def check_request(self, path: str, request: Request) -> Response | None:
        return None


# ---------------------------------------------------------------------------------------------- helpers


def json_response(status: int, obj: Any) -> Response:
    body = json.dumps(obj, separators=(",", ":")).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(status, "Error")
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                       ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return Response(status, reason, headers, body)


_SHIFTED: dict[tuple[str, int], str | None] = {}  # (whole-second prefix, shift) -> shifted prefix


def shift_rfc3339(s: str, shift_ns: int) -> str:
    """An RFC 3339 UTC time moved by a whole number of seconds, its fraction kept as written (one
    conversion per distinct second: looped passes run at full replay speed). A time that does not
    parse is sent as it is: the collector's own checks deal with it."""
    if len(s) < 20 or s[-1] not in "Zz" or s[19] not in ".Zz":
        return s
    key = (s[:19], shift_ns)
    head = _SHIFTED.get(key)
    if head is None and key not in _SHIFTED:
        try:
            t = parse_ts(s[:19] + "Z")
            head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((t + shift_ns) // 10**9))
        except (ValueError, IndexError):
            head = None
        if len(_SHIFTED) > 100_000:
            _SHIFTED.clear()
        _SHIFTED[key] = head
    return s if head is None else head + s[19:]
