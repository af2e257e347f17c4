"""The book fold behind anchors (`end_book`, `anchor_rows`) gives exactly what the earlier polars
version gave, row for row and in the same order, on tables with several instruments, snapshots
begun mid-table, repeated levels, removals, null sequence numbers and chunks whose dictionaries
differ."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from engine import schema
from engine.lake.anchors import ANCHOR_MAX_IDLE_NS, anchor_rows, end_book


def polars_end_book(t: pa.Table) -> pa.Table:
    """The polars implementation anchors used until 2026-12-05 (the reference)."""
    df = pl.from_arrow(t.select(["ts", "source", "market", "instrument", "side", "price", "size", "seq", "snapshot"]))
    df = df.with_columns(pl.col(c).cast(pl.String) for c in ("source", "market", "instrument", "side"))
    df = df.with_row_index("i")
    prev = [pl.col(c).shift(1).over("instrument") for c in ("snapshot", "ts", "seq")]
    begin = pl.col("snapshot") & (
        prev[0].fill_null(False).not_()
        | (prev[1] != pl.col("ts")).fill_null(True)
        | (prev[2].fill_null(-1) != pl.col("seq").fill_null(-1))
    )
    starts = df.filter(begin).group_by("instrument").agg(pl.col("i").max().alias("start"))
    state = df.group_by("instrument").agg(pl.col("ts").max().alias("state_ts"), pl.col("seq").last().alias("state_seq"))
    live = df.join(starts, on="instrument", how="left").filter(pl.col("start").is_null() | (pl.col("i") >= pl.col("start")))
    book = (
        live.group_by(["instrument", "side", "price"], maintain_order=True)
        .agg(pl.col("size").last(), pl.col("source").last(), pl.col("market").last())
        .filter(pl.col("size") > 0)
        .join(state, on="instrument", how="left", maintain_order="left")
    )
    return book.to_arrow()


def polars_anchor_rows(book: pa.Table, nxt: pa.Table) -> pa.Table:
    first_recv = int(nxt.column("recv_ts").to_numpy().min())
    df = pl.from_arrow(book).filter(pl.col("state_ts") >= first_recv - ANCHOR_MAX_IDLE_NS)
    out = df.select(
        pl.col("state_ts").alias("ts"), pl.lit(first_recv, dtype=pl.Int64).alias("recv_ts"),
        "source", "market", "instrument", "side", "price", "size", pl.col("state_seq").alias("seq"),
        pl.lit(True).alias("snapshot"),
    )
    return schema.validate("l2", out.to_arrow())


def _dict(values: list[str], idx) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(idx, np.int32)), pa.array(values, pa.string()))


def random_l2(rng: np.random.Generator, n: int, insts: list[str], null_seq: bool, t0: int) -> pa.Table:
    """Messages of 1-8 rows (one instrument, ts and seq each), some of them snapshots, prices on a
    small grid so levels repeat, a fifth of the sizes zero."""
    cols: dict[str, list] = {k: [] for k in ("ts", "inst", "side", "price", "size", "seq", "snap")}
    ts, seq = t0, 0
    while len(cols["ts"]) < n:
        k = int(rng.integers(1, 9))
        inst = int(rng.integers(0, len(insts)))
        snap = bool(rng.random() < 0.08)
        ts += int(rng.integers(0, 3)) * 1000  # equal ts across messages happens
        seq += int(rng.integers(0, 2))  # ... and equal seq (a snapshot of two messages with one seq)
        for _ in range(k):
            cols["ts"].append(ts)
            cols["inst"].append(inst)
            cols["side"].append(int(rng.integers(0, 2)))
            cols["price"].append(round(100 + int(rng.integers(-30, 30)) * 0.25, 2))
            cols["size"].append(0.0 if rng.random() < 0.2 else round(float(rng.random()) * 5, 6))
            cols["seq"].append(None if null_seq and rng.random() < 0.3 else seq)
            cols["snap"].append(snap)
    m = len(cols["ts"])
    return pa.table({
        "ts": pa.array(cols["ts"], pa.int64()),
        "recv_ts": pa.array(np.array(cols["ts"], np.int64) + 1000),
        "source": _dict(["coinbase"], np.zeros(m)),
        "market": _dict(["MKT"], np.zeros(m)),
        "instrument": _dict(insts, cols["inst"]),
        "side": _dict(["bid", "ask"], cols["side"]),
        "price": pa.array(cols["price"], pa.float64()),
        "size": pa.array(cols["size"], pa.float64()),
        "seq": pa.array(cols["seq"], pa.int64()),
        "snapshot": pa.array(cols["snap"], pa.bool_()),
    }, schema=schema.L2_SCHEMA)


def _plain(t: pa.Table) -> list[dict]:
    return t.select(["instrument", "side", "price", "size", "source", "market", "state_ts", "state_seq"]).to_pylist()


@pytest.mark.parametrize("seed", range(12))
def test_end_book_equals_the_polars_reference(seed):
    rng = np.random.default_rng(seed)
    insts = ["A"] if seed % 3 == 0 else ["A", "B", "C"]
    t = random_l2(rng, int(rng.integers(1, 3000)), insts, null_seq=seed % 2 == 1, t0=10**18)
    if seed % 4 == 1:  # chunks with their own dictionaries, in another order
        half = t.num_rows // 2
        b = t.slice(half)
        inst = pa.array(b.column("instrument").to_pylist(), pa.string()).dictionary_encode()
        side = pa.array(b.column("side").to_pylist(), pa.string()).dictionary_encode()
        b = b.set_column(4, "instrument", inst).set_column(5, "side", side)
        t = pa.concat_tables([t.slice(0, half), b.cast(t.schema)])
    assert _plain(end_book(t)) == _plain(polars_end_book(t))


@pytest.mark.parametrize("seed", range(6))
def test_folding_chunk_by_chunk_and_anchor_rows_equal_the_reference(seed):
    """As the buffer does it: the carried book as anchor rows ahead of each chunk, folded again."""
    rng = np.random.default_rng(100 + seed)
    insts = ["A", "B"] if seed % 2 else ["A"]
    t = random_l2(rng, 5000, insts, null_seq=seed % 3 == 0, t0=10**18)
    ours = ref = None
    for lo in range(0, t.num_rows, 700):
        chunk = t.slice(lo, 700)
        a_ours = anchor_rows(ours, chunk) if ours is not None else None
        a_ref = polars_anchor_rows(ref, chunk) if ref is not None else None
        if ours is not None:
            assert a_ours.schema == a_ref.schema and a_ours.to_pylist() == a_ref.to_pylist()
        ours = end_book(pa.concat_tables([a_ours, chunk]).unify_dictionaries() if a_ours is not None else chunk)
        ref = polars_end_book(pa.concat_tables([a_ref, chunk]).unify_dictionaries() if a_ref is not None else chunk)
        assert _plain(ours) == _plain(ref)


def test_idle_books_are_not_carried_and_empty_tables_fold():
    rng = np.random.default_rng(7)
    t = random_l2(rng, 200, ["A"], null_seq=False, t0=10**18)
    book = end_book(t)
    assert book.num_rows
    later = t.slice(0, 1).set_column(1, "recv_ts", pa.array([10**18 + ANCHOR_MAX_IDLE_NS + 10**12], pa.int64()))
    assert anchor_rows(book, later).num_rows == 0
    assert end_book(t.slice(0, 0)).num_rows == 0
