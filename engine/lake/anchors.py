"""Book anchors: each raw l2 file starts with the book as it stood at the end of the previous one.

Computed from the rows themselves (vectorized, once per chunk on the encoder thread), so live
collection and offline ingest produce the same anchors, and any single file can be rebuilt into
books on its own. Hash grouping in Arrow and numpy, single-threaded: the collector folds every
chunk it writes, and a thread pool's start-up and spinning cost more than the fold itself.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import schema

ANCHOR_MAX_IDLE_NS = 24 * schema.NS_PER_HOUR  # books idle longer than this (expired contracts) are not carried
_BOOK_COLS = ["instrument", "side", "price", "size", "source", "market"]


def _codes(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Each row's code for the value of a string or dictionary column (equal values, equal codes)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        if len(pc.unique(arr.dictionary)) == len(arr.dictionary):  # no value twice: the indices are the codes
            return arr.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        arr = arr.dictionary_decode()
    return pc.dictionary_encode(arr).indices.to_numpy(zero_copy_only=False).astype(np.int64)


def end_book(t: pa.Table) -> pa.Table:
    """Levels with non-zero size per instrument after applying `t` in arrival order: columns
    instrument, side, price, size, source, market (the last row of each level) and the instrument's
    state_ts (its largest ts) and state_seq (its last row's seq). Levels in order of their first
    row since the instrument's last snapshot began (a snapshot begins at a snapshot row whose
    previous row of the instrument is not part of the same snapshot: not a snapshot row, or another
    ts or seq); an instrument's rows before that are superseded."""
    t = t.unify_dictionaries().combine_chunks()
    n = t.num_rows
    inst = _codes(t.column("instrument"))
    ts = t.column("ts").to_numpy()
    seq_col = t.column("seq")
    seq = seq_col.fill_null(-1).to_numpy() if seq_col.null_count else seq_col.to_numpy()
    snap = t.column("snapshot").to_numpy(zero_copy_only=False)
    rows = np.arange(n)
    one = n == 0 or bool((inst == inst[0]).all())
    order = rows if one else np.argsort(inst, kind="stable")  # each instrument's rows together, in arrival order
    k, ts_o, seq_o, snap_o = inst[order], ts[order], seq[order], snap[order]
    first = np.ones(n, bool)  # first row of its instrument (in `order`)
    first[1:] = k[1:] != k[:-1]
    last = np.ones(n, bool)
    last[:-1] = first[1:]
    begin_o = snap_o.copy()
    begin_o[1:] &= first[1:] | ~snap_o[:-1] | (ts_o[1:] != ts_o[:-1]) | (seq_o[1:] != seq_o[:-1])
    n_inst = int(inst.max()) + 1 if n else 0
    start = np.full(n_inst, -1, np.int64)  # row where each instrument's last snapshot begins
    b = order[begin_o]
    np.maximum.at(start, inst[b], b)
    live = rows[rows >= start[inst]]
    # one key per (instrument, side, price), numbered in order of first appearance among live rows
    side = _codes(t.column("side"))[live]
    price = _codes(t.column("price").combine_chunks().take(pa.array(live)))
    n_side, n_price = (int(side.max()) + 1, int(price.max()) + 1) if len(live) else (1, 1)
    key = (inst[live] * n_side + side) * n_price + price
    grp = _codes(pa.array(key))
    last_row = np.full(int(grp.max()) + 1 if len(grp) else 0, -1, np.int64)
    np.maximum.at(last_row, grp, live)
    size = t.column("size").to_numpy()
    keep = last_row[size[last_row] > 0]
    state_ts = np.full(n_inst, np.iinfo(np.int64).min, np.int64)
    np.maximum.at(state_ts, inst, ts)
    ends = order[last]  # each instrument's last row
    state_row = np.zeros(n_inst, np.int64)
    state_row[inst[ends]] = ends
    idx = pa.array(keep)
    book = t.select(_BOOK_COLS).take(idx)
    k_keep = inst[keep]
    return book.append_column("state_ts", pa.array(state_ts[k_keep], pa.int64())).append_column(
        "state_seq", seq_col.take(pa.array(state_row[k_keep])))


def anchor_rows(book: pa.Table, nxt: pa.Table) -> pa.Table:
    """The carried book as snapshot rows at the start of the next file (recv_ts inside its hour)."""
    first_recv = pc.min(nxt.column("recv_ts")).as_py()
    book = book.filter(pc.greater_equal(book.column("state_ts"), first_recv - ANCHOR_MAX_IDLE_NS))
    n = book.num_rows
    out = pa.table({
        "ts": book.column("state_ts"),
        "recv_ts": pa.array(np.full(n, first_recv, np.int64)),
        **{c: book.column(c) for c in ("source", "market", "instrument", "side", "price", "size")},
        "seq": book.column("state_seq"),
        "snapshot": pa.array(np.ones(n, bool)),
    })
    return schema.validate("l2", out)
