"""`LakeIOManager`: lake assets load by name, read through the engine; it never writes.

`defs.load_asset_value(AssetKey("compacted_l2"), partition_key="2026-11-25|coinbase:BTC-USD")`, or
a downstream asset declaring `compacted_l2` as an input, gets the partition as a `polars.DataFrame`:
exactly `eng.l2(source="coinbase", market="BTC-USD", start="2026-11-25", end="2026-11-26")` — the
catalog's files, clamped to the sealed watermark, remote files through the read cache. The stages
`raw_*`, `uploaded_*` and `compacted_*` of a table are the same rows at different points of their
life (local, in the store, merged), so they load the same query: what the lake holds now.

The assets that move data (upload, compaction, quotes) do their work through the engine and
return `MaterializeResult`s, so nothing reaches `handle_output` but None; any other value is
refused (a read-only lake must not be written by pickling a frame into it).

Lake assets are declared with `@lake_asset(...)` (or `lake_external(spec)` for one written outside
Dagster), which binds the IO manager to them: `{"engine": EngineResource(...)}` stays the only
resource to give. Another lake asset is one entry of `LOADERS` (asset name → function of the
engine and the partition, None when the asset is not partitioned); e.g. reference data:
`LOADERS["instruments"] = lambda eng, p: eng.instruments(**({"source": p.source, "market": p.market} if p else {}), history=True)`.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import dagster as dg

from engine_defs.partitions import split_partition_key
from engine_defs.resources import EngineResource

if TYPE_CHECKING:  # imported where used: the code server loading the definitions stays light
    import polars as pl

LAKE_IO_MANAGER_KEY = "lake_io_manager"


class LakeIOManagerError(RuntimeError):
    pass


@dataclass(frozen=True, order=True)
class Part:
    """One (date, source, market) partition and the query window it stands for: the UTC day."""

    date: str
    source: str
    market: str

    @classmethod
    def of(cls, partition_key) -> "Part":
        return cls(*split_partition_key(partition_key))

    @property
    def end(self) -> str:
        return (dt.date.fromisoformat(self.date) + dt.timedelta(days=1)).isoformat()

    def window(self) -> dict:
        """Keyword arguments of the engine query for this partition."""
        return {"source": self.source, "market": self.market, "start": self.date, "end": self.end}


Loader = Callable[..., "pl.DataFrame"]  # (engine, Part, or None for an unpartitioned asset) -> frame


def partitioned(p: Part | None, what: str) -> Part:
    if p is None:
        raise LakeIOManagerError(f"{what} is partitioned by date|source:market: give a partition key, e.g. "
                                 "partition_key='2026-11-25|coinbase:BTC-USD'")
    return p


def empty(table: str) -> pl.DataFrame:
    """An empty result shaped like the engine's for `table` (time columns Datetime("ns", "UTC"))."""
    import polars as pl

    from engine import schema
    from engine.timeutil import result_times

    return result_times(pl.from_arrow(schema.spec(table).schema.empty_table()), schema.time_cols(table))


def read_table(table: str) -> Loader:
    """The partition of `table` as `eng.read(table, ...)` returns it; empty when the market never had
    rows of this table (e.g. a Kalshi series without l2), where the engine would raise."""

    def load(eng, p: Part | None) -> pl.DataFrame:
        from engine.research.query import UnknownMarketError

        try:
            return eng.read(table, **partitioned(p, f"table {table}").window())
        except UnknownMarketError:
            return empty(table)

    return load


def read_quotes(eng, p: Part | None) -> pl.DataFrame:
    from engine.research.query import UnknownMarketError

    try:
        return eng.quotes(**partitioned(p, "quotes").window())
    except UnknownMarketError:
        return empty("quotes")


STAGES = ("raw", "uploaded", "compacted")
LOADERS: dict[str, Loader] = {
    **{f"{stage}_{t}": read_table(t) for t in ("l2", "trades", "gaps") for stage in STAGES},
    "quotes": read_quotes,
    # reference data: not partitioned, every version (eng.instruments(at=...) picks the one in force)
    "instruments": lambda eng, p: eng.instruments(history=True),
}


class LakeIOManager(dg.IOManager):
    """Loads lake assets through the engine (read-only: `handle_output` accepts only None)."""

    def __init__(self, engine: EngineResource):
        self.engine = engine

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:  # the asset did its writing through the engine
            return
        raise LakeIOManagerError(
            f"asset {context.asset_key.to_user_string() if context.has_asset_key else context.name} returned a "
            f"{type(obj).__name__}, but the lake IO manager is read-only: lake assets write through the engine and "
            "return a MaterializeResult (or None); give an asset whose value Dagster should store another IO manager")

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        import polars as pl

        key = context.asset_key
        name = key.path[-1]
        loader = LOADERS.get(name)
        if loader is None:
            raise LakeIOManagerError(f"the lake IO manager cannot load asset {key.to_user_string()}: it loads "
                                     f"{', '.join(sorted(LOADERS))} (add a loader to engine_defs.io.LOADERS)")
        parts = sorted(Part.of(pk) for pk in context.asset_partition_keys) if context.has_asset_partitions else [None]
        eng = self.engine.engine()
        frames = [loader(eng, p) for p in parts]
        if context.log is not None:
            context.log.debug(f"loaded {key.to_user_string()} for {len(parts)} partition(s): "
                              f"{sum(f.height for f in frames)} rows")
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical_relaxed")


@dg.io_manager(required_resource_keys={"engine"},
               description="Read-only: loads lake assets by name through the engine (the `engine` resource).")
def lake_io_manager(init_context) -> LakeIOManager:
    """The IO manager on the run's own `engine` resource (one Engine per run for assets and loads)."""
    return LakeIOManager(init_context.resources.engine)


def lake_asset(**kw):
    """`@dg.asset(...)` with `lake_io_manager` bound to the asset (`io_manager_def`), so any
    `resources={"engine": ...}` (Definitions, `materialize`, tests) is all it needs. Dagster marks
    `io_manager_def` beta; its warning is silenced here, once for all lake assets."""

    def deco(fn):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*io_manager_def.*")
            return dg.asset(io_manager_def=lake_io_manager, **kw)(fn)

    return deco


def lake_external(spec: dg.AssetSpec) -> dg.AssetsDefinition:
    """An external lake asset (written outside Dagster, e.g. raw files) loadable through `lake_io_manager`."""
    return dg.AssetsDefinition(specs=[spec.with_io_manager_key(LAKE_IO_MANAGER_KEY)],
                               resource_defs={LAKE_IO_MANAGER_KEY: lake_io_manager})


def load_asset(asset, partition_key: str, *, defs: dg.Definitions | None = None,
               instance: dg.DagsterInstance | None = None):
    """`defs.load_asset_value(asset, partition_key=...)` (default: the project's definitions, lake
    from the environment) that also works where no Dagster instance has the market partitions
    registered, e.g. a laptop reading the bucket without DAGSTER_HOME: then an ephemeral instance
    with that market key is used. Loading needs an instance because market keys are dynamic."""
    from engine_defs.partitions import MARKETS, market_key

    if defs is None:
        from engine_defs.definitions import defs
    if instance is None:
        instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    p = Part.of(partition_key)
    mk = market_key(p.source, p.market)
    if not instance.has_dynamic_partition(MARKETS, mk):
        if not instance.is_ephemeral:
            instance = dg.DagsterInstance.ephemeral()  # never register keys in a real instance from a read
        instance.add_dynamic_partitions(MARKETS, [mk])
    return defs.load_asset_value(asset, partition_key=str(partition_key), instance=instance)
