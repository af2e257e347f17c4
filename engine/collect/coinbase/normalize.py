"""Coinbase Advanced Trade: normalization of decoded frames into canonical rows.

Traps handled here (see exchange-protocols.md §1.2):
- `sequence_num` is one counter per connection shared by all channels: a jump cannot be attributed,
  so every book on the connection is invalidated, a `sequence` gap row is written per market and
  the runtime is asked to reconnect (there is no snapshot request on this feed).
- `market_trades.side` is the MAKER side: taker = opposite. Trade snapshots repeat after each
  reconnect: dedupe on (product, trade_id).
- RFC 3339 timestamps with 3-9 fractional digits; snapshot `event_time` may be bogus (1970).
- `new_quantity` is the absolute size at the level (0 removes it).
"""

from __future__ import annotations

from typing import Iterable

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.collect.base import Action, BaseNormalizer
from engine.collect.coinbase import wire
from engine.collect.coinbase.reference import KIND as PRODUCT_KIND
from engine.collect.coinbase.reference import product_fields
from engine.collect.coinbase.wire import (
    IGNORED_CHANNELS,
    SOURCE,
    L2Msg,
    L2Update,
    RawL2Event,
    RawL2Msg,
    RawL2Update,
    Side,
    SubsMsg,
    TradesMsg,
    UpdateEvent,
)
from engine.collect.columns import absurd_runs, const_dict, dict_runs, float_array, int_array
from engine.collect.timestamps import DEFAULT_MAX_SKEW_NS, bulk_ts, parse_ts, settle_ts
from engine.schema import L2_SCHEMA

# trade ids remembered per product for dedupe beyond the floor: a (re)connect snapshot repeats at
# most the last few dozen trades, so 10k-20k recent ids (not hundreds of thousands) is ample memory
TRADE_ID_WINDOW = 10_000

_TAKER = {"SELL": "buy", "BUY": "sell", "sell": "buy", "buy": "sell"}
_SIDES = pa.array(["bid", "ask"], pa.string())  # side dictionary: index 0 = bid, 1 = offer or ask
_BID = Side.BID
_SIDE_OF = wire.SIDE_OF
# assigned, not imported: a method call on an imported name compiles to a slower LOAD_ATTR + CALL
_decoder = wire.decoder
_raw_decoder = wire.raw_decoder
_probe = wire.probe_decoder


class _Bad(Exception):
    pass


def _arrow_floats(prices: tuple[str, ...], sizes: tuple[str, ...]) -> tuple[list | tuple, list | tuple]:
    """Raw decimal strings -> floats exactly as Arrow's cast converts them. When Arrow cannot read
    one, the strings stay raw: the chunk's read-out then gives this event NaN rows, so it is dropped
    and reported at conversion like any absurd value."""
    try:
        cast = pc.cast
        return (cast(pa.array(prices, pa.string()), pa.float64()).to_pylist(),
                cast(pa.array(sizes, pa.string()), pa.float64()).to_pylist())
    except Exception:  # noqa: BLE001
        return prices, sizes


class L2Chunk:
    """Coinbase l2 rows awaiting conversion.

    Per message only the decoded update Structs and one run tuple per event
    `(n, recv_ns, seq, envelope_time, product_id, snapshot)` are appended. Every `sub_rows` rows,
    while the Structs are still in the CPU cache, their columns (price, size, side, event time) are
    read out in bulk, so no Python code runs per row, and the Structs are
    released (numbers Arrow could not read, from the raw fallback, become NaN). `take` checks the
    values and builds one Arrow table: event times are parsed once per stretch of rows sharing one
    (in the recordings the updates of a message always do, consecutive messages often); one that is
    unparseable or further than `max_skew_ns` from the receive time falls back to the envelope time,
    then to the receive time (counted in `ts_fallbacks`). An event holding a NaN/inf price or size,
    a negative size or a non-positive price is dropped and reported through `on_bad`, in message order.
    """

    __slots__ = ("ups", "runs", "rows", "flush_at", "sub_rows", "done", "unreadable", "price", "size", "ask", "et", "et_n",
                 "max_skew_ns", "ts_fallbacks", "last_lag")

    def __init__(self, max_skew_ns: int = DEFAULT_MAX_SKEW_NS, sub_rows: int = 4096):
        self.max_skew_ns = max_skew_ns
        self.sub_rows = sub_rows
        self.ts_fallbacks = 0
        self.last_lag: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.ups: list[L2Update] = []  # Structs not read out yet
        self.runs: list[tuple[int, int, int, str, str, bool]] = []  # their events
        self.done: list[tuple[int, int, int, str, str, bool]] = []  # events read out
        self.unreadable: dict[int, str] = {}  # index in `done` -> why its numbers could not be read
        self.price: list[np.ndarray] = []
        self.size: list[np.ndarray] = []
        self.ask = bytearray()  # 1 = ask, 0 = bid
        self.et: list[str] = []  # event times, one per stretch of rows carrying the same one
        self.et_n: list[np.ndarray] = []  # the stretches' lengths
        self.rows = 0  # rows pending in this chunk
        self.flush_at = self.sub_rows  # read the Structs out when `rows` reaches this

    @staticmethod
    def as_l2_run(r: tuple) -> tuple:
        """An event's run in the layout of `L2Cols` runs, for `BaseNormalizer.bad_run`."""
        n, recv, seq, env, pid, snap = r
        return (n, recv, None, None, env, pid, pid, None, seq, snap)

    def flush(self) -> None:
        """Reads the pending Structs out into columns and releases them."""
        ups, runs = self.ups, self.runs
        if not runs:
            return
        self.ups, self.runs = [], []
        self.flush_at = self.rows + self.sub_rows
        try:
            pr = float_array([u.price_level for u in ups])
            sz = float_array([u.new_quantity for u in ups])
        except Exception:  # noqa: BLE001 - a raw number Arrow cannot read: NaN rows, reported at take in order
            prs, szs, row = [], [], 0
            for i, r in enumerate(runs, len(self.done)):
                ev = ups[row:row + r[0]]
                row += r[0]
                try:
                    p, q = float_array([u.price_level for u in ev]), float_array([u.new_quantity for u in ev])
                except Exception as e:  # noqa: BLE001
                    p = q = np.full(r[0], np.nan)
                    self.unreadable[i] = f"conversion failed: {e!r}"[:200]
                prs.append(p)
                szs.append(q)
            pr, sz = np.concatenate(prs), np.concatenate(szs)
        self.price.append(pr)
        self.size.append(sz)
        self.ask += bytes([u.side is not _BID for u in ups])
        # the updates of a message (and often of many) share one event time: keep one per stretch
        et = np.array([u.event_time for u in ups], object)
        starts = np.flatnonzero(et[1:] != et[:-1]) + 1
        self.et += et[0:1].tolist() + et[starts].tolist()
        self.et_n.append(np.diff(starts, prepend=0, append=len(et)))
        self.done += runs

    def take(self, on_bad=None) -> pa.Table | None:
        """All rows of the chunk as one table; `on_bad(run, reason)` hears of every dropped event."""
        self.flush()
        runs = self.done
        if not runs:
            self._reset()
            return None
        pr, sz = np.concatenate(self.price), np.concatenate(self.size)
        ask = np.frombuffer(self.ask, np.uint8).astype(np.int32)
        ts = np.repeat(bulk_ts(self.et), np.concatenate(self.et_n))  # one parse per stretch
        unreadable = self.unreadable
        self._reset()
        n_, recv_, seq_, env_, pid_, snap_ = zip(*runs)
        counts = int_array(n_)
        absurd = absurd_runs(pr, sz, counts)
        if absurd is not None:  # drop the events holding absurd values, keep the rest
            bad_ev, keep_ev, keep_row = absurd
            if on_bad is not None:
                for i in bad_ev:
                    on_bad(self.as_l2_run(runs[i]), unreadable.get(i, "absurd price or size"))
            runs = [r for r, k in zip(runs, keep_ev.tolist()) if k]
            if not runs:
                return None
            pr, sz, ask, ts = pr[keep_row], sz[keep_row], ask[keep_row], ts[keep_row]
            n_, recv_, seq_, env_, pid_, snap_ = zip(*runs)
            counts = int_array(n_)
        n = len(pr)
        recv = np.repeat(int_array(recv_), counts)
        self.ts_fallbacks += settle_ts(ts, recv, lambda bad: np.repeat(bulk_ts(list(env_)), counts), self.max_skew_ns)
        self.last_lag = int(recv[-1] - ts[-1])
        mkt = dict_runs(list(pid_), counts)
        cols = [
            pa.array(ts, pa.int64()),
            pa.array(recv, pa.int64()),
            const_dict(SOURCE, n),
            mkt,
            mkt,  # instrument == market on Coinbase
            pa.DictionaryArray.from_arrays(pa.array(ask, pa.int32()), _SIDES),
            pa.array(pr, pa.float64()),
            pa.array(sz, pa.float64()),
            pa.array(np.repeat(int_array(seq_), counts), pa.int64()),
            pa.array(np.repeat(np.array(snap_, bool), counts) if any(snap_) else np.zeros(n, bool), pa.bool_()),
        ]
        return pa.Table.from_arrays(cols, schema=L2_SCHEMA)


class CoinbaseNormalizer(BaseNormalizer):
    source = SOURCE

    def __init__(self, max_skew_ns: int = DEFAULT_MAX_SKEW_NS, products: Iterable[str] = (), log=None):
        super().__init__(max_skew_ns=max_skew_ns, log=log)
        self.l2 = L2Chunk(max_skew_ns)
        self.valid: set[str] = set()  # products whose book is complete on the current connection
        self.known: set[str] = set(products)
        self.last_seq: int | None = None
        self.explicit_conns = False
        self.trade_floor: dict[str, int] = {}
        self.trade_seen: dict[str, set[int]] = {}
        self._et_s = ""
        self._et_v = 0

    # ---- state ------------------------------------------------------------------------------
    def markets(self) -> Iterable[str]:
        return self.known

    def seed_trade_ids(self, max_ids: dict[str, int]) -> None:
        """Max stored trade_id per product (from the lake) so reconnect snapshots do not duplicate."""
        for p, v in max_ids.items():
            self.trade_floor[p] = max(self.trade_floor.get(p, -1), int(v))

    def on_connect(self, recv_ns: int, conn: int | None = None, **meta) -> None:
        if conn is not None:
            self.explicit_conns = True
        super().on_connect(recv_ns, conn, **meta)

    def reset_connection(self, recv_ns: int, **meta) -> None:
        self.last_seq = None
        self.valid.clear()

    def invalidate_all(self) -> None:
        self.valid.clear()

    # ---- reference data (REST answers the link fetched; recorded in the capture) ----------------
    def on_rest(self, recv_ns: int, name: str, body: str) -> None:
        """`product` (`GET /products/{id}`) or `products` (`GET /products`): one version per product;
        a bad product is a counted skip, the others of the answer are kept."""
        if name not in ("product", "products"):
            return super().on_rest(recv_ns, name, body)
        try:
            raws = wire.products_decoder.decode(body) if name == "products" else [body]
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.skip(body, f"bad_rest_{name}", e)
            return
        for raw in raws:
            try:
                p = wire.product_decoder.decode(raw)
                self.instrument(recv_ns, p.id, p.id, PRODUCT_KIND, **product_fields(p))
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                self.skip(raw if isinstance(raw, str) else bytes(raw), f"bad_rest_{name}", e)

    # ---- frames -----------------------------------------------------------------------------
    def feed(self, recv_ns: int, frame: str | bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes += len(frame)
        try:
            msg = _decoder.decode(frame)
        except msgspec.ValidationError:
            try:  # numbers msgspec does not parse, or not a frame we know: exactly as before
                msg = _raw_decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self._untyped(recv_ns, frame, e)
                return
        except msgspec.DecodeError as e:  # malformed JSON
            self._untyped(recv_ns, frame, e)
            return
        cls = type(msg)
        if cls is L2Msg:
            # the steady state, exactly as the general path below handles it: the next frame on the
            # connection, one update event of a valid book (valid implies connected: see on_disconnect)
            seq = msg.sequence_num
            evs = msg.events
            if seq - 1 == self.last_seq and len(evs) == 1:
                ev = evs[0]
                pid = ev.product_id
                ups = ev.updates
                if type(ev) is UpdateEvent and ups and pid in self.valid:
                    self.last_seq = seq
                    self.last_frame_recv = recv_ns
                    l2 = self.l2
                    l2.ups += ups
                    n = len(ups)
                    l2.runs.append((n, recv_ns, seq, msg.timestamp, pid, False))
                    l2.rows += n
                    if l2.rows >= l2.flush_at:
                        l2.flush()
                    return
        if self.conn is None:
            self.on_connect(recv_ns)
        seq, last = msg.sequence_num, self.last_seq
        if last is not None and seq == last + 1:
            self.last_seq = seq
        elif not self._sequence(recv_ns, seq, frame):
            return
        self.last_frame_recv = recv_ns
        if cls is L2Msg or cls is RawL2Msg:
            try:
                self._l2(recv_ns, msg)
            except _Bad as e:
                self._bad_l2(recv_ns, frame, msg, str(e))
        elif cls is TradesMsg:
            self._trades(recv_ns, msg, frame)
        elif cls is SubsMsg:
            for ev in msg.events:
                for ch, prods in ev.subscriptions.items():
                    if ch in ("level2", "market_trades"):
                        self.known.update(prods)

    def _untyped(self, recv_ns: int, frame, exc) -> None:
        p = self.probe(_probe, frame)
        if p is None:
            return
        if p.type == "error":
            self.c.errors += 1
            self.log.error("exchange_error", message=p.message, reason=p.reason, frame_head=str(frame[:200]))
            self.actions.append(Action("error", message=p.message, reason=p.reason))
            return
        if p.channel in IGNORED_CHANNELS and p.sequence_num is not None:
            if self.conn is None:
                self.on_connect(recv_ns)
            if self._sequence(recv_ns, p.sequence_num, frame):
                self.last_frame_recv = recv_ns
                self.c.ignored_frames += 1
            return
        if p.channel == "l2_data" and p.sequence_num is not None:
            # a book update we cannot read: the books of this connection can no longer be trusted
            if self.conn is None:
                self.on_connect(recv_ns)
            if self._sequence(recv_ns, p.sequence_num, frame):
                self.last_frame_recv = recv_ns
                self._bad_l2(recv_ns, frame, None, f"bad_l2_data: {exc}")
            return
        if p.sequence_num is not None and p.channel in ("market_trades", "heartbeats", "subscriptions"):
            if self.conn is None:
                self.on_connect(recv_ns)
            if self._sequence(recv_ns, p.sequence_num, frame):
                self.last_frame_recv = recv_ns
            self.skip(frame, f"bad_{p.channel}", exc)
            return
        self.skip(frame, "unknown_message" if p.channel or p.type else "missing_fields", exc)

    def _sequence(self, recv_ns: int, seq: int, frame) -> bool:
        last = self.last_seq
        if last is None or seq == last + 1:
            self.last_seq = seq
            return True
        if seq <= last:
            if seq == 0 and not self.explicit_conns:
                # capture without meta lines: a sequence restart is a new connection
                self.on_disconnect(recv_ns, "sequence restart (new connection)")
                self.on_connect(recv_ns)
                self.last_seq = 0
                return True
            self.skip(frame, f"out_of_order: sequence_num {seq} after {last}")
            return False
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        for m in sorted(self.known):
            self.gap(m, None, start, recv_ns, "sequence", f"sequence_num jumped {last} -> {seq} on connection {self.conn}")
        self.invalidate_all()
        self.actions.append(Action("reconnect", reason=f"sequence: sequence_num jumped {last} -> {seq}"))
        self.last_seq = seq
        return True

    def _bad_l2(self, recv_ns: int, frame, msg, reason: str) -> None:
        self.skip(frame, reason)
        prods = sorted({ev.product_id for ev in msg.events}) if msg is not None else sorted(self.known)
        start = self.last_frame_recv if self.last_frame_recv is not None else recv_ns
        hit = [p for p in prods if p in self.valid]
        for p in hit:
            self.gap(p, None, start, recv_ns, "sequence", f"unreadable l2_data frame: {reason}"[:300])
            self.valid.discard(p)
        if hit:
            self.actions.append(Action("reconnect", reason=f"sequence: unreadable l2_data frame ({reason})"[:300]))

    def _ts(self, s: str, recv_ns: int, env: str) -> int:
        if s == self._et_s:
            t = self._et_v
        else:
            try:
                t = parse_ts(s)
            except (ValueError, IndexError):
                t = None
            if t is not None:
                self._et_s, self._et_v = s, t
        if t is not None and -self.max_skew_ns < recv_ns - t < self.max_skew_ns:
            return t
        if env:
            try:
                t = parse_ts(env)
            except (ValueError, IndexError):
                raise _Bad(f"bad timestamp {s!r} / {env!r}") from None
            if -self.max_skew_ns < recv_ns - t < self.max_skew_ns:
                return t
        raise _Bad(f"timestamp far from receive time: {s!r}")

    def _l2(self, recv_ns: int, msg: L2Msg | RawL2Msg) -> None:
        seq = msg.sequence_num
        env = msg.timestamp
        l2 = self.l2
        for ev in msg.events:
            ups = ev.updates
            n = len(ups)
            typ = ev.type
            pid = ev.product_id
            if typ == "snapshot":
                snap = True
            elif typ == "update":
                snap = False
                if pid not in self.valid:
                    self.c.skipped_rows += n
                    continue
            else:
                raise _Bad(f"unknown l2 event type {typ!r}")
            if not n:
                continue
            raw = type(ev) is RawL2Event
            if raw:
                ups = self._typed(ups)
            if snap:
                self.valid.add(pid)
                self.known.add(pid)
            l2.ups += ups
            l2.runs.append((n, recv_ns, seq, env, pid, snap))
            l2.rows += n
        if l2.rows >= l2.flush_at:
            l2.flush()

    @staticmethod
    def _typed(raw: list[RawL2Update]) -> list[L2Update]:
        """Updates of the raw fallback view as typed Structs; an unknown side is a bad frame. Numbers
        as Arrow's cast reads them (kept raw when Arrow cannot, so the chunk's conversion reports
        this message)."""
        try:
            sides = [_SIDE_OF[u.side] for u in raw]
        except KeyError as e:
            raise _Bad(f"unknown side {e.args[0]!r}") from None
        prices, sizes = _arrow_floats(tuple(u.price_level for u in raw), tuple(u.new_quantity for u in raw))
        return [L2Update(side=sd, event_time=u.event_time, price_level=p, new_quantity=q)
                for sd, u, p, q in zip(sides, raw, prices, sizes)]

    def bad_run(self, run: tuple, reason: str) -> None:
        """Rows of one l2 message failed the bulk checks: the book of that product is no longer known."""
        super().bad_run(run, reason)
        pid, recv = run[6], run[1]
        if pid in self.valid:
            self.valid.discard(pid)
            self.gap(pid, None, recv, recv, "sequence", f"unreadable l2_data frame: {reason}")
            self.actions.append(Action("reconnect", reason=f"sequence: unreadable l2_data frame for {pid} ({reason})"))

    def _trades(self, recv_ns: int, msg: TradesMsg, frame) -> None:
        seq = msg.sequence_num
        env = msg.timestamp
        good = []
        for ev in msg.events:
            for tr in ev.trades:
                try:
                    tid = int(tr.trade_id)
                    side = _TAKER[tr.side]
                    if not (tr.price > 0.0 and tr.size > 0.0) or tr.price == float("inf") or tr.size == float("inf"):
                        raise _Bad("absurd price or size")
                    ts = self._ts(tr.time, recv_ns, env)
                except (ValueError, KeyError, _Bad) as e:
                    self.skip(frame, "bad_trade", e)
                    continue
                good.append((tid, ts, side, tr))
        add = self.trades.add
        for tid, ts, side, tr in good:
            p = tr.product_id
            seen = self.trade_seen.get(p)
            if seen is None:
                seen = self.trade_seen[p] = set()
            if tid <= self.trade_floor.get(p, -1) or tid in seen:
                self.c.dup_trades += 1
                continue
            seen.add(tid)
            if len(seen) > 2 * TRADE_ID_WINDOW:
                keep = sorted(seen)[-TRADE_ID_WINDOW:]
                self.trade_floor[p] = max(self.trade_floor.get(p, -1), keep[0] - 1)
                self.trade_seen[p] = set(keep)
            self.known.add(p)
            add(ts, recv_ns, p, p, side, tr.price, tr.size, tr.trade_id, seq)
            self.c.rows_trades += 1
