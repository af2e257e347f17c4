"""The fault table (issue 11): one row per fault a hostile user found, with the rows it loses and
what it reports, each backed by the tests that reproduce it, run here and now. A row whose tests
do not all pass says FAILED: the table never claims more than this run showed.

Usage: scripts/bench_faults   (prints a Markdown table)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T = "engine_tests/"

ROWS = [
    ("1", "a capture stamped 30 days ago played live (collectors refuse times a day from receipt)",
     "0: every trade after the subscription's snapshot window is stored",
     "the replay exchange moves it to the present by whole seconds (`stats()['shift_ns']`)",
     [T + "test_collector.py::test_capture_stamped_30_days_ago_plays_at_the_present"]),
    ("2", "16 random bytes over a spool segment, at 50 seeded offsets",
     "only the damaged record's rows (50 of 1,500 batch recoveries); 0 crashes, 0 altered rows",
     "a `corrupt` gap per damaged record, its bytes in spool/quarantine/, one log line",
     [T + "test_integrity.py::test_spool_fuzz_damaged_records_quarantined_rest_recovered",
      T + "test_integrity.py::test_spool_torn_tail_unidentified_record_and_old_format"]),
    ("3", "append of 10 rows, 5 with an invalid market", "0; nothing spooled, a retry stores each row once",
     "SchemaError naming table, column, row count and why", [T + "test_integrity.py::test_append_is_all_or_nothing"]),
    ("4", "a 300-character market, `BTC-USD\\n`, control characters; one buffer that cannot be written",
     "0: bad rows refused whole; other buffers and open() go on",
     "SchemaError per column; FlushError naming each failed buffer, retried every 30 s",
     [T + "test_integrity.py::test_bad_names_refused",
      T + "test_integrity.py::test_flush_failure_of_one_buffer_blocks_neither_the_others_nor_open"]),
    ("5", "NaN/inf or negative prices and sizes, negative ts, ts in ms or us, ts a day from recv_ts",
     "append: the batch is refused; collectors: only the bad rows",
     "SchemaError naming table, column, count; collectors count `refused_<table>_<column>`",
     [T + "test_integrity.py::test_bad_values_refused_with_table_column_and_count",
      T + "test_integrity.py::test_collector_counts_refused_rows_and_keeps_the_rest"]),
    ("6", "catalog: `{\"op\":\"add\"}` lines; a torn last add line; a long log",
     "0: the orphan file is verified and adopted (or quarantined), never deleted or doubled",
     "a warning per skipped line; open from snapshot + tail",
     [T + "test_catalog.py::test_incomplete_lines_are_skipped_with_a_warning",
      T + "test_faults.py::test_torn_last_add_line_file_is_adopted_not_deleted",
      T + "test_faults.py::test_unreadable_uncatalogued_file_is_quarantined_never_deleted",
      T + "test_faults.py::test_file_whose_catalog_append_failed_is_not_adopted_twice",
      T + "test_catalog.py::test_snapshot_plus_tail_answers_like_the_whole_log"]),
    ("7", "a query planned before a compaction swap, read after it", "0: it reads the retired files",
     "retired files purged only after the grace period and a verified replacement",
     [T + "test_storage.py::test_query_planned_before_compaction_reads_after_the_swap",
      T + "test_storage.py::test_purge_keeps_retired_files_until_the_compacted_file_verifies"]),
    ("8", "a flipped byte in a staging, local-store or cached file", "0 silently changed prices",
     "CorruptFileError naming the key (page CRCs; SHA-256 of cached and DuckDB-read files)",
     [T + "test_bitrot.py::test_flipped_byte_in_staging_file", T + "test_bitrot.py::test_flipped_byte_in_local_store_file",
      T + "test_bitrot.py::test_flipped_byte_in_cached_file"]),
    ("9", "`SELECT sum(hash(range)) FROM range(1e12)` in sql()", "-",
     "QueryTimeoutError after timeout_s; memory_limit 25 % of RAM; temp files in the lake home",
     [T + "test_sql_limits.py::test_runaway_query_hits_the_time_limit",
      T + "test_sql_limits.py::test_memory_limit_and_temp_directory_are_applied",
      T + "test_sql_limits.py::test_duckdb_errors_become_engine_errors"]),
    ("10", "kill -9 of the launcher", "-", "collector, replay exchanges and their children gone, ports free",
     [T + "test_launch.py::test_kill_9_of_the_launcher_takes_collector_and_exchanges_with_it",
      T + "test_launch.py::test_kill_9_of_the_launcher_takes_grandchildren_with_it",
      T + "test_launch.py::test_a_child_dies_with_its_parent"]),
    ("11", "a notebook opens the lake of a crashed collector", "0: the restarted collector recovers the spool",
     "the notebook is a reader; append on it raises ReadOnlyError",
     [T + "test_multiprocess.py::test_reader_leaves_a_crashed_writers_spool_to_the_writer"]),
    ("12", "user:pass@ in the endpoint URL; secrets in a resource's repr; a bad Kalshi key", "-",
     "redacted in logs and errors; repr masked; the key's cause logged once, then backoff",
     [T + "test_hardening.py::test_endpoint_credentials_stay_out_of_logs_and_errors",
      T + "test_hardening.py::test_engine_resource_repr_hides_plain_secrets",
      T + "test_hardening.py::test_bad_kalshi_key_logged_once_with_its_cause"]),
    ("13", "pre-epoch fractional times; an uploaded object deleted behind the engine's back",
     "0: verify --repair uploads it again", "to_ns exact; verify reports the object missing",
     [T + "test_hardening.py::test_pre_epoch_fractional_times",
      T + "test_hardening.py::test_verify_repair_reuploads_an_object_deleted_behind_the_engines_back"]),
]


def main() -> int:
    ids = [i for *_, tests in ROWS for i in tests]
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider",
                        f"--junitxml={xml}", *ids], cwd=ROOT, capture_output=True, text=True)
        cases = ET.parse(xml).getroot().iter("testcase")
        result: dict[str, list[tuple[bool, float]]] = {}
        for c in cases:
            node = c.get("classname", "").replace(".", "/") + ".py::" + c.get("name", "").split("[")[0]
            ok = not any(ch.tag in ("failure", "error", "skipped") for ch in c)
            result.setdefault(node, []).append((ok, float(c.get("time", 0))))
    print("| # | fault | rows lost | reported | tests (this run) |")
    print("|---|---|---|---|---|")
    for n, fault, lost, reported, tests in ROWS:
        runs = [r for t in tests for r in result.get(t, [(False, 0.0)])]
        status = "pass" if all(ok for ok, _ in runs) else "**FAILED**"
        print(f"| {n} | {fault} | {lost} | {reported} | {status}: {len(runs)} in {sum(s for _, s in runs):.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
