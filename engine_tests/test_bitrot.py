"""Bit rot: a byte flipped inside a data page of a staging, local-store or cached file is an error
naming the file (CorruptFileError), never silently different prices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine import Engine
from engine.lake.writer import CorruptFileError
from engine.sim import synth
from engine.timeutil import to_ns

ROOT = Path(__file__).resolve().parents[1]
START = to_ns("2026-11-18T10:00:00Z")  # a fixed hour, never today
HOUR = 3600 * 10**9
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # every zstd page payload starts with it, right after the page header


def flip_in_data_page(path: Path, column: str = "price") -> None:
    """Flip one bit inside the first data page payload of `column`, keeping the file's mtime (as rot does)."""
    pf = pq.ParquetFile(path)
    before = pf.read().column(column)
    c = pf.metadata.row_group(0).column(pf.schema_arrow.names.index(column))
    end = (c.dictionary_page_offset or c.data_page_offset) + c.total_compressed_size
    data = bytearray(path.read_bytes())
    at = data.find(ZSTD_MAGIC, c.data_page_offset, end) + 200
    assert c.data_page_offset < at < end
    data[at] ^= 0x10
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the flip landed in page data: a read without checksums returns different prices, silently
    assert not pq.read_table(path).column(column).equals(before)


def lake(home: Path, store=None) -> tuple[Engine, object]:
    eng = Engine.open(home, store, background=False, writer=True)
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", START, 20_000, HOUR, seed=3))
    eng.flush()
    (e,) = eng.catalog.entries()
    return eng, e


def assert_corrupt(eng: Engine, key: str) -> None:
    """Every read path names the damaged file."""
    reads = {
        "l2": lambda: eng.l2(source="coinbase", market="BTC-USD", allow_unsealed=True),
        "sql": lambda: eng.sql("SELECT sum(price) AS p FROM l2", allow_unsealed=True),
        "book": lambda: eng.book("coinbase", "BTC-USD", "BTC-USD", at=START + HOUR - 1, allow_unsealed=True),
    }
    for name, read in reads.items():
        with pytest.raises(CorruptFileError) as ei:
            read()
        assert ei.value.key == key and key in str(ei.value), name


def test_flipped_byte_in_staging_file(tmp_path):
    eng, e = lake(tmp_path / "h")
    path = eng.layout.staged(e.key)
    assert eng.local_path(e) == path
    flip_in_data_page(path)
    assert_corrupt(eng, e.key)
    from engine.lake.compaction import compact_partition

    with pytest.raises(CorruptFileError) as ei:  # nothing corrupt is merged into a compacted file
        compact_partition(eng, (e.table, e.source, e.market, e.date))
    assert ei.value.key == e.key
    eng.close()


def test_flipped_byte_in_local_store_file(tmp_path):
    eng, e = lake(tmp_path / "h")
    assert eng.upload()["uploaded"] == 1
    eng.layout.staged(e.key).unlink()  # as after compaction: the store's copy is the one read
    path = eng.store.path(e.key)
    assert eng.local_path(e) == path
    flip_in_data_page(path)
    assert_corrupt(eng, e.key)
    eng.close()


def _cached(eng: Engine) -> Path:
    (p,) = list(eng.cache.root.rglob("*.parquet"))
    return p


def test_flipped_byte_in_cached_file(tmp_path, s3_env):
    eng, e = lake(tmp_path / "h", s3_env)
    assert eng.upload()["uploaded"] == 1
    eng.layout.staged(e.key).unlink()
    want = eng.l2(source="coinbase", market="BTC-USD", allow_unsealed=True)["price"].sum()  # downloaded, verified
    flip_in_data_page(_cached(eng))
    # already opened (and checked) in this process: the page checksums catch it
    with pytest.raises(CorruptFileError) as ei:
        eng.l2(source="coinbase", market="BTC-USD", allow_unsealed=True)
    assert ei.value.key == e.key and e.key in str(ei.value)
    # the damaged copy was dropped: the next query fetches the object again and answers right
    assert eng.l2(source="coinbase", market="BTC-USD", allow_unsealed=True)["price"].sum() == want
    eng.close()

    # A new process checks each cached object's SHA-256 against the catalog when it first opens it:
    # the damaged copy is dropped and fetched again (logged), so DuckDB never reads it.
    flip_in_data_page(_cached(eng))
    code = (
        "import json, sys; from engine import Engine\n"
        f"eng = Engine.open({str(tmp_path / 'h')!r}, {s3_env!r}, background=False)\n"
        "print(json.dumps([eng.sql('SELECT sum(price) AS p FROM l2', allow_unsealed=True)['p'][0],"
        " eng.l2(source='coinbase', market='BTC-USD', allow_unsealed=True)['price'].sum()]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == [pytest.approx(want), pytest.approx(want)]
    events = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
    assert any(ev.get("event") == "cache_copy_corrupt" and ev.get("key") == e.key for ev in events), r.stderr


def test_read_parquet_is_read_table_without_the_dataset_layer(tmp_path):
    """`read_parquet` (compaction, integrity, derived tables) returns what `pq.read_table` returns,
    schema metadata included, page checksums verified, without importing `pyarrow.dataset` (which
    imports pandas: +50 MB in every Dagster run)."""
    from engine.lake.writer import read_parquet

    eng, e = lake(tmp_path / "h")
    path = eng.layout.staged(e.key)
    assert b"engine.spool_key" in pq.ParquetFile(path).metadata.metadata  # a footer key added after writing
    for cols in (None, ["recv_ts", "price"]):
        want = pq.read_table(path, columns=cols, page_checksum_verification=True)
        got = read_parquet(path, e.key, columns=cols)
        assert got.equals(want) and got.schema.equals(want.schema, check_metadata=True)
    code = ("import sys; from engine.lake.writer import read_parquet\n"
            f"t = read_parquet({str(path)!r}, 'k'); print(t.num_rows, 'pyarrow.dataset' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(e.rows), "False"]
    flip_in_data_page(path)
    with pytest.raises(CorruptFileError) as ei:
        read_parquet(path, e.key)
    assert ei.value.key == e.key
    eng.close()
