"""Book anchors: each raw l2 file starts with the book as it stood at the end of the previous one.

Computed from the rows themselves (vectorized, once per file), so live collection and offline
ingest produce the same anchors, and any single file can be rebuilt into books on its own.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from engine import schema

ANCHOR_MAX_IDLE_NS = 24 * schema.NS_PER_HOUR  # books idle longer than this (expired contracts) are not carried


def end_book(t: pa.Table) -> pa.Table:
    """Levels with non-zero size per instrument after applying `t` in arrival order."""
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
        .join(state, on="instrument", how="left")
    )
    return book.to_arrow()


def anchor_rows(book: pa.Table, nxt: pa.Table) -> pa.Table:
    """The carried book as snapshot rows at the start of the next file (recv_ts inside its hour)."""
    recv = nxt.column("recv_ts")
    import pyarrow.compute as pc

    first_recv = pc.min(recv).as_py()
    df = pl.from_arrow(book).filter(pl.col("state_ts") >= first_recv - ANCHOR_MAX_IDLE_NS)
    out = df.select(
        pl.col("state_ts").alias("ts"),
        pl.lit(first_recv, dtype=pl.Int64).alias("recv_ts"),
        "source", "market", "instrument", "side", "price", "size",
        pl.col("state_seq").alias("seq"),
        pl.lit(True).alias("snapshot"),
    )
    return schema.validate("l2", out.to_arrow())
