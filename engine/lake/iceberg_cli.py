"""`data-engine iceberg publish|status`: the lake as Apache Iceberg tables (engine.lake.iceberg)."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data-engine iceberg", description=(
        "Publish the lake's uploaded Parquet files as Apache Iceberg tables (registered in place, no copy), "
        "or show how far the tables are behind the catalog. SQLite catalog under HOME/iceberg/ unless "
        "--rest-uri / ENGINE_ICEBERG_REST_URI names a REST catalog (credentials only from the environment: "
        "ENGINE_ICEBERG_CREDENTIAL=client_id:secret or ENGINE_ICEBERG_TOKEN)."))
    p.add_argument("action", choices=["publish", "status"])
    p.add_argument("--table", action="append", help="only this table (repeatable; default every table)")
    p.add_argument("--namespace", help="Iceberg namespace (default $ENGINE_ICEBERG_NAMESPACE or 'lake')")
    p.add_argument("--rest-uri", help="REST catalog URL (default $ENGINE_ICEBERG_REST_URI; unset: SQLite)")
    p.add_argument("--warehouse", help="REST: the warehouse the server expects (default $ENGINE_ICEBERG_WAREHOUSE)")
    p.add_argument("--follow", action=argparse.BooleanOptionalAction, default=None,
                   help="publish: whether this home's uploads and compactions republish the tables "
                        "(default: as set before, else yes)")
    p.add_argument("--home", default=None, help="lake home (default $ENGINE_HOME or ./lake)")
    p.add_argument("--store", default=None, help="object store (default $ENGINE_STORE or HOME/store)")
    return p


def cli(argv: list[str]) -> int:
    from engine import Engine
    from engine.errors import EngineError
    from engine.lake import iceberg
    from engine.lake.store import StoreError
    from engine.schema import SchemaError

    args = _parser().parse_args(argv)
    try:
        config = iceberg.IcebergConfig.from_env(namespace=args.namespace, rest_uri=args.rest_uri,
                                                warehouse=args.warehouse)
        eng = Engine.open(args.home, args.store, background=False, writer=args.action == "publish")
        if args.action == "publish":
            for r in iceberg.publish(eng, args.table, config, follow=args.follow):
                what = f"+{r.added} -{r.removed} file(s), snapshot {r.snapshot_id}" if r.committed else "unchanged"
                print(f"{config.namespace}.{r.table}: {r.files} file(s), {r.rows} rows; {what} ({r.seconds:.2f} s)")
            print(f"catalog: {config.describe()}; metadata under {iceberg.warehouse_uri(eng.store)}/{config.namespace}/")
            return 0
        behind = 0
        for s in iceberg.status(eng, args.table, config):
            if not s.exists:
                print(f"{config.namespace}.{s.table}: not published ({s.catalog_files} uploaded file(s) in the catalog)")
            else:
                print(f"{config.namespace}.{s.table}: {s.files} file(s), {s.rows} rows, snapshot {s.snapshot_id} "
                      f"({s.snapshots} kept); {s.unregistered} to add, {s.stale} to replace; {s.metadata_location}")
            behind += s.unregistered + s.stale
        print(f"catalog: {config.describe()}; " + ("in step with the lake" if not behind else
                                                   f"{behind} change(s) not published: run `data-engine iceberg publish`"))
        return 0
    except (EngineError, SchemaError, StoreError, OSError, ValueError) as e:
        print(f"data-engine iceberg {args.action}: error: {e}", file=sys.stderr)
        return 2
