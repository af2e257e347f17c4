"""Per-instrument figures of a file (`instruments.of_table`, `merge`) equal what the earlier polars
grouping gave: names sorted (a null instrument first), rows and min/max times, for dictionary and
plain string columns, null instruments, chunks with their own (repeating, partly unused)
dictionaries, and files written chunk by chunk."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from engine import schema
from engine.lake import instruments
from engine.lake.instruments import FIGURES, InstrumentStats, _of_table_polars, of_table


def polars_merge(parts: list[InstrumentStats]) -> InstrumentStats:
    """The polars merge used until 2026-12-05 (the reference)."""
    df = pl.concat([p.frame() for p in parts])
    g = (df.group_by("instrument")
         .agg(pl.col("rows").sum(), pl.col("min_ts").min(), pl.col("max_ts").max(), pl.col("min_recv_ts").min(),
              pl.col("max_recv_ts").max())
         .sort("instrument", nulls_last=False))
    return InstrumentStats(g["instrument"].to_list(), np.stack([g[f].to_numpy().astype(np.int64) for f in FIGURES]))


def gaps_table(rng: np.random.Generator, n: int, names: list[str | None]) -> pa.Table:
    """Gap rows: a nullable instrument (whole-market gaps have none)."""
    start = 10**18 + rng.integers(0, 10**12, n)
    inst = [names[i] for i in rng.integers(0, len(names), n)]
    return pa.table({
        "source": pa.array(["coinbase"] * n).dictionary_encode(), "market": pa.array(["M"] * n).dictionary_encode(),
        "instrument": pa.array(inst, pa.string()).dictionary_encode(),
        "start_ts": pa.array(start, pa.int64()), "end_ts": pa.array(start + 5, pa.int64()),
        "kind": pa.array(["disconnect"] * n).dictionary_encode(), "detail": pa.array([None] * n, pa.string()),
    }).cast(schema.GAPS_SCHEMA)


def l2_chunks(rng: np.random.Generator, names: list[str]) -> pa.Table:
    """l2 rows in three chunks, each with its own dictionary: repeated and unused values included."""
    parts = []
    for c in range(3):
        n = int(rng.integers(1, 400))
        dictionary = names + names[:1] + ["UNUSED"] if c == 1 else list(reversed(names))
        idx = rng.integers(0, len(names), n)
        ts = 10**18 + rng.integers(0, 10**12, n)
        parts.append(pa.table({
            "ts": pa.array(ts, pa.int64()), "recv_ts": pa.array(ts + rng.integers(1, 10**6, n), pa.int64()),
            "source": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["coinbase"])),
            "market": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["M"])),
            "instrument": pa.DictionaryArray.from_arrays(pa.array(idx.astype(np.int32)), pa.array(dictionary)),
            "side": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["bid"])),
            "price": pa.array(np.ones(n)), "size": pa.array(np.ones(n)), "seq": pa.array(np.arange(n), pa.int64()),
            "snapshot": pa.array(np.zeros(n, bool)),
        }, schema=schema.L2_SCHEMA))
    return pa.concat_tables(parts)


def _same(a: InstrumentStats, b: InstrumentStats) -> None:
    assert a.names == b.names
    assert a.m.dtype == b.m.dtype == np.int64 and np.array_equal(a.m, b.m)


@pytest.mark.parametrize("seed", range(8))
def test_of_table_equals_the_polars_grouping(seed):
    rng = np.random.default_rng(seed)
    names = ["KX-B1", "KX-B2", "BTC-USD", "ÉTH-x"][: 1 + seed % 4]
    _same(of_table("l2", l2_chunks(rng, names)), _of_table_polars("l2", l2_chunks(np.random.default_rng(seed), names)))
    g = gaps_table(rng, int(rng.integers(1, 300)), [None, *names])
    _same(of_table("gaps", g), _of_table_polars("gaps", g))


def test_plain_string_instruments_and_empty_tables():
    rng = np.random.default_rng(3)
    t = l2_chunks(rng, ["A", "B"])
    plain = t.set_column(4, pa.field("instrument", pa.string()), t.column("instrument").cast(pa.string()))
    _same(of_table("l2", plain), _of_table_polars("l2", t))
    assert len(of_table("l2", t.slice(0, 0))) == 0
    assert of_table("l2", t.slice(0, 0)).m.shape == (5, 0)


@pytest.mark.parametrize("seed", range(5))
def test_merge_equals_the_polars_merge(seed):
    rng = np.random.default_rng(50 + seed)
    parts = [of_table("gaps", gaps_table(rng, int(rng.integers(1, 100)), [None, "A", "B", "C"][: 2 + (seed + i) % 3]))
             for i in range(4)]
    _same(instruments.merge(parts), polars_merge(parts))
    assert instruments.merge([None, parts[0]]) is parts[0]
