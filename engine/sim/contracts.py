"""A lake of binary range contracts priced off a simulated spot, with their reference data.

What `contract_view`'s tests, benchmark and plot need and the plain synthetic rows lack: a spot book
(one level a side) on a random walk; each contract's YES book quoting the model probability of
settling YES given that spot and the time left (normal moves of `sigma` dollars per √second);
trades at those quotes; and the `instruments` versions a collector records: listing, opening, an
optional close-time change, the determination (the result, from the spot at close) and settlement.
Recorded gaps (a fresh snapshot after each) and quiet spells (no update, nothing recorded) can be
put on the spot, the whole series or one contract. Times are absolute ns: callers pass a window
ending near now, so the lake is always recent.

    lake = plan(start, end, seed=1)                 # everything computed, nothing written
    write(eng, lake)                                # append l2, trades, gaps, instruments; flush
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine import schema
from engine.sim.kalshi.markets import kalshi_event_code
from engine.sim.synth import _dict

S = 10**9
_PHI = np.frompyfunc(lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))), 1, 1)


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return _PHI(np.asarray(x, dtype=np.float64)).astype(np.float64)


@dataclass(frozen=True)
class Contract:
    """One contract as generated: its terms, the truth it settled on, and the versions written."""

    ticker: str
    strike_type: str  # between | greater | less
    floor_strike: float | None
    cap_strike: float | None
    open_ts: int
    close_ts: int  # final close (after a change)
    first_close_ts: int  # as listed
    changed_at: int | None  # valid_from of the close-time change, if any
    result: str | None  # yes | no; None when not determined by the lake's end
    versions: tuple[dict, ...]


@dataclass(frozen=True, eq=False)
class ContractLake:
    source: str
    series: str
    spot_source: str
    spot_market: str
    start: int
    end: int
    contracts: tuple[Contract, ...]
    spot_ts: np.ndarray  # the true spot path (every move, recorded or not)
    spot_mid: np.ndarray
    tables: dict[str, list[pa.Table]] = field(repr=False)

    def contract(self, ticker: str) -> Contract:
        return next(c for c in self.contracts if c.ticker == ticker)

    def spot_at(self, t) -> np.ndarray:
        i = np.searchsorted(self.spot_ts, np.asarray(t, dtype=np.int64), side="right") - 1
        return self.spot_mid[np.maximum(i, 0)]


def _prob(c_type: str, floor, cap, spot: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """P(settles YES) when the spot at close is normal around `spot` with deviation `sd`."""
    if c_type == "greater":
        return 1.0 - normal_cdf((floor - spot) / sd)
    if c_type == "less":
        return normal_cdf((cap - spot) / sd)
    return normal_cdf((cap + 0.01 - spot) / sd) - normal_cdf((floor - spot) / sd)


def _settles_yes(c_type: str, floor, cap, x: float) -> bool:
    x = round(x, 2)
    if c_type == "greater":
        return x > floor
    if c_type == "less":
        return x < cap
    return floor <= x <= cap


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _windows(keys: Sequence[tuple[str, int, int]], *names: str) -> list[tuple[int, int]]:
    return [(a, b) for k, a, b in keys if k in names]


def _drop_in(t: np.ndarray, wins: list[tuple[int, int]]) -> np.ndarray:
    keep = np.ones(len(t), dtype=bool)
    for a, b in wins:
        keep &= ~((t >= a) & (t < b))
    return keep


def _events(rng, lo: int, hi: int, rate: float) -> np.ndarray:
    """Update times in [lo, hi): lo itself (the first snapshot) then a Poisson stream."""
    n = int((hi - lo) / S * rate * 1.3) + 8
    t = lo + np.cumsum(rng.exponential(S / rate, n).astype(np.int64) + 1)
    return np.concatenate([[lo], t[t < hi]]).astype(np.int64)


def _book_rows(rng, ts: np.ndarray, snap: np.ndarray, bid: np.ndarray, ask: np.ndarray, has_bid: np.ndarray,
               has_ask: np.ndarray, size: np.ndarray, seq0: int) -> dict[str, np.ndarray]:
    """One-level books as l2 rows: a snapshot sets the levels; any other update removes the previous
    levels (size 0) and sets the new ones, in one message (same ts, recv_ts and seq); messages
    arrive in time order, 0.2-8 ms after their time."""
    n = len(ts)
    pb, pa_ = np.roll(bid, 1), np.roll(ask, 1)
    phb, pha = np.roll(has_bid, 1), np.roll(has_ask, 1)
    # per update: [remove bid, remove ask, set bid, set ask]
    side = np.tile(np.array([0, 1, 0, 1]), (n, 1))
    price = np.stack([pb, pa_, bid, ask], axis=1)
    sz = np.stack([np.zeros(n), np.zeros(n), size, size], axis=1)
    keep = np.stack([phb & ~snap, pha & ~snap, has_bid, has_ask], axis=1)
    keep[0, :2] = False
    rep = lambda x: np.repeat(x, 4).reshape(n, 4)  # noqa: E731
    k = keep.ravel()
    recv = np.maximum.accumulate(ts + rng.integers(200_000, 8_000_000, n))
    return {"ts": rep(ts).ravel()[k], "recv_ts": rep(recv).ravel()[k], "side": side.ravel()[k], "price": np.round(price.ravel()[k], 2),
            "size": sz.ravel()[k], "seq": rep(seq0 + np.arange(n)).ravel()[k], "snapshot": rep(snap).ravel()[k]}


def _l2_table(source: str, market: str, instruments: list[str], inst_idx: np.ndarray, r: dict) -> pa.Table:
    n = len(r["ts"])
    return pa.table({
        "ts": r["ts"], "recv_ts": r["recv_ts"],
        "source": _dict([source], np.zeros(n)), "market": _dict([market], np.zeros(n)),
        "instrument": _dict(instruments, inst_idx), "side": _dict(["bid", "ask"], r["side"]),
        "price": r["price"].astype(np.float64), "size": r["size"].astype(np.float64),
        "seq": r["seq"].astype(np.int64), "snapshot": r["snapshot"].astype(bool),
    }, schema=schema.L2_SCHEMA)


def _plain(table: str) -> pa.Schema:
    return pa.schema([pa.field(f.name, pa.string() if pa.types.is_dictionary(f.type) else f.type)
                      for f in schema.spec(table).schema])


def _spot(rng, start: int, end: int, spot0: float, sigma: float, rate: float, gaps, quiet):
    """The true spot path (every move) and the l2 rows of the updates recorded: a snapshot first and
    after each gap, none during gaps or quiet spells."""
    st = _events(rng, start, end, rate)
    mid = spot0 + np.cumsum(rng.normal(0.0, sigma * np.sqrt(np.diff(st, prepend=st[0]) / S)))
    keep = _drop_in(st, gaps + quiet)
    resnap = np.array(sorted(b for _, b in gaps if start < b < end), dtype=np.int64)
    ts = np.concatenate([st[keep], resnap])
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    snap = np.concatenate([np.zeros(keep.sum(), bool), np.ones(len(resnap), bool)])[order]
    snap[0] = True
    m = mid[np.searchsorted(st, ts, side="right") - 1]
    spread = rng.integers(1, 40, len(ts)) * 0.01
    bid = np.round(np.floor(m * 100) / 100 - np.floor(spread * 50) / 100, 2)
    ask = np.round(bid + spread, 2)
    size = np.round(rng.random(len(ts)) * 2 + 0.001, 6)
    every = np.ones(len(ts), bool)
    return st, mid, _book_rows(rng, ts, snap, bid, ask, every, every, size, 0)


def _terms(series: str, code: str, center: float, buckets: int, width: float) -> list[tuple]:
    """(ticker, strike_type, floor, cap) of one event: `buckets` ranges around `center`, two tails."""
    lows = [center + (k - buckets // 2) * width - width / 2 for k in range(buckets)]
    top = lows[-1] + width - 0.01
    return ([(f"{series}-{code}-T{_fmt(lows[0])}", "less", None, lows[0])]
            + [(f"{series}-{code}-B{_fmt(lo + width / 2)}", "between", lo, lo + width - 0.01) for lo in lows]
            + [(f"{series}-{code}-T{_fmt(top)}", "greater", top, None)])


def _contract(rng, term: tuple, lo: int, hi: int, close: int, spot_at, sigma: float, rates: tuple[float, float],
              gaps, quiet, seq0: int):
    """One contract's book rows (YES quotes around the model probability) and trades over [lo, hi)."""
    _, c_type, fl, cp = term
    ev = _events(rng, lo, hi, rates[0]) if lo < hi else np.zeros(0, np.int64)
    ok = _drop_in(ev, gaps + quiet)
    re = np.array(sorted(b for _, b in gaps if lo < b < hi), dtype=np.int64)
    ts = np.concatenate([ev[ok], re])
    o = np.argsort(ts, kind="stable")
    ts = ts[o]
    snap = np.concatenate([np.zeros(ok.sum(), bool), np.ones(len(re), bool)])[o]
    if not len(ts):
        return None, None
    snap[0] = True
    p = _prob(c_type, fl, cp, spot_at(ts), sigma * np.sqrt(np.maximum(close - ts, S) / S))
    hs = rng.integers(1, 4, len(ts)) * 0.01
    b = np.round(np.floor(np.round((p - hs) * 100, 6)) / 100, 2)
    a = np.round(np.ceil(np.round((p + hs) * 100, 6)) / 100, 2)
    hb, ha = b >= 0.01, a <= 0.99  # a far contract quotes one side only
    book = _book_rows(rng, ts, snap, b, a, hb, ha, rng.integers(1, 500, len(ts)).astype(np.float64), seq0)
    # trades at the quote in force
    tt = _events(rng, lo, hi, rates[1])[1:]
    tt = tt[_drop_in(tt, gaps + quiet)]
    k = np.searchsorted(ts, tt, side="right") - 1
    tt, k = tt[k >= 0], k[k >= 0]
    buy = rng.random(len(tt)) < 0.5
    fine = np.where(buy, ha[k], hb[k])
    return book, (tt[fine], buy[fine], np.where(buy, a[k], b[k])[fine])


def _versions(base: dict, open_: int, close: int, final_close: int, changed_at: int | None, result: str | None,
              end: int) -> list[dict]:
    """Listing (10 min before open), opening, the close change, determination (1 min after close)
    and settlement (5 min after), each written only once it happened before `end`."""
    vers = [{**base, "valid_from": open_ - 600 * S, "status": "initialized"},
            {**base, "valid_from": open_, "status": "active"}]
    if changed_at is not None:
        vers.append({**vers[-1], "valid_from": changed_at, "close_ts": final_close, "expiration_ts": final_close + 300 * S})
    if result is not None:
        vers.append({**vers[-1], "valid_from": final_close + 60 * S, "status": "determined", "result": result,
                     "settlement_value": 1.0 if result == "yes" else 0.0})
        if final_close + 300 * S <= end:
            vers.append({**vers[-1], "valid_from": final_close + 300 * S, "status": "finalized",
                         "settled_ts": final_close + 300 * S})
    return [v for v in vers if v["valid_from"] < end]


def plan(start: int, end: int, *, seed: int = 0, source: str = "kalshi", series: str = "KXBTC",
         spot_source: str = "coinbase", spot_market: str = "BTC-USD", underlying: str = "BTC", spot0: float = 97_000.0,
         sigma: float = 8.0, spot_rate: float = 2.0, contract_rate: float = 0.2, trade_rate: float = 0.02,
         period_min: int = 60, buckets: int = 6, width: float = 500.0, close_changes: int = 1,
         close_extension_ns: int = 15 * 60 * S, gaps: Sequence[tuple[str, int, int]] = (),
         quiet: Sequence[tuple[str, int, int]] = ()) -> ContractLake:
    """The lake's rows for [start, end), nothing written. Events close every `period_min` minutes
    and list `buckets` `between` contracts of `width` around the spot at their open plus a `less`
    and a `greater` tail; each opens 1.5 periods before its close. The first `close_changes`
    events lying wholly inside the window get their close moved `close_extension_ns` later,
    announced halfway through their life. `gaps`/`quiet`: (key, start, end) with key "spot", the
    series (every contract) or one ticker; a gap is recorded and followed by a snapshot."""
    rng = np.random.default_rng(seed)
    period = period_min * 60 * S
    spot_gaps = _windows(gaps, "spot", spot_market)
    st, mid, spot_rows = _spot(rng, start, end, spot0, sigma, spot_rate, spot_gaps, _windows(quiet, "spot", spot_market))

    def spot_at(t):
        return mid[np.maximum(np.searchsorted(st, np.asarray(t, dtype=np.int64), side="right") - 1, 0)]

    gap_rows = [{"source": spot_source, "market": spot_market, "instrument": None, "start_ts": a, "end_ts": b,
                 "kind": "disconnect", "detail": "sim: spot socket closed"} for a, b in spot_gaps]
    gap_rows += [{"source": source, "market": series, "instrument": None, "start_ts": a, "end_ts": b,
                  "kind": "disconnect", "detail": "sim: series socket closed"} for a, b in _windows(gaps, series)]
    blank = {c: None for c in schema.INSTRUMENTS_SCHEMA.names}
    ref = [{**blank, "valid_from": start, "source": spot_source, "market": spot_market, "instrument": spot_market,
            "kind": "spot", "base": underlying, "quote": "USD", "tick_size": 0.01, "status": "online"}]
    contracts: list[Contract] = []
    books, trades, names = [], [], []
    seq, changed = 0, 0
    close = (start // period + 1) * period
    while close - period - period // 2 < end:  # every event open before the end
        open_ = close - period - period // 2
        fits = open_ >= start and close + close_extension_ns + 300 * S <= end
        final_close = close + close_extension_ns if (fits and changed < close_changes) else close
        changed_at = open_ + (close - open_) // 2 if final_close != close else None
        changed += final_close != close
        code = kalshi_event_code(close, period_min % 60 != 0)
        center = round(float(spot_at(max(open_, start))) / width) * width
        for term in _terms(series, code, center, buckets, width):
            ticker, c_type, fl, cp = term
            lo, hi = max(open_, start), min(final_close, end)
            g_win = [(a, b) for a, b in _windows(gaps, series, ticker) if a < hi and b > lo]
            book, tr = _contract(rng, term, lo, hi, final_close, spot_at, sigma, (contract_rate, trade_rate), g_win,
                                 _windows(quiet, series, ticker), seq)
            if book is not None:
                books.append((len(names), book))
                trades.append((len(names), tr))
                seq = int(book["seq"].max()) + 1
            names.append(ticker)
            gap_rows += [{"source": source, "market": series, "instrument": ticker, "start_ts": a, "end_ts": b,
                          "kind": "sequence", "detail": "sim: contract seq jump"} for a, b in _windows(gaps, ticker)]
            result = None
            if final_close + 60 * S <= end:
                result = "yes" if _settles_yes(c_type, fl, cp, float(spot_at(final_close))) else "no"
            base = {**blank, "source": source, "market": series, "instrument": ticker, "kind": "binary",
                    "base": underlying, "quote": "USD", "tick_size": 0.01, "underlying": underlying,
                    "strike_type": c_type, "floor_strike": fl, "cap_strike": cp, "open_ts": open_, "close_ts": close,
                    "expiration_ts": close + 300 * S, "title": f"{underlying} at {code}: {ticker.rsplit('-', 1)[1]}"}
            vers = _versions(base, open_, close, final_close, changed_at, result, end)
            ref += vers
            contracts.append(Contract(ticker, c_type, fl, cp, open_, final_close, close, changed_at, result, tuple(vers)))
        close += period
    tables: dict[str, list[pa.Table]] = {
        "l2": [_l2_table(spot_source, spot_market, [spot_market], np.zeros(len(spot_rows["ts"]), int), spot_rows)],
        "trades": [], "gaps": [], "instruments": []}
    if books:
        idx = np.concatenate([np.full(len(r["ts"]), i) for i, r in books])
        tables["l2"].append(_l2_table(source, series, names, idx, {c: np.concatenate([r[c] for _, r in books])
                                                                   for c in books[0][1]}))
    if trades:
        tables["trades"].append(_trades_table(rng, source, series, names, trades))
    if gap_rows:
        tables["gaps"].append(schema.validate("gaps", pa.Table.from_pylist(gap_rows, schema=_plain("gaps"))))
    tables["instruments"].append(schema.validate("instruments", pa.Table.from_pylist(ref, schema=_plain("instruments"))))
    return ContractLake(source, series, spot_source, spot_market, start, end, tuple(contracts), st, mid, tables)


def _trades_table(rng, source: str, series: str, names: list[str], parts: list) -> pa.Table:
    idx = np.concatenate([np.full(len(t[0]), i) for i, t in parts])
    tt, buy, px = (np.concatenate([t[k] for _, t in parts]) for k in range(3))
    n = len(tt)
    return pa.table({
        "ts": tt, "recv_ts": tt + rng.integers(300_000, 8_000_000, n),
        "source": _dict([source], np.zeros(n)), "market": _dict([series], np.zeros(n)),
        "instrument": _dict(names, idx), "side": _dict(["buy", "sell"], (~buy).astype(int)),
        "price": np.round(px, 2), "size": rng.integers(1, 200, n).astype(np.float64),
        "trade_id": pa.array([f"t{i}" for i in range(n)]), "seq": np.arange(n, dtype=np.int64),
    }, schema=schema.TRADES_SCHEMA)


def write(eng, lake: ContractLake) -> None:
    """Append the lake's tables (each whole) and flush."""
    for table in ("l2", "trades", "gaps", "instruments"):
        for t in lake.tables[table]:
            if t.num_rows:
                eng.append(table, t)
    eng.flush()
