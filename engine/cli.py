"""`data-engine` command line. Storage commands live here; collector, ingest and replay commands
are dispatched to their own modules so each stays small."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → "module:function(argv) -> int"
DISPATCH = {
    "collect": ("engine.collect.runner:cli", "run the exchange collectors"),
    "status": ("engine.collect.status:status_cli", "show collector counters"),
    "keep": ("engine.run.keeper:cli", "upload, compact and publish a home in a loop (a collector shard's batch side)"),
    "ingest": ("engine.collect.ingest:cli", "normalize capture files offline into the lake"),
    "replay-exchange": ("engine.sim.replay:cli", "serve a capture as a local exchange"),
    "gen-capture": ("engine.sim.generate:cli", "generate a protocol-exact capture"),
    "demo": ("engine.sim.demo:cli", "end-to-end demonstration on a generated lake"),
    "coverage": ("engine.research.coverage:cli", "coverage per market and hour (optionally a PNG heat map)"),
    "plot": ("engine.research.plot:cli", "draw quotes and trades, book depth or coverage to PNG or HTML"),
    "export": ("engine.research.export:cli", "stream a table range to a Parquet, CSV or Arrow file"),
    "iceberg": ("engine.lake.iceberg_cli:cli", "publish the lake as Apache Iceberg tables / show their status"),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=None, help="lake home (default $ENGINE_HOME or ./lake)")
    p.add_argument("--store", default=None, help="object store: directory or s3://bucket/prefix (default $ENGINE_STORE or HOME/store)")


def _progress(desc: str):
    from tqdm import tqdm

    bar = {"b": None}

    def cb(done, total):
        if bar["b"] is None:
            bar["b"] = tqdm(total=total, desc=desc, unit="file", file=sys.stderr, disable=None)
        bar["b"].update(done - bar["b"].n)
        if done >= total:
            bar["b"].close()

    return cb


def _engine(args, writer: bool = False):
    """A reader, or the writer role for the commands that change the lake (upload, compact,
    catalog rebuild/publish)."""
    from engine import Engine

    return Engine.open(args.home, args.store, background=False, writer=writer)


def cmd_catalog(args) -> int:
    import polars as pl

    eng = _engine(args, writer=args.action in ("rebuild", "publish") or (args.action == "verify" and args.repair))
    if args.action in ("summary", "instruments"):
        filters = dict(table=args.table, source=args.source, market=args.market, start=args.start, end=args.end)
        if args.action == "instruments":
            df = eng.catalog.instruments(**filters, instrument=args.instrument)
        elif args.by == "instrument" or args.instrument:
            df = eng.catalog.summary(**filters, by="instrument", instrument=args.instrument)
        else:
            df = eng.catalog.summary(**filters)
        times = [c for c in df.columns if c.endswith("_ts")]
        with pl.Config(tbl_rows=500, tbl_cols=20, tbl_width_chars=240):
            print(df.with_columns(pl.from_epoch(c, "ns") for c in times))
        wm = eng.catalog.watermarks
        for s, w in sorted(wm.items()):
            from engine.timeutil import iso

            print(f"sealed watermark {s}: {iso(w)}")
        return 0
    if args.action == "verify":
        problems = eng.verify(table=args.table, source=args.source, market=args.market, progress=_progress("verify"),
                              repair=args.repair)
        for p in problems:
            print(f"{'REPAIRED' if p.repaired else 'BAD'} {p.key}: {p.problem}")
        left = [p for p in problems if not p.repaired]
        print(f"{len(eng.catalog.by_key)} files checked, {len(problems)} problem(s)"
              + (f", {len(problems) - len(left)} repaired" if args.repair else ""))
        return 1 if left else 0
    if args.action == "rebuild":
        if not args.from_store:
            print("catalog rebuild needs --from-store (the only source it can rebuild from)", file=sys.stderr)
            return 2
        from engine.lake.verify import rebuild_from_store

        n = rebuild_from_store(eng)
        print(f"catalog rebuilt from {eng.store.url}: {n} entries")
        return 0
    if args.action == "publish":
        print(f"published {eng.publish_manifest()} to {eng.store.url}")
        return 0
    return 2


def cmd_upload(args) -> int:
    eng = _engine(args, writer=True)
    r = eng.upload(table=args.table, market=args.market, date=args.date, progress=_progress("upload"))
    print(f"uploaded {r['uploaded']} file(s), {r['bytes']} bytes to {eng.store.url}; {r['failed']} failed")
    for e in r["errors"]:
        print("  " + e, file=sys.stderr)
    return 1 if r["failed"] else 0


def cmd_compact(args) -> int:
    eng = _engine(args, writer=True)
    res = eng.compact(date=args.date, table=args.table, market=args.market, progress=_progress("compact"))
    for r in res:
        print(f"{r.table} {r.source}/{r.market} {r.date}: {r.files_in} files → {r.key} ({r.rows} rows, {r.bytes} bytes)")
    print(f"{len(res)} partition(s) compacted")
    return 0


def cmd_sql(args) -> int:
    import polars as pl

    eng = _engine(args)
    df = eng.sql(args.query, allow_unsealed=args.allow_unsealed, timeout_s=args.timeout,
                 memory_limit=args.memory_limit)
    with pl.Config(tbl_rows=args.limit, tbl_cols=30, tbl_width_chars=200):
        print(df)
    return 0


def cmd_flush(args) -> int:
    from engine.collect.status import request_flush

    n = request_flush(args.home)
    print(f"flush requested from {n} running collector(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data-engine", description="Market-data engine: collect, store, compact, query.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("catalog", help="catalog summary / instruments / verify / rebuild --from-store / publish")
    c.add_argument("action", choices=["summary", "instruments", "verify", "rebuild", "publish"])
    c.add_argument("--from-store", action="store_true")
    c.add_argument("--repair", action="store_true", help="verify: upload again store objects that are missing or differ")
    c.add_argument("--table")
    c.add_argument("--source")
    c.add_argument("--market")
    c.add_argument("--by", choices=["date", "instrument"], default="date",
                   help="summary: per (table, source, market, date), or per instrument")
    c.add_argument("--instrument", help="summary/instruments: exact name or glob, e.g. 'KXBTC-26DEC04*'")
    c.add_argument("--start", help="summary/instruments: only figures with times at or after this")
    c.add_argument("--end", help="summary/instruments: only figures with times before this")
    _common(c)
    c.set_defaults(func=cmd_catalog)
    u = sub.add_parser("upload", help="verified upload of local files to the store")
    u.add_argument("--table")
    u.add_argument("--market")
    u.add_argument("--date")
    _common(u)
    u.set_defaults(func=cmd_upload)
    k = sub.add_parser("compact", help="merge closed date partitions into one sorted file")
    k.add_argument("--date")
    k.add_argument("--table")
    k.add_argument("--market")
    _common(k)
    k.set_defaults(func=cmd_compact)
    q = sub.add_parser("sql", help="run a read-only SELECT over the lake (views l2, trades, gaps, quotes)")
    q.add_argument("query")
    q.add_argument("--allow-unsealed", action="store_true")
    q.add_argument("--limit", type=int, default=20)
    q.add_argument("--timeout", type=float, default=60.0, help="seconds before the query is interrupted (default 60)")
    q.add_argument("--memory-limit", default=None, help="DuckDB memory limit, e.g. 4GB (default a quarter of RAM)")
    _common(q)
    q.set_defaults(func=cmd_sql)
    f = sub.add_parser("flush", help="ask running collectors to flush their buffers now")
    _common(f)
    f.set_defaults(func=cmd_flush)
    for name, (_, help_) in DISPATCH.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """`argv` None: the process's own command line, and a collector's process then ends as soon as
    it returns (see `_end_process`)."""
    own = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DISPATCH:
        if argv[0] == "collect":  # the collector's allocator options, read once when pyarrow loads
            from engine.collect.memory import before_arrow

            before_arrow()
        mod, fn = DISPATCH[argv[0]][0].split(":")
        rc = int(getattr(importlib.import_module(mod), fn)(argv[1:]) or 0)
        if own and argv[0] == "collect":
            _end_process(rc)
        return rc
    args = build_parser().parse_args(argv)
    from engine.errors import EngineError
    from engine.lake.store import StoreError
    from engine.schema import SchemaError

    try:
        return int(args.func(args) or 0)
    except (EngineError, SchemaError, StoreError, LookupError, ValueError, OSError) as e:
        print(f"data-engine {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _end_process(rc: int) -> None:
    """End a collector's process once it has returned: everything it wrote is closed, synced and
    catalogued by then, so only the log streams are flushed. Skips the interpreter's teardown of
    pyarrow, polars and the rest (~0.09 CPU-s a stop, the collector's largest fixed cost)."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
