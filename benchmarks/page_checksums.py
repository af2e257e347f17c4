"""Cost of Parquet page-checksum verification on reads (issue 11 item 8), against the same reads
without verification, same file, same run. Target: verified reads at most 10% slower.

Also prints the write cost of the checksums and, for sql(), the one-off SHA-256 check of a file
beside a DuckDB scan of it (DuckDB ignores page checksums, so files are hashed once per process).

Usage: scripts/bench_checksums [--rows N] [--repeat K]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)

import duckdb  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.common import best_of
from engine import schema  # noqa: E402
from engine.fsio import sha256_file  # noqa: E402
from engine.lake.writer import _parquet_options, parquet_format, write_parquet  # noqa: E402
from engine.sim import synth  # noqa: E402
from engine.timeutil import to_ns  # noqa: E402


def paired(a, b, repeat: int) -> tuple[float, float, float, float]:
    """Best wall and best CPU times of `a` and `b`, runs interleaved so that load from other
    processes hits both alike: (wall a, wall b, cpu a, cpu b)."""
    wall: dict = {a: [], b: []}
    cpu: dict = {a: [], b: []}
    for _ in range(repeat):
        for fn in (a, b):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[fn].append(time.perf_counter() - t0)
            cpu[fn].append(time.process_time() - c0)
    return min(wall[a]), min(wall[b]), min(cpu[a]), min(cpu[b])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5_000_000, help="l2 rows in the file (one compacted market-day)")
    ap.add_argument("--repeat", type=int, default=11)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-checksums-") as d:
        t = synth.realistic_l2("coinbase", "BTC-USD", to_ns("2026-11-20"), args.rows, rate_per_s=args.rows / 86_000)
        t = schema.validate("l2", t)
        path = Path(d) / "0000.parquet"
        write_parquet("l2", t, path)
        size = path.stat().st_size
        sorted_t = pq.read_table(path)
        opts = _parquet_options("l2")
        plain = {**opts, "write_page_checksum": False}
        w_off, w_on, _, _ = paired(lambda: pq.write_table(sorted_t, Path(d) / "w0.parquet", **plain),
                                     lambda: pq.write_table(sorted_t, Path(d) / "w1.parquet", **opts), args.repeat)
        del sorted_t

        rows = []
        off_on = paired(lambda: pq.read_table(path), lambda: pq.read_table(path, page_checksum_verification=True),
                        args.repeat)
        rows.append(("pq.read_table (compaction, verify)", *off_on))
        off_on = paired(lambda: pads.dataset([str(path)], format="parquet").to_table(),
                        lambda: pads.dataset([str(path)], format=parquet_format()).to_table(), args.repeat)
        rows.append(("dataset scan (l2(), read())", *off_on))
        pf_off, pf_on = pq.ParquetFile(path), pq.ParquetFile(path, page_checksum_verification=True)
        n = pf_off.metadata.num_row_groups
        off_on = paired(lambda: pf_off.read_row_groups(range(n)), lambda: pf_on.read_row_groups(range(n)), args.repeat)
        rows.append(("ParquetFile.read_row_groups (books, quotes)", *off_on))

        con = duckdb.connect()
        duck = best_of(lambda: con.sql(f"SELECT sum(price), sum(size), count(*) FROM read_parquet('{path}')").fetchall(),
                    args.repeat)
        sha = best_of(lambda: sha256_file(path), args.repeat)

    print(f"file: {args.rows:,} l2 rows ({size / 1e6:.1f} MB, zstd 3, page checksums on); best of {args.repeat}, "
          "verified and unverified runs interleaved")
    print()
    print("| read path | without verification | with page-checksum verification | wall cost | CPU cost | target |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for name, a, b, ca, cb in rows:
        cost, ccost = b / a - 1, cb / ca - 1
        worst = max(worst, cost)
        print(f"| {name} | {a * 1e3:.1f} ms ({args.rows / a / 1e6:.1f} M rows/s) | {b * 1e3:.1f} ms "
              f"({args.rows / b / 1e6:.1f} M rows/s) | {cost * 100:+.1f}% | {ccost * 100:+.1f}% | <= +10% wall |")
    print(f"| write_table (writer, compaction) | {w_off * 1e3:.1f} ms | {w_on * 1e3:.1f} ms (checksums written) "
          f"| {(w_on / w_off - 1) * 100:+.1f}% | | |")
    print(f"| sql(): SHA-256 once per file per process | DuckDB scan {duck * 1e3:.1f} ms | hash {sha * 1e3:.1f} ms "
          f"| {sha / duck * 100:.0f}% of one scan, first use only | | |")
    print()
    print(f"worst read cost {worst * 100:+.1f}% ({'within' if worst <= 0.10 else 'OVER'} the 10% target)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
