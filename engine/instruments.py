"""Per-instrument figures of a lake file: rows and min/max `ts` and `recv_ts` of each instrument in it.

A Kalshi market partition holds dozens of contracts a day; these figures let the catalog answer
"which contracts, how many rows, from when to when" and let a query skip files without the contract,
with no reads of data files. They are computed from the table being written (one vectorized
group-by), and kept in the catalog log as one short string per file (`encode`), because a log line
is written per file and a Kalshi hourly file holds ~50 contracts:

    base64( raw deflate( header, names, byte-shuffled figures ) )

- header: format byte, number of instruments k, then the file's min ts, max ts, min recv, max recv;
- names: joined by "\\n" (instrument names hold no control characters), a null instrument as "";
- figures: a (5, k) uint64 matrix [rows, min_ts - min ts, max ts - max_ts, min_recv - min recv,
  max recv - max_recv] stored byte plane by byte plane, so the high zero bytes of the offsets
  compress away (~24 bytes an instrument, against ~80 as JSON numbers).
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from engine import schema
from engine.paths import match

FIGURES = ("rows", "min_ts", "max_ts", "min_recv_ts", "max_recv_ts")
_FORMAT = 1
_HEAD = struct.Struct("<BI4q")
_I64 = np.iinfo(np.int64)


@dataclass(frozen=True)
class InstrumentStats:
    """Figures per instrument, sorted by name (a null instrument first): `m[i]` is FIGURES[i]."""

    names: list[str | None]
    m: np.ndarray  # (5, k) int64

    def __len__(self) -> int:
        return len(self.names)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame({"instrument": pl.Series(self.names, dtype=pl.String),
                             **{f: self.m[i] for i, f in enumerate(FIGURES)}})

    def matching(self, pattern: str, start: int | None = None, end: int | None = None) -> bool:
        """Whether an instrument matching `pattern` (exact or glob) has rows with ts in [start, end)."""
        for i, n in enumerate(self.names):
            if n is not None and match(n, pattern) and (start is None or self.m[2, i] >= start) \
                    and (end is None or self.m[1, i] < end):
                return True
        return False


def of_table(table: str, t: pa.Table) -> InstrumentStats | None:
    """The figures of `t`, by one group-by (None: the table has no instrument column)."""
    sp = schema.spec(table)
    if "instrument" not in sp.columns:
        return None
    cols = list(dict.fromkeys(["instrument", sp.time_col, sp.part_col]))
    df = pl.from_arrow(t.select(cols)) if t.num_rows else None
    if df is None:
        return InstrumentStats([], np.zeros((5, 0), np.int64))
    g = (df.group_by(pl.col("instrument").cast(pl.String))
         .agg(pl.len().cast(pl.Int64).alias("rows"), pl.col(sp.time_col).min().alias("min_ts"),
              pl.col(sp.time_col).max().alias("max_ts"), pl.col(sp.part_col).min().alias("min_recv_ts"),
              pl.col(sp.part_col).max().alias("max_recv_ts"))
         .sort("instrument", nulls_last=False))
    return _of_frame(g)


def _of_frame(g: pl.DataFrame) -> InstrumentStats:
    return InstrumentStats(g["instrument"].to_list(), np.stack([g[f].to_numpy().astype(np.int64) for f in FIGURES]))


def merge(parts: Iterable[InstrumentStats | None]) -> InstrumentStats | None:
    """Figures of the concatenation of tables (a file written chunk by chunk)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    df = pl.concat([p.frame() for p in parts])
    g = (df.group_by("instrument")
         .agg(pl.col("rows").sum(), pl.col("min_ts").min(), pl.col("max_ts").max(), pl.col("min_recv_ts").min(),
              pl.col("max_recv_ts").max())
         .sort("instrument", nulls_last=False))
    return _of_frame(g)


def encode(st: InstrumentStats | None) -> str | None:
    if st is None:
        return None
    k = len(st.names)
    m = st.m.astype(np.int64, copy=False)
    base = (int(m[1].min()), int(m[2].max()), int(m[3].min()), int(m[4].max())) if k else (0, 0, 0, 0)
    off = np.stack([m[0], m[1] - base[0], base[1] - m[2], m[3] - base[2], base[3] - m[4]]).astype("<u8")
    names = "\n".join("" if n is None else n for n in st.names).encode()
    raw = _HEAD.pack(_FORMAT, k, *base) + names + b"\0" + off.reshape(-1).view(np.uint8).reshape(-1, 8).T.tobytes()
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    return base64.b64encode(z.compress(raw) + z.flush()).decode()


def decode(s: str) -> InstrumentStats:
    raw = zlib.decompress(base64.b64decode(s), -15)
    fmt, k, *base = _HEAD.unpack_from(raw)
    if fmt != _FORMAT:
        raise ValueError(f"instrument figures format {fmt}, this engine reads {_FORMAT}")
    cut = raw.index(b"\0", _HEAD.size)
    names = [n or None for n in raw[_HEAD.size:cut].decode().split("\n")] if k else []
    off = np.frombuffer(raw, np.uint8, offset=cut + 1).reshape(8, 5 * k).T.copy().view("<u8").reshape(5, k)
    off = off.astype(np.int64)
    m = np.stack([off[0], base[0] + off[1], base[1] - off[2], base[2] + off[3], base[3] - off[4]])
    return InstrumentStats(names, m)


# ---- per (partition, instrument) figures, for the catalog's questions ----------------------------------

PART_FIGURES = ("rows", "files", "min_ts", "max_ts", "min_recv_ts", "max_recv_ts")
ARROW_TYPE = pa.list_(pa.struct([("instrument", pa.string())] + [(f, pa.int64()) for f in PART_FIGURES]))
FRAME_SCHEMA = {"table": pl.String, "source": pl.String, "market": pl.String, "date": pl.String,
                "instrument": pl.String, **{f: pl.Int64 for f in PART_FIGURES}}


def file_figures(e) -> InstrumentStats:
    """A catalog entry's figures; a file catalogued without them counts as one null instrument."""
    if e.instruments is not None:
        return decode(e.instruments)
    vals = (e.rows, e.min_ts, e.max_ts, e.min_recv_ts, e.max_recv_ts)
    fill = (0, _I64.max, _I64.min, _I64.max, _I64.min)  # unknown bounds: neutral in min/max, nulls later
    return InstrumentStats([None], np.array([[v if v is not None else f] for v, f in zip(vals, fill)], np.int64))


def partition_figures(entries: Iterable) -> list[dict]:
    """Per instrument of one partition's files: rows, files holding it, min/max ts and recv_ts."""
    names: list[str | None] = []
    mats = []
    for e in entries:
        st = file_figures(e)
        names += st.names
        mats.append(st.m)
    if not names:
        return []
    m = np.concatenate(mats, axis=1)
    index: dict[str | None, int] = {}
    codes = np.fromiter((index.setdefault(n, len(index)) for n in names), np.int64, len(names))
    k = len(index)
    rows = np.bincount(codes, m[0], k).astype(np.int64)
    files = np.bincount(codes, minlength=k)
    lo = np.full((2, k), _I64.max)
    hi = np.full((2, k), _I64.min)
    np.minimum.at(lo[0], codes, m[1])
    np.maximum.at(hi[0], codes, m[2])
    np.minimum.at(lo[1], codes, m[3])
    np.maximum.at(hi[1], codes, m[4])

    def val(x: int, null: int) -> int | None:
        return None if x == null else x

    return [{"instrument": n, "rows": int(rows[i]), "files": int(files[i]),
             "min_ts": val(int(lo[0, i]), _I64.max), "max_ts": val(int(hi[0, i]), _I64.min),
             "min_recv_ts": val(int(lo[1, i]), _I64.max), "max_recv_ts": val(int(hi[1, i]), _I64.min)}
            for n, i in sorted(index.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))]
