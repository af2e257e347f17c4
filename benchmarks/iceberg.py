"""Publishing the lake as Iceberg tables (issue 16): publish time for N files and reads through
`polars.scan_iceberg` against `eng.l2()` on the same data, each beside a baseline measured in the
same run:

1. first publish of N tiny l2 files (registered in place: footer reads + one commit), against reading
   the N footers alone, pyiceberg's own `add_files` of the same files into an unpartitioned table
   (it cannot infer the source/market partition: the files keep no statistics for them), and the
   engine's catalog manifest of the same files;
2. publish again with nothing new (the diff only), with 1% new files (incremental append), and after
   compacting one day (the overwrite that swaps the raw files for the compacted ones);
3. the whole table and one market-day read through `scan_iceberg` against `eng.l2()`.

The N files are written directly into the local store's Hive layout with the engine's Parquet writer
and catalogued with one catalog append (no collector, no upload), so 10,000 take seconds.

Usage: scripts/bench_iceberg [--files N] [--rows R] [--markets M]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)

os.environ.setdefault("POLARS_ICEBERG_PLANNER", "pyiceberg")  # the polars_iceberg plugin is not installed here

import polars as pl  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.common import table  # noqa: E402
from engine import Engine, schema  # noqa: E402
from engine.lake import iceberg  # noqa: E402
from engine.lake.catalog import FileEntry, Op  # noqa: E402
from engine.lake.writer import write_parquet  # noqa: E402
from engine.paths import date_of_ns, file_key  # noqa: E402
from engine.sim import synth  # noqa: E402
from engine.timeutil import NS_PER_DAY, NS_PER_HOUR, now_ns  # noqa: E402


def write_files(eng: Engine, n: int, rows: int, markets: int, first_hour: int) -> list[FileEntry]:
    """`n` hourly l2 files (`rows` rows each) over `markets` markets, straight into the store's layout,
    catalogued as uploaded with one append. Hours count from `first_hour` (an absolute hour number)."""

    def one(i: int) -> FileEntry:
        m, h = f"M{i % markets:02d}-USD", first_hour + i // markets
        t0 = h * NS_PER_HOUR
        date = date_of_ns(t0)
        key = file_key("l2", "coinbase", m, date, h % 24 + 1)
        t = synth.l2_rows("coinbase", m, t0, rows, NS_PER_HOUR - 10**9, seed=i, seq_start=i * rows)
        wf = write_parquet("l2", t, eng.store.path(key))
        return FileEntry(key=key, table="l2", source="coinbase", market=m, date=date, rows=wf.rows, bytes=wf.bytes,
                         sha256=wf.sha256, local=False, remote=True, created_ns=now_ns(),
                         schema_version=schema.SCHEMA_VERSION, **wf.stats)

    with ThreadPoolExecutor(2) as ex:
        entries = list(ex.map(one, range(n)))
    eng.catalog.append(*(Op(op="add", file=e) for e in entries))
    return entries


def _publish(eng: Engine) -> iceberg.TablePublish:
    (r,) = iceberg.publish(eng, ["l2"], follow=False)
    return r


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=20, help="rows per file (tiny: the cost is per file)")
    ap.add_argument("--markets", type=int, default=10)
    a = ap.parse_args(argv)
    n = a.files
    hours = -(-n // a.markets)
    first_hour = (now_ns() // NS_PER_DAY - 2) * 24 - hours  # every day closed: compaction takes them
    with tempfile.TemporaryDirectory(prefix="bench-iceberg-") as tmp:
        eng = Engine.open(Path(tmp) / "home", background=False, writer=True)
        t0 = time.perf_counter()
        entries = write_files(eng, n, a.rows, a.markets, first_hour)
        gen_s = time.perf_counter() - t0
        nbytes = sum(e.bytes for e in entries)
        print(f"## {n:,} l2 files of {a.rows} rows ({nbytes / 2**20:.0f} MiB, {a.markets} markets x "
              f"{hours / 24:.0f} days, hourly files), written and catalogued in {gen_s:.1f} s\n")

        paths = [eng.store.path(e.key) for e in entries]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(iceberg.FOOTER_WORKERS) as ex:
            list(ex.map(pq.read_metadata, paths))
        footers_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.publish_manifest()
        manifest_s = time.perf_counter() - t0

        first = _publish(eng)
        assert first.added == n and first.files == n, first

        # pyiceberg's own add_files, into an unpartitioned table of the same schema (a partitioned one fails)
        from pyiceberg.exceptions import NoSuchTableError

        cat = iceberg.open_catalog(eng)
        ischema = iceberg.iceberg_schema("l2")
        try:
            cat.drop_table(("lake", "l2_add_files"))
        except NoSuchTableError:
            pass
        plain = cat.create_table(("lake", "l2_add_files"), schema=ischema,
                                 location=iceberg.table_location(eng.store, "lake", "l2_add_files"),
                                 properties=iceberg.table_properties("l2"))
        t0 = time.perf_counter()
        plain.add_files([iceberg.file_uri(eng.store, e.key) for e in entries])
        add_files_s = time.perf_counter() - t0

        rows = [
            ("read the N footers alone (8 threads), baseline", f"{footers_s:.2f}", "1.00x", ""),
            ("catalog manifest of the N files (engine)", f"{manifest_s:.2f}", f"{manifest_s / footers_s:.2f}x", ""),
            ("pyiceberg add_files, unpartitioned table", f"{add_files_s:.2f}", f"{add_files_s / footers_s:.2f}x",
             f"{add_files_s / n * 1e3:.2f} ms/file"),
            ("**iceberg publish, first (N new files)**", f"{first.seconds:.2f}", f"{first.seconds / footers_s:.2f}x",
             f"{first.seconds / n * 1e3:.2f} ms/file"),
        ]

        again = _publish(eng)
        assert not again.committed
        rows.append(("publish again, nothing new (diff only)", f"{again.seconds:.2f}",
                     f"{again.seconds / footers_s:.2f}x", "no commit"))
        extra = write_files(eng, max(1, n // 100), a.rows, a.markets, first_hour + hours)
        inc = _publish(eng)
        assert inc.added == len(extra) and inc.removed == 0, inc
        rows.append((f"publish {len(extra)} new files (incremental)", f"{inc.seconds:.2f}",
                     f"{inc.seconds / footers_s:.2f}x", f"snapshot {inc.snapshot_id}"))

        day = sorted({e.date for e in entries})[1]
        before = len(eng.catalog.files("l2"))
        eng.compact(date=day, table="l2", grace_s=3600)
        merged = before - len(eng.catalog.files("l2"))
        rep = _publish(eng)
        assert rep.removed == merged + rep.added and rep.files == len(eng.catalog.files("l2")), rep
        rows.append((f"publish after compacting {day}: -{rep.removed} +{rep.added} in one overwrite",
                     f"{rep.seconds:.2f}", f"{rep.seconds / footers_s:.2f}x", f"snapshot {rep.snapshot_id}"))
        print(table(rows, ("publish", "seconds", "vs footers", "")))

        # reads: the whole table, then one market-day
        tbl = iceberg.load_table(eng, "l2")
        t0 = time.perf_counter()
        want = eng.l2(raw_ns=True, allow_unsealed=True)
        eng_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = pl.scan_iceberg(tbl).collect()
        ice_s = time.perf_counter() - t0
        assert got.height == want.height
        cols = want.columns
        equal = got.select(cols).sort(cols).equals(want.with_columns(pl.col(pl.Categorical).cast(pl.String)).sort(cols))
        dates = sorted({e.date for e in entries})
        one_day = dates[2] if len(dates) > 3 else dates[-1]  # a whole day of hourly files, not compacted
        market = entries[0].market
        start, end = f"{one_day}T00:00:00Z", f"{one_day}T23:59:59.999999999Z"
        t0 = time.perf_counter()
        want1 = eng.l2(market=market, start=start, end=end, raw_ns=True, allow_unsealed=True)
        eng1_s = time.perf_counter() - t0
        from engine.timeutil import to_ns

        t0 = time.perf_counter()
        got1 = (pl.scan_iceberg(tbl).filter((pl.col("market") == market) & (pl.col("ts") >= to_ns(start))
                                            & (pl.col("ts") < to_ns(end))).collect())
        ice1_s = time.perf_counter() - t0
        print()
        print(table([
            (f"whole table ({want.height:,} rows, {rep.files:,} files)", f"{eng_s:.2f}", f"{ice_s:.2f}",
             f"{ice_s / eng_s:.2f}x", "equal" if equal else "DIFFERENT"),
            (f"one market-day ({want1.height:,} rows)", f"{eng1_s:.3f}", f"{ice1_s:.3f}", f"{ice1_s / eng1_s:.2f}x",
             "equal count" if got1.height == want1.height else "DIFFERENT"),
        ], ("read", "eng.l2() s (baseline)", "scan_iceberg s", "ratio", "rows")))
        eng.close()
        return 0 if equal and got1.height == want1.height else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
