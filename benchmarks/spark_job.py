"""Runs inside .venv-spark (PySpark only, no engine import): Spark in local mode reads the store's Hive
layout `data/{table}/source=/market=/date=/` with partition discovery and prints, as one JSON line,
the rows per (source, market, date) of each table, the schema Spark inferred and the seconds taken.

Usage: .venv-spark/bin/python benchmarks/spark_job.py STORE_DIR TABLE[,TABLE...]
"""

from __future__ import annotations

import json
import sys
import time


def main(store: str, tables: list[str]) -> dict:
    from pyspark.sql import SparkSession

    t0 = time.perf_counter()
    spark = (SparkSession.builder.master("local[2]").appName("lake-hive-read")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4")
             .config("spark.driver.memory", "1g").config("spark.sql.session.timeZone", "UTC").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    out: dict = {"spark": spark.version, "startup_s": time.perf_counter() - t0, "tables": {}}
    try:
        for t in tables:
            t1 = time.perf_counter()
            # partition discovery: source, market (strings) and date (a date) from the directory names
            df = spark.read.parquet(f"{store}/data/{t}")
            rows = df.groupBy("source", "market", "date").count().collect()
            out["tables"][t] = {
                "counts": sorted([r["source"], r["market"], str(r["date"]), int(r["count"])] for r in rows),
                "schema": df.schema.simpleString(),
                "partition_columns": [c for c in ("source", "market", "date") if c in df.columns],
                "seconds": time.perf_counter() - t1,
            }
    finally:
        spark.stop()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2].split(","))))
