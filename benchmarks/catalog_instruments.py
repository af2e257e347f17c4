"""Per-instrument figures in the catalog: their bytes, their write cost, and `summary(by="instrument")`.

1. Bytes per file with and without the figures: a catalog log line, and a manifest (zstd Parquet)
   divided by its files. Real files: ingested from a generated Kalshi capture whose 15-minute
   contracts rotate (~50 contracts an hourly file), and a one-instrument Coinbase-like file. Manifest:
   2,400 files of that Kalshi shape (100 days × 24 hours, 50 contracts each, names new every day).
2. Write cost: the figures' group-by against writing the same 1M-row l2 file.
3. `summary(by="instrument")` at 100,000 files × 20 instruments (hourly files of 6 markets × 2
   tables; each holds 20 of its market-day's 40 instruments), from the log catalog opened from its
   snapshot (first question, then cached, then filtered), after a 10,000-line tail, after a whole-log
   replay, and from the manifest on a fresh home (FrameCatalog). There are no data files at all:
   every answer comes from the catalog. Target: <= 20 ms.
Usage: scripts/bench_catalog_instruments [--files 100000] [--instruments 20]
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import polars as pl

from engine.lake import instruments as inst
from engine.lake.catalog import SNAPSHOT_EVERY, Catalog, FileEntry, Op
from engine.lake.manifest import build, parse
from engine.paths import file_key
from engine.timeutil import to_ns
from benchmarks.common import best_of, peak_rss_mb, table

NS_H = 3_600 * 10**9
T0 = to_ns("2025-01-01")
MARKETS = ["BTC-USD", "ETH-USD", "SOL-USD", "KXBTC", "KXETH", "KXSOL"]
_enc = msgspec.json.Encoder()


def _line(e: FileEntry, with_figures: bool) -> int:
    """Bytes of the log line of `e`; without figures: the line an engine without them writes."""
    d = msgspec.to_builtins(Op(op="add", file=e, at=1_741_000_000_000_000_000))
    if not with_figures:
        d["file"].pop("instruments")
    return len(_enc.encode(d)) + 1


# ---- 1. bytes ------------------------------------------------------------------------------------------

def real_files(work: Path) -> list[tuple]:
    from engine import Engine
    from engine.sim import synth
    from engine.sim.capture_gen import generate_kalshi, write_capture
    from engine.collect.ingest import ingest_files

    cap = work / "kalshi.jsonl"
    write_capture(generate_kalshi(series=["KXBTC"], seconds=3 * 3600, rate=10, seed=1, start_ns=T0 + 9 * NS_H,
                                  contract_minutes=15, strikes=10), cap)
    eng = Engine.open(work / "home", background=False, writer=True, book_anchors=True)
    ingest_files(eng, [cap], "kalshi", progress=False)
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", T0 + 9 * NS_H, 200_000, NS_H - 10**9))
    eng.flush()
    rows = []
    for e in eng.catalog.entries():
        k = len(inst.decode(e.instruments))
        with_, without = _line(e, True), _line(e, False)
        rows.append((f"log line, {e.table} {e.market} {e.key[-12:-8]}", f"{k} instruments, {e.rows:,} rows",
                     f"{with_:,} B", f"{without:,} B", f"+{with_ - without:,} B ({(with_ - without) / max(k, 1):.0f} B an instrument)"))
    eng.close()
    return rows


def kalshi_shape(n_files: int, contracts: int = 50, seed: int = 0) -> list[FileEntry]:
    """Hourly files of one Kalshi market: `contracts` per file, names new every day, figures random
    within each contract's part of the hour (ns exchange times, recv 1–5 ms later)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_files):
        day, hour = divmod(i, 24)
        t = T0 + i * NS_H
        date = time.strftime("%Y-%m-%d", time.gmtime((T0 + day * 24 * NS_H) // 10**9))
        code = time.strftime("%y%b%d", time.gmtime(t // 10**9)).upper()
        names = sorted(f"KXBTC-{code}{(hour + j // 10) % 24:02d}{15 * (j // 10) % 60:02d}-B{95000 + 250 * (j % 10)}"
                       for j in range(contracts))
        lo = t + np.sort(rng.integers(0, NS_H // 4, contracts))
        hi = t + NS_H - rng.integers(0, NS_H // 4, contracts)
        m = np.stack([rng.integers(50, 5000, contracts), lo, hi, lo + rng.integers(10**6, 5 * 10**6, contracts),
                      hi + rng.integers(10**6, 5 * 10**6, contracts)])
        st = inst.InstrumentStats(names, m)
        out.append(FileEntry(key=file_key("l2", "kalshi", "KXBTC", date, hour + 1), table="l2", source="kalshi",
                             market="KXBTC", date=date, rows=int(m[0].sum()), bytes=900_000, sha256=f"{i:064x}",
                             min_ts=int(lo.min()), max_ts=int(hi.max()), min_recv_ts=int(m[3].min()),
                             max_recv_ts=int(m[4].max()), min_seq=i, max_seq=i + 9_999, remote=True,
                             created_ns=t + NS_H, instruments=inst.encode(st)))
    return out


def manifest_bytes(n: int = 2_400) -> list[tuple]:
    es = kalshi_shape(n)
    bare = [msgspec.structs.replace(e, instruments=None) for e in es]
    t0 = time.perf_counter()
    with_ = len(build(es, {}))
    t_build = time.perf_counter() - t0
    without = len(build(bare, {}))
    log_with = sum(_line(e, True) for e in es) / n
    log_without = sum(_line(e, False) for e in es) / n
    return [
        (f"manifest, {n:,} Kalshi hourly files × 50 contracts", "per file", f"{with_ / n:,.0f} B",
         f"{without / n:,.0f} B", f"+{(with_ - without) / n:,.0f} B ({(with_ - without) / n / 50:.0f} B a contract); "
                                  f"build {t_build * 1e3:,.0f} ms"),
        (f"log line, the same {n:,} files", "per file", f"{log_with:,.0f} B", f"{log_without:,.0f} B",
         f"+{log_with - log_without:,.0f} B ({(log_with - log_without) / 50:.0f} B a contract)"),
    ]


# ---- 2. write cost -------------------------------------------------------------------------------------

def write_cost(work: Path) -> list[tuple]:
    from engine.sim import synth
    from engine.lake.writer import write_parquet

    names = [f"KXBTC-26DEC0417-B{97000 + 250 * i}" for i in range(50)]
    t = synth.l2_rows("kalshi", "KXBTC", T0, 1_000_000, NS_H - 10**9, instruments=names)
    t_fig = best_of(lambda: inst.encode(inst.of_table("l2", t)), 5)
    t_write = best_of(lambda: write_parquet("l2", t, work / "f.parquet"), 3)
    return [("figures of a 1M-row l2 file (50 instruments)", "group-by + encode", f"{t_fig * 1e3:.1f} ms",
             f"whole write {t_write * 1e3:,.0f} ms", f"{100 * t_fig / t_write:.1f}% of the write")]


# ---- 3. summary(by="instrument") at scale --------------------------------------------------------------

def _entry(i: int, k: int, rotating: bool) -> FileEntry:
    """File i: hourly, 12 an hour (6 markets × l2/trades), with k instruments: rotating, k of the
    market-day's 2k (new names every day, as Kalshi contracts), or the market's same k every hour."""
    m = MARKETS[i % 6]
    tab = "l2" if i % 12 < 6 else "trades"
    hour = i // 12
    day, name = hour // 24, hour % 24 + 1
    ts = T0 + hour * NS_H
    date = time.strftime("%Y-%m-%d", time.gmtime((T0 + day * 24 * NS_H) // 10**9))
    src = "coinbase" if i % 6 < 3 else "kalshi"
    rnd = random.Random(i)
    names = (sorted(f"{m}-{date}-{(hour % 24 + j) % (2 * k):02d}" for j in range(k)) if rotating
             else [f"{m}-{j:02d}" for j in range(k)])
    lo = [ts + rnd.randrange(NS_H // 4) for _ in range(k)]
    hi = [ts + NS_H - 1 - rnd.randrange(NS_H // 4) for _ in range(k)]
    m_ = np.array([[rnd.randrange(1, 50_000) for _ in range(k)], lo, hi, [x + 1_000_000 for x in lo],
                   [x + 1_000_000 for x in hi]], np.int64)
    return FileEntry(key=file_key(tab, src, m, date, name), table=tab, source=src, market=m, date=date,
                     rows=int(m_[0].sum()), bytes=12_000_000, sha256=f"{i:064x}", min_ts=min(lo), max_ts=max(hi),
                     min_recv_ts=min(lo) + 1_000_000, max_recv_ts=max(hi) + 1_000_000, min_seq=i,
                     max_seq=i + 999_999, created_ns=ts + NS_H, remote=True,
                     instruments=inst.encode(inst.InstrumentStats(names, m_)))


def _write_log(path: Path, lo: int, hi: int, k: int, rotating: bool) -> None:
    with open(path, "ab") as f:
        for start in range(lo, hi, 20_000):
            f.write(b"".join(_enc.encode(Op(op="add", file=_entry(i, k, rotating), at=1)) + b"\n"
                             for i in range(start, min(hi, start + 20_000))))


def _first(make, q) -> float:
    """Time of the first question on a fresh catalog (made by `make`, not timed)."""
    gc.collect()
    cat = make()
    t0 = time.perf_counter()
    q(cat)
    return time.perf_counter() - t0


def _new_questions(cat, q, n: int = 10) -> float:
    """Best time of `n` different questions on a warm catalog (none answered from the last-answer cache)."""
    return min(best_of(lambda: q(cat, T0 + d * 24 * NS_H), 1) for d in range(1, n + 1))


def at_scale(work: Path, n: int, k: int, rotating: bool) -> list[tuple]:
    d = work / f"scale-{int(rotating)}"
    d.mkdir()
    log = d / "log.jsonl"
    t0 = time.perf_counter()
    _write_log(log, 0, n, k, rotating)
    print(f"log of {n:,} files written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    whole = lambda c: c.summary(by="instrument")  # noqa: E731
    kx = lambda c, s=T0 + 200 * 24 * NS_H: c.summary(by="instrument", market="KX*", start=s)  # noqa: E731
    since = lambda c, s: c.summary(by="instrument", start=s)  # noqa: E731
    one = lambda c, s=None: c.summary(by="instrument", instrument="KXBTC-2025-03-0*" if rotating else "KXBTC-0*",  # noqa: E731
                                      start=s)
    listed = lambda c, s=T0 + 300 * 24 * NS_H: c.instruments(source="kalshi", start=s)  # noqa: E731

    full = Catalog(log, snapshot=False)
    t_replay = _first(lambda: Catalog(log, snapshot=False), whole)
    want = whole(full)
    full.checkpoint()
    del full
    snap_mb = (d / "snapshot.arrow").stat().st_size / 1e6
    t_open = best_of(lambda: Catalog(log), 5)
    t_cold = _first(lambda: Catalog(log), whole)
    t_cold_kx = _first(lambda: Catalog(log), kx)
    cat = Catalog(log)
    assert whole(cat).equals(want), "the snapshot answers differently from the replayed log"
    whole(cat)
    t_cached = best_of(lambda: whole(cat), 10)
    t_since = _new_questions(cat, since)
    t_kx = _new_questions(cat, kx)
    t_one = _new_questions(cat, one)
    t_list = _new_questions(cat, listed)
    t_date = _new_questions(cat, lambda c, s: c.summary(start=s))
    rows_out = want.height
    # a full tail (the most lines an append-triggered checkpoint leaves): its partitions are decoded on demand
    _write_log(log, n, n + SNAPSHOT_EVERY - 1, k, rotating)
    t_tail = _first(lambda: Catalog(log, snapshot_every=10**12), whole)
    tcat = Catalog(log, snapshot_every=10**12)
    whole(tcat)
    t_tail_new = _new_questions(tcat, since)
    # the manifest on a fresh home: one Parquet file, questions on its frame
    es = list(tcat.entries())
    t0 = time.perf_counter()
    data = build(es, {})
    t_build = time.perf_counter() - t0
    bare_mb = len(build([msgspec.structs.replace(e, instruments=None) for e in es], {})) / 1e6
    t_parse = best_of(lambda: parse(data, "bench"), 3)
    t_fcold = _first(lambda: parse(data, "bench"), whole)
    fc = parse(data, "bench")
    assert whole(fc).equals(whole(tcat)), "the manifest answers differently from the log"
    t_fnew = _new_questions(fc, since)
    t_fkx = _new_questions(fc, kx)
    pattern = "KXBTC-2025-03-04-1*" if rotating else "KXBTC-1*"
    t_fsel = best_of(lambda: fc.files("l2", market="KXBTC", instrument=pattern, start=T0 + 62 * 24 * NS_H,
                                      end=T0 + 63 * 24 * NS_H), 5)
    t_csel = best_of(lambda: tcat.files("l2", market="KXBTC", instrument=pattern, start=T0 + 62 * 24 * NS_H,
                                        end=T0 + 63 * 24 * NS_H), 5)
    t_csel_all = best_of(lambda: tcat.files("l2", market="KXBTC", instrument=pattern), 3)
    shutil.rmtree(d)
    shape = "rotating daily (Kalshi-like)" if rotating else "the same per market"
    nf = f"{n:,} files × {k} instruments {shape}"
    return [
        (f"**{nf}**: whole-lake summary(by='instrument'), log catalog from its snapshot: first question",
         f"{t_cold * 1e3:.1f} ms", f"{rows_out:,} rows out", "<= 20 ms",
         f"open {t_open * 1e3:.0f} ms; snapshot {snap_mb:.0f} MB"),
        ("  same question again (last answer kept)", f"{t_cached * 1e3:.2f} ms", "", "", ""),
        ("  new questions on the open catalog: start=day d / market='KX*', start=d / instrument glob / instruments()",
         f"{t_since * 1e3:.1f} / {t_kx * 1e3:.1f} / {t_one * 1e3:.1f} / {t_list * 1e3:.1f} ms",
         f"summary() by date: {t_date * 1e3:.1f} ms", "<= 20 ms", ""),
        ("  first filtered question (market='KX*', start=day 200) on a fresh catalog", f"{t_cold_kx * 1e3:.1f} ms",
         "", "<= 20 ms", ""),
        (f"  after a {SNAPSHOT_EVERY - 1:,}-line tail: first question / new questions",
         f"{t_tail * 1e3:.0f} ms / {t_tail_new * 1e3:.1f} ms", "", "",
         "the tail's files' figures decoded once (~20 µs a file)"),
        ("  whole-log replay (no snapshot): first question", f"{t_replay * 1e3:,.0f} ms", "", "",
         "every file's figures decoded once"),
        ("  manifest on a fresh home (FrameCatalog): first question / new questions / market='KX*'",
         f"{t_fcold * 1e3:.0f} / {t_fnew * 1e3:.1f} / {t_fkx * 1e3:.1f} ms", "", "<= 20 ms",
         f"manifest {len(data) / 1e6:.1f} MB ({bare_mb:.1f} MB without figures), build {t_build:.1f} s, "
         f"parse {t_parse * 1e3:.0f} ms"),
        ("  files(l2, KXBTC, instrument glob): one day, log / manifest; whole history, log",
         f"{t_csel * 1e3:.1f} / {t_fsel * 1e3:.1f} / {t_csel_all * 1e3:.1f} ms", "", "", "instrument pruning"),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--instruments", type=int, default=20)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-catinst-"))
    try:
        sizes = real_files(work / "real") + manifest_bytes()
        print("### Bytes per file, with and without per-instrument figures\n")
        print(table(sizes, ("measure", "file", "with figures", "without (baseline)", "cost")))
        print()
        print(table(write_cost(work), ("measure", "what", "figures", "baseline", "share")))
        print("\n### summary(by='instrument') from the catalog alone (no data files exist)\n")
        rows = at_scale(work, args.files, args.instruments, True) + at_scale(work, args.files, args.instruments, False)
        print(table(rows, ("measure", "time", "baseline / size", "target", "notes")))
        print(f"\npeak RSS {peak_rss_mb():,.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
