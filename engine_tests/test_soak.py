"""Soak: replay exchange (6 markets) -> collector -> spool -> files -> upload to moto S3 ->
compaction (while collecting, and at the end) -> queries. Rows sent on the wire equal rows
stored, per sequence number; no duplicate trades. The short run is in the default suite and
checks correctness only; throughput and the collector's memory growth are budgets of the
benchmark (`scripts/soak`, part of `scripts/bench`) and of the long run (`-m slow`)."""

from __future__ import annotations

import pytest

from benchmarks.soak import budget_problems, run_soak, summary_lines


def _check(r: dict) -> None:
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


def test_short_soak(tmp_path):
    r = run_soak(minutes=20 / 60, markets=6, rate_x=20, workdir=tmp_path, flush_age_s=5, maint_every_s=4,
                 compact_every_s=8)
    _check(r)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ten minutes of soak plus capture generation, upload and compaction
def test_long_soak(tmp_path):
    r = run_soak(minutes=10, markets=6, rate_x=50, workdir=tmp_path, flush_age_s=60, maint_every_s=10,
                 compact_every_s=120)
    _check(r)
    assert budget_problems(r, min_rate_fraction=0.8, max_rss_growth_mb=100) == []


def test_budgets_flag_slow_runs_and_memory_growth():
    """The benchmark's budget check (no soak run: a report as run_soak returns it)."""
    ok = {"rows_per_s_sustained": 900, "target_rows_per_s": 1000,
          "rss_mb": {"first_third_mean": 200.0, "last_third_mean": 250.0}}
    assert budget_problems(ok) == []
    slow = dict(ok, rows_per_s_sustained=800)
    assert [p.split()[0] for p in budget_problems(slow)] == ["sustained"]
    grows = dict(ok, rss_mb={"first_third_mean": 200.0, "last_third_mean": 300.0})
    assert [p.split()[0] for p in budget_problems(grows)] == ["collector"]
    assert len(budget_problems(dict(grows, rows_per_s_sustained=10))) == 2
