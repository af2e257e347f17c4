"""`data-engine demo`: the storage path end to end on a generated lake, offline, in seconds."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import polars as pl

from engine import Engine
from engine.schema import NS_PER_DAY, NS_PER_HOUR
from engine.sim import synth
from engine.timeutil import iso


def build_lake(home: Path, rows_per_hour: int = 20_000, hours: int = 30) -> Engine:
    """Generated books and trades for 3 Coinbase products and 2 Kalshi series, ending now."""
    eng = Engine.open(home, background=False, book_anchors=True, writer=True)
    now = time.time_ns()
    start = (now // NS_PER_HOUR - hours) * NS_PER_HOUR
    kalshi = {"KXBTC": ["KXBTC-26NOV2617-B97500", "KXBTC-26NOV2617-B98000"], "KXETH": ["KXETH-26NOV2617-B3400"]}
    for h in range(hours):
        t0 = start + h * NS_PER_HOUR
        span = min(NS_PER_HOUR, now - 120 * 10**9 - t0)
        if span <= 0:
            break
        for i, m in enumerate(["BTC-USD", "ETH-USD", "SOL-USD"]):
            eng.append("l2", synth.realistic_l2("coinbase", m, t0, rows_per_hour, seed=h * 10 + i,
                                                 rate_per_s=rows_per_hour / (span / 1e9)))
            eng.append("trades", synth.trade_rows("coinbase", m, t0, rows_per_hour // 20, span, seed=h * 10 + i,
                                                  id_start=(h * 10 + i) * 10**6))
        for j, (series, instruments) in enumerate(kalshi.items()):
            eng.append("l2", synth.l2_rows("kalshi", series, t0, rows_per_hour // 10, span, seed=h * 7 + j,
                                           instruments=instruments))
            eng.append("trades", synth.trade_rows("kalshi", series, t0, rows_per_hour // 100, span, seed=h * 7 + j,
                                                  instruments=instruments, id_start=(h * 7 + j) * 10**6))
    eng.append("gaps", synth.gap_rows([
        {"source": "coinbase", "market": "ETH-USD", "instrument": None, "start_ts": start + 5 * NS_PER_HOUR,
         "end_ts": start + 5 * NS_PER_HOUR + 42 * 10**9, "kind": "disconnect", "detail": "demo: socket closed"},
        {"source": "kalshi", "market": "KXBTC", "instrument": "KXBTC-26NOV2617-B97500", "start_ts": start + 9 * NS_PER_HOUR,
         "end_ts": start + 9 * NS_PER_HOUR + 3 * 10**9, "kind": "sequence", "detail": "demo: seq 1041 → 1043"},
    ]))
    eng.flush()
    return eng


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine demo", description=__doc__)
    ap.add_argument("--home", default="./.demo/lake-storage", help="demo lake (recreated)")
    ap.add_argument("--rows-per-hour", type=int, default=20_000)
    args = ap.parse_args(argv)
    home = Path(args.home)
    shutil.rmtree(home, ignore_errors=True)
    t0 = time.perf_counter()
    eng = build_lake(home, args.rows_per_hour)
    print(f"wrote {len(eng.catalog.entries())} files in {time.perf_counter() - t0:.1f}s into {home}/staging")
    up = eng.upload()
    print(f"uploaded {up['uploaded']} files ({up['bytes']:,} bytes) to {eng.store.url}")
    res = eng.compact()
    print(f"compacted {len(res)} closed partitions into one sorted file each")
    with pl.Config(tbl_rows=40, tbl_cols=12, tbl_width_chars=160, fmt_str_lengths=30):
        print("\ncatalog summary (no data read):")
        print(eng.catalog.summary())  # min_ts/max_ts come as UTC datetimes
        print("\nSQL: trades per market, last 24h:")
        day_ago = time.time_ns() - NS_PER_DAY
        print(eng.sql("SELECT source, market, count(*) AS trades, round(sum(price*size), 2) AS notional "
                      "FROM trades GROUP BY ALL ORDER BY ALL", start=day_ago))
        print("\ngaps:")
        print(eng.gaps())
    for s, w in sorted(eng.catalog.watermarks.items()):
        print(f"sealed watermark {s}: {iso(w)}")
    eng.close()
    return 0
