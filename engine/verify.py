"""`catalog verify` and `catalog rebuild --from-store`: the catalog checked against, or rebuilt from, the files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.parquet as pq

from engine import schema
from engine.catalog import SNAPSHOT_NAME, FileEntry, Op, _enc
from engine.fsio import atomic_write_bytes, sha256_file
from engine.log import get_logger
from engine.paths import match, parse_key
from engine.writer import read_parquet, table_stats

log = get_logger(component="verify")


@dataclass
class Problem:
    key: str
    problem: str


def verify(eng, table=None, source=None, market=None, progress=None) -> list[Problem]:
    """Re-read every live file; report any whose checksum, row count or schema disagrees with the catalog."""
    problems: list[Problem] = []
    entries = [e for e in eng.catalog.entries() if table is None or e.table == table]
    entries = sorted((e for e in entries if match(e.source, source) and match(e.market, market)), key=lambda e: e.key)
    for i, e in enumerate(entries):
        try:
            path = eng.local_path(e)
        except Exception as err:  # noqa: BLE001 - reported, not raised: verify lists every problem
            problems.append(Problem(e.key, f"unreadable: {err}"))
            continue
        sha = sha256_file(path)
        if sha != e.sha256:
            problems.append(Problem(e.key, f"checksum {sha[:12]}… differs from catalog {e.sha256[:12]}…"))
            continue
        try:
            md = pq.ParquetFile(path).metadata
        except Exception as err:  # noqa: BLE001
            problems.append(Problem(e.key, f"not a readable Parquet file: {err}"))
            continue
        if md.num_rows != e.rows:
            problems.append(Problem(e.key, f"{md.num_rows} rows, catalog says {e.rows}"))
        got = md.schema.to_arrow_schema().remove_metadata()
        want = schema.spec(e.table).schema
        if [(f.name, str(f.type)) for f in got] != [(f.name, str(f.type)) for f in want]:
            problems.append(Problem(e.key, f"schema differs from {e.table}: {got}"))
        if progress:
            progress(i + 1, len(entries))
    for p in problems:
        log.error("verify_problem", key=p.key, problem=p.problem)
    return problems


def rebuild_from_store(eng) -> int:
    """Reconstruct the catalog log from the objects in the store (one LIST, each file read once)."""
    import time

    keys = eng.store.list_keys("data/")
    ops = []
    replaced: set[str] = set()
    for key in keys:
        kp = parse_key(key)
        if kp.table not in schema.TABLES:
            continue
        path = eng.cache.root / "rebuild" / key
        if eng.store.is_local:
            src = eng.store.path(key)
        else:
            eng.store.get_file(key, path)
            src = path
        t = read_parquet(src, key)
        replaced.update(json.loads((t.schema.metadata or {}).get(b"engine.replaces", b"[]")))
        e = FileEntry(
            key=key, table=kp.table, source=kp.source, market=kp.market, date=kp.date, rows=t.num_rows,
            bytes=src.stat().st_size, sha256=sha256_file(src), local=False, remote=True,
            compacted=kp.name.startswith("0000"), created_ns=time.time_ns(), **table_stats(kp.table, t),
        )
        ops.append(Op(op="add", file=e))
        if not eng.store.is_local:
            path.unlink(missing_ok=True)
    # Raw files a compaction replaced may still await their purge: their rows are in the compacted file.
    ops = [o for o in ops if o.file.key not in replaced]
    # Everything in the store is sealed: the watermark is the newest receive time seen.
    wm: dict[str, int] = {}
    for o in ops:
        if o.file.max_recv_ts is not None:
            wm[o.file.source] = max(wm.get(o.file.source, 0), o.file.max_recv_ts + 1)
    ops += [Op(op="watermark", source=s, ts=w) for s, w in wm.items()]
    log_path = eng.layout.catalog_log
    if log_path.exists():
        log_path.rename(log_path.with_suffix(f".jsonl.bak-{time.time_ns()}"))
    (eng.layout.catalog_dir / SNAPSHOT_NAME).unlink(missing_ok=True)  # it indexes the old log
    atomic_write_bytes(log_path, b"".join(_enc.encode(o) + b"\n" for o in ops))
    log.info("catalog_rebuilt", files=len(keys), store=eng.store.url)
    return len(ops)
