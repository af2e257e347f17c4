"""Soak: replay exchange (6 markets) -> collector -> spool -> files -> upload to moto S3 ->
compaction (while collecting, and at the end) -> queries. Rows sent on the wire equal rows
stored, per sequence number; no duplicate trades; the collector's memory does not grow without
bound. The short run is in the default suite; the long one is `-m slow` (or `scripts/soak`)."""

from __future__ import annotations

import pytest

from benchmarks.soak import run_soak, summary_lines


def _check(r: dict, rss_growth_mb: float) -> None:
    print("\n" + "\n".join(summary_lines(r)))
    ri, rs = r["rows_in"], r["rows_stored"]
    assert ri["connections"] == 1 and rs["gaps"] == 0
    assert ri["l2_updates"] > 0 and rs["l2_updates"] == ri["l2_updates"], "l2 rows lost or duplicated"
    assert r["per_seq_equal"] is True, r.get("per_seq_first_mismatch")
    assert rs["trades"] == ri["trades"] and r["trade_duplicates"] == 0
    assert rs["l2_snapshot_and_anchor_rows"] >= ri["l2_snapshot_rows"]
    assert r["verify_problems"] == []
    assert r["final_upload"]["failed"] == 0
    assert any(m["compacted"] for m in r["maintenance"]), "no compaction ran while collecting"
    assert r["rss_mb"]["last_third_mean"] - r["rss_mb"]["first_third_mean"] < rss_growth_mb, r["rss_mb"]


def test_short_soak(tmp_path):
    r = run_soak(minutes=20 / 60, markets=6, rate_x=20, workdir=tmp_path, flush_age_s=5, maint_every_s=4,
                 compact_every_s=8)
    assert r["rows_per_s_sustained"] > 0.7 * r["target_rows_per_s"], r["rows_per_s_sustained"]
    _check(r, rss_growth_mb=150)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ten minutes of soak plus capture generation, upload and compaction
def test_long_soak(tmp_path):
    r = run_soak(minutes=10, markets=6, rate_x=50, workdir=tmp_path, flush_age_s=60, maint_every_s=10,
                 compact_every_s=120)
    assert r["rows_per_s_sustained"] > 0.8 * r["target_rows_per_s"], r["rows_per_s_sustained"]
    _check(r, rss_growth_mb=100)
