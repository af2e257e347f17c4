"""The bucket as the database (issue 12), against moto's S3 server on 127.0.0.1, each figure beside
a baseline measured in the same run:

1. a reader's open plus refresh of an unchanged manifest of N files (target <= 50 ms, one request),
   against the first open that downloads and parses it;
2. one market-day of l2 read from the bucket: cold through the engine, warm (cached), and pyarrow
   reading the same objects through boto3 directly;
3. peak memory of `scan_l2(...).filter(...).group_by(...).collect()` over D days against `l2()` of
   the same range followed by the same aggregation (each in its own process).

Usage: scripts/bench_remote [--files N] [--days D] [--rows-per-day R]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)

import boto3  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine import Engine  # noqa: E402
from engine.lake.catalog import FileEntry  # noqa: E402
from engine.lake.manifest import build  # noqa: E402
from engine.paths import MANIFEST_KEY  # noqa: E402
from engine.sim import synth  # noqa: E402
from engine.timeutil import NS_PER_DAY as DAY  # noqa: E402
from engine.timeutil import to_ns  # noqa: E402
from engine_tests.conftest import MotoServer  # noqa: E402

T0 = to_ns("2026-10-01")


def _manifest_of(n: int) -> bytes:
    """A manifest of `n` uploaded files (50 markets, hourly files) without writing them."""
    entries = []
    for i in range(n):
        m, h = i % 50, i // 50
        date = time.strftime("%Y-%m-%d", time.gmtime((T0 + h * 3600 * 10**9) // 10**9))
        ts = T0 + h * 3600 * 10**9
        entries.append(FileEntry(key=f"data/l2/source=coinbase/market=M{m:02d}/date={date}/{h:06d}.parquet", table="l2",
                           source="coinbase", market=f"M{m:02d}", date=date, rows=100_000, bytes=1_200_000,
                           sha256=hashlib.sha256(b"%d" % i).hexdigest(), min_ts=ts, max_ts=ts + 3599 * 10**9, min_recv_ts=ts,
                           max_recv_ts=ts + 3599 * 10**9, min_seq=1, max_seq=100_000, remote=True, created_ns=ts))
    return build(entries, {"coinbase": T0 + (n // 50 + 1) * 3600 * 10**9})


def bench_open(store: str, home: Path, n: int, repeat: int) -> None:
    data = _manifest_of(n)
    w = Engine.open(home / "writer", store, background=False, writer=True)
    w.store.put_bytes(MANIFEST_KEY, data)
    t0 = time.perf_counter()
    first = Engine.open(home / "reader", store)
    cold = time.perf_counter() - t0
    assert len(first.catalog.df) == n
    opens, refreshes, reqs = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = Engine.open(home / "reader", store)
        t1 = time.perf_counter()
        seen = []
        r.store.client.meta.events.register("before-send.s3.*", lambda request, _s=seen, **_: _s.append(request.url))
        assert r.refresh() is False
        t2 = time.perf_counter()
        opens.append(t1 - t0)
        refreshes.append(t2 - t1)
        reqs.append(len(seen))
    best_open, best_refresh = min(opens), min(refreshes)
    print(f"## reader open + refresh, manifest of {n:,} files ({len(data) / 2**20:.1f} MiB)")
    print(f"{'first open (download + parse), baseline':<52}{cold * 1e3:>10.1f} ms")
    print(f"{'open again (cached, one conditional GET)':<52}{best_open * 1e3:>10.1f} ms")
    print(f"{'refresh() of the unchanged manifest':<52}{best_refresh * 1e3:>10.1f} ms   requests: {max(reqs)}")
    print(f"{'open + refresh':<52}{(best_open + best_refresh) * 1e3:>10.1f} ms   target <= 50 ms; "
          f"{cold / (best_open + best_refresh):.1f}x faster than the first open")
    print()


def bench_day(store: str, bucket: str, home: Path, rows: int, repeat: int) -> None:
    w = Engine.open(home / "day-writer", store, background=False, writer=True)
    per_hour = rows // 24
    for h in range(24):
        w.append("l2", synth.realistic_l2("coinbase", "BTC-USD", T0 + h * 3600 * 10**9, per_hour, seed=h,
                                          rate_per_s=per_hour / 3600))
    w.flush()
    w.upload()
    files = w.catalog.files("l2", "coinbase", "BTC-USD")
    nbytes = sum(e.bytes for e in files)
    q = {"source": "coinbase", "market": "BTC-USD", "allow_unsealed": True}  # every file, as the baseline reads
    colds, warms, directs = [], [], []
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for i in range(repeat):
        t0 = time.perf_counter()
        r = Engine.open(home / f"day-reader-{i}", store)
        df = r.l2(**q)
        colds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        df2 = r.l2(**q)
        warms.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tabs = [pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=f"lake/{e.key}")["Body"].read()))
                for e in files]
        directs.append(time.perf_counter() - t0)
        assert df.height == df2.height == sum(t.num_rows for t in tabs), (df.height, df2.height, [t.num_rows for t in tabs])
        rows = df.height
    d = min(directs)
    print(f"## one market-day of l2 from the bucket: {rows:,} rows in {len(files)} hourly files, {nbytes / 2**20:.1f} MiB")
    print(f"{'pyarrow via boto3 get_object (baseline)':<52}{d * 1e3:>10.1f} ms")
    print(f"{'engine, cold (fresh home: manifest, fetch, verify)':<52}{min(colds) * 1e3:>10.1f} ms   {min(colds) / d:.2f}x baseline")
    print(f"{'engine, warm (read cache)':<52}{min(warms) * 1e3:>10.1f} ms   {min(warms) / d:.2f}x baseline")
    print()


def _child_peak(store: str, home: Path, mode: str, days: int) -> tuple[float, int, float]:
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
import polars as pl
from engine import Engine
r = Engine.open({str(home)!r}, {store!r}, cache_bytes=256 << 20)
q = dict(source="coinbase", market="BTC-USD", start={T0}, end={T0 + days * DAY}, allow_unsealed=True)
t0 = time.perf_counter()
agg = lambda f: f.filter(pl.col("side") == "bid").group_by("instrument").agg(pl.len(), pl.col("size").sum())
if {mode!r} == "scan":
    out = agg(r.scan_l2(**q)).collect()
elif {mode!r} == "scan-streaming":
    out = agg(r.scan_l2(**q)).collect(engine="streaming")
else:
    out = agg(r.l2(**q))
print(json.dumps([time.perf_counter() - t0, int(out["len"].sum()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    secs, n, kb = json.loads(p.stdout.strip().splitlines()[-1])
    return secs, n, kb * 1024


def bench_memory(store: str, home: Path, days: int, rows_per_day: int) -> None:
    w = Engine.open(home / "mem-writer", store, background=False, writer=True, flush_rows=10**9)
    for d in range(days):
        for h in range(0, 24, 6):
            w.append("l2", synth.realistic_l2("coinbase", "BTC-USD", T0 + d * DAY + h * 3600 * 10**9,
                                              rows_per_day // 4, seed=d * 24 + h, rate_per_s=rows_per_day / 86_400))
        w.flush()
    w.upload()
    total = sum(e.bytes for e in w.catalog.files("l2"))
    Engine.open(home / "mem-probe", store)  # manifest cached once; each child opens its own home below
    scan = _child_peak(store, home / "mem-scan", "scan", days)
    stream = _child_peak(store, home / "mem-stream", "scan-streaming", days)
    eager = _child_peak(store, home / "mem-eager", "eager", days)
    assert scan[1] == eager[1]
    print(f"## {days} days of l2 ({days * rows_per_day:,} rows, {total / 2**20:.0f} MiB in the bucket), "
          "filter + group_by, peak RSS of the process")
    print(f"{'l2() then aggregate (baseline)':<52}{eager[2] / 2**20:>10.0f} MB   {eager[0]:.1f} s")
    print(f"{'scan_l2(...).filter(...).group_by(...).collect()':<52}{scan[2] / 2**20:>10.0f} MB   {scan[0]:.1f} s   "
          f"{scan[2] / eager[2]:.2f}x the baseline's memory")
    label = '... .collect(engine="streaming")'
    print(f"{label:<52}{stream[2] / 2**20:>10.0f} MB   {stream[0]:.1f} s   "
          f"{stream[2] / eager[2]:.2f}x the baseline's memory")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--rows-per-day", type=int, default=400_000)
    ap.add_argument("--day-rows", type=int, default=2_400_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    srv = MotoServer().start()
    try:
        for k, v in srv.env().items():
            os.environ[k] = v
        bucket = "bench"
        srv.make_bucket(bucket)
        store = f"s3://{bucket}/lake"
        with tempfile.TemporaryDirectory(prefix="bench-remote-") as d:
            bench_open(store, Path(d) / "open", a.files, a.repeat)
        srv.make_bucket("bench-day")
        with tempfile.TemporaryDirectory(prefix="bench-remote-") as d:
            bench_day("s3://bench-day/lake", "bench-day", Path(d), a.day_rows, max(2, a.repeat // 2))
        srv.make_bucket("bench-mem")
        with tempfile.TemporaryDirectory(prefix="bench-remote-") as d:
            bench_memory("s3://bench-mem/lake", Path(d), a.days, a.rows_per_day)
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
