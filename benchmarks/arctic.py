"""This engine vs ArcticDB (LMDB backend) on the same tick data: write rate, read of one
market-day into Polars, a one-hour window, bytes on disk.

    scripts/bench_arctic [--rows 5000000] [--json out.json]

ArcticDB is not a dependency of the engine: it is installed at benchmark time into a separate
virtualenv (.bench/arctic-venv, `pip install arcticdb==VERSION`), so its pins (it wants protobuf<7,
pandas) never touch the project's venv. If it cannot be installed the report says so plainly.
Both sides get the same rows (realistic Coinbase-like L2 for one market-day, exported once to a
Parquet file); ArcticDB is given a pandas frame indexed by `ts` (what its date_range reads need)
with the string columns as plain strings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)

from engine.timeutil import NS_PER_HOUR as NS_H  # noqa: E402

ARCTIC_VERSION = "6.28.2"

ARCTIC_CHILD = r"""
import json, os, sys, time
import pyarrow.parquet as pq, polars as pl, pandas as pd
import arcticdb as adb
src, lmdb_dir, h0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = pq.read_table(src)
df = t.to_pandas(strings_to_categorical=False)
for c in ("source", "market", "instrument", "side"):
    df[c] = df[c].astype(str)
df.index = pd.to_datetime(df.pop("ts"), unit="ns")
ac = adb.Arctic(f"lmdb://{lmdb_dir}")
lib = ac.get_library("ticks", create_if_missing=True)
t0 = time.perf_counter(); lib.write("coinbase.BTC-USD", df); w = time.perf_counter() - t0
def best(fn, n=3):
    out = []
    for _ in range(n):
        t0 = time.perf_counter(); r = fn(); out.append(time.perf_counter() - t0)
    return min(out), r
r_pd, d = best(lambda: lib.read("coinbase.BTC-USD").data)
r_pl, dp = best(lambda: pl.from_pandas(lib.read("coinbase.BTC-USD").data.reset_index()))
lo, hi = pd.Timestamp(h0, unit="ns"), pd.Timestamp(h0 + 3_600_000_000_000 - 1, unit="ns")
w_pl, wp = best(lambda: pl.from_pandas(lib.read("coinbase.BTC-USD", date_range=(lo, hi)).data.reset_index()))
size = 0
for root, _, files in os.walk(lmdb_dir):
    for f in files:
        st = os.stat(os.path.join(root, f))
        size += min(st.st_size, st.st_blocks * 512)
print(json.dumps({"write_s": w, "read_day_pandas_s": r_pd, "read_day_polars_s": r_pl, "rows_day": dp.height,
                  "window_polars_s": w_pl, "rows_window": wp.height, "bytes": size, "version": adb.__version__}))
"""


def _arctic_python(log) -> tuple[str | None, str]:
    """A venv with arcticdb; returns (python path or None, message)."""
    venv = ROOT / ".bench" / "arctic-venv"
    py = venv / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import arcticdb, polars, pyarrow"], capture_output=True).returncode == 0
    if ok:
        return str(py), "reused .bench/arctic-venv"
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        pins = [ln.strip() for ln in (ROOT / "requirements.lock").read_text().splitlines()
                if ln.split("==")[0].strip().lower() in ("polars", "polars-runtime-32", "pyarrow", "numpy")]
        log(f"installing arcticdb=={ARCTIC_VERSION} into {venv} ...")
        p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            f"arcticdb=={ARCTIC_VERSION}", *pins], capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            return None, f"pip install arcticdb=={ARCTIC_VERSION} failed: {p.stderr.strip()[-500:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not create the ArcticDB venv: {e}"
    return str(py), f"installed arcticdb=={ARCTIC_VERSION} into .bench/arctic-venv"


def run(rows: int, log=print) -> dict:
    import polars as pl
    import pyarrow.parquet as pq

    from engine import Engine
    from engine.sim import synth
    from engine.timeutil import to_ns

    day = "2026-11-03"
    d0 = to_ns(day)
    work = Path(tempfile.mkdtemp(prefix="bench-arctic-"))
    out: dict = {"rows": rows, "day": day}
    try:
        t = synth.realistic_l2("coinbase", "BTC-USD", d0, rows, seed=1, rate_per_s=rows / 86400 * 0.999)
        t = t.filter(pl.Series(t.column("recv_ts").to_numpy() < d0 + 86400 * 10**9).to_arrow())
        rows = out["rows"] = t.num_rows
        src = work / "ticks.parquet"
        pq.write_table(t, src, compression="none")
        h0 = d0 + 12 * NS_H
        # ---- this engine: append + flush (hourly raw files), then the day compacted into one file
        eng = Engine.open(work / "lake", background=False, flush_rows=10**9, writer=True)
        t0 = time.perf_counter()
        step = 250_000
        for i in range(0, rows, step):
            eng.append("l2", t.slice(i, step))
        eng.flush()
        append_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.compact()
        compact_s = time.perf_counter() - t0
        files = [e for e in eng.catalog.entries() if e.table == "l2"]
        assert len(files) == 1 and files[0].rows == rows, files

        def best(fn, n=3):
            ts = []
            for _ in range(n):
                s = time.perf_counter()
                r = fn()
                ts.append(time.perf_counter() - s)
            return min(ts), r

        rd, dfd = best(lambda: eng.l2(source="coinbase", market="BTC-USD", start=day, end=d0 + 86400 * 10**9))
        rw, dfw = best(lambda: eng.l2(source="coinbase", market="BTC-USD", start=h0, end=h0 + NS_H))
        assert dfd.height == rows
        out["engine"] = {"write_s": append_s, "write_rows_per_s": rows / append_s, "compact_s": compact_s,
                         "read_day_polars_s": rd, "window_polars_s": rw, "rows_window": dfw.height,
                         "bytes": files[0].bytes}
        eng.close()
        # ---- ArcticDB (LMDB) in its own venv
        py, msg = _arctic_python(log)
        out["arctic_install"] = msg
        if py is None:
            out["arctic"] = None
            return out
        p = subprocess.run([py, "-c", ARCTIC_CHILD, str(src), str(work / "lmdb"), str(h0)], capture_output=True,
                           text=True, timeout=1800)
        if p.returncode != 0:
            out["arctic"] = None
            out["arctic_install"] += f"; ArcticDB run failed: {p.stderr.strip()[-800:]}"
            return out
        a = json.loads(p.stdout.strip().splitlines()[-1])
        a["write_rows_per_s"] = rows / a["write_s"]
        out["arctic"] = a
        if a["rows_window"] != dfw.height:
            out["note"] = f"window rows differ: engine {dfw.height}, arctic {a['rows_window']} (ts vs index bounds)"
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(r: dict) -> list[str]:
    e, a = r["engine"], r.get("arctic")
    lines = [f"Same tick data: {r['rows']:,} realistic L2 rows, one market-day ({r['day']}).", ""]
    if a is None:
        lines += [f"**ArcticDB could not be benchmarked: {r.get('arctic_install')}**", ""]
        lines += ["| figure | this engine |", "|---|---|",
                  f"| write rate | {e['write_rows_per_s'] / 1e6:.2f} M rows/s |",
                  f"| read one market-day into Polars | {e['read_day_polars_s'] * 1000:.0f} ms |",
                  f"| one-hour window into Polars | {e['window_polars_s'] * 1000:.1f} ms |",
                  f"| bytes on disk | {e['bytes'] / 2**20:.1f} MiB ({e['bytes'] / r['rows']:.2f} B/row) |"]
        return lines
    rows = r["rows"]
    lines += [f"ArcticDB {a['version']} (LMDB backend, {r.get('arctic_install')}).", "",
              "| figure | this engine | ArcticDB | ratio (engine / ArcticDB) | target |", "|---|---|---|---|---|",
              f"| write rate (rows/s) | {e['write_rows_per_s'] / 1e6:.2f} M | {a['write_rows_per_s'] / 1e6:.2f} M | "
              f"{e['write_rows_per_s'] / a['write_rows_per_s']:.2f}x | — |",
              f"| read one market-day into Polars | {e['read_day_polars_s'] * 1000:.0f} ms | {a['read_day_polars_s'] * 1000:.0f} ms"
              f" (pandas only: {a['read_day_pandas_s'] * 1000:.0f} ms) | {e['read_day_polars_s'] / a['read_day_polars_s']:.2f}x time | <= 1.0x "
              f"{'✅' if e['read_day_polars_s'] <= a['read_day_polars_s'] else '❌'} |",
              f"| one-hour window into Polars | {e['window_polars_s'] * 1000:.1f} ms | {a['window_polars_s'] * 1000:.1f} ms | "
              f"{e['window_polars_s'] / a['window_polars_s']:.2f}x time | <= 1.0x {'✅' if e['window_polars_s'] <= a['window_polars_s'] else '❌'} |",
              f"| bytes on disk | {e['bytes'] / 2**20:.1f} MiB ({e['bytes'] / rows:.2f} B/row) | {a['bytes'] / 2**20:.1f} MiB "
              f"({a['bytes'] / rows:.2f} B/row) | {e['bytes'] / a['bytes']:.2f}x | <= 0.5x {'✅' if e['bytes'] <= 0.5 * a['bytes'] else '❌'} |"]
    if r.get("note"):
        lines += ["", r["note"]]
    lines += ["", f"Engine write = append + flush into hourly raw files ({e['write_s']:.2f} s); the day's compaction "
              f"into one sorted file took a further {e['compact_s']:.2f} s. Reads are the best of 3."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench_arctic")
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    r = run(a.rows, log=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(table(r)))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
