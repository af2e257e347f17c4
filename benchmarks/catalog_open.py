"""Catalog open time as the lake grows: snapshot + tail against the plain log replay (same run).

Builds catalog logs of N `add` lines (hourly files of 6 markets × 2 tables, 24 per partition, as
the collector writes them; `--compacted` also builds the one-file-per-partition shape a compacted
lake has), then times, per N:
- baseline: `Catalog(log, snapshot=False)`, the whole log replayed;
- the first checkpoint (written from that fully replayed catalog);
- open from the snapshot with an empty tail, and with a full tail (`SNAPSHOT_EVERY - 1` lines,
  the most an append-triggered checkpoint leaves);
- the first questions after a snapshot open (summary, one market-day's files), and the steady-state
  checkpoint (snapshot + full tail → new snapshot).
Usage: scripts/bench_catalog [--files 100000,1000000] [--compacted]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)

import msgspec  # noqa: E402

from benchmarks.common import best_of, peak_rss_mb, table  # noqa: E402
from engine.lake.catalog import SNAPSHOT_EVERY, Catalog, FileEntry, Op  # noqa: E402
from engine.paths import file_key  # noqa: E402
from engine.timeutil import NS_PER_HOUR as NS_H  # noqa: E402
from engine.timeutil import to_ns  # noqa: E402

T0 = to_ns("2020-01-01")
MARKETS = ["BTC-USD", "ETH-USD", "SOL-USD", "KXBTC", "KXETH", "KXSOL"]
_enc = msgspec.json.Encoder()


def _entry(i: int, compacted: bool) -> FileEntry:
    """File i: hourly (12 per hour: 6 markets × l2/trades), or one per (table, market, day)."""
    m = MARKETS[i % 6]
    table = "l2" if i % 12 < 6 else "trades"
    if compacted:
        day, name = i // 12, 0
        ts, span = T0 + day * 24 * NS_H, 24 * NS_H
    else:
        hour = i // 12
        day, name = hour // 24, hour % 24 + 1
        ts, span = T0 + hour * NS_H, NS_H
    date = time.strftime("%Y-%m-%d", time.gmtime((T0 + day * 24 * NS_H) // 10**9))
    src = "coinbase" if i % 6 < 3 else "kalshi"
    return FileEntry(key=file_key(table, src, m, date, name), table=table, source=src, market=m, date=date,
                     rows=1_000_000, bytes=12_000_000, sha256=f"{i:064x}", min_ts=ts, max_ts=ts + span - 1,
                     min_recv_ts=ts, max_recv_ts=ts + span - 1, min_seq=i, max_seq=i + 999_999, created_ns=ts + span,
                     compacted=compacted)


def _write_log(path: Path, lo: int, hi: int, compacted: bool) -> None:
    with open(path, "ab") as f:
        for start in range(lo, hi, 50_000):
            f.write(b"".join(_enc.encode(Op(op="add", file=_entry(i, compacted), at=1)) + b"\n"
                             for i in range(start, min(hi, start + 50_000))))


def _open_time(log: Path, n: int = 5, **kw) -> float:
    gc.collect()
    return best_of(lambda: Catalog(log, **kw), n)


def run(work: Path, n_files: int, compacted: bool) -> list[tuple]:
    shape = "compacted, 1 file/partition" if compacted else "hourly, 24 files/partition"
    d = work / f"{n_files}-{int(compacted)}"
    d.mkdir()
    log = d / "log.jsonl"
    _write_log(log, 0, n_files, compacted)
    gc.collect()
    t0 = time.perf_counter()
    full = Catalog(log, snapshot=False)  # the baseline: today's open, the whole log replayed
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    full.checkpoint()
    t_first_ckpt = time.perf_counter() - t0
    snap_mb = full.snapshot_path.stat().st_size / 1e6
    log_mb = log.stat().st_size / 1e6
    del full
    t_empty = _open_time(log)
    # a full tail: the most lines an append-triggered checkpoint leaves behind (new hours of files)
    _write_log(log, n_files, n_files + SNAPSHOT_EVERY - 1, compacted)
    t_tail = _open_time(log, 3, snapshot_every=10**12)
    cat = Catalog(log, snapshot_every=10**12)
    t0 = time.perf_counter()
    cat.summary()
    t_sum = time.perf_counter() - t0
    day = _entry(n_files // 2, compacted).date
    t0 = time.perf_counter()
    files = cat.files("l2", market="BTC-USD", start=day, end=to_ns(day) + 24 * NS_H)
    t_files = time.perf_counter() - t0
    assert files, "no files found for a market-day"
    t0 = time.perf_counter()
    cat.checkpoint()
    t_ckpt = time.perf_counter() - t0
    shutil.rmtree(d)
    n = f"{n_files:,} files ({shape})"
    target = {100_000: "<= 100 ms", 1_000_000: "<= 300 ms"}.get(n_files, "")
    return [
        (f"open, {n}, empty tail", f"{t_empty * 1e3:.1f} ms", f"log replay {t_base * 1e3:,.0f} ms",
         f"{t_base / t_empty:,.0f}x faster", target),
        (f"open, {n}, + {SNAPSHOT_EVERY - 1:,}-line tail", f"{t_tail * 1e3:.1f} ms", f"log replay {t_base * 1e3:,.0f} ms",
         f"{t_base / t_tail:,.0f}x faster", target),
        (f"first summary() / one market-day files(), {n}", f"{t_sum * 1e3:.1f} ms / {t_files * 1e3:.1f} ms", "", "", ""),
        (f"checkpoint, {n}: first / snapshot + tail", f"{t_first_ckpt * 1e3:,.0f} ms / {t_ckpt * 1e3:,.0f} ms",
         f"snapshot {snap_mb:,.0f} MB, log {log_mb:,.0f} MB", "", f"every {SNAPSHOT_EVERY:,} log lines"),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", default="100000,1000000", help="comma-separated catalog sizes")
    ap.add_argument("--compacted", action="store_true", help="also the one-file-per-partition shape")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    rows = []
    try:
        for n in (int(x) for x in args.files.split(",")):
            for compacted in (False, True) if args.compacted else (False,):
                rows += run(work, n, compacted)
                print(f"done {n:,} compacted={compacted}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, ("measure", "with snapshot", "baseline (same run)", "ratio", "target")))
    print(f"\npeak RSS {peak_rss_mb():,.0f} MB (the baseline replay holds every entry in memory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
