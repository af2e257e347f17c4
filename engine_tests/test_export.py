"""Export: round trips (export, read back with Polars/pyarrow, equal to the query) for Parquet, CSV and
Arrow, one file or a folder, the CLI; and a range larger than the read cache exported from a real S3
server (moto) in bounded memory, measured in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import Engine
from engine.research.export import CSV_TIME_FORMAT, cli, export
from engine.schema import NS_PER_HOUR, SchemaError
from engine.sim import synth
from engine.timeutil import iso

ROOT = Path(__file__).resolve().parents[1]
S = 10**9
# 26 hours ago, on the hour: the data crosses a UTC date boundary on any day the tests run
T0 = (time.time_ns() // NS_PER_HOUR - 26) * NS_PER_HOUR


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    home = tmp_path_factory.mktemp("exp") / "lake"
    w = Engine.open(home, background=False, writer=True)
    for h in range(0, 26, 5):  # every fifth hour: six hourly files per market, over two dates
        t = T0 + h * NS_PER_HOUR
        w.append("trades", synth.trade_rows("coinbase", "BTC-USD", t, 400, NS_PER_HOUR - S, seed=h, id_start=h * 1000))
        w.append("trades", synth.trade_rows("kalshi", "KXBTC", t, 150, NS_PER_HOUR - S, seed=h + 50, id_start=h * 1000,
                                            instruments=["KXBTC-X-B97500", "KXBTC-X-B98000"]))
        w.append("l2", synth.l2_rows("coinbase", "BTC-USD", t, 3000, NS_PER_HOUR - S, seed=h, seq_start=h * 10**6))
    w.flush()
    w.close()
    eng = Engine.open(home)
    yield eng
    eng.close()


def _plain(df: pl.DataFrame) -> pl.DataFrame:
    """The query result with its dictionary columns as strings: what the export writes."""
    return df.with_columns(pl.col(c).cast(pl.String) for c, t in df.schema.items() if isinstance(t, pl.Categorical))


def _read_back(path: Path, fmt: str, like: pl.DataFrame) -> pl.DataFrame:
    if fmt == "parquet":
        return pl.read_parquet(path)
    if fmt == "arrow":
        return pl.read_ipc(path)
    times = [c for c, t in like.schema.items() if isinstance(t, pl.Datetime)]
    df = pl.read_csv(path, schema_overrides={c: pl.String if c in times else t for c, t in like.schema.items()})
    return df.with_columns(pl.col(c).str.to_datetime(CSV_TIME_FORMAT, time_unit="ns", time_zone="UTC") for c in times)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "arrow"])
def test_round_trip_equals_the_query(lake, tmp_path, fmt):
    kw = dict(source="coinbase", market="BTC-USD", start=T0 + 4 * NS_PER_HOUR, end=T0 + 21 * NS_PER_HOUR)
    want = _plain(lake.trades(**kw))
    seen = []
    r = lake.export("trades", **kw, format=fmt, out=tmp_path / f"t.{fmt}", progress=lambda d, t: seen.append((d, t)),
                    batch_rows=100)
    assert r.rows == want.height > 0 and r.files == (tmp_path / f"t.{fmt}",) and r.bytes == r.path.stat().st_size
    got = _read_back(r.path, fmt, want)
    assert got.schema == want.schema
    assert got.equals(want)
    assert seen[-1][0] == want.height and len(seen) >= want.height // 400  # per batch, several files
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # written under a temporary name, renamed
    if fmt == "csv":  # ISO-8601 UTC with nanoseconds
        first = r.path.read_text().splitlines()[1]
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z,\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z,coinbase,", first)
    if fmt == "parquet":  # pyarrow sees the lake's time type
        assert pq.read_schema(r.path).field("ts").type == pa.timestamp("ns", tz="UTC")
    if fmt == "arrow":
        with pa.ipc.open_file(r.path) as f:
            assert f.schema.field("recv_ts").type == pa.timestamp("ns", tz="UTC")


def test_l2_globs_raw_ns_and_folders(lake, tmp_path):
    # l2 (booleans, floats), parquet and csv
    want = _plain(lake.l2(market="BTC-USD", end=T0 + 11 * NS_PER_HOUR))
    for fmt in ("parquet", "csv"):
        r = lake.export("l2", market="BTC-USD", end=T0 + 11 * NS_PER_HOUR, format=fmt, out=tmp_path / f"l2.{fmt}",
                        progress=False)
        assert _read_back(r.path, fmt, want).equals(want)
    # an instrument glob over a Kalshi series, times as int ns
    want = _plain(lake.trades(market="KX*", instrument="*B98000", raw_ns=True))
    r = lake.export("trades", market="KX*", instrument="*B98000", raw_ns=True, out=tmp_path / "k.arrow", format="arrow",
                    progress=False)
    got = pl.read_ipc(r.path)
    assert got.schema["ts"] == pl.Int64 and got.equals(want) and set(got["instrument"]) == {"KXBTC-X-B98000"}
    # a folder: one file per source, market and UTC date
    out = tmp_path / "folder"
    out.mkdir()
    r = lake.export("trades", format="parquet", out=out, progress=False)
    names = sorted(p.name for p in r.files)
    dates = sorted({time.strftime("%Y-%m-%d", time.gmtime((T0 + h * NS_PER_HOUR) / S)) for h in range(0, 26, 5)})
    assert len(dates) == 2
    assert names == sorted(f"trades-{s}-{m}-{d}.parquet" for s, m in (("coinbase", "BTC-USD"), ("kalshi", "KXBTC"))
                           for d in dates)
    back = pl.concat([pl.read_parquet(p) for p in r.files]).sort("source", "instrument", "ts", "seq")
    assert back.equals(_plain(lake.trades()).sort("source", "instrument", "ts", "seq"))
    assert r.rows == back.height and r.path == out
    # a path ending in a separator is a folder too (created)
    r2 = lake.export("trades", market="KXBTC", format="csv", out=str(tmp_path / "new") + os.sep, progress=False)
    assert r2.path.is_dir() and len(r2.files) == 2


def test_empty_range_and_errors(lake, tmp_path):
    r = lake.export("trades", market="BTC-USD", start=T0 + 1 * NS_PER_HOUR, end=T0 + 2 * NS_PER_HOUR, format="csv",
                    out=tmp_path / "e.csv", progress=False)
    assert r.rows == 0 and r.path.read_text().strip() == "ts,recv_ts,source,market,instrument,side,price,size,trade_id,seq"
    with pytest.raises(ValueError, match="unknown format 'xlsx'; formats: parquet, csv, arrow"):
        lake.export("trades", format="xlsx", out=tmp_path / "x.xlsx")
    with pytest.raises(SchemaError, match="unknown table 'bogus'"):
        lake.export("bogus", out=tmp_path / "x.parquet")
    with pytest.raises(LookupError, match="unknown market 'NOPE'"):
        lake.export("trades", market="NOPE", out=tmp_path / "x.parquet")
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".x*"))


def test_cli(lake, tmp_path, capsys):
    out = tmp_path / "cli.csv"
    assert cli(["trades", "--home", str(lake.home), "--market", "KXBTC", "--format", "csv", "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    assert pl.read_csv(out).height == lake.trades(market="KXBTC").height
    assert cli(["trades", "--home", str(lake.home), "--market", "NOPE", "--out", str(tmp_path / "n.parquet")]) == 2
    assert "unknown market 'NOPE'" in capsys.readouterr().err
    # through the top-level command
    from engine.cli import main

    assert main(["export", "l2", "--home", str(lake.home), "--end", iso(T0 + NS_PER_HOUR), "--out",
                 str(tmp_path / "m.arrow"), "--format", "arrow"]) == 0
    assert pl.read_ipc(tmp_path / "m.arrow").height == lake.l2(end=T0 + NS_PER_HOUR).height


# ---- larger than the read cache, in bounded memory ---------------------------------------------------
_CHILD = r"""
import json, resource, sys
from engine import Engine
home, store, cache_bytes, out, first_end = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
eng = Engine.open(home, store, cache_bytes=cache_bytes)
cache = eng.layout.cache
def cached():
    return sum(p.stat().st_size for p in cache.rglob("*.parquet"))
# warm-up: imports, thread pools and one file's fetch and export, so the measure is what the range adds
eng.export("l2", end=first_end, out=out + ".first.parquet", progress=False, allow_unsealed=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak_cache = [0]
def progress(done, total):
    peak_cache[0] = max(peak_cache[0], cached())
r = eng.export("l2", out=out, progress=progress, allow_unsealed=True)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"rows": r.rows, "rss_growth": grown * 1024, "peak_cache": peak_cache[0], "base": base * 1024}))
"""


def _bounded_export(tmp_path, s3_env, hours: int, rows_per_hour: int) -> dict:
    from engine.lake.store import CacheTooSmallError

    w = Engine.open(tmp_path / "vps", s3_env, background=False, writer=True)
    for h in range(hours):
        w.append("l2", synth.l2_rows("coinbase", "BTC-USD", T0 + h * NS_PER_HOUR, rows_per_hour, NS_PER_HOUR - S,
                                     seed=h, seq_start=h * 10**7))
        w.flush()
    w.upload()
    w.close()
    files = sorted(w.catalog.entries(), key=lambda e: e.key)
    total = sum(e.bytes for e in files)
    cache_bytes = max(e.bytes for e in files) * 2  # two files at most: a fraction of the range
    assert cache_bytes < total / 2
    r = Engine.open(tmp_path / "laptop", s3_env, cache_bytes=cache_bytes)
    with pytest.raises(CacheTooSmallError):  # the eager query cannot hold the range at once
        r.l2(allow_unsealed=True)
    out = tmp_path / "all.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "ENGINE_LOG_LEVEL": "WARNING"}
    p = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "laptop"), s3_env, str(cache_bytes), str(out),
                        str(T0 + NS_PER_HOUR)], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    back = pl.read_parquet(out)
    m.update(total=total, cache_bytes=cache_bytes, data_bytes=back.estimated_size(), back=back)
    assert m["rows"] == back.height == hours * rows_per_hour
    return m


def _check_bounds(m: dict, share: float) -> None:
    # through the cache, never more than it may hold (and something went through it)
    assert 0 < m["peak_cache"] <= m["cache_bytes"], m
    # memory: what the whole range adds to one file's export is a fraction of the data held at once
    assert m["rss_growth"] < share * m["data_bytes"], {k: v for k, v in m.items() if k != "back"}


def test_export_larger_than_the_read_cache_in_bounded_memory(tmp_path, s3_env):
    m = _bounded_export(tmp_path, s3_env, hours=6, rows_per_hour=250_000)
    _check_bounds(m, 0.5)
    sample = m["back"].filter(pl.col("seq") % 9973 == 0).sort("seq")
    r = Engine.open(tmp_path / "laptop2", s3_env)  # a big enough cache: the eager query, for comparison
    want = _plain(r.l2(allow_unsealed=True)).filter(pl.col("seq") % 9973 == 0).sort("seq")
    assert sample.equals(want)
    print(f"export of {m['rows']:,} l2 rows ({m['total'] / 2**20:.1f} MiB in the store, "
          f"{m['data_bytes'] / 2**20:.0f} MiB in memory) with a {m['cache_bytes'] / 2**20:.1f} MiB cache: "
          f"RSS +{m['rss_growth'] / 2**20:.1f} MiB over one file's export, cache peak {m['peak_cache'] / 2**20:.1f} MiB")


@pytest.mark.slow
def test_export_a_day_larger_than_the_read_cache_in_bounded_memory(tmp_path, s3_env):
    m = _bounded_export(tmp_path, s3_env, hours=24, rows_per_hour=300_000)
    _check_bounds(m, 0.15)
    print(f"export of {m['rows']:,} l2 rows: RSS +{m['rss_growth'] / 2**20:.1f} MiB of "
          f"{m['data_bytes'] / 2**20:.0f} MiB, cache peak {m['peak_cache'] / 2**20:.1f} MiB")
