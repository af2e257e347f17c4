"""Scale soak, short: 20 Coinbase-like products and 4 Kalshi-like series at the generators'
per-instrument rates, played by real replay exchanges (child processes, real sockets) to 2 collector
shards with their keepers; a fresh reader merging both shards' manifest parts holds exactly the rows
the exchanges sent, per (source, market), each market from one shard, and no gap. The 10-minute
100 + 20 run, 1 vs 2 shards, is `scripts/bench_scale` (part of `scripts/bench`)."""

from __future__ import annotations

import pytest

from benchmarks.scale_soak import market_names, per_market_rate, run_scale_soak, summary_lines
from engine.paths import check_key_part


def test_scale_names_and_rates_are_the_generators_per_instrument_ones():
    names = market_names({"coinbase": 100, "kalshi": 20})
    assert names["coinbase"][:2] == ["P000-USD", "P001-USD"] and names["coinbase"][-1] == "P099-USD"
    assert names["kalshi"][0] == "KXS00" and names["kalshi"][-1] == "KXS19"
    for ms in names.values():
        for m in ms:
            check_key_part("market", m)
    assert per_market_rate("coinbase") == pytest.approx(200 / 3)  # gen-capture's 200/s for 3 products
    assert per_market_rate("kalshi") == pytest.approx(100 / 3)  # 100/s for 3 series


def _check(r: dict, shards: int) -> dict:
    print("\n" + "\n".join(summary_lines(r)))
    (c,) = [c for c in r["configs"] if c["shards"] == shards]
    assert c["collector_rc"] == [0] * shards
    assert all(m["in"] > 0 for m in c["markets"]), [m for m in c["markets"] if not m["in"]]
    # exactly what was sent, per (source, market) and kind of row: l2 updates, snapshot rows, trades
    assert c["rows_equal"], c["mismatches"]
    assert c["rows_in"] == c["rows_stored"] and c["rows_in"]["l2_updates"] and c["rows_in"]["trades"]
    # each market collected by exactly one shard, the shards together cover every market
    assert c["markets_on_one_shard"]
    if shards > 1:
        assert {m["shards"][0] for m in c["markets"]} == set(range(shards))
        planned = sorted((s, m) for part in c["plan"] for s, ms in part.items() for m in ms)
        assert planned == sorted((m["source"], m["market"]) for m in c["markets"])
    assert c["gaps"] == []  # a clean start on fresh homes and a flushed stop leave none
    assert c["reconnects"] == {"coinbase": 0, "kalshi": 0}
    # each collector's own peak (VmHWM, as sampled and as it logged at stop), not wait4's, which
    # carries the soak's own peak across fork+exec
    assert len(c["collector_max_rss_mb"]) == shards and all(x and x > 0 for x in c["collector_max_rss_mb"])
    for src in ("coinbase", "kalshi"):
        assert c["lag_behind_feed_ms"][src]["frames"] > 0 and c["lag_exchange_to_recv_ms"][src] is not None
    return c


def test_short_scale_soak_two_shards(tmp_path):
    r = run_scale_soak(minutes=0.5, products=20, series=4, shard_counts=(2,), workdir=tmp_path, flush_age_s=8,
                       keep_every_s=5)
    _check(r, 2)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two ten-minute runs plus capture generation and the final reads
def test_scale_soak_100_products_20_series_1_vs_2_shards(tmp_path):
    r = run_scale_soak(minutes=10, products=100, series=20, shard_counts=(1, 2), workdir=tmp_path)
    _check(r, 1)
    _check(r, 2)
