"""A collector shard's identity, kept in its home (`shard.json`).

A shard is one collector process with its own home (spool, staging, catalog log) and a shard id.
The id is part of every file name it writes (`0003-s1.parquet`, compacted `0000-s1.parquet`) and
of the manifest part it publishes (`catalog/manifest/part-0001.parquet`), so shards sharing one
bucket never write the same key. It lives in the home, not only on a command line, because every
process that writes for the home (collector, upload, compaction, Dagster, the CLI) must name files
and publish the manifest the same way. A home without the file is unsharded: today's names and
the single `catalog/manifest.parquet`.

`sources` are the sources the shard collects: a reader's watermark of a source is the minimum over
the manifest parts that declare it, so a shard holds back only what it collects.
"""

from __future__ import annotations

import time

import msgspec

from engine.fsio import atomic_write_bytes
from engine.log import get_logger
from engine.paths import SHARD_MAX, Layout, parse_key

log = get_logger(component="shard")


class ShardError(ValueError):
    """A shard id that does not fit the home (another id claimed it) or is out of range."""


class Identity(msgspec.Struct, kw_only=True, frozen=True):
    shard: int
    shards: int | None = None  # how many shards the assignment was computed for (None: explicit markets)
    markets: dict[str, list[str]] = msgspec.field(default_factory=dict)  # source → markets it collects
    store: str | None = None  # the store URL the shard uploads to (a default for later processes; no secret)
    retire_legacy: bool = False  # an unsharded writer's home became shard 0: its first part retires the legacy manifest
    claimed_ns: int = 0

    @property
    def sources(self) -> list[str]:
        return sorted(s for s, ms in self.markets.items() if ms)


def read(layout: Layout) -> Identity | None:
    """The home's shard identity, None for an unsharded home; a damaged file is an error (guessing
    would name files as another shard)."""
    try:
        data = layout.shard_file.read_bytes()
    except FileNotFoundError:
        return None
    try:
        ident = msgspec.json.decode(data, type=Identity)
    except msgspec.MsgspecError as e:
        raise ShardError(f"{layout.shard_file} is unreadable ({e}); fix it or restore it (it names the shard "
                         "whose files this home writes)") from None
    check_id(ident.shard)
    return ident


def check_id(shard: int) -> int:
    if not 0 <= shard <= SHARD_MAX:
        raise ShardError(f"shard id {shard} out of range 0..{SHARD_MAX}")
    return shard


def claim(layout: Layout, shard: int, *, shards: int | None = None, markets: dict[str, list[str]] | None = None,
          store: str | None = None) -> Identity:
    """Make the home shard `shard` (or confirm it), recording what it collects now (`markets` None:
    keep what is recorded). A home keeps its
    id for life: asking for another id is refused, since its files already carry the first one. An
    unsharded home that already wrote becomes a shard by adopting the legacy manifest (its files keep
    their names; it publishes its part and retires `catalog/manifest.parquet`)."""
    check_id(shard)
    old = read(layout)
    if old is not None and old.shard != shard:
        raise ShardError(f"{layout.home} is the home of shard {old.shard}; it cannot collect as shard {shard} "
                         f"(its files carry its id): use the home of shard {shard}, or a new home")
    wrote = old is None and layout.catalog_log.exists() and layout.catalog_log.stat().st_size > 0
    if wrote and shard != 0:
        raise ShardError(f"{layout.home} is an unsharded lake home with files: it can only become shard 0 "
                         f"(which keeps its files' names and takes over its manifest); use a new home for shard {shard}")
    if markets is None:  # a keeper confirming the id: what the collector recorded stays
        markets, shards = (old.markets, old.shards) if old is not None else ({}, shards)
    ident = Identity(shard=shard, shards=shards, markets={s: list(m) for s, m in sorted(markets.items())},
                     store=store if store is not None else (old.store if old else None),
                     retire_legacy=old.retire_legacy if old is not None else wrote,
                     claimed_ns=old.claimed_ns if old is not None else time.time_ns())
    if ident != old:
        _write(layout, ident)
        log.info("shard_claimed", home=str(layout.home), shard=shard, shards=shards, sources=ident.sources,
                 takes_over_unsharded_home=ident.retire_legacy)
    return ident


def legacy_retired(layout: Layout) -> Identity:
    """Record that the legacy manifest this home published before it was a shard is deleted."""
    ident = msgspec.structs.replace(read(layout), retire_legacy=False)
    _write(layout, ident)
    return ident


def _write(layout: Layout, ident: Identity) -> None:
    layout.home.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(layout.shard_file, msgspec.json.format(msgspec.json.encode(ident), indent=1) + b"\n")


def owns(shard: int | None, key: str) -> bool:
    """Whether a home of `shard` (None: unsharded) owns the data file `key`: files named with its id,
    and files with unsharded names for an unsharded home or shard 0 (which takes over an unsharded
    lake). Rebuilding a catalog from the store takes only these, so a shard never compacts or
    republishes another shard's files."""
    kshard = parse_key(key).shard
    if kshard is None:
        return shard in (None, 0)
    return kshard == shard


def declared_sources(ident: Identity | None, entries) -> list[str] | None:
    """The sources a home's manifest holds back: those it collects and those with files not uploaded
    yet. None for an unsharded home (every source of its watermarks, as before shards)."""
    if ident is None:
        return None
    return sorted(set(ident.sources) | {e.source for e in entries if not e.remote})

