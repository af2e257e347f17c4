"""Derived tables of the lake. Quotes: the best bid/ask (price and size) series derived from `l2`,
one row per change.

Derivation is vectorized end to end (numpy, no Python code per row):

1. rows are put in arrival order per instrument: (instrument, recv_ts, ts, seq), ties in stored order;
2. each row opens an *epoch* when it starts a new instrument or a snapshot (a run of snapshot rows
   from one message, i.e. same recv_ts and seq, replaces the book);
3. every row that sets a level to size > 0 makes an interval of *events* during which that level
   holds that size: from the row's event up to the next update of the same (epoch, side, price),
   or the end of the epoch;
4. the best bid (ask) after each event is the interval with the highest (lowest) price covering it:
   an offline range-max over the event axis, done with a bottom-up segment tree whose updates and
   push-down are whole-array numpy operations (O(n log n) work, ~log n vector passes);
5. a quote's `ts` is the event's effective ts (running max of `ts` per instrument in arrival order,
   see `effective_ts`), so quotes are monotone per instrument;
6. an event emits a quote when (bid_price, bid_size, ask_price, ask_size) differs from the previous
   event of the same instrument (the first event of an instrument always emits).

Stored per (source, market, date) partition as table `quotes`, written after compaction by
`derive_partition`; `engine.research.quotes.quotes()` reads stored partitions that are current and
derives the others with `derive`.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engine import schema
from engine.log import get_logger

log = get_logger(component="quotes")

L2_COLS = ["ts", "recv_ts", "source", "market", "instrument", "side", "price", "size", "seq", "snapshot"]
QUOTE_COLS = schema.QUOTES_SCHEMA.names
_SEQ_NULL = np.iinfo(np.int64).min


# ---- core derivation -------------------------------------------------------------------------
def as_numpy(col) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col.to_numpy(zero_copy_only=False)


def ordered_codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Dictionary (or string) column → (int codes whose order follows the string order, values)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.unify_dictionaries() if hasattr(arr, "unify_dictionaries") else arr
        values = arr.dictionary.to_pylist()
        idx = arr.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        enc = pc.dictionary_encode(arr)
        values = enc.dictionary.to_pylist()
        idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    order = sorted(range(len(values)), key=lambda i: values[i] or "")
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values), dtype=np.int64)
    return (rank[idx] if len(values) else idx), [values[i] for i in order]


def arrival_order(t: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """`t` sorted by (instrument, recv_ts, ts, seq), stable; also the instrument codes in that order."""
    inst, names = ordered_codes(t.column("instrument"))
    recv = as_numpy(t.column("recv_ts")).astype(np.int64, copy=False)
    ts = as_numpy(t.column("ts")).astype(np.int64, copy=False)
    seq = t.column("seq")
    seqv = as_numpy(seq.fill_null(_SEQ_NULL)).astype(np.int64, copy=False)
    n = t.num_rows
    # fast path: already in order (checked with vector ops)
    if n < 2 or is_sorted_keys(inst, recv, ts, seqv):
        return t, inst
    order = np.lexsort((np.arange(n), seqv, ts, recv, inst))
    return t.take(pa.array(order)), inst[order]


def is_sorted_keys(*keys) -> bool:
    """Lexicographic non-decreasing check of parallel int arrays."""
    undecided = np.ones(len(keys[0]) - 1, dtype=bool)
    for k in keys:
        a, b = k[:-1], k[1:]
        if np.any(undecided & (b < a)):
            return False
        undecided &= b == a
        if not undecided.any():
            return True
    return True


def effective_ts(ts: np.ndarray, inst: np.ndarray) -> np.ndarray:
    """Running max of `ts` per instrument over rows in arrival order.

    Exchange timestamps can step back between messages (and Kalshi snapshots carry the receive
    time), so the time at which a book state is known is the largest `ts` applied so far: this
    keeps quotes monotone per instrument and makes "the book at t" the arrival-order prefix of rows
    whose effective ts <= t — the same definition for quotes, book() and books().
    """
    if len(ts) == 0:
        return ts
    starts = np.flatnonzero(np.r_[True, inst[1:] != inst[:-1]])
    if len(starts) == 1:
        return np.maximum.accumulate(ts)
    out = np.empty_like(ts)
    bounds = np.r_[starts, len(ts)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        np.maximum.accumulate(ts[a:b], out=out[a:b])
    return out


def best_of_book(t: pa.Table, inst: np.ndarray | None = None) -> dict:
    """Best bid/ask after every event of rows `t` that are already in arrival order.

    Returns numpy arrays: `end` (row position of each event's last row), `bid_row`/`ask_row` (row
    that set the best level, -1 when that side is empty), and `inst` per event.
    """
    n = t.num_rows
    if inst is None:
        inst, _ = ordered_codes(t.column("instrument"))
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return {"end": e, "bid_row": e, "ask_row": e, "inst": e}
    recv = as_numpy(t.column("recv_ts")).astype(np.int64, copy=False)
    ts = as_numpy(t.column("ts")).astype(np.int64, copy=False)
    seq = as_numpy(t.column("seq").fill_null(_SEQ_NULL)).astype(np.int64, copy=False)
    snap = as_numpy(t.column("snapshot")).astype(bool, copy=False)
    side_codes, side_names = ordered_codes(t.column("side"))
    ask_code = side_names.index("ask") if "ask" in side_names else -1
    is_ask = side_codes == ask_code
    price = as_numpy(t.column("price")).astype(np.float64, copy=False)
    size = as_numpy(t.column("size")).astype(np.float64, copy=False)

    # epochs: a new instrument, or the first row of a snapshot message
    new_inst = np.empty(n, dtype=bool)
    new_inst[0] = True
    np.not_equal(inst[1:], inst[:-1], out=new_inst[1:])
    same_msg = np.zeros(n, dtype=bool)  # row i continues row i-1's message
    same_msg[1:] = (~new_inst[1:]) & (recv[1:] == recv[:-1]) & (seq[1:] == seq[:-1])
    prev_snap = np.zeros(n, dtype=bool)
    prev_snap[1:] = snap[:-1]
    begin = new_inst | (snap & ~(prev_snap & same_msg))
    epoch = np.cumsum(begin) - 1
    epoch_start = np.flatnonzero(begin)
    epoch_end = np.append(epoch_start[1:], n)  # first row of the next epoch

    # events: maximal runs sharing (instrument, recv_ts, ts, seq); a snapshot message is one event
    same_key = np.zeros(n, dtype=bool)
    same_key[1:] = same_msg[1:] & (ts[1:] == ts[:-1])
    cont_snap = np.zeros(n, dtype=bool)
    cont_snap[1:] = snap[1:] & prev_snap[1:] & ~begin[1:]
    joined = same_key | cont_snap  # row i is in the same event as row i-1
    is_end = np.empty(n, dtype=bool)
    is_end[:-1] = ~joined[1:]
    is_end[-1] = True
    ends = np.flatnonzero(is_end)
    n_ev = len(ends)
    ev_of = np.cumsum(is_end) - is_end  # event index of each row
    ev_of_next = np.append(ev_of, n_ev)  # ev_of at position n = n_ev

    # level intervals: rows setting size > 0, alive until the next update of the level in the epoch
    prank, n_prices = _dense_rank(price)
    nxt = _next_same_level(epoch, is_ask, prank, n_prices, epoch_end[epoch])
    alive = size > 0
    lo = ev_of[alive]
    hi = ev_of_next[nxt[alive]]
    rows = np.flatnonzero(alive)
    keep = hi > lo
    lo, hi, rows = lo[keep], hi[keep], rows[keep]
    ask_iv = is_ask[rows]
    rank_iv = prank[rows]
    out = {"end": ends, "inst": inst[ends]}
    for name, sel, key_rank in (
        ("bid_row", ~ask_iv, rank_iv),
        ("ask_row", ask_iv, (n_prices - 1) - rank_iv),
    ):
        keys = key_rank[sel] * n + rows[sel]
        best = _range_max(n_ev, lo[sel], hi[sel], keys)
        out[name] = np.where(best >= 0, best % n, -1)
    return out


def _dense_rank(price: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense rank of each price among the distinct prices (hash unique + small sort + hash map)."""
    s = pl.Series("p", price)
    u = np.sort(s.unique().to_numpy())
    if np.isnan(u).any():
        raise ValueError("l2 price is NaN")
    r = s.replace_strict(pl.Series(u), pl.Series(np.arange(len(u), dtype=np.int64)), return_dtype=pl.Int64)
    return r.to_numpy(), len(u)


def _next_same_level(epoch, is_ask, prank, n_prices, default) -> np.ndarray:
    """Position of the next row updating the same (epoch, side, price); `default` where none."""
    n = len(epoch)
    if (int(epoch[-1]) + 1) * 2 * n_prices < 2**62:
        df = pl.DataFrame({"c": (epoch * 2 + is_ask) * n_prices + prank})
        keys = ["c"]
    else:
        df = pl.DataFrame({"e": epoch, "s": is_ask, "p": prank})
        keys = ["e", "s", "p"]
    df = df.with_columns(i=pl.Series(np.arange(n, dtype=np.int64)))
    nxt = df.select(pl.col("i").shift(-1).over(keys)).to_series()
    return np.where(nxt.is_null().to_numpy(), default, nxt.fill_null(0).to_numpy())


def _range_max(size: int, lo: np.ndarray, hi: np.ndarray, val: np.ndarray) -> np.ndarray:
    """For each point p in [0, size): max of `val` over intervals [lo, hi) containing p, else -1.

    A "reverse sparse table": an interval of length L with k = floor(log2 L) is the union of
    [lo, lo + 2^k) and [hi - 2^k, hi), so it is scattered (max) into level k at two places; then
    levels are pushed down from the top, level k into k-1 by one shifted np.maximum over the
    whole axis. Work: one scatter per interval end plus (log2 of the longest interval) vector passes.
    """
    cur = np.full(size, -1, dtype=np.int64)
    if size == 0 or len(val) == 0:
        return cur
    length = (hi - lo).astype(np.int64)
    k = (np.frexp(length.astype(np.float64))[1] - 1).astype(np.int8)  # floor(log2 L), exact below 2^53
    order = np.argsort(k, kind="stable")
    ks = k[order]
    kmax = int(ks[-1])
    bounds = np.searchsorted(ks, np.arange(kmax + 2))
    for kk in range(kmax, -1, -1):
        sel = order[bounds[kk]:bounds[kk + 1]]
        if len(sel):
            v = val[sel]
            np.maximum.at(cur, lo[sel], v)
            np.maximum.at(cur, hi[sel] - (1 << kk), v)
        if kk > 0:
            h = 1 << (kk - 1)
            np.maximum(cur[h:], cur[:-h], out=cur[h:])  # ufunc overlap handling makes this exact
    return cur


CHUNK_ROWS = 8_000_000  # instruments are independent: bigger inputs are derived in instrument chunks


def derive(l2) -> pl.DataFrame:
    """Quotes from l2 rows (a pyarrow Table or polars DataFrame of any subset of markets)."""
    t = l2.to_arrow() if isinstance(l2, pl.DataFrame) else l2
    t = t.select(L2_COLS)
    if t.num_rows == 0:
        return pl.from_arrow(schema.QUOTES_SCHEMA.empty_table())
    t, inst = arrival_order(t)
    starts = np.flatnonzero(np.r_[True, inst[1:] != inst[:-1]])
    bounds = [0]
    for s0 in starts[1:].tolist():  # cut at instrument boundaries into chunks of <= CHUNK_ROWS (when possible)
        if s0 - bounds[-1] >= CHUNK_ROWS:
            bounds.append(s0)
    bounds.append(t.num_rows)
    parts = [_derive_sorted(t.slice(a, b - a), inst[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    out = pa.concat_tables(parts).unify_dictionaries() if len(parts) > 1 else parts[0]
    from engine.lake.writer import sort_table

    out = sort_table("quotes", schema.validate("quotes", out))  # stored order: (instrument, ts, seq), stable
    return pl.from_arrow(out)


def _derive_sorted(t: pa.Table, inst: np.ndarray) -> pa.Table:
    """Quotes of rows already in arrival order (whole instruments), in derivation order."""
    r = best_of_book(t, inst)
    ends = r["end"]
    bid_row, ask_row = r["bid_row"], r["ask_row"]
    price = as_numpy(t.column("price")).astype(np.float64, copy=False)
    size = as_numpy(t.column("size")).astype(np.float64, copy=False)
    bnull, anull = bid_row < 0, ask_row < 0
    bp = np.where(bnull, np.nan, price[bid_row])
    bs = np.where(bnull, np.nan, size[bid_row])
    ap = np.where(anull, np.nan, price[ask_row])
    asz = np.where(anull, np.nan, size[ask_row])
    ev_inst = r["inst"]
    emit = np.ones(len(ends), dtype=bool)
    if len(ends) > 1:
        def diff(x):
            a, b = x[1:], x[:-1]
            return ~((a == b) | (np.isnan(a) & np.isnan(b)))

        emit[1:] = (ev_inst[1:] != ev_inst[:-1]) | diff(bp) | diff(bs) | diff(ap) | diff(asz)
    rows = ends[emit]
    base = t.take(pa.array(rows)).select(["recv_ts", "source", "market", "instrument", "seq"])
    eff = effective_ts(as_numpy(t.column("ts")).astype(np.int64, copy=False), inst)

    def col(x, null):
        return pa.array(x[emit], mask=null[emit])

    out = pa.table(
        {
            "ts": pa.array(eff[rows]), "recv_ts": base.column("recv_ts"), "source": base.column("source"),
            "market": base.column("market"), "instrument": base.column("instrument"),
            "bid_price": col(bp, bnull), "bid_size": col(bs, bnull),
            "ask_price": col(ap, anull), "ask_size": col(asz, anull), "seq": base.column("seq"),
        }
    )
    return out


def derive_partition(eng, source: str, market: str, date: str):
    """Write (or replace) the stored quotes of one l2 (source, market, date) partition; returns the entry."""
    eng.require_writer("derive_partition")
    import time

    from engine.lake.catalog import FileEntry
    from engine.lake.writer import read_parquet, write_parquet
    from engine.paths import compacted_key
    from engine.timeutil import now_ns

    t0 = time.perf_counter()
    files = eng.catalog.files_in(("l2", source, market, date))
    if not files:
        return None
    tables = [read_parquet(eng.local_path(e), e.key, columns=L2_COLS) for e in files]
    l2 = pa.concat_tables(tables).unify_dictionaries() if len(tables) > 1 else tables[0]
    q = derive(l2).to_arrow()
    q = schema.validate("quotes", q)
    old = [e.key for e in eng.catalog.files_in(("quotes", source, market, date))]
    key, n = compacted_key("quotes", source, market, date, eng.shard), 0  # a shard's quotes carry its id
    while key in old or key in eng.catalog.retired or key in eng.catalog.by_key:
        n += 1
        key = compacted_key("quotes", source, market, date, eng.shard, n)
    path = eng.layout.staged(key)
    wf = write_parquet("quotes", q, path, extra_meta={"engine.derived_from": ",".join(e.key for e in files)})
    stats = wf.stats
    if q.num_rows == 0:
        stats = {k: None for k in stats}
    entry = FileEntry(key=key, table="quotes", source=source, market=market, date=date, rows=wf.rows,
                      bytes=wf.bytes, sha256=wf.sha256, compacted=True, created_ns=now_ns(),
                      schema_version=schema.SCHEMA_VERSION, **stats)
    eng.store.put_file(key, path, wf.sha256)
    entry.remote = True
    if old:
        eng.catalog.swap(entry, old)
    else:
        eng.catalog.add_file(entry)
    path.unlink(missing_ok=True)
    eng.catalog.mark_local_deleted([key])
    log.info("quotes_derived", source=source, market=market, date=date, l2_rows=l2.num_rows, rows=wf.rows,
             key=key, seconds=round(time.perf_counter() - t0, 3))
    return entry
