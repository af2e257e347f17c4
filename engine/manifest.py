"""The catalog manifest: one Parquet object in the store listing every live file and watermark,
so another machine can open the lake with one GET and no LIST."""

from __future__ import annotations

import io

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from engine.catalog import SNAPSHOT_NAME, Catalog, FileEntry, Op, _enc
from engine.fsio import atomic_write_bytes
from engine.log import get_logger
from engine.paths import MANIFEST_KEY

log = get_logger(component="manifest")


def build(cat: Catalog) -> bytes:
    entries = sorted(cat.entries(), key=lambda e: e.key)
    rows = [msgspec.structs.asdict(e) for e in entries]
    t = pa.Table.from_pylist(rows, schema=_schema()) if rows else _schema().empty_table()
    meta = {b"engine.watermarks": msgspec.json.encode(cat.watermarks)}
    t = t.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd")
    return buf.getvalue()


def _schema() -> pa.Schema:
    fields = []
    for name, typ in zip(FileEntry.__struct_fields__, msgspec.structs.fields(FileEntry)):
        t = typ.type
        if t in (int, int | None):
            at = pa.int64()
        elif t is bool:
            at = pa.bool_()
        else:
            at = pa.string()
        fields.append(pa.field(name, at))
    return pa.schema(fields)


def publish(eng) -> str:
    """Only remote files are listed: the manifest describes what the bucket holds."""
    data = build(eng.catalog)
    eng.store.put_bytes(MANIFEST_KEY, data)
    log.info("manifest_published", store=eng.store.url, bytes=len(data), files=len(eng.catalog.by_key))
    return MANIFEST_KEY


def bootstrap_from_manifest(eng) -> bool:
    """Seed an empty home's catalog log from the store's manifest (one GET)."""
    data = eng.store.get_bytes(MANIFEST_KEY)
    if data is None:
        return False
    t = pq.read_table(io.BytesIO(data))
    wms = msgspec.json.decode((t.schema.metadata or {}).get(b"engine.watermarks", b"{}"))
    ops = []
    for row in t.to_pylist():
        e = FileEntry(**row)
        e.local = False
        if e.remote:
            ops.append(Op(op="add", file=e))
    ops += [Op(op="watermark", source=s, ts=w) for s, w in wms.items()]
    eng.layout.catalog_dir.mkdir(parents=True, exist_ok=True)
    (eng.layout.catalog_dir / SNAPSHOT_NAME).unlink(missing_ok=True)  # it indexes the old log
    atomic_write_bytes(eng.layout.catalog_log, b"".join(_enc.encode(o) + b"\n" for o in ops))
    log.info("catalog_bootstrapped_from_manifest", files=len(ops), store=eng.store.url)
    return True
