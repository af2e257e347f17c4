"""The catalog manifest: Parquet objects in the store listing every uploaded file and, per source,
the remote watermark, so another machine opens the lake with one LIST of `catalog/manifest*` and
no LIST of the data.

An unsharded writer publishes `catalog/manifest.parquet`; each collector shard publishes its own
part, `catalog/manifest/part-{shard}.parquet` (engine.lake.shard), so shards never write the same
object. A reader lists the prefix (one request, with every object's ETag), downloads only the
objects whose ETag changed since it cached them, and merges them: files by key, and per source the
minimum watermark over the parts that declare the source (the shards collecting it). An unchanged
lake costs that one LIST and no download.

Publishing is one PUT of one object (S3 and B2 replace an object atomically; the local store
renames), so a reader sees the old part or the new one, never half of one.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.lake import instruments as inst
from engine.fsio import atomic_write_bytes
from engine.lake import shard as shard_id
from engine.lake.catalog import FileEntry, Partition, check_by, filter_summary, instrument_list
from engine.lake.store import StoreError
from engine.log import get_logger
from engine.paths import MANIFEST_KEY, MANIFEST_PREFIX, manifest_part_key, manifest_part_shard

log = get_logger(component="manifest")


class ManifestError(StoreError):
    """The store has no usable manifest: a reader must not take that for an empty lake."""


def remote_watermarks(entries: list[FileEntry], watermarks: dict[str, int]) -> dict[str, int]:
    """Per source: every row received before it is in an uploaded, catalogued object (the writer's
    sealed watermark, held back to the oldest row of any live file not uploaded yet)."""
    out = dict(watermarks)
    for e in entries:
        if not e.remote and e.min_recv_ts is not None and e.source in out:
            out[e.source] = min(out[e.source], e.min_recv_ts)
    return out


def build(entries: list[FileEntry], watermarks: dict[str, int], *, shard: int | None = None,
          sources: list[str] | None = None) -> bytes:
    """The manifest of a catalog's live files (`entries`) and its sealed `watermarks`; a shard's part
    also names its shard and the `sources` whose watermark it holds (see `merge`)."""
    remote = sorted((e for e in entries if e.remote), key=lambda e: e.key)
    sch = _schema()
    cols = {f.name: pa.array([getattr(e, f.name) for e in remote], f.type) for f in sch if f.name != "instruments"}
    t = pa.table({**cols, "instruments": _instrument_column(remote)}, schema=sch)
    meta = {b"engine.watermarks": msgspec.json.encode(watermarks),
            b"engine.remote_watermarks": msgspec.json.encode(remote_watermarks(entries, watermarks)),
            b"engine.published_ns": str(time.time_ns()).encode()}
    if shard is not None:
        meta[b"engine.shard"] = str(shard).encode()
        meta[b"engine.sources"] = msgspec.json.encode(sorted(sources or []))
    t = t.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd", write_page_checksum=True, **_ENCODING)
    return buf.getvalue()


_FILE_FIELDS = msgspec.structs.fields(FileEntry)
_INST_TYPE = pa.list_(pa.struct([("instrument", pa.string())] + [(f, pa.int64()) for f in inst.FIGURES]))


_NESTED = "instruments.list.element."
# figures delta-encoded (~24 bytes a contract; 40 as plain int64 + zstd), names and other strings dictionary-encoded
_ENCODING = {
    "use_dictionary": [f.name for f in _FILE_FIELDS if f.type in (str, str | None) and f.name != "instruments"]
    + [_NESTED + "instrument"],
    "column_encoding": {_NESTED + f: "DELTA_BINARY_PACKED" for f in inst.FIGURES},
}


def _instrument_column(remote: list[FileEntry]) -> pa.Array:
    """Each file's per-instrument figures as a list of structs (null: not recorded), so a reader
    filters and sums them vectorized."""
    offsets, names, figs, valid = [0], [], [], []
    for e in remote:
        st = inst.figures_of(e)
        valid.append(st is not None)
        if st is not None:
            names += st.names
            figs.append(st.m)
        offsets.append(len(names))
    m = np.concatenate(figs, axis=1) if figs else np.zeros((5, 0), np.int64)
    values = pa.StructArray.from_arrays([pa.array(names, pa.string())] + [pa.array(m[i]) for i in range(5)],
                                        fields=list(_INST_TYPE.value_type))
    mask = pa.array([not v for v in valid], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=mask)


def _schema() -> pa.Schema:
    fields = []
    for name, typ in zip(FileEntry.__struct_fields__, msgspec.structs.fields(FileEntry)):
        t = typ.type
        if name == "instruments":
            fields.append(pa.field(name, _INST_TYPE))
            continue
        if t in (int, int | None):
            at = pa.int64()
        elif t is bool:
            at = pa.bool_()
        else:
            at = pa.string()
        fields.append(pa.field(name, at))
    return pa.schema(fields)


def publish(eng) -> str:
    """Only remote files are listed: the manifest describes what the bucket holds. A shard publishes
    its own part; a shard that took over an unsharded home then retires the legacy manifest (its
    files are in the part now), once."""
    eng.require_writer("publish_manifest")
    entries = list(eng.catalog.entries())
    ident = shard_id.read(eng.layout)  # read again: the collector records what it collects at each start
    if (ident.shard if ident is not None else None) != eng.shard:
        raise shard_id.ShardError(
            f"{eng.home} became shard {ident.shard if ident else None} after this engine opened it as "
            f"{'shard ' + str(eng.shard) if eng.shard is not None else 'unsharded'}; not publishing (reopen the home)")
    eng.shard_identity = ident
    key = MANIFEST_KEY if ident is None else manifest_part_key(ident.shard)
    data = build(entries, eng.catalog.watermarks, shard=eng.shard, sources=shard_id.declared_sources(ident, entries))
    eng.store.put_bytes(key, data)
    log.info("manifest_published", store=eng.store.url, key=key, bytes=len(data), files=len(eng.catalog.by_key))
    if ident is not None and ident.retire_legacy:
        eng.store.delete(MANIFEST_KEY)
        eng.shard_identity = shard_id.legacy_retired(eng.layout)
        log.info("legacy_manifest_retired", store=eng.store.url, key=MANIFEST_KEY, part=key)
    return key


def publish_after_change(eng) -> str | None:
    """Republish after a change to what the store holds (upload, compaction swap, purge), and the
    Iceberg tables if this home publishes them. A failure is logged, not raised: the change itself
    is durable, and the next change publishes again."""
    from engine.lake.iceberg import follow

    try:
        return publish(eng)
    except (StoreError, shard_id.ShardError) as err:
        log.error("manifest_publish_failed", store=eng.store.url, error=str(err))
        return None
    finally:
        follow(eng)


class Part(msgspec.Struct, frozen=True):
    """One manifest object read: its files, watermarks and the sources it holds back."""

    key: str
    df: pl.DataFrame
    remote: dict[str, int]  # per source: every row received before it is uploaded
    local: dict[str, int]  # the writer's own sealed watermarks
    shard: int | None
    sources: tuple[str, ...] | None  # None: an unsharded manifest, holding every source it has a watermark of


def read_part(data: bytes, url: str, key: str = MANIFEST_KEY) -> Part:
    """One manifest object; a damaged one is a ManifestError naming it (never an empty lake)."""
    try:
        meta = pq.ParquetFile(io.BytesIO(data)).schema_arrow.metadata or {}
        local = msgspec.json.decode(meta.get(b"engine.watermarks", b"{}"), type=dict[str, int])
        remote = meta.get(b"engine.remote_watermarks")
        wms = msgspec.json.decode(remote, type=dict[str, int]) if remote else local  # older manifests
        shard = int(meta[b"engine.shard"]) if b"engine.shard" in meta else None
        sources = (tuple(msgspec.json.decode(meta[b"engine.sources"], type=list[str]))
                   if b"engine.sources" in meta else None)
        df = pl.read_parquet(io.BytesIO(data))  # Polars reads 100k entries in ~8 ms, pyarrow in ~35
        want = pl.from_arrow(_schema().empty_table()).schema
        missing = [c for c in want if c not in df.columns and c != "instruments"]
        if missing:
            raise ValueError(f"columns missing: {', '.join(missing)}")
        if "instruments" not in df.columns:  # a manifest from before per-instrument figures
            df = df.with_columns(pl.lit(None, dtype=want["instruments"]).alias("instruments"))
        df = df.select(want.names()).cast(dict(want)).with_columns(local=pl.lit(False))
    except (pa.ArrowException, pl.exceptions.PolarsError, OSError, msgspec.MsgspecError, TypeError, ValueError,
            KeyError) as e:
        head = data[:40]
        raise ManifestError(
            f"the catalog manifest at {url}/{key} is unreadable ({type(e).__name__}: {e}; starts with "
            f"{head!r}); republish it on the writing machine with `data-engine catalog publish`, or check that "
            "the store URL and endpoint point at the lake's bucket") from None
    return Part(key, df.filter(pl.col("remote")), wms, local, shard, sources)


def _merge_watermarks(parts: list[Part], which: str) -> dict[str, int]:
    """Per source, the minimum over the parts holding it: a shard's part holds the sources it declares
    (those it collects, or has files of not uploaded yet), at 0 until it has a watermark; an unsharded
    manifest holds the sources of its watermarks. A shard collecting no market of a source does not
    hold it back."""
    out: dict[str, int] = {}
    for p in parts:
        wms = getattr(p, which)
        for src in (p.sources if p.sources is not None else wms):
            out[src] = min(out.get(src, wms.get(src, 0)), wms.get(src, 0))
    return out


def merge(parts: list[Part]) -> "FrameCatalog":
    """A reader's catalog of several manifest objects: shard parts in shard order, then the legacy
    manifest; a key listed twice (a shard adopting the legacy manifest, between its two steps) once."""
    parts = sorted(parts, key=lambda p: (p.shard is None, p.shard or 0, p.key))
    df = parts[0].df if len(parts) == 1 else pl.concat([p.df for p in parts], rechunk=False)
    if len(parts) > 1 and parts[-1].shard is None:  # only then can a key be listed twice (shard names differ)
        df = df.unique("key", keep="first", maintain_order=True)
    return FrameCatalog(df, _merge_watermarks(parts, "remote"), _merge_watermarks(parts, "local"))


def parse(data: bytes, url: str, key: str = MANIFEST_KEY) -> "FrameCatalog":
    """One manifest object as a reader's catalog, clamped to its remote watermarks."""
    return merge([read_part(data, url, key)])


class FrameCatalog:
    """A reader's read-only catalog: the manifest's file list kept as one columnar frame, so that
    opening 100,000 files costs a Parquet read, and each question a vectorized filter. It answers
    what `Catalog` answers for queries; FileEntry objects are made only for the files selected."""

    torn_lines = 0
    version = 0
    etags: dict[str, str] | None = None  # the manifest objects it was made of (ManifestReader)

    def __init__(self, df: pl.DataFrame, watermarks: dict[str, int], writer_watermarks: dict[str, int]):
        self.df = df
        # what only a writer's log has: empty here, one per instance (never shared between catalogs)
        self.retired: dict[str, tuple[int, FileEntry]] = {}
        self.spool_hw: dict[str, int] = {}
        self.replaced_by: dict[str, str] = {}
        self.watermarks = dict(watermarks)
        self.writer_watermarks = dict(writer_watermarks)
        self._entries: list[FileEntry] | None = None
        self._summary: pl.DataFrame | None = None
        self._inst: tuple[pl.DataFrame, pl.DataFrame] | None = None

    def refresh(self, startup: bool = False) -> int:
        return 0  # the engine refreshes a reader by fetching the manifest again

    @staticmethod
    def _to_entries(df: pl.DataFrame) -> list[FileEntry]:
        """FileEntry objects without their instrument figures (this catalog answers instrument
        questions from its frame)."""
        return msgspec.convert(df.drop("instruments").sort("key").to_dicts(), list[FileEntry])

    def entries(self) -> list[FileEntry]:
        if self._entries is None:
            self._entries = self._to_entries(self.df)
        return self._entries

    @property
    def by_key(self) -> dict[str, FileEntry]:
        return {e.key: e for e in self.entries()}

    def files(self, table: str, source=None, market=None, start=None, end=None, instrument=None) -> list[FileEntry]:
        from engine.timeutil import to_ns

        start, end = to_ns(start, name="start"), to_ns(end, name="end")
        df = filter_summary(self.df, table, source, market, start, end)
        if instrument is not None:
            df = self._holding(df, instrument, start, end)
        return self._to_entries(df)

    def files_in(self, part: Partition) -> list[FileEntry]:
        t, s, m, d = part
        return self._to_entries(self.df.filter(table=t, source=s, market=m, date=d))

    @staticmethod
    def _holding(df: pl.DataFrame, instrument: str, start, end) -> pl.DataFrame:
        """The files of `df` holding a matching instrument with rows in [start, end), and those without figures."""
        figs = df.select("key", "instruments").explode("instruments").unnest("instruments")
        figs = inst.instrument_filter(figs.filter(pl.col("instrument").is_not_null()), instrument)
        if start is not None:
            figs = figs.filter(pl.col("max_ts") >= start)
        if end is not None:
            figs = figs.filter(pl.col("min_ts") < end)
        return df.filter(pl.col("instruments").is_null() | pl.col("key").is_in(figs["key"].implode()))

    def _inst_parts(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Partitions (with their time range) and their per-instrument rows (`_p`: the partition),
        built once per manifest; a file without figures counts as a null instrument."""
        if self._inst is None:
            part = ["table", "source", "market", "date"]
            files = self.df.with_columns(_p=(pl.struct(part).rank("dense") - 1).cast(pl.Int64))
            parts = (files.group_by("_p").agg(*(pl.col(c).first() for c in part), pl.col("min_ts").min(),
                                                pl.col("max_ts").max()).sort("_p"))
            known = files.filter(pl.col("instruments").is_not_null())
            rows = inst.flatten(known["instruments"].to_arrow(), known["_p"].to_numpy())
            rows = rows.with_columns(files=pl.lit(1, pl.Int64))
            unknown = files.filter(pl.col("instruments").is_null()).select(
                "_p", pl.lit(None, pl.String).alias("instrument"), *inst.FIGURES, files=pl.lit(1, pl.Int64))
            rows = pl.concat([rows.select(inst.ROWS_SCHEMA.keys()).cast(inst.ROWS_SCHEMA),
                              unknown.select(inst.ROWS_SCHEMA.keys()).cast(inst.ROWS_SCHEMA)])
            # one row per (partition, instrument): questions then reduce ~10x fewer rows
            self._inst = (parts.drop("_p"), inst.reduce(parts, rows, ["_p"]))  # parts' row i is partition i
        return self._inst

    def _by_instrument(self, keys, by, table, source, market, start, end, instrument) -> pl.DataFrame:
        check_by(by)
        parts, rows = self._inst_parts()
        idx = filter_summary(parts.with_row_index("_row"), table, source, market, start, end)["_row"].to_numpy()
        if len(idx) < parts.height:
            parts, rows = inst.select_parts(parts, rows, idx)
        return inst.reduce(parts, rows, list(keys), start, end, instrument)

    def _summary_all(self) -> pl.DataFrame:
        if self._summary is None:
            self._summary = (self.df.group_by("table", "source", "market", "date")
                             .agg(pl.col("rows").sum(), pl.col("bytes").sum(), pl.len().cast(pl.Int64).alias("files"),
                                  pl.col("min_ts").min(), pl.col("max_ts").max())
                             .sort("table", "source", "market", "date"))
        return self._summary

    def summary(self, table=None, source=None, market=None, start=None, end=None, raw_ns: bool = False, *,
                by: str = "date", instrument=None) -> pl.DataFrame:
        """As `Catalog.summary`."""
        from engine.schema import time_cols
        from engine.timeutil import result_times, to_ns

        if by != "date" or instrument is not None:
            return result_times(self._by_instrument(("table", "source", "market"), by, table, source, market,
                                                    to_ns(start, name="start"), to_ns(end, name="end"), instrument),
                                time_cols("summary"), raw_ns=raw_ns)
        return result_times(filter_summary(self._summary_all(), table, source, market, to_ns(start, name="start"),
                                           to_ns(end, name="end")), time_cols("summary"), raw_ns=raw_ns)

    def instruments(self, table=None, source=None, market=None, start=None, end=None, instrument=None,
                    raw_ns: bool = False) -> pl.DataFrame:
        from engine.timeutil import to_ns

        return instrument_list(self._by_instrument(("source", "market"), "instrument", table, source, market,
                                                   to_ns(start, name="start"), to_ns(end, name="end"), instrument), raw_ns=raw_ns)

    def partitions(self, table=None, source=None, market=None, start=None, end=None) -> list[Partition]:
        df = self.summary(table, source, market, start, end, raw_ns=True)
        return sorted(df.select("table", "source", "market", "date").iter_rows())

    def markets(self, table: str | None = None) -> list[tuple[str, str]]:
        df = self._summary_all() if table is None else self._summary_all().filter(table=table)
        return sorted(set(df.select("source", "market").iter_rows()))

    def watermark(self, source: str) -> int:
        return self.watermarks.get(source, 0)

    def last_recv_ts(self, source: str) -> int | None:
        return self.df.filter(source=source)["max_recv_ts"].max()


class ManifestReader:
    """A reader home's view of the bucket: every manifest object cached under the home with its ETag,
    so an open or refresh of an unchanged lake is one LIST of `catalog/manifest*` and no download."""

    def __init__(self, store, catalog_dir: Path):
        self.store = store
        self.dir = Path(catalog_dir) / "manifests"
        self.checked = 0.0  # monotonic time of the last request
        self.requests = 0

    def _cache_path(self, key: str) -> Path:
        return self.dir / key.removeprefix(MANIFEST_PREFIX).lstrip("/").replace("/", "_")

    def _cached(self, key: str, etag: str) -> bytes | None:
        p = self._cache_path(key)
        try:
            if p.with_name(p.name + ".etag").read_text().strip() == etag:
                return p.read_bytes()
        except FileNotFoundError:
            pass
        return None

    def _keep(self, key: str, data: bytes, etag: str | None) -> None:
        p = self._cache_path(key)
        atomic_write_bytes(p, data)
        atomic_write_bytes(p.with_name(p.name + ".etag"), (etag or "").encode())

    def _forget_except(self, keys) -> None:
        keep = {self._cache_path(k).name for k in keys}
        for p in self.dir.glob("*"):
            if p.name.removesuffix(".etag") not in keep and not p.name.startswith("."):
                p.unlink(missing_ok=True)

    def _listing(self) -> dict[str, str]:
        self.requests += 1
        try:
            found = self.store.list_etags(MANIFEST_PREFIX)
        finally:
            self.checked = time.monotonic()
        return {k: t for k, t in found.items() if k == MANIFEST_KEY or manifest_part_shard(k) is not None}

    def _missing(self) -> ManifestError:
        return ManifestError(
            f"no catalog manifest at {self.store.url}/{MANIFEST_KEY} (nor shard parts under {MANIFEST_PREFIX}/): "
            "nothing was uploaded there yet, or the store URL is wrong. On the writing machine run "
            "`data-engine upload` (it publishes the manifest).")

    def fetch(self, current: "FrameCatalog | None") -> "FrameCatalog | None":
        """A new catalog when a manifest object changed (or none is loaded yet), else None."""
        listing = self._listing()
        if not listing:
            raise self._missing()
        if current is not None and getattr(current, "etags", None) == listing:
            return None
        parts, etags, got = [], {}, 0
        for key, tag in sorted(listing.items()):
            data = self._cached(key, tag)
            if data is None:
                try:
                    data, tag = self.store.get_bytes_if_changed(key, None)
                except KeyError:  # gone since the LIST (a shard retiring the legacy manifest)
                    continue
                self.requests += 1
                got += len(data)
                self._keep(key, data, tag)
            parts.append(read_part(data, self.store.url, key))
            etags[key] = tag
        if not parts:
            raise self._missing()
        self._forget_except(etags)
        cat = merge(parts)
        cat.etags = etags
        log.info("manifest_loaded", store=self.store.url, parts=len(parts), files=len(cat.df), downloaded_bytes=got)
        return cat
