"""The catalog manifest: one Parquet object in the store listing every uploaded file and, per source,
the remote watermark, so another machine opens the lake with one GET and no LIST.

Publishing is one PUT of one object (S3 and B2 replace an object atomically; the local store
renames), so a reader sees the old manifest or the new one, never half of one. Readers fetch it
with If-None-Match: an unchanged manifest costs one small request and no download.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from engine.catalog import Catalog, FileEntry
from engine.fsio import atomic_write_bytes
from engine.log import get_logger
from engine.paths import MANIFEST_KEY
from engine.store import StoreError

log = get_logger(component="manifest")


class ManifestError(StoreError):
    """The store has no usable manifest: a reader must not take that for an empty lake."""


def remote_watermarks(cat: Catalog) -> dict[str, int]:
    """Per source: every row received before it is in an uploaded, catalogued object (the writer's
    sealed watermark, held back to the oldest row of any live file not uploaded yet)."""
    out = dict(cat.watermarks)
    for e in cat.entries():
        if not e.remote and e.min_recv_ts is not None and e.source in out:
            out[e.source] = min(out[e.source], e.min_recv_ts)
    return out


def build(cat: Catalog) -> bytes:
    entries = sorted((e for e in cat.entries() if e.remote), key=lambda e: e.key)
    rows = [msgspec.structs.asdict(e) for e in entries]
    t = pa.Table.from_pylist(rows, schema=_schema()) if rows else _schema().empty_table()
    meta = {b"engine.watermarks": msgspec.json.encode(cat.watermarks),
            b"engine.remote_watermarks": msgspec.json.encode(remote_watermarks(cat)),
            b"engine.published_ns": str(time.time_ns()).encode()}
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
    eng.require_writer("publish_manifest")
    data = build(eng.catalog)
    eng.store.put_bytes(MANIFEST_KEY, data)
    log.info("manifest_published", store=eng.store.url, bytes=len(data), files=len(eng.catalog.by_key))
    return MANIFEST_KEY


def publish_after_change(eng) -> str | None:
    """Republish after a change to what the store holds (upload, compaction swap, purge). A failure
    is logged, not raised: the change itself is durable, and the next change publishes again."""
    try:
        return publish(eng)
    except StoreError as err:
        log.error("manifest_publish_failed", store=eng.store.url, error=str(err))
        return None


def parse(data: bytes, url: str) -> Catalog:
    """An in-memory catalog of the manifest's files, clamped to its remote watermarks."""
    try:
        t = pq.read_table(io.BytesIO(data))
        meta = t.schema.metadata or {}
        local = msgspec.json.decode(meta.get(b"engine.watermarks", b"{}"), type=dict[str, int])
        remote = meta.get(b"engine.remote_watermarks")
        wms = msgspec.json.decode(remote, type=dict[str, int]) if remote else local  # older manifests
        entries = [FileEntry(**row) for row in t.to_pylist()]
    except (pa.ArrowException, OSError, msgspec.MsgspecError, TypeError, ValueError) as e:
        head = data[:40]
        raise ManifestError(
            f"the catalog manifest at {url}/{MANIFEST_KEY} is unreadable ({type(e).__name__}: {e}; starts with "
            f"{head!r}); republish it on the writing machine with `data-engine catalog publish`, or check that "
            "the store URL and endpoint point at the lake's bucket") from None
    cat = Catalog(None)
    for e in entries:
        e.local = False
        cat._add(e)
    cat.watermarks.update(wms)
    cat.writer_watermarks.update(local)
    return cat


class ManifestReader:
    """A reader home's view of the bucket: the manifest cached under the home with its ETag, so an
    open or refresh of an unchanged manifest is one conditional GET with no body."""

    def __init__(self, store, catalog_dir: Path):
        self.store = store
        self.cached = Path(catalog_dir) / "manifest.parquet"
        self.etag_file = Path(catalog_dir) / "manifest.etag"
        self.checked = 0.0  # monotonic time of the last request
        self.requests = 0

    def fetch(self, current: Catalog | None) -> Catalog | None:
        """A new catalog when the manifest changed (or none is loaded yet), else None."""
        etag = None
        if current is not None or self.cached.exists():
            etag = self.etag_file.read_text().strip() if self.etag_file.exists() else None
        self.requests += 1
        try:
            data, tag = self.store.get_bytes_if_changed(MANIFEST_KEY, etag)
        except KeyError:
            raise ManifestError(
                f"no catalog manifest at {self.store.url}/{MANIFEST_KEY}: nothing was uploaded there yet, or the "
                "store URL is wrong. On the writing machine run `data-engine upload` (it publishes the manifest)."
            ) from None
        finally:
            self.checked = time.monotonic()
        if data is None:
            if current is not None:
                return None
            data = self.cached.read_bytes()
        cat = parse(data, self.store.url)
        self.cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.cached, data)
        atomic_write_bytes(self.etag_file, (tag or "").encode())
        log.info("manifest_loaded", store=self.store.url, files=len(cat.by_key), bytes=len(data))
        return cat
