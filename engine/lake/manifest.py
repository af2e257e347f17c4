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
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.lake import instruments as inst
from engine.lake.catalog import FileEntry, Partition, check_by, filter_summary, instrument_list
from engine.fsio import atomic_write_bytes
from engine.lake.catalog import FileEntry, Partition, filter_summary
from engine.lake.store import StoreError
from engine.log import get_logger
from engine.paths import MANIFEST_KEY

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


def build(entries: list[FileEntry], watermarks: dict[str, int]) -> bytes:
    """The manifest of a catalog's live files (`entries`) and its sealed `watermarks`."""
    remote = sorted((e for e in entries if e.remote), key=lambda e: e.key)
    sch = _schema()
    cols = {f.name: pa.array([getattr(e, f.name) for e in remote], f.type) for f in sch if f.name != "instruments"}
    t = pa.table({**cols, "instruments": _instrument_column(remote)}, schema=sch)
    meta = {b"engine.watermarks": msgspec.json.encode(watermarks),
            b"engine.remote_watermarks": msgspec.json.encode(remote_watermarks(entries, watermarks)),
            b"engine.published_ns": str(time.time_ns()).encode()}
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
    """Only remote files are listed: the manifest describes what the bucket holds."""
    eng.require_writer("publish_manifest")
    data = build(list(eng.catalog.entries()), eng.catalog.watermarks)
    eng.store.put_bytes(MANIFEST_KEY, data)
    log.info("manifest_published", store=eng.store.url, bytes=len(data), files=len(eng.catalog.by_key))
    return MANIFEST_KEY


def publish_after_change(eng) -> str | None:
    """Republish after a change to what the store holds (upload, compaction swap, purge), and the
    Iceberg tables if this home publishes them. A failure is logged, not raised: the change itself
    is durable, and the next change publishes again."""
    from engine.lake.iceberg import follow

    try:
        return publish(eng)
    except StoreError as err:
        log.error("manifest_publish_failed", store=eng.store.url, error=str(err))
        return None
    finally:
        follow(eng)


def parse(data: bytes, url: str) -> "FrameCatalog":
    """The manifest as a reader's catalog, clamped to its remote watermarks."""
    try:
        meta = pq.ParquetFile(io.BytesIO(data)).schema_arrow.metadata or {}
        local = msgspec.json.decode(meta.get(b"engine.watermarks", b"{}"), type=dict[str, int])
        remote = meta.get(b"engine.remote_watermarks")
        wms = msgspec.json.decode(remote, type=dict[str, int]) if remote else local  # older manifests
        df = pl.read_parquet(io.BytesIO(data))  # Polars reads 100k entries in ~8 ms, pyarrow in ~35
        want = pl.from_arrow(_schema().empty_table()).schema
        missing = [c for c in want if c not in df.columns and c != "instruments"]
        if missing:
            raise ValueError(f"columns missing: {', '.join(missing)}")
        if "instruments" not in df.columns:  # a manifest from before per-instrument figures
            df = df.with_columns(pl.lit(None, dtype=want["instruments"]).alias("instruments"))
        df = df.select(want.names()).cast(dict(want)).with_columns(local=pl.lit(False))
    except (pa.ArrowException, pl.exceptions.PolarsError, OSError, msgspec.MsgspecError, TypeError, ValueError) as e:
        head = data[:40]
        raise ManifestError(
            f"the catalog manifest at {url}/{MANIFEST_KEY} is unreadable ({type(e).__name__}: {e}; starts with "
            f"{head!r}); republish it on the writing machine with `data-engine catalog publish`, or check that "
            "the store URL and endpoint point at the lake's bucket") from None
    return FrameCatalog(df.filter(pl.col("remote")), wms, local)


class FrameCatalog:
    """A reader's read-only catalog: the manifest's file list kept as one columnar frame, so that
    opening 100,000 files costs a Parquet read, and each question a vectorized filter. It answers
    what `Catalog` answers for queries; FileEntry objects are made only for the files selected."""

    torn_lines = 0
    version = 0

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
    """A reader home's view of the bucket: the manifest cached under the home with its ETag, so an
    open or refresh of an unchanged manifest is one conditional GET with no body."""

    def __init__(self, store, catalog_dir: Path):
        self.store = store
        self.cached = Path(catalog_dir) / "manifest.parquet"
        self.etag_file = Path(catalog_dir) / "manifest.etag"
        self.checked = 0.0  # monotonic time of the last request
        self.requests = 0

    def fetch(self, current: FrameCatalog | None) -> FrameCatalog | None:
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
            return parse(self.cached.read_bytes(), self.store.url)  # unchanged since this home cached it
        cat = parse(data, self.store.url)
        self.cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.cached, data)
        atomic_write_bytes(self.etag_file, (tag or "").encode())
        log.info("manifest_loaded", store=self.store.url, files=len(cat.df), bytes=len(data))
        return cat
