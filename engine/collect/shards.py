"""Collector shards: which markets each of N collector processes takes, and the `collect` options.

The assignment is round-robin over the configured (source, market) pairs sorted by source, then
market: pair j goes to shard j mod N. Why this rule:
- it is computed from the configuration alone, so every host started with the same sources,
  markets and N agrees on it without talking to the others (the bucket is the only meeting point);
- shard loads differ by at most one market, and every source is spread over the shards (a source
  with 100 products does not land on one process while another shard takes a 3-series source);
- a market belongs to exactly one shard, so a date partition normally holds one shard's files.
Changing the market list or N can move a market to another shard. That day's partition then holds
files of both; each shard compacts only its own files (into `0000-s{shard}.parquet`), so nothing
collides and readers see both.

`collect --shard-id K --shards N` keeps shard K's markets of the configured ones; `--shard-id K`
alone collects the markets given explicitly (one systemd unit or container per shard, with its
own list). Either way the home records its shard id (engine.lake.shard) before the lake opens.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engine.lake import shard as shard_id
from engine.log import get_logger
from engine.paths import Layout

log = get_logger(component="shards")


def assign(markets: dict[str, list[str]], shards: int) -> list[dict[str, list[str]]]:
    """Shard i's markets per source for each i < `shards` (round-robin over sorted (source, market))."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    pairs = sorted({(s, m) for s, ms in markets.items() for m in ms})
    out: list[dict[str, list[str]]] = [{} for _ in range(shards)]
    for j, (s, m) in enumerate(pairs):
        out[j % shards].setdefault(s, []).append(m)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sharding (several collector processes, one bucket)")
    g.add_argument("--shard-id", type=int, default=None,
                   help="this collector's shard id: its files are named with it and it publishes its own manifest "
                        "part (with --shards: collect only the markets assigned to it)")
    g.add_argument("--shards", type=int, default=None,
                   help="number of shards the configured markets are spread over (round-robin of (source, market))")


def configured_markets(cfg: argparse.Namespace) -> dict[str, list[str]]:
    from engine.collect import registry

    return {s: registry.get(s).markets(cfg) for s in dict.fromkeys(cfg.source)}


def configure(cfg: argparse.Namespace) -> shard_id.Identity | None:
    """Apply `--shard-id/--shards` to a parsed `collect` configuration: narrow each source to the
    shard's markets (dropping sources left without any) and claim the home for the shard. None for
    an unsharded collector. Raises ValueError (a clear message) on inconsistent options."""
    from engine.collect import registry

    sid, n = getattr(cfg, "shard_id", None), getattr(cfg, "shards", None)
    if sid is None:
        if n not in (None, 1):
            raise ValueError(f"--shards {n} needs --shard-id (which of the {n} shards this collector is)")
        return None
    if n is not None and not 0 <= sid < n:
        raise ValueError(f"--shard-id {sid} is not one of the {n} shards (0..{n - 1})")
    markets = configured_markets(cfg)
    mine = assign(markets, n)[sid] if n is not None else {s: ms for s, ms in markets.items() if ms}
    for s in markets:
        registry.get(s).set_markets(cfg, mine.get(s, []))
    cfg.source = [s for s in markets if mine.get(s)]
    ident = shard_id.claim(Layout(Path(cfg.home).resolve()), sid, shards=n, markets=mine,
                           store=os.environ.get("ENGINE_STORE") or None)
    log.info("shard_markets", shard=sid, shards=n, markets=mine)
    return ident


def plan(collect_args: list[str], shards: int) -> list[dict[str, list[str]]]:
    """What each of `shards` collectors started with `collect_args` would collect (the supervisor
    prints it and starts no collector for a shard left without markets)."""
    from engine.collect.runner import parse_args

    return assign(configured_markets(parse_args(collect_args)), shards)


def shard_home(home: Path, shard: int) -> Path:
    """Shard 0 keeps the lake home itself (an unsharded lake becomes shard 0 with its files); shard
    i > 0 lives in `home/shards/i` on a host that runs several shards."""
    return home if shard == 0 else home / "shards" / str(shard)
