"""The normalizer base every exchange's normalizer extends, its counters and the actions it asks
of the live runtime.

A normalizer turns raw text frames into canonical rows. The live collector and the offline
`ingest` call exactly the same methods (`on_connect`, `on_disconnect`, `feed`, `take`), so the
same capture always gives the same rows. Rows go into the column builders (`engine.collect.columns`).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import msgspec
import pyarrow as pa

from engine.collect.columns import GapCols, L2Cols, TradeCols
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS
from engine.log import get_logger
from engine.schema import INSTRUMENTS_SCHEMA, drop_faulty_rows

CHUNK_ROWS = 65_536
_REF_KEYS = ("valid_from", "source", "market", "instrument", "kind")
REF_FIELDS = tuple(n for n in INSTRUMENTS_SCHEMA.names if n not in _REF_KEYS)  # instrument()'s keyword columns
_REF_FIELDS = frozenset(REF_FIELDS)


def fixed_units(s: str, digits: int) -> int:
    """Exact decimal string -> integer in units of 10**-digits ("0.2100", 4 -> 2100; "-1.5", 2 -> -150).

    Raises ValueError on anything that is not a plain decimal or has nonzero digits beyond `digits`.
    """
    neg = s[:1] == "-"
    if neg or s[:1] == "+":
        s = s[1:]
    whole, dot, frac = s.partition(".")
    if not (whole.isdigit() or (whole == "" and dot and frac)):
        raise ValueError(f"bad decimal {s!r}")
    if frac:
        if not frac.isdigit():
            raise ValueError(f"bad decimal {s!r}")
        if len(frac) > digits:
            if frac[digits:].strip("0"):
                raise ValueError(f"too many decimals in {s!r}")
            frac = frac[:digits]
    v = int(whole or "0") * 10**digits + (int(frac.ljust(digits, "0")) if frac else 0)
    return -v if neg else v


@dataclass(slots=True)  # slots: `frames` and `bytes` are bumped on every frame
class Counters:
    frames: int = 0
    bytes: int = 0
    rows_l2: int = 0
    rows_trades: int = 0
    skipped_frames: int = 0
    ignored_frames: int = 0
    skipped_rows: int = 0
    dup_trades: int = 0
    instrument_versions: int = 0
    rest_answers: int = 0
    gaps: int = 0
    reconnects: int = 0
    errors: int = 0
    ts_fallbacks: int = 0
    feed_lag_ns: int | None = None
    last_recv_ns: int | None = None
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["skip_reasons"] = dict(self.skip_reasons)
        return d


class Action:
    """A request from the normalizer to the live runtime (ignored offline)."""

    __slots__ = ("kind", "args")

    def __init__(self, kind: str, **args):
        self.kind = kind  # "reconnect" | "get_snapshot" | "resubscribe" | "error"
        self.args = args

    def __repr__(self) -> str:
        return f"Action({self.kind}, {self.args})"


class BaseNormalizer:
    source = "?"

    def __init__(self, max_skew_ns: int = DEFAULT_MAX_SKEW_NS, log=None):
        self.l2 = L2Cols(self.source, max_skew_ns)
        self.trades = TradeCols(self.source)
        self.gaps = GapCols(self.source)
        self.ref: list[dict[str, Any]] = []  # instruments rows (reference data), see `instrument()`
        self._ref_last: dict[tuple[str, str], dict[str, Any]] = {}
        self.c = Counters()
        self.max_skew_ns = max_skew_ns
        self.actions: list[Action] = []
        self.log = log or get_logger(source=self.source)
        self._skip_logged = 0
        self._skip_log_window = 0.0
        self.conn: int | None = None
        self._implicit_conn = 0
        self.last_frame_recv: int | None = None
        self.pending_gap: tuple[str, int, str] | None = None  # (kind, start_ts, detail) awaiting reconnect

    # -- bad input ------------------------------------------------------------------------------
    def probe(self, decoder, frame: Any):
        """The loose envelope of a frame the typed decoder refused, or None when it is not even
        JSON (counted and logged as `malformed_json`)."""
        try:
            return decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.skip(frame, "malformed_json", e)
            return None

    def skip(self, frame: Any, reason: str, exc: BaseException | None = None) -> None:
        c = self.c
        c.skipped_frames += 1
        key = reason.split(":", 1)[0]
        c.skip_reasons[key] = c.skip_reasons.get(key, 0) + 1
        if self._may_log():
            head = frame[:200] if isinstance(frame, (str, bytes)) else repr(frame)[:200]
            if isinstance(head, bytes):
                head = head.decode("utf-8", "replace")
            self.log.warning("frame_skipped", reason=reason, error=repr(exc)[:200] if exc else None, frame_head=head)

    def _may_log(self) -> bool:
        """At most 20 skip lines a minute (then one saying so); the counters keep every skip."""
        now = time.monotonic()
        if now - self._skip_log_window > 60.0:
            self._skip_log_window, self._skip_logged = now, 0
        self._skip_logged += 1
        if self._skip_logged == 21:
            self.log.warning("frame_skipped_suppressed", note="more skipped frames this minute; see counters")
        return self._skip_logged <= 20

    def admit(self, table: str, t: pa.Table | None) -> pa.Table | None:
        """`t` without the rows append would refuse (a name no partition takes, a value no table
        takes), each counted as a skipped row with its reason: one bad row never costs its chunk.
        One vectorized pass per chunk; the per-message checks stay the fast first line."""
        if t is None or not t.num_rows:
            return t
        t, dropped = drop_faulty_rows(table, t)
        for what, n in dropped.items():
            key = f"refused_{what}"
            self.c.skip_reasons[key] = self.c.skip_reasons.get(key, 0) + n
            self.c.skipped_rows += n
            if table == "trades":
                self.c.rows_trades -= n  # counted when parsed; never stored
            if self._may_log():
                self.log.warning("rows_skipped", reason=key, rows=n, table=table)
        return t

    def bad_run(self, run: tuple, reason: str) -> None:
        """A message whose rows failed the bulk checks at conversion: counted as a skipped frame."""
        self.c.skipped_frames += 1
        key = "bad_rows"
        self.c.skip_reasons[key] = self.c.skip_reasons.get(key, 0) + 1
        self.log.warning("frame_skipped", reason=f"{key}: {reason}", instrument=run[6], recv_ns=run[1], seq=run[8])

    # -- reference data -------------------------------------------------------------------------
    def instrument(self, valid_from: int, market: str, instrument: str, kind: str, **fields: Any) -> None:
        """One version of an instrument (a row of the `instruments` table); the other columns of
        `schema.INSTRUMENTS_SCHEMA` are given by name and default to null. A version equal to the
        last one recorded for this instrument (every column but `valid_from`) is not stored again."""
        unknown = set(fields) - _REF_FIELDS
        if unknown:
            raise TypeError(f"instrument(): unknown column(s) {sorted(unknown)}")
        row = {"market": market, "instrument": instrument, "kind": kind, **{f: fields.get(f) for f in REF_FIELDS}}
        key = (market, instrument)
        if self._ref_last.get(key) == row:
            return
        self._ref_last[key] = row
        self.ref.append({"valid_from": valid_from, "source": self.source, **row})
        self.c.instrument_versions += 1

    def last_instrument(self, market: str, instrument: str) -> dict[str, Any] | None:
        """The last version recorded (or seeded) for an instrument, without `valid_from` and `source`:
        what a partial update (a lifecycle event) is merged into."""
        row = self._ref_last.get((market, instrument))
        return dict(row) if row is not None else None

    def seed_instruments(self, rows: Iterable[dict[str, Any]]) -> None:
        """The latest stored version of each instrument (rows of the `instruments` table, any order of
        versions: the last per instrument by `valid_from` wins), so that a restarted collector does
        not store an unchanged version again."""
        latest: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        for r in rows:
            key = (str(r["market"]), str(r["instrument"]))
            vf = int(r.get("valid_from") or 0)
            if key not in latest or vf >= latest[key][0]:
                latest[key] = (vf, r)
        for key, (_, r) in latest.items():
            self._ref_last[key] = {"market": key[0], "instrument": key[1], "kind": str(r["kind"]),
                                   **{f: r.get(f) for f in REF_FIELDS}}

    def rest(self, recv_ns: int, name: str, body: str) -> None:
        """A REST answer (the body text as received) that the live `Link` fetched and the capture
        recorded as a `rest` meta line: it reaches the normalizer the same way live and offline."""
        self.c.rest_answers += 1
        self.on_rest(recv_ns, name, body)

    def on_rest(self, recv_ns: int, name: str, body: str) -> None:
        """Override to turn a source's REST answers (reference data) into rows; never raise: a bad
        body is a counted, logged skip."""
        self.skip(body, f"unknown_rest: {name!r}")

    # -- gaps -----------------------------------------------------------------------------------
    def gap(self, market: str, instrument: str | None, start: int, end: int, kind: str, detail: str) -> None:
        self.gaps.add(market, instrument, start, end, kind, detail)
        self.c.gaps += 1
        self.log.warning("gap", market=market, instrument=instrument, kind=kind, start_ts=start, end_ts=end, detail=detail)

    def markets(self) -> Iterable[str]:  # markets known on the current connection
        return ()

    def emit_pending_gap(self, end_ns: int) -> None:
        if self.pending_gap is None:
            return
        kind, start, detail = self.pending_gap
        self.pending_gap = None
        for m in sorted(self.markets()):
            self.gap(m, None, start, end_ns, kind, detail)

    # -- connection lifecycle (meta lines) -------------------------------------------------------
    def on_connect(self, recv_ns: int, conn: int | None = None, **meta) -> None:
        if conn is None:
            self._implicit_conn += 1
            conn = -self._implicit_conn
        self.conn = conn
        self.reset_connection(recv_ns, **meta)
        self.emit_pending_gap(recv_ns)

    def on_disconnect(self, recv_ns: int, reason: str = "") -> None:
        kind = "stale" if reason.startswith("stale") else "disconnect"
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        if self.pending_gap is None:
            self.pending_gap = (kind, start, f"{kind}: {reason}"[:500])
        self.invalidate_all()
        self.conn = None

    def reset_connection(self, recv_ns: int, **meta) -> None:  # per-connection state
        pass

    def invalidate_all(self) -> None:
        pass

    # -- output ---------------------------------------------------------------------------------
    def rows_pending(self) -> int:
        return self.l2.rows + self.trades.rows + self.gaps.rows + len(self.ref)

    def take(self) -> dict[str, pa.Table]:
        out = {}
        self.c.last_recv_ns = self.last_frame_recv
        l2 = self.l2.take(self.bad_run)  # first: a bad run found here can add a gap row
        self.c.ts_fallbacks = self.l2.ts_fallbacks
        if self.l2.last_lag is not None:
            self.c.feed_lag_ns = self.l2.last_lag
        g = self.admit("gaps", self.gaps.take())
        if g is not None and g.num_rows:
            out["gaps"] = g
        l2 = self.admit("l2", l2)
        if l2 is not None and l2.num_rows:
            out["l2"] = l2
            self.c.rows_l2 += l2.num_rows
        t = self.admit("trades", self.trades.take())
        if t is not None and t.num_rows:
            out["trades"] = t
        if self.ref:
            rows, self.ref = self.ref, []
            r = self.admit("instruments", pa.Table.from_pylist(rows, schema=INSTRUMENTS_SCHEMA))
            if r is not None and r.num_rows:
                out["instruments"] = r
        return out

    def pop_actions(self) -> list[Action]:
        a, self.actions = self.actions, []
        return a

    def restart_gaps(self, markets: Iterable[str], start_ns: int, end_ns: int, detail: str = "collector restart") -> None:
        for m in sorted(set(markets)):
            self.gap(m, None, start_ns, end_ns, "restart", detail)


def tune_gc() -> None:
    """Long-lived allocation-heavy process: freeze start-up objects and collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
