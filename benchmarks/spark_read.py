"""PySpark (local mode, Java 17) reading the lake's Hive layout directly, with partition discovery:
rows per (source, market, date) from Spark against the catalog's figures for the files in the store.

PySpark lives in its own venv (.venv-spark, made by scripts/bench_spark: pyspark, pyarrow and polars
pinned), so the job runs there as a subprocess (benchmarks/spark_job.py) and this side, in the
project's venv, builds the lake and compares. Reading the directories is exact only when no file
retired by a compaction still waits for its purge (the grace period): the run shows that case too,
which is why the Iceberg tables (or the manifest) are the way to read an exact file list.

Usage: scripts/bench_spark [--markets M] [--hours H] [--rows R]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)

from benchmarks.common import table  # noqa: E402
from engine import Engine  # noqa: E402
from engine.sim import synth  # noqa: E402
from engine.timeutil import NS_PER_DAY, NS_PER_HOUR, now_ns  # noqa: E402

SPARK_PY = ROOT / ".venv-spark" / "bin" / "python"
SPARK_TIMEOUT_S = 600


def catalog_counts(eng, table_name: str) -> Counter:
    """Rows per (source, market, date) of the catalog's live files that are in the store."""
    c: Counter = Counter()
    for e in eng.catalog.files(table_name):
        if e.remote:
            c[(e.source, e.market, e.date)] += e.rows
    return c


def run_spark(store_dir: Path, tables: tuple[str, ...]) -> dict:
    if not SPARK_PY.exists():
        raise RuntimeError(f"{SPARK_PY} missing: run scripts/bench_spark once (it creates .venv-spark)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    p = subprocess.run([str(SPARK_PY), str(ROOT / "benchmarks" / "spark_job.py"), str(store_dir), ",".join(tables)],
                       capture_output=True, text=True, timeout=SPARK_TIMEOUT_S, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"spark job failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def compare(eng, tables: tuple[str, ...] = ("l2", "trades")) -> dict:
    """Spark's counts per (source, market, date) against the catalog's, per table; `ok` when equal."""
    if not eng.store.is_local:
        raise ValueError("this check reads a local store directory (Spark on S3 needs hadoop-aws jars)")
    spark = run_spark(eng.store.root, tables)
    rep = {"ok": True, "spark": spark["spark"], "startup_s": spark["startup_s"], "tables": {}}
    for t in tables:
        got = {(s, m, d): n for s, m, d, n in spark["tables"][t]["counts"]}
        want = catalog_counts(eng, t)
        diff = {f"{k[1]} {k[2]}": (want.get(k, 0), got.get(k, 0)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
        rep["tables"][t] = {"partitions": len(want), "rows": sum(want.values()), "spark_rows": sum(got.values()),
                            "diff": diff, "seconds": spark["tables"][t]["seconds"],
                            "partition_columns": spark["tables"][t]["partition_columns"],
                            "schema": spark["tables"][t]["schema"]}
        rep["ok"] &= not diff
    return rep


def build(home: Path, markets: int, hours: int, rows: int) -> Engine:
    """`markets` markets × 2 closed days × `hours` hourly files of l2 and trades, uploaded."""
    eng = Engine.open(home, background=False, writer=True)
    day0 = (now_ns() // NS_PER_DAY - 3) * NS_PER_DAY
    for d in range(2):
        for h in range(hours):
            t0 = day0 + d * NS_PER_DAY + h * NS_PER_HOUR
            for i in range(markets):
                m = f"M{i:02d}-USD"
                eng.append("l2", synth.l2_rows("coinbase", m, t0, rows, NS_PER_HOUR - 10**9, seed=d * 1000 + h * 10 + i))
                eng.append("trades", synth.trade_rows("coinbase", m, t0, rows // 4, NS_PER_HOUR - 10**9, seed=h + i,
                                                      id_start=(d * 1000 + h * 10 + i) * 10**6))
            eng.flush()
    eng.upload()
    return eng


def _rows(rep: dict) -> list[tuple]:
    return [(t, r["partitions"], f"{r['rows']:,}", f"{r['spark_rows']:,}", "equal" if not r["diff"] else
             f"{len(r['diff'])} differ, e.g. {next(iter(r['diff'].items()))}", f"{r['seconds']:.2f}")
            for t, r in rep["tables"].items()]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markets", type=int, default=3)
    ap.add_argument("--hours", type=int, default=4)
    ap.add_argument("--rows", type=int, default=20_000, help="l2 rows per file (trades: a quarter)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        t0 = time.perf_counter()
        eng = build(Path(tmp) / "home", a.markets, a.hours, a.rows)
        day1 = sorted({e.date for e in eng.catalog.entries()})[0]
        # day 1 compacted and its raw files purged (grace 0): a mix of compacted and raw hourly files
        eng.compact(date=day1, grace_s=0)
        from engine.lake.compaction import purge_retired

        purge_retired(eng, grace_s=0)
        print(f"lake: {a.markets} markets x 2 days, {len(eng.catalog.entries())} files "
              f"(day {day1} compacted), built in {time.perf_counter() - t0:.1f} s\n")
        rep = compare(eng, ("l2", "trades"))
        print(f"PySpark {rep['spark']} local[2] on Java 17 (session start {rep['startup_s']:.1f} s); partition columns "
              f"discovered: {rep['tables']['l2']['partition_columns']}\n")
        print(table(_rows(rep), ("table", "partitions (catalog)", "rows (catalog)", "rows (Spark)", "per (market, date)",
                                 "Spark read s")))
        print(f"\nSpark schema of l2: {rep['tables']['l2']['schema']}")
        # the caveat: a compaction's retired raw files stay in the store for the grace period
        eng.compact(grace_s=3600)
        caveat = compare(eng, ("l2",))
        r = caveat["tables"]["l2"]
        print(f"\nAfter compacting day 2 (raw files retired, purged only after the 1 h grace period): Spark over the "
              f"directories counts {r['spark_rows']:,} l2 rows against the catalog's {r['rows']:,} "
              f"({'equal' if not r['diff'] else str(len(r['diff'])) + ' partitions double-counted'}): "
              "read the Iceberg tables (or the manifest's file list) for an exact view at any time.")
        eng.close()
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
