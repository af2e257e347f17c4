"""Research toolkit benchmark: quotes derivation, as-of joins, book(at=...) latency — each against
baselines on the same data, in one run. Prints a table with ratios.

    scripts/bench_research [--l2-rows 5000000] [--trades 5000000]
        [--quotes 20000000] [--day-rows 10000000] [--books 40] [--baseline-rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)
os.environ.setdefault("ENGINE_LOG_LEVEL", "warning")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402

from engine import Engine, schema  # noqa: E402
from engine.sim import synth  # noqa: E402
from engine.timeutil import NS as S  # noqa: E402
from engine.timeutil import to_ns  # noqa: E402

ROWS: list[tuple] = []


def timed(fn, repeat=1):
    best, out = None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def row(section, what, seconds, n=None, unit="rows/s", note=""):
    ROWS.append((section, what, seconds, n, unit, note))
    rate = f"{n / seconds / 1e6:8.2f} M {unit}" if n else ""
    print(f"  {section:8} {what:46} {seconds * 1e3:10.1f} ms {rate} {note}", flush=True)


def l2_with_snapshots(n, seed=0, instruments=("BTC-USD", "ETH-USD")):
    """Synthetic l2 with a full snapshot every ~50k rows per instrument (as after reconnects/anchors)."""
    t = synth.l2_rows("coinbase", "BTC-USD", to_ns("2026-11-01"), n, 86_400 * S, seed=seed, instruments=list(instruments))
    snap = np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    for start in rng.choice(n - 400, max(1, n // 50_000), replace=False):
        snap[start:start + 400] = True
    cols = {c: t.column(c) for c in t.column_names}
    # a snapshot message shares recv_ts and seq
    recv = t.column("recv_ts").to_numpy().copy()
    seq = t.column("seq").to_numpy().copy()
    runs = np.flatnonzero(np.diff(np.r_[0, snap.astype(np.int8)]) == 1)
    for a in runs:
        recv[a:a + 400] = recv[a]
        seq[a:a + 400] = seq[a]
    ts = np.minimum(t.column("ts").to_numpy(), recv)
    cols.update(ts=pa.array(ts), recv_ts=pa.array(recv), seq=pa.array(seq), snapshot=pa.array(snap))
    return schema.validate("l2", pa.table(cols))


def naive_quotes(t: pa.Table) -> int:
    """Baseline: plain-Python replay with dict books, best recomputed only when the top is touched."""
    df = pl.from_arrow(t.select(["instrument", "recv_ts", "ts", "seq", "side", "price", "size", "snapshot"]))
    df = df.with_columns(pl.col("instrument", "side").cast(pl.String)).sort(["instrument", "recv_ts", "ts", "seq"], maintain_order=True)
    emitted = 0
    books: dict = {}
    prev = {}
    last_key = None
    for inst, recv, ts, seq, side, price, size, snap in df.iter_rows():
        b = books.setdefault(inst, ({}, {}))
        if snap and last_key != (inst, recv, seq, True):
            b = books[inst] = ({}, {})
        last_key = (inst, recv, seq, snap)
        lv = b[side == "ask"]
        if size == 0:
            lv.pop(price, None)
        else:
            lv[price] = size
        bb = max(b[0]) if b[0] else None
        ba = min(b[1]) if b[1] else None
        st = (bb, ba)
        if prev.get(inst) != st:
            prev[inst] = st
            emitted += 1
    return emitted


def bench_quotes(a, tmp):
    print("quotes derivation", flush=True)
    from engine.lake.derived import derive, derive_partition

    t = l2_with_snapshots(a.l2_rows)
    derive(t.slice(0, 100_000))  # warm up
    dt, q = timed(lambda: derive(t), repeat=2)
    row("quotes", f"derive() in memory ({a.l2_rows:,} l2 rows)", dt, a.l2_rows, note=f"-> {q.height:,} quotes")
    nb = min(a.baseline_rows, t.num_rows)
    dtb, _ = timed(lambda: naive_quotes(t.slice(0, nb)))
    dts, _ = timed(lambda: derive(t.slice(0, nb)))
    row("quotes", f"baseline: Python dict replay ({nb:,} rows)", dtb, nb, note=f"x{dtb / dts:.1f} slower than derive() on the same rows")
    # end to end on a compacted partition: read + derive + write + catalog
    eng = Engine.open(tmp / "q", background=False, writer=True)
    for off in range(0, t.num_rows, 1_000_000):
        eng.append("l2", t.slice(off, 1_000_000))
    eng.flush()
    eng.compact(table="l2")
    dt2, _ = timed(lambda: derive_partition(eng, "coinbase", "BTC-USD", "2026-11-01"))
    row("quotes", "derive_partition() read+derive+write", dt2, a.l2_rows)
    dt3, qs = timed(lambda: eng.quotes("coinbase", "BTC-USD"))
    row("quotes", "eng.quotes() from the stored partition", dt3, qs.height, unit="quotes/s")
    eng.close()
    return dt


def bench_asof(a):
    print(f"as-of joins: {a.trades:,} trades x {a.quotes:,} quotes", flush=True)
    import duckdb

    from engine.research.asof import asof

    rng = np.random.default_rng(7)
    insts = ["BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD"]
    t0 = to_ns("2026-11-01")

    def frame(n, cols):
        inst = np.sort(rng.integers(0, len(insts), n))
        ts = np.empty(n, dtype=np.int64)
        for i in range(len(insts)):  # lake order: (instrument, ts)
            m = inst == i
            ts[m] = np.sort(t0 + rng.integers(0, 86_400 * S, int(m.sum())))
        df = pl.DataFrame({"instrument": pl.Series(np.array(insts)[inst]).cast(pl.Categorical), "ts": ts})
        return df.with_columns(**{c: pl.Series(rng.random(n)) for c in cols})

    quotes = frame(a.quotes, ["bid_price", "bid_size", "ask_price", "ask_size"])
    trades = frame(a.trades, ["price", "size"])
    res = {}
    dt, out = timed(lambda: trades.join_asof(quotes, on="ts", by="instrument", check_sortedness=False), repeat=2)
    res["polars"] = dt
    row("asof", "polars.join_asof (by instrument, sorted input)", dt, a.trades, unit="left rows/s")
    con = duckdb.connect()
    con.execute("SET threads=2")
    con.register("q", quotes.to_arrow())
    con.register("t", trades.to_arrow())
    dt, dd = timed(lambda: con.sql("SELECT t.*, q.bid_price, q.bid_size, q.ask_price, q.ask_size FROM t ASOF LEFT JOIN q "
                                   "ON t.instrument = q.instrument AND t.ts >= q.ts").to_arrow_table(), repeat=2)
    res["duckdb"] = dt
    row("asof", "DuckDB ASOF LEFT JOIN (by instrument)", dt, a.trades, unit="left rows/s")
    con.close()
    del dd
    dt, mine = timed(lambda: asof(None, trades, quotes, by="instrument"), repeat=2)
    res["engine"] = dt
    fastest = min(res["polars"], res["duckdb"])
    row("asof", "engine asof(by='instrument')", dt, a.trades, unit="left rows/s",
        note=f"{dt / fastest:.2f}x the faster baseline (target <= 1.2x)")
    assert mine["bid_price"].equals(out["bid_price"], null_equal=True)
    # cross-source style: no `by`, both sides in global time order
    qg, tg = quotes.sort("ts"), trades.sort("ts")
    dtp, _ = timed(lambda: tg.join_asof(qg, on="ts", suffix="_right"), repeat=2)
    row("asof", "polars.join_asof (by=None, time-sorted)", dtp, a.trades, unit="left rows/s")
    dte, _ = timed(lambda: asof(None, tg, qg, by=None), repeat=2)
    row("asof", "engine asof(by=None)", dte, a.trades, unit="left rows/s", note=f"{dte / dtp:.2f}x polars")
    return dt / fastest


def bench_book(a, tmp):
    print(f"book(at=...) on a compacted day of {a.day_rows:,} l2 rows (hourly anchors)", flush=True)
    eng = Engine.open(tmp / "b", background=False, book_anchors=True, writer=True)
    day = to_ns("2026-11-01")
    per_hour = a.day_rows // 24
    for h in range(24):
        eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", day + h * 3600 * S, per_hour, 3600 * S, seed=h,
                                       instruments=["BTC-USD", "ETH-USD"], seq_start=h * per_hour))
        eng.flush()
    t0 = time.perf_counter()
    eng.compact()
    print(f"  (compaction incl. quotes derivation: {time.perf_counter() - t0:.1f} s)", flush=True)
    files = eng.catalog.files("l2")
    assert len(files) == 1 and files[0].compacted
    rng = np.random.default_rng(3)
    ats = [int(day + rng.integers(3600 * S, 86_400 * S)) for _ in range(a.books)]
    eng.book("coinbase", "BTC-USD", "BTC-USD", at=ats[0])  # warm up (footer, page cache)
    lat = []
    for at in ats:
        t1 = time.perf_counter()
        eng.book("coinbase", "BTC-USD", "BTC-USD", at=at, depth=10)
        lat.append(time.perf_counter() - t1)
    lat = np.array(lat)
    row("book", f"book(at, depth=10) median of {len(lat)}", float(np.median(lat)),
        note=f"min {lat.min() * 1e3:.1f} ms, p95 {np.percentile(lat, 95) * 1e3:.1f} ms (target <= 50 ms); load avg {os.getloadavg()[0]:.1f}")

    def full_replay(at):  # baseline: no anchors used — read the day up to `at`, keep the last size per level
        df = eng.l2(source="coinbase", market="BTC-USD", instrument="BTC-USD", end=at + 1,
                    columns=["side", "price", "size", "recv_ts", "ts", "seq"])
        df = df.sort(["recv_ts", "ts", "seq"], maintain_order=True)
        last = df.group_by(["side", "price"]).agg(pl.col("size").last()).filter(pl.col("size") > 0)
        return last

    bl = []
    for at in ats[:10]:
        t1 = time.perf_counter()
        full_replay(at)
        bl.append(time.perf_counter() - t1)
    row("book", "baseline: replay the day up to at (polars)", float(np.median(bl)),
        note=f"x{np.median(bl) / np.median(lat):.1f} slower")
    eng.close()
    return float(np.median(lat))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--l2-rows", type=int, default=5_000_000)
    ap.add_argument("--baseline-rows", type=int, default=1_000_000)
    ap.add_argument("--trades", type=int, default=5_000_000)
    ap.add_argument("--quotes", type=int, default=20_000_000)
    ap.add_argument("--day-rows", type=int, default=10_000_000)
    ap.add_argument("--books", type=int, default=40)
    ap.add_argument("--only", choices=["quotes", "asof", "book"], default=None)
    a = ap.parse_args(argv)
    print(f"bench_research on {os.cpu_count()} cores, polars {pl.__version__}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_research_") as d:
        tmp = Path(d)
        summary = {}
        if a.only in (None, "quotes"):
            dt = bench_quotes(a, tmp)
            summary["quotes M l2 rows/s (target >= 1)"] = f"{a.l2_rows / dt / 1e6:.2f}"
        if a.only in (None, "asof"):
            summary["asof / faster baseline (target <= 1.2)"] = f"{bench_asof(a):.2f}"
        if a.only in (None, "book"):
            summary["book(at) median ms (target <= 50)"] = f"{bench_book(a, tmp) * 1e3:.1f}"
    print("\nsummary")
    for k, v in summary.items():
        print(f"  {k:44} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
