"""The lake published as Apache Iceberg tables (pyiceberg), its Parquet files registered in place.

One Iceberg table per lake table (`lake.l2`, `lake.trades`, ...). Publishing copies no data: each
uploaded file (the store's object, as the catalog lists it) becomes an Iceberg data file by its URI,
with metrics read from its own footer and its partition taken from the catalog. Iceberg metadata
(JSON, Avro manifests) lives beside the data, under `{store}/iceberg/{namespace}/{table}/`.

Decisions (README "The lake as Iceberg tables" says the same for users):
- Catalog: SQLite (`{home}/iceberg/catalog.db`, warehouse `{store}/iceberg`) unless a REST catalog is
  configured (ENGINE_ICEBERG_REST_URI, credential/token from the environment, never logged).
- Partition spec: identity(source), identity(market). The date is not a partition field: Iceberg
  derives partitions from columns by transforms, `day()` needs a date/timestamp column while the
  lake's times are int64 ns (`long`), `truncate[86400e9]` does not fit the 32-bit width Java readers
  parse, and the files hold no `date` column (a reader filling one from metadata is not universal).
  Every file lies inside one UTC day and is sorted by time, so the per-file min/max of `ts` and
  `recv_ts` in the manifests prune a time range at least as well as a date partition would.
  The writer keeps no statistics for `source` and `market` (constant per file), so pyiceberg's
  `add_files` cannot infer their partition values: the data files are built here with the same
  pyiceberg functions `add_files` uses, the partition values coming from the catalog (the path).
- Types: times stay `long` (int64 ns, exactly as stored; `timestamp_ns` needs format v3 and a
  timestamp type in the file, which would not read back equal); dictionary-encoded strings are
  plain `string` (Iceberg has no dictionary type; readers decode them).
- The files registered are the table's own manifest list, no second record to drift: a publish
  diffs it against the catalog's uploaded files, appends the new ones, and replaces files a
  compaction retired by their compacted file in ONE overwrite snapshot. Publishing again with
  nothing new commits nothing. Snapshots older than the compaction grace period are expired (their
  raw files get purged after it); pyiceberg never deletes data files.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine import schema
from engine.errors import EngineError
from engine.fsio import atomic_write_bytes
from engine.lake.catalog import FileEntry
from engine.lake.store import LocalStore, S3Store
from engine.log import get_logger, redact

log = get_logger(component="iceberg")

DEFAULT_NAMESPACE = "lake"
CATALOG_NAME = "engine"
STATE_NAME = "state.json"
COMMIT_ATTEMPTS = 3
FOOTER_WORKERS = 8  # footer reads are round trips on S3: several at once
TABLE_PROPERTIES = {
    "write.metadata.delete-after-commit.enabled": "true",  # old metadata JSON goes; data files never do
    "write.metadata.previous-versions-max": "20",
    "engine.layout": "data/{table}/source={source}/market={market}/date={date}/{seq}.parquet",
    "engine.time-unit": "ns since the Unix epoch, UTC (long)",
}
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


class IcebergError(EngineError):
    """Publishing or reading the Iceberg tables failed for a reason the user can act on."""


class _DictionaryNote(logging.Filter):
    """pyiceberg warns once per dictionary column per file read that Iceberg has no dictionary type:
    expected for this lake (documented above), and 4 lines a file would drown the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have a dictionary type" not in record.getMessage()


logging.getLogger("pyiceberg.io.pyarrow").addFilter(_DictionaryNote())


@dataclass(frozen=True)
class IcebergConfig:
    """Where the Iceberg catalog is. `rest_uri` None: SQLite under the lake home."""

    rest_uri: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    warehouse: str | None = None  # REST: the warehouse the server expects (default: the store's iceberg/)
    credential: str | None = field(default=None, repr=False)  # OAuth2 client credentials `id:secret`
    token: str | None = field(default=None, repr=False)  # or a bearer token
    timeout_s: float = 10.0  # per HTTP request to a REST catalog: a silent server is an error, not a hang

    @classmethod
    def from_env(cls, **overrides) -> "IcebergConfig":
        """ENGINE_ICEBERG_REST_URI, _NAMESPACE, _WAREHOUSE, _CREDENTIAL, _TOKEN, _TIMEOUT_S; explicit
        `overrides` (not None) win."""
        env = os.environ.get
        kw = dict(rest_uri=env("ENGINE_ICEBERG_REST_URI") or None,
                  namespace=env("ENGINE_ICEBERG_NAMESPACE") or DEFAULT_NAMESPACE,
                  warehouse=env("ENGINE_ICEBERG_WAREHOUSE") or None,
                  credential=env("ENGINE_ICEBERG_CREDENTIAL") or None,
                  token=env("ENGINE_ICEBERG_TOKEN") or None,
                  timeout_s=float(env("ENGINE_ICEBERG_TIMEOUT_S") or 10.0))
        kw.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**kw)
        if not _NAME.fullmatch(cfg.namespace):
            raise IcebergError(f"Iceberg namespace {cfg.namespace!r} must be lowercase letters, digits and '_'")
        if cfg.rest_uri and not re.match(r"https?://", cfg.rest_uri):
            raise IcebergError(f"ENGINE_ICEBERG_REST_URI {redact(cfg.rest_uri)!r} is not an http(s):// URL")
        return cfg

    @property
    def kind(self) -> str:
        return "rest" if self.rest_uri else "sqlite"

    def describe(self) -> str:
        """Where the catalog is, safe to print or log (no credential)."""
        return f"REST {redact(self.rest_uri)}" if self.rest_uri else "SQLite"


@dataclass
class TablePublish:
    """What one publish did to one table."""

    table: str
    files: int  # registered now (= the catalog's uploaded files of the table)
    rows: int
    added: int
    removed: int
    snapshot_id: int | None  # current snapshot after the publish (None: table still empty)
    committed: bool  # False: nothing had changed, nothing was written
    metadata_location: str
    seconds: float


@dataclass
class TableStatus:
    table: str
    exists: bool
    snapshot_id: int | None = None
    snapshots: int = 0
    files: int = 0  # registered in the current snapshot
    rows: int = 0
    catalog_files: int = 0  # uploaded files the lake's catalog lists
    unregistered: int = 0  # uploaded but not in the table yet (publish adds them)
    stale: int = 0  # in the table but no longer live in the catalog (compacted away: publish replaces them)
    metadata_location: str | None = None


# ---- locations --------------------------------------------------------------------------------


def store_uri(store) -> str:
    """The store's root as a URI Iceberg readers resolve: file:///abs/dir or s3://bucket/prefix."""
    if isinstance(store, LocalStore):
        return store.root.as_uri()
    if isinstance(store, S3Store):
        return store.url
    raise IcebergError(f"store {store.url} cannot hold Iceberg tables (a directory or an S3 bucket can)")


def file_uri(store, key: str) -> str:
    return f"{store_uri(store)}/{key}"


def warehouse_uri(store) -> str:
    return f"{store_uri(store)}/iceberg"


def table_location(store, namespace: str, table: str) -> str:
    return f"{warehouse_uri(store)}/{namespace}/{table}"


def io_properties(store) -> dict[str, str]:
    """FileIO properties for the store: S3 endpoint, region and credentials (from the environment,
    as the store's own client has them). Kept in memory only: never written to table metadata."""
    if not isinstance(store, S3Store):
        return {}
    props = {"s3.region": os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1"))}
    if store.endpoint_url:
        props["s3.endpoint"] = store.endpoint_url
    for prop, env in (("s3.access-key-id", "AWS_ACCESS_KEY_ID"), ("s3.secret-access-key", "AWS_SECRET_ACCESS_KEY"),
                      ("s3.session-token", "AWS_SESSION_TOKEN")):
        if os.environ.get(env):
            props[prop] = os.environ[env]
    return props


def _dir(eng) -> Path:
    return eng.layout.home / "iceberg"


# ---- catalog ------------------------------------------------------------------------------------


def open_catalog(eng, config: IcebergConfig | None = None):
    """The pyiceberg catalog: SQLite under the home, or the configured REST catalog (checked now:
    an unreachable or refusing server is an IcebergError naming it, never a hang)."""
    config = config or IcebergConfig.from_env()
    props = io_properties(eng.store)
    if config.rest_uri is None:
        from pyiceberg.catalog.sql import SqlCatalog

        d = _dir(eng)
        d.mkdir(parents=True, exist_ok=True)
        return SqlCatalog(CATALOG_NAME, uri=f"sqlite:///{d / 'catalog.db'}", warehouse=warehouse_uri(eng.store), **props)
    props.update(uri=config.rest_uri, warehouse=config.warehouse or warehouse_uri(eng.store))
    if config.credential:
        props["credential"] = config.credential
        # the REST spec's token endpoint, named (pyiceberg warns when it has to assume it)
        props.setdefault("oauth2-server-uri", f"{config.rest_uri.rstrip('/')}/v1/oauth/tokens")
    if config.token:
        props["token"] = config.token
    return _rest_catalog(config, props)


def _rest_catalog(config: IcebergConfig, props: dict[str, str]):
    import requests
    from pyiceberg.catalog.rest import RestCatalog
    from pyiceberg.exceptions import ForbiddenError, OAuthError, RESTError, UnauthorizedError

    class _TimeoutAdapter(requests.adapters.HTTPAdapter):
        def send(self, request, **kw):
            if kw.get("timeout") is None:
                kw["timeout"] = config.timeout_s
            return super().send(request, **kw)

    class _TimedRestCatalog(RestCatalog):
        """pyiceberg's REST client sets no timeout: every request here gets one."""

        def _create_session(self):
            s = super()._create_session()
            s.mount("http://", _TimeoutAdapter())
            s.mount("https://", _TimeoutAdapter())
            return s

    where = redact(config.rest_uri or "")
    try:
        # pyiceberg's first requests (config, an OAuth2 token) go out before a session can be given a
        # timeout: probe the server first, so a silent one is an error within `timeout_s`, not a hang
        requests.get(f"{config.rest_uri.rstrip('/')}/v1/config", timeout=config.timeout_s)
        return _TimedRestCatalog(CATALOG_NAME, **props)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise IcebergError(
            f"the Iceberg REST catalog at {where} did not answer within {config.timeout_s:g} s "
            f"({type(e).__name__}); is it up and reachable? (ENGINE_ICEBERG_REST_URI)") from None
    except (UnauthorizedError, ForbiddenError, OAuthError) as e:
        raise IcebergError(
            f"the Iceberg REST catalog at {where} refused the credentials ({type(e).__name__}); check "
            "ENGINE_ICEBERG_CREDENTIAL (client_id:secret) or ENGINE_ICEBERG_TOKEN") from None
    except RESTError as e:
        raise IcebergError(f"the Iceberg REST catalog at {where} answered an error: "
                           f"{type(e).__name__}: {redact(str(e))[:300]}") from None


# ---- schema --------------------------------------------------------------------------------------


def iceberg_schema(table: str):
    """The lake table's columns as an Iceberg schema (ids 1..n in column order)."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import BooleanType, DoubleType, LongType, NestedField, StringType

    types = {pa.int64(): LongType(), pa.string(): StringType(), pa.float64(): DoubleType(), pa.bool_(): BooleanType()}
    fields = []
    for i, f in enumerate(schema.spec(table).schema, 1):
        t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        if t not in types:
            raise IcebergError(f"{table}.{f.name}: no Iceberg type for {t} yet")
        fields.append(NestedField(i, f.name, types[t], required=not f.nullable))
    return Schema(*fields)


def partition_spec(ischema):
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform

    return PartitionSpec(*(PartitionField(source_id=ischema.find_field(c).field_id, field_id=1000 + i,
                                          transform=IdentityTransform(), name=c)
                           for i, c in enumerate(("source", "market"))))


def table_properties(table: str) -> dict[str, str]:
    """Columns the writer keeps no Parquet statistics for (constant or never filtered) get metrics
    mode `none`: nothing to read, and no warning per file that they are missing."""
    from engine.lake.writer import _NO_STATS

    return {**TABLE_PROPERTIES, **{f"write.metadata.metrics.column.{c}": "none"
                                   for c in schema.spec(table).columns if c in _NO_STATS}}


def _ensure_table(cat, eng, namespace: str, table: str):
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError, TableAlreadyExistsError

    ident = (namespace, table)
    try:
        return cat.load_table(ident)
    except NoSuchTableError:
        pass
    try:
        cat.create_namespace(namespace)
    except NamespaceAlreadyExistsError:
        pass
    ischema = iceberg_schema(table)
    try:
        tbl = cat.create_table(ident, schema=ischema, partition_spec=partition_spec(ischema),
                               location=table_location(eng.store, namespace, table), properties=table_properties(table))
    except TableAlreadyExistsError:  # another publisher created it meanwhile
        return cat.load_table(ident)
    log.info("iceberg_table_created", table=f"{namespace}.{table}", location=tbl.location())
    return tbl


def load_table(eng, table: str, config: IcebergConfig | None = None):
    """The published pyiceberg Table of a lake table (for `polars.scan_iceberg`, `tbl.scan()`...)."""
    from pyiceberg.exceptions import NoSuchTableError

    schema.spec(table)
    config = config or IcebergConfig.from_env()
    try:
        return open_catalog(eng, config).load_table((config.namespace, table))
    except NoSuchTableError:
        raise IcebergError(f"no Iceberg table {config.namespace}.{table} in the {config.describe()} catalog: "
                           "run `data-engine iceberg publish` first") from None


# ---- data files ----------------------------------------------------------------------------------


def registered(tbl) -> dict[str, object]:
    """The data files of the table's current snapshot, by path (DataFile objects)."""
    snap = tbl.current_snapshot()
    if snap is None:
        return {}
    out = {}
    for m in snap.manifests(tbl.io):
        for entry in m.fetch_manifest_entry(tbl.io, discard_deleted=True):
            out[entry.data_file.file_path] = entry.data_file
    return out


def _footer(eng, tbl, e: FileEntry, uri: str) -> pq.FileMetaData:
    """A file's Parquet footer, from the fastest copy: the staged one (identical, verified at upload),
    the local store, or the store through the table's FileIO."""
    for p in (eng.layout.staged(e.key), eng.store.path(e.key) if eng.store.is_local else None):
        if p is not None:
            try:
                return pq.read_metadata(p)
            except FileNotFoundError:  # the staged copy was just deleted (after compaction)
                continue
    with tbl.io.new_input(uri).open() as f:
        return pq.read_metadata(f)


class _DataFiles:
    """Builds Iceberg DataFiles for catalog entries, as pyiceberg's add_files does, the partition
    from the catalog (the writer keeps no statistics for the constant source/market columns)."""

    def __init__(self, eng, tbl):
        from pyiceberg.io.pyarrow import compute_statistics_plan, parquet_path_to_id_mapping

        self.eng, self.tbl = eng, tbl
        md = tbl.metadata
        self.schema, self.spec_id, self.fmt = md.schema(), md.default_spec_id, md.format_version
        self.plan = compute_statistics_plan(self.schema, md.properties)
        self.mapping = parquet_path_to_id_mapping(self.schema)
        self._checked: set[pa.Schema] = set()
        self._lock = threading.Lock()

    def _check_schema(self, e: FileEntry, arrow_schema: pa.Schema) -> None:
        from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible

        arrow_schema = arrow_schema.remove_metadata()
        with self._lock:
            if arrow_schema in self._checked:
                return
        try:
            _check_pyarrow_schema_compatible(self.schema, arrow_schema, format_version=self.fmt)
        except ValueError as err:
            raise IcebergError(f"{e.key} does not fit the Iceberg schema of {e.table}: {err}") from None
        with self._lock:
            self._checked.add(arrow_schema)

    def build(self, e: FileEntry):
        from pyiceberg.io.pyarrow import data_file_statistics_from_parquet_metadata
        from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
        from pyiceberg.typedef import Record

        uri = file_uri(self.eng.store, e.key)
        md = _footer(self.eng, self.tbl, e, uri)
        if md.num_rows != e.rows:
            raise IcebergError(f"{e.key} holds {md.num_rows} rows, the catalog says {e.rows}: not registering it "
                               "(run `data-engine catalog verify`)")
        self._check_schema(e, md.schema.to_arrow_schema())
        st = data_file_statistics_from_parquet_metadata(parquet_metadata=md, stats_columns=self.plan,
                                                        parquet_column_mapping=self.mapping)
        return DataFile.from_args(
            content=DataFileContent.DATA, file_path=uri, file_format=FileFormat.PARQUET,
            partition=Record(e.source, e.market), file_size_in_bytes=e.bytes, sort_order_id=None,
            spec_id=self.spec_id, equality_ids=None, key_metadata=None, **st.to_serialized_dict())


# ---- publish -------------------------------------------------------------------------------------


class _PublishLock:
    """One publisher per lake home at a time (CLI, Dagster and a compaction's follow-up may overlap);
    other homes or machines are kept apart by the catalog's own optimistic commits."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def publish(eng, tables: list[str] | None = None, config: IcebergConfig | None = None, *,
            keep_snapshots_s: float | None = None, workers: int = FOOTER_WORKERS,
            follow: bool | None = None) -> list[TablePublish]:
    """Register the catalog's uploaded files in the Iceberg tables: new files appended, files a
    compaction replaced swapped for the compacted one in one snapshot; a table already in step is
    not touched. `keep_snapshots_s` (default: compaction's grace period): older snapshots expire.
    `follow` (default: as before, else True): uploads and compactions of this home publish again."""
    from engine.lake.compaction import GRACE_S

    eng.require_writer("iceberg_publish")
    config = config or IcebergConfig.from_env()
    tables = list(tables or schema.TABLES)
    for t in tables:
        schema.spec(t)
    keep = GRACE_S if keep_snapshots_s is None else keep_snapshots_s
    with _PublishLock(_dir(eng) / "publish.lock"):
        cat = open_catalog(eng, config)
        eng.catalog.refresh()
        out = [_publish_table(eng, cat, config.namespace, t, keep, workers) for t in tables]
        _write_state(eng, config, out, follow)
    return out


def _publish_table(eng, cat, namespace: str, table: str, keep_s: float, workers: int) -> TablePublish:
    from pyiceberg.exceptions import CommitFailedException

    t0 = time.perf_counter()
    wanted = {file_uri(eng.store, e.key): e for e in eng.catalog.files(table) if e.remote}
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        tbl = _ensure_table(cat, eng, namespace, table)
        have = registered(tbl)
        add = [e for uri, e in wanted.items() if uri not in have]
        drop = [df for uri, df in have.items() if uri not in wanted]
        if not add and not drop:
            snap = tbl.current_snapshot()
            return TablePublish(table, len(have), sum(e.rows for e in wanted.values()), 0, 0,
                                snap.snapshot_id if snap else None, False, tbl.metadata_location,
                                time.perf_counter() - t0)
        builder = _DataFiles(eng, tbl)
        if len(add) > 1 and workers > 1:
            with ThreadPoolExecutor(min(workers, len(add)), thread_name_prefix="iceberg-footer") as ex:
                new = list(ex.map(builder.build, add))
        else:
            new = [builder.build(e) for e in add]
        try:
            _commit(tbl, new, drop, keep_s)
        except CommitFailedException as err:  # another publisher committed first: diff again
            log.warning("iceberg_commit_conflict", table=table, attempt=attempt, error=str(err)[:200])
            if attempt == COMMIT_ATTEMPTS:
                raise IcebergError(f"{namespace}.{table}: commit kept conflicting with another publisher "
                                   f"({attempt} attempts); run publish again") from None
            continue
        tbl = cat.load_table((namespace, table))
        snap = tbl.current_snapshot()
        res = TablePublish(table, len(wanted), sum(e.rows for e in wanted.values()), len(new), len(drop),
                           snap.snapshot_id if snap else None, True, tbl.metadata_location, time.perf_counter() - t0)
        log.info("iceberg_published", table=f"{namespace}.{table}", files=res.files, added=res.added,
                 removed=res.removed, snapshot_id=res.snapshot_id, seconds=round(res.seconds, 3))
        return res
    raise AssertionError("unreachable")


def _commit(tbl, new: list, drop: list, keep_s: float) -> None:
    """One transaction, one snapshot: an append when only adding, else an overwrite that deletes
    the replaced files and adds their replacement together; then old snapshots expire."""
    from pyiceberg.table import TableProperties
    from pyiceberg.table.update.snapshot import ExpireSnapshots

    props = {"engine.added-files": str(len(new)), "engine.removed-files": str(len(drop))}
    with tbl.transaction() as txn:
        if txn.table_metadata.name_mapping() is None:  # the files carry no field ids: columns by name
            txn.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                                  txn.table_metadata.schema().name_mapping.model_dump_json()})
        snap = txn.update_snapshot(snapshot_properties=props)
        # merge_append folds small manifests together (past 100): hourly publishes stay cheap to plan
        with (snap.overwrite() if drop else snap.merge_append()) as producer:
            for df in drop:
                producer.delete_data_file(df)
            for df in new:
                producer.append_data_file(df)
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=keep_s)
        current = txn.table_metadata.current_snapshot_id
        old = [s.snapshot_id for s in txn.table_metadata.snapshots
               if s.timestamp_ms < cutoff.timestamp() * 1000 and s.snapshot_id != current]
        if old:
            ExpireSnapshots(txn).by_ids(old).commit()


def _read_state(eng) -> dict:
    try:
        return json.loads((_dir(eng) / STATE_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_state(eng, config: IcebergConfig, results: list[TablePublish], follow: bool | None) -> None:
    """`{home}/iceberg/state.json`: where the tables were published, what the last publish did, and
    whether uploads and compactions of this home keep them in step (`follow`). No credential."""
    old = _read_state(eng)
    tables = old.get("tables", {})
    tables.update({r.table: {**asdict(r), "published_ns": time.time_ns()} for r in results})
    state = {"catalog": config.kind, "rest_uri": redact(config.rest_uri) if config.rest_uri else None,
             "namespace": config.namespace, "store": eng.store.url, "tables": tables,
             "follow": old.get("follow", True) if follow is None else follow}
    path = _dir(eng) / STATE_NAME
    atomic_write_bytes(path, json.dumps(state, indent=1, sort_keys=True).encode())


def follow(eng) -> list[TablePublish] | None:
    """After a change to what the store holds (upload, compaction swap, purge): publish again if this
    home published Iceberg tables before (and did not opt out), so they list new files at once and
    replaced ones are swapped out before the grace period ends and they are purged. A failure is
    logged, not raised: the change itself is durable, and the next change publishes again."""
    if not (_dir(eng) / STATE_NAME).exists():
        return None
    try:
        state = _read_state(eng)
        if not state.get("follow", True):
            return None
        config = IcebergConfig.from_env(namespace=state.get("namespace"))
        if config.kind != state.get("catalog", "sqlite"):
            log.warning("iceberg_follow_skipped", why=f"published to a {state.get('catalog')} catalog, this process "
                        f"is configured for {config.describe()}")
            return None
        return publish(eng, config=config)
    except Exception as err:  # noqa: BLE001 - logged: the lake's change stands, the next one retries
        log.error("iceberg_follow_failed", error=redact(str(err))[:500])
        return None


# ---- status --------------------------------------------------------------------------------------


def status(eng, tables: list[str] | None = None, config: IcebergConfig | None = None) -> list[TableStatus]:
    """Per table: what the current snapshot registers against what the catalog has uploaded."""
    from pyiceberg.exceptions import NoSuchTableError

    config = config or IcebergConfig.from_env()
    cat = open_catalog(eng, config)
    eng.refresh()
    out = []
    for t in tables or list(schema.TABLES):
        wanted = {file_uri(eng.store, e.key) for e in eng.catalog.files(t) if e.remote}
        try:
            tbl = cat.load_table((config.namespace, t))
        except NoSuchTableError:
            out.append(TableStatus(t, False, catalog_files=len(wanted), unregistered=len(wanted)))
            continue
        have = registered(tbl)
        snap = tbl.current_snapshot()
        out.append(TableStatus(
            t, True, snapshot_id=snap.snapshot_id if snap else None, snapshots=len(tbl.metadata.snapshots),
            files=len(have), rows=sum(df.record_count for df in have.values()), catalog_files=len(wanted),
            unregistered=len(wanted - have.keys()), stale=len(have.keys() - wanted),
            metadata_location=tbl.metadata_location))
    return out
