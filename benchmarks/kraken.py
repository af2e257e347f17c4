"""Kraken normalization benchmark: `scripts/bench_kraken` (or `python benchmarks/kraken.py` in the venv).

Kraken spot v2 `book` updates (depth 1000, generated: the capture generator's realistic mix, every
checksum right) -> Arrow rows of the l2 schema, rows/s:
- ours, verifying Kraken's CRC32 on every message, and ours without verifying (the book is still
  kept: the truncation rows need it); the difference is what verification costs (target <= 30%);
- a stdlib-json baseline on the same frames that does the same job the plain way: `json.loads`
  with decimals kept as text (`parse_float=str`, as Kraken's guide says), the book in dicts,
  truncation by sorting, the checksum from the sorted best 10 on every message, one dict per row,
  `pa.Table.from_pylist` into the same Arrow rows; with and without its checksum.

Timings use the process CPU clock (the machine is shared; wall time is printed too); best of 3.
The snapshots that start the books are fed first and not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/kraken.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)


def frames(seconds: float, rate: float) -> tuple[list[tuple[int, str]], list[tuple[int, str]], int]:
    """(head: meta-less frames up to the last snapshot, book updates, their rows incl. truncation)."""
    from engine.sim.kraken.gen import generate_kraken

    head, ups = [], []
    t0 = time.time_ns() - int(seconds * 1e9) - 60 * 10**9
    for rec in generate_kraken(seconds=seconds, rate=rate, seed=11, start_ns=t0, instrument_update=False):
        f = rec.get("frame")
        if f is None:
            continue
        if f.startswith('{"channel":"book","type":"update"'):
            ups.append((rec["recv_ns"], f))
        elif not ups:
            head.append((rec["recv_ns"], f))
    return head, ups, 0


def ours(head, ups, verify: bool) -> tuple[float, int, float, dict]:
    from engine.collect.kraken.normalize import KrakenNormalizer

    n = KrakenNormalizer(verify_checksum=verify)
    n.on_connect(head[0][0], conn=1, depth=1000)
    for r, f in head:
        n.feed(r, f)
    n.take()
    t, w = time.process_time(), time.perf_counter()
    rows = 0
    feed, take, l2 = n.feed, n.take, n.l2
    for r, f in ups:
        feed(r, f)
        if l2.rows >= 65_536:
            rows += take()["l2"].num_rows
    rows += take()["l2"].num_rows
    dt, dw = time.process_time() - t, time.perf_counter() - w
    assert n.checksums_failed == 0 and n.c.skipped_frames == 0, (n.checksum_status(), n.c.skip_reasons)
    return dt, rows, dw, n.checksum_status()


def baseline(head, ups, verify: bool) -> tuple[float, int, float]:
    """The plain way, same result: stdlib json (decimal text kept), dict books, sorted() for the
    depth and the best 10, CRC32 of the best 10 on every message, row dicts -> Arrow."""
    import datetime as dt

    import pyarrow as pa

    from engine.schema import L2_SCHEMA

    def tok(s: str) -> str:
        return s.replace(".", "").lstrip("0")

    books: dict[str, dict] = {}

    def apply(msg: dict, recv: int, out: list | None) -> None:
        for d in msg["data"]:
            sym = d["symbol"]
            if msg["type"] == "snapshot":
                books[sym] = {"bids": {}, "asks": {}}
            b = books[sym]
            ts = dt.datetime.fromisoformat(d["timestamp"].replace("Z", "+00:00"))
            ts_ns = int(ts.timestamp()) * 10**9 + ts.microsecond * 1000
            for side, name in (("bid", "bids"), ("ask", "asks")):
                lv = b[name]
                for x in d[name]:
                    p, q = x["price"], x["qty"]
                    if float(q) == 0:
                        lv.pop(float(p), None)
                    else:
                        lv[float(p)] = (p, q)
                    if out is not None:
                        out.append({"ts": ts_ns, "recv_ts": recv, "source": "kraken", "market": sym.replace("/", "-"),
                                    "instrument": sym, "side": side, "price": float(p), "size": float(q), "seq": None,
                                    "snapshot": msg["type"] == "snapshot"})
                for k in sorted(lv, reverse=name == "bids")[1000:]:
                    del lv[k]
                    if out is not None:
                        out.append({"ts": ts_ns, "recv_ts": recv, "source": "kraken", "market": sym.replace("/", "-"),
                                    "instrument": sym, "side": side, "price": k, "size": 0.0, "seq": None,
                                    "snapshot": False})
            if verify:
                a = [b["asks"][k] for k in sorted(b["asks"])[:10]]
                bb = [b["bids"][k] for k in sorted(b["bids"], reverse=True)[:10]]
                s = "".join(tok(p) + tok(q) for p, q in a + bb)
                assert zlib.crc32(s.encode()) == int(d["checksum"])

    for r, f in head:
        m = json.loads(f, parse_float=str, parse_int=str)
        if m.get("channel") == "book":
            apply(m, r, None)
    clock = time.process_time
    t, w = clock(), time.perf_counter()
    out, rows = [], 0
    for r, f in ups:
        m = json.loads(f, parse_float=str, parse_int=str)  # every number as its text (an integer price too)
        apply(m, r, out)
        if len(out) >= 65_536:
            rows += pa.Table.from_pylist(out, schema=L2_SCHEMA).num_rows
            out = []
    rows += pa.Table.from_pylist(out, schema=L2_SCHEMA).num_rows
    return clock() - t, rows, time.perf_counter() - w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120.0, help="generated capture length")
    ap.add_argument("--rate", type=float, default=250.0, help="generated book messages per second")
    a = ap.parse_args(argv)
    os.environ.setdefault("ENGINE_LOG_LEVEL", "ERROR")
    from engine.collect.base import tune_gc

    head, ups, _ = frames(a.seconds, a.rate)
    tune_gc()  # the collector and ingest processes run with these GC settings
    ours(head, ups, True)  # warm-up
    on = min(ours(head, ups, True) for _ in range(3))
    off = min(ours(head, ups, False) for _ in range(3))
    b_on = min(baseline(head, ups, True) for _ in range(2))
    b_off = min(baseline(head, ups, False) for _ in range(2))
    rows = on[1]
    assert off[1] == b_on[1] == b_off[1] == rows, (on[1], off[1], b_on[1], b_off[1])
    st = on[3]
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"frames: {len(ups)} book updates (depth 1000, generated), {rows} rows ({rows / len(ups):.1f} per message); "
          f"checksums verified per run: {st['checksums_verified']}")
    print(f"{'Kraken book updates -> Arrow l2 rows (per CPU-second)':<58}{'rows/s':>14}{'wall rows/s':>14}")
    print("-" * 86)
    for name, (t, n, w, *_) in (("ours, checksum verified on every message", on), ("ours, no verification", off),
                                ("stdlib json + dict book + row dicts, checksum", b_on),
                                ("stdlib json + dict book + row dicts, no checksum", b_off)):
        print(f"{name:<58}{n / t / 1e6:>10.3f} M/s{n / w / 1e6:>10.3f} M/s")
    over = (on[0] - off[0]) / off[0]
    print(f"{'verification adds (ours)':<58}{100 * over:>12.1f} %{'target <= 30 %':>16}")
    print(f"{'verification adds (baseline)':<58}{100 * (b_on[0] - b_off[0]) / b_off[0]:>12.1f} %")
    print(f"{'ours / baseline, both verifying':<58}{b_on[0] / on[0]:>13.1f} x")
    print(f"{'per message: ours verified / unverified':<58}{1e6 * on[0] / len(ups):>10.2f} µs / {1e6 * off[0] / len(ups):.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
