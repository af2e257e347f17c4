"""Collector shards: two hosts simulated on one machine (two homes, one bucket on moto's S3 server on
127.0.0.1), each writing and uploading its markets; a fresh reader merges their manifest parts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from engine import Engine
from engine.api import SyncBoundaryWarning
from engine.collect import shards
from engine.lake import shard
from engine.lake.shard import ShardError
from engine.lake.verify import rebuild_from_store
from engine.paths import MANIFEST_KEY, Layout, compacted_key, file_key, manifest_part_key, name_parts, parse_key
from engine.sim import synth
from engine.timeutil import now_ns

ROOT = Path(__file__).resolve().parents[1]
H = 3600 * 10**9
DAY = 24 * H
T0 = (now_ns() // DAY - 3) * DAY  # three days ago, midnight UTC: closed, compactable, any run date


def _shard_home(tmp: Path, name: str, sid: int, markets: dict[str, list[str]], store: str) -> Engine:
    shard.claim(Layout(tmp / name), sid, shards=2, markets=markets, store=store)
    return Engine.open(tmp / name, store, background=False, writer=True)


def _trades(eng: Engine, source: str, market: str, hour: int, rows: int = 50, seed: int = 0) -> None:
    eng.append("trades", synth.trade_rows(source, market, T0 + hour * H, rows, H - 10**9, seed=seed + hour,
                                          id_start=(seed * 1000 + hour) * 10**6))
    eng.flush()


def test_names_carry_the_shard_and_every_parser_takes_old_and_new():
    assert file_key("l2", "coinbase", "BTC-USD", "2026-01-02", 3).endswith("/0003.parquet")
    assert file_key("l2", "coinbase", "BTC-USD", "2026-01-02", 3, 1).endswith("/0003-s1.parquet")
    assert compacted_key("l2", "coinbase", "BTC-USD", "2026-01-02", 2, 1).endswith("/0000-s2-1.parquet")
    assert name_parts("0003") == (3, None) and name_parts("0000-1") == (0, None)
    assert name_parts("0012-s7") == (12, 7) and name_parts("0000-s7-3") == (0, 7)
    assert name_parts("backup") == (None, None)
    kp = parse_key(file_key("trades", "kalshi", "KXBTC", "2026-01-02", 10000, 12))
    assert (kp.seq, kp.shard, kp.compacted) == (10000, 12, False)
    assert parse_key(compacted_key("trades", "kalshi", "KXBTC", "2026-01-02")).compacted
    assert manifest_part_key(3) == "catalog/manifest/part-0003.parquet"
    # ownership: a shard owns its own names; shard 0 (and an unsharded home) the unsharded names
    old, s0, s1 = (file_key("l2", "c", "m", "2026-01-02", 1, s) for s in (None, 0, 1))
    assert shard.owns(None, old) and shard.owns(0, old) and not shard.owns(1, old)
    assert shard.owns(1, s1) and not shard.owns(0, s1) and shard.owns(0, s0) and not shard.owns(None, s0)


def test_assignment_is_deterministic_balanced_and_covers_every_market():
    markets = {"kalshi": ["KXSOL", "KXBTC", "KXETH"], "coinbase": ["SOL-USD", "BTC-USD", "ETH-USD", "DOGE-USD"]}
    two = shards.assign(markets, 2)
    assert two == shards.assign(dict(reversed(markets.items())), 2)  # order of the configuration is irrelevant
    assert two[0] == {"coinbase": ["BTC-USD", "ETH-USD"], "kalshi": ["KXBTC", "KXSOL"]}
    assert two[1] == {"coinbase": ["DOGE-USD", "SOL-USD"], "kalshi": ["KXETH"]}
    for n in (1, 2, 3, 7, 10):
        parts = shards.assign(markets, n)
        got = sorted((s, m) for p in parts for s, ms in p.items() for m in ms)
        assert got == sorted((s, m) for s, ms in markets.items() for m in ms)  # each market exactly once
        sizes = [sum(map(len, p.values())) for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_collect_options_narrow_markets_and_claim_the_home(tmp_path, monkeypatch):
    from engine.collect.runner import parse_args

    monkeypatch.delenv("ENGINE_STORE", raising=False)
    home = tmp_path / "h"
    cfg = parse_args(["--home", str(home), "--source", "coinbase", "kalshi", "--products", "A-USD", "B-USD", "C-USD",
                      "--series", "KXA", "--shard-id", "1", "--shards", "2"])
    ident = shards.configure(cfg)
    assert cfg.products == ["B-USD"] and cfg.series == ["KXA"] and cfg.source == ["coinbase", "kalshi"]
    assert ident.shard == 1 and shard.read(Layout(home)).markets == {"coinbase": ["B-USD"], "kalshi": ["KXA"]}
    # a source left without markets is not collected by this shard
    cfg = parse_args(["--home", str(tmp_path / "h0"), "--source", "coinbase", "kalshi", "--products", "A-USD",
                      "--series", "KXA", "--shard-id", "0", "--shards", "2"])
    shards.configure(cfg)
    assert cfg.source == ["coinbase"] and cfg.products == ["A-USD"]
    with pytest.raises(ShardError, match="home of shard 1"):  # a home keeps its id: its files carry it
        shards.configure(parse_args(["--home", str(home), "--shard-id", "0", "--shards", "2"]))
    with pytest.raises(ValueError, match="not one of the 2 shards"):
        shards.configure(parse_args(["--home", str(home), "--shard-id", "2", "--shards", "2"]))
    with pytest.raises(ValueError, match="needs --shard-id"):
        shards.configure(parse_args(["--home", str(home), "--shards", "2"]))
    assert shards.configure(parse_args(["--home", str(tmp_path / "u")])) is None  # unsharded: nothing changes
    assert not (tmp_path / "u" / "shard.json").exists()


def test_two_hosts_one_bucket_merge_never_collide_and_hold_back_only_what_they_collect(tmp_path, s3_env):
    a = _shard_home(tmp_path, "host-a", 0, {"coinbase": ["BTC-USD", "SOL-USD"]}, s3_env)
    b = _shard_home(tmp_path, "host-b", 1, {"coinbase": ["ETH-USD", "SOL-USD"], "kalshi": ["KXBTC"]}, s3_env)
    for h in range(3):
        _trades(a, "coinbase", "BTC-USD", h, seed=1)
        _trades(b, "coinbase", "ETH-USD", h, seed=2)
        _trades(b, "kalshi", "KXBTC", h, seed=3)
    # the SAME market on both shards, same partition and hour: names never collide
    _trades(a, "coinbase", "SOL-USD", 1, seed=4)
    _trades(b, "coinbase", "SOL-USD", 1, seed=5)
    assert a.upload()["failed"] == 0 and b.upload()["failed"] == 0
    keys = a.store.list_keys("data/")
    assert len(keys) == len(set(keys)) == 3 + 3 + 3 + 2
    assert {parse_key(k).shard for k in keys} == {0, 1}
    assert sorted(k.rsplit("/", 1)[1] for k in keys if "SOL-USD" in k) == ["0001-s0.parquet", "0001-s1.parquet"]
    assert a.store.get_bytes(MANIFEST_KEY) is None  # shards publish parts only
    assert a.store.list_etags("catalog/manifest").keys() == {manifest_part_key(0), manifest_part_key(1)}

    r = Engine.open(tmp_path / "laptop", s3_env)
    assert r.remote_reader
    got = r.trades(allow_unsealed=True)
    assert got.height == 11 * 50 and got.select("source", "market", "trade_id").unique().height == 11 * 50
    per_market = dict(got.group_by("market").len().iter_rows())
    assert per_market == {"BTC-USD": 150, "ETH-USD": 150, "KXBTC": 150, "SOL-USD": 100}
    summ = r.catalog.summary(table="trades", by="instrument", raw_ns=True)
    assert dict(summ.select("instrument", "rows").iter_rows()) == per_market  # figures of both parts
    assert r.catalog.summary(market="SOL-USD", raw_ns=True)["files"].to_list() == [2]
    # each shard's own home reads the whole lake too (a shard's home is only its part of it)
    assert Engine.open(tmp_path / "host-a").trades(allow_unsealed=True).height == 11 * 50

    # host b writes an hour it has not uploaded: coinbase is sealed only below it (min over shards);
    # kalshi is held by b alone, coinbase by both
    _trades(b, "coinbase", "ETH-USD", 3, seed=2)
    b.publish_manifest()
    pending = min(e.min_recv_ts for e in b.catalog.entries() if not e.remote)
    assert r.refresh()
    wa = a.catalog.watermarks["coinbase"]
    assert r.catalog.watermark("coinbase") == pending < wa
    assert r.catalog.watermark("kalshi") == b.catalog.watermark("kalshi")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clamped = r.trades(source="coinbase", start=T0, end=T0 + 5 * H)
    assert clamped["recv_ts"].dt.epoch("ns").max() < pending and clamped.height == 400
    assert any(issubclass(c.category, SyncBoundaryWarning) for c in caught)
    # a shard that collects a source but has published no watermark for it yet holds it back entirely
    c = _shard_home(tmp_path, "host-c", 2, {"kalshi": ["KXETH"]}, s3_env)
    c.publish_manifest()
    assert r.refresh() and r.catalog.watermark("kalshi") == 0 and r.catalog.watermark("coinbase") == pending
    with pytest.warns(SyncBoundaryWarning, match="kalshi is complete up to 1970"):
        assert r.trades(source="kalshi", start=T0, end=T0 + 5 * H).height == 0


def test_each_shard_compacts_only_its_own_files_rebuilds_only_its_own_and_verifies(tmp_path, s3_env):
    a = _shard_home(tmp_path, "host-a", 0, {"coinbase": ["SOL-USD"]}, s3_env)
    b = _shard_home(tmp_path, "host-b", 1, {"coinbase": ["SOL-USD"]}, s3_env)
    for h in range(3):  # a market moved between shards that day: both hold files of the partition
        _trades(a, "coinbase", "SOL-USD", h, seed=1)
        _trades(b, "coinbase", "SOL-USD", 10 + h, seed=2)
        a.append("l2", synth.l2_rows("coinbase", "SOL-USD", T0 + h * H, 200, H - 10**9, seed=h))
        b.append("l2", synth.l2_rows("coinbase", "SOL-USD", T0 + (10 + h) * H, 200, H - 10**9, seed=9 + h,
                                     seq_start=10**6))
        a.flush()
        b.flush()
    a.upload()
    b.upload()
    ra, rb = a.compact(grace_s=0), b.compact(grace_s=0)
    assert {r.key.rsplit("/", 1)[1] for r in ra} == {"0000-s0.parquet"}
    assert {r.key.rsplit("/", 1)[1] for r in rb} == {"0000-s1.parquet"}
    assert a.compact() == [] and b.compact() == []  # idempotent
    a.upload(grace_s=0)
    b.upload(grace_s=0)  # purges the retired raw files
    names = sorted(k.rsplit("/", 1)[1] for k in a.store.list_keys("data/"))
    assert names == ["0000-s0.parquet"] * 3 + ["0000-s1.parquet"] * 3  # l2, quotes, trades of each shard
    r = Engine.open(tmp_path / "laptop", s3_env)
    assert r.trades(allow_unsealed=True).height == 300
    assert r.l2(allow_unsealed=True).height == 1200
    assert r.quotes("coinbase", "SOL-USD", start=T0, end=T0 + DAY, allow_unsealed=True).height > 0
    assert a.verify() == [] and b.verify() == []
    # a lost catalog log rebuilt from the bucket takes only the shard's own files
    for eng, sid in ((a, 0), (b, 1)):
        eng.close()
        eng.layout.catalog_log.unlink()
        e2 = Engine.open(eng.home, s3_env, background=False, writer=True)
        rebuild_from_store(e2)
        e2 = Engine.open(eng.home, s3_env, background=False, writer=True)
        assert {parse_key(k).shard for k in e2.catalog.by_key} == {sid}
        assert len(e2.catalog.by_key) == 3 and e2.verify() == []


def test_staging_adoption_keeps_a_shard_name(tmp_path, s3_env):
    """A complete file whose catalog line was lost is adopted under its sharded name, and the next
    file of the partition takes the following number."""
    from engine.lake.writer import write_parquet

    b = _shard_home(tmp_path, "host-b", 1, {"coinbase": ["ETH-USD"]}, s3_env)
    _trades(b, "coinbase", "ETH-USD", 0)
    b.close()
    key = file_key("trades", "coinbase", "ETH-USD", parse_key(next(iter(b.catalog.by_key))).date, 7, 1)
    write_parquet("trades", synth.trade_rows("coinbase", "ETH-USD", T0 + 2 * H, 30, H - 10**9, id_start=9 * 10**6),
                  b.layout.staged(key))
    b = Engine.open(tmp_path / "host-b", s3_env, background=False, writer=True)
    _trades(b, "coinbase", "ETH-USD", 3)
    names = sorted(k.rsplit("/", 1)[1] for k in b.catalog.by_key)
    assert names == ["0001-s1.parquet", "0007-s1.parquet", "0008-s1.parquet"], names


def test_an_unsharded_lake_becomes_shard_0_and_readers_see_it_whole(tmp_path, s3_env):
    w = Engine.open(tmp_path / "vps", s3_env, background=False, writer=True)
    _trades(w, "coinbase", "BTC-USD", 0)
    w.upload()
    legacy = w.store.get_bytes(MANIFEST_KEY)
    assert legacy is not None
    w.close()
    r = Engine.open(tmp_path / "laptop", s3_env)
    assert r.trades(allow_unsealed=True).height == 50
    with pytest.raises(ShardError, match="can only become shard 0"):
        shard.claim(Layout(tmp_path / "vps"), 1)
    # the old home goes on as shard 0: old names kept, new ones carry the id, its part replaces the manifest
    shard.claim(Layout(tmp_path / "vps"), 0, shards=2, markets={"coinbase": ["BTC-USD"]}, store=s3_env)
    w = Engine.open(tmp_path / "vps", background=False, writer=True)  # the store: as recorded / ENGINE_STORE
    _trades(w, "coinbase", "BTC-USD", 1)
    w.upload()
    assert sorted(k.rsplit("/", 1)[1] for k in w.store.list_keys("data/")) == ["0001.parquet", "0002-s0.parquet"]
    assert w.store.list_etags("catalog/manifest").keys() == {manifest_part_key(0)}
    assert not shard.read(w.layout).retire_legacy
    assert r.refresh() and r.trades(allow_unsealed=True).height == 100
    # between the part's PUT and the legacy DELETE a reader sees both: each file once
    w.store.put_bytes(MANIFEST_KEY, legacy)
    assert r.refresh() and r.trades(allow_unsealed=True).height == 100
    w.store.delete(MANIFEST_KEY)
    assert [r.key.rsplit("/", 1)[1] for r in w.compact(grace_s=0)] == ["0000-s0.parquet"]


def test_reader_refresh_of_unchanged_parts_is_one_list_and_changed_parts_are_fetched(tmp_path, s3_env):
    a = _shard_home(tmp_path, "host-a", 0, {"coinbase": ["BTC-USD"]}, s3_env)
    b = _shard_home(tmp_path, "host-b", 1, {"coinbase": ["ETH-USD"]}, s3_env)
    _trades(a, "coinbase", "BTC-USD", 0)
    _trades(b, "coinbase", "ETH-USD", 0)
    a.upload()
    b.upload()
    r = Engine.open(tmp_path / "laptop", s3_env, refresh_s=3600)
    seen: list[tuple[str, str]] = []
    r.store.client.meta.events.register("before-send.s3.*", lambda request, **_: seen.append((request.method, request.url)))
    assert r.refresh() is False and len(seen) == 1 and "list-type=2" in seen[0][1]
    _trades(b, "coinbase", "ETH-USD", 1)
    b.upload()
    seen.clear()
    assert r.refresh() is True
    assert len(seen) == 2 and "part-0001" in seen[1][1]  # the LIST, then only the part that changed
    assert r.trades(allow_unsealed=True).height == 150


def test_scripts_run_shards_2_demo_starts_two_collectors_covering_every_market(tmp_path):
    """`./scripts/run --demo --shards 2 --no-dagster --for 12`: two collectors and two keepers; the
    shards' markets together are every demo market, each uploads to the one store, and a fresh
    reader sees rows of every market."""
    env = dict(os.environ, ENGINE_FLUSH_AGE_S="3", PYTHONPATH=str(ROOT))
    for k in ("ENGINE_STORE", "ENGINE_HOME"):
        env.pop(k, None)
    home = tmp_path / "lake"
    cmd = [sys.executable, "-m", "engine.run.supervisor", "--demo", "--demo-minutes", "0.5", "--demo-dir",
           str(tmp_path / "demo"), "--home", str(home), "--no-dagster", "--shards", "2", "--keep-every", "2",
           "--for", "12"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    started = [x.split()[1] for x in log.splitlines() if x.strip().startswith("started")]
    assert {"collector-0", "collector-1", "keeper-0", "keeper-1"} <= set(started), log[-3000:]
    assert "collector" not in started
    idents = [shard.read(Layout(shards.shard_home(home, i))) for i in (0, 1)]
    assert [i.shard for i in idents] == [0, 1]
    covered = sorted((s, m) for i in idents for s, ms in i.markets.items() for m in ms)
    from engine.collect import registry
    from engine.collect.runner import parse_args

    cfg = parse_args(["--source", *registry.names()])  # the defaults, as each source names its markets
    demo_markets = sorted((s, m) for s, ms in shards.configured_markets(cfg).items() for m in ms)
    assert covered == demo_markets and len(set(covered)) == len(covered)
    r = Engine.open(tmp_path / "reader", str(home / "store"))
    assert r.store.list_etags("catalog/manifest").keys() == {manifest_part_key(0), manifest_part_key(1)}
    seen = set(r.l2(allow_unsealed=True, columns=["source", "market"]).select("source", "market").unique().iter_rows())
    seen |= set(r.trades(allow_unsealed=True, columns=["source", "market"]).select("source", "market").unique().iter_rows())
    assert seen == set(demo_markets), (seen, log[-2000:])
    for i in (0, 1):  # every file a shard wrote carries its id
        names = {parse_key(k).shard for k in Engine.open(shards.shard_home(home, i), background=False,
                                                         writer=True).catalog.by_key}
        assert names == {i}


def test_keeper_uploads_and_publishes_its_part_and_follows_a_late_claim(tmp_path, s3_env):
    import threading

    from engine.run.keeper import keep

    def run_keeper(home, **kw):
        stop = threading.Event()
        t = threading.Thread(target=keep, args=(home, s3_env, 0.2), kwargs=dict(stop=stop, **kw), daemon=True)
        t.start()
        return stop, t

    def wait(cond, timeout=30.0):
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "timed out"
            time.sleep(0.1)

    store = Engine.open(tmp_path / "probe", s3_env, background=False, writer=True).store
    # started before its collector: the keeper claims the id, the collector then records its markets
    stop, t = run_keeper(tmp_path / "b", shard=1)
    wait(lambda: manifest_part_key(1) in store.list_etags("catalog/manifest"))
    b = _shard_home(tmp_path, "b", 1, {"coinbase": ["ETH-USD"]}, s3_env)
    _trades(b, "coinbase", "ETH-USD", 0)
    wait(lambda: any("-s1.parquet" in k for k in store.list_keys("data/")))
    stop.set()
    t.join(30)
    assert not t.is_alive()
    r = Engine.open(tmp_path / "laptop", s3_env)
    assert r.trades(allow_unsealed=True).height == 50 and r.catalog.watermark("coinbase") > 0
    # a keeper that opened an unsharded home reopens it once the home becomes a shard
    (tmp_path / "a").mkdir()
    stop, t = run_keeper(tmp_path / "a")
    wait(lambda: MANIFEST_KEY in store.list_etags("catalog/manifest"))
    a = _shard_home(tmp_path, "a", 0, {"coinbase": ["BTC-USD"]}, s3_env)
    _trades(a, "coinbase", "BTC-USD", 0)
    wait(lambda: manifest_part_key(0) in store.list_etags("catalog/manifest")
         and any("-s0.parquet" in k for k in store.list_keys("data/")))
    stop.set()
    t.join(30)
    assert r.refresh() and r.trades(allow_unsealed=True).height == 100
