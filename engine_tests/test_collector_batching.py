"""The collector's per-batch paths: a batch of frames captured in one write gives the lines frame by
frame would, append splits a batch by (hour, source, market) keeping arrival order, and the memory
tuning runs. Counted and compared, never timed."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from engine.api import _split
from engine.collect import memory
from engine.collect.capture import CaptureWriter, read_capture
from engine.schema import NS_PER_HOUR

T0 = (1_790_000_000 * 10**9) // NS_PER_HOUR * NS_PER_HOUR


def test_capture_batch_write_gives_the_same_lines_as_frame_by_frame(tmp_path):
    frames = ['{"a":1}', 'quote " backslash \\ tab \t', "unicode ü €", b'{"bytes":true}', b"\xff bad utf-8", ""]
    one = CaptureWriter(tmp_path / "one", "x", compress=False)
    many = CaptureWriter(tmp_path / "many", "x", compress=False)
    one.meta(T0, {"type": "connect", "source": "x", "conn": 1})
    many.meta(T0, {"type": "connect", "source": "x", "conn": 1})
    for f in frames:
        one.frame(T0 + 5, f)
    many.frames(T0 + 5, frames)
    many.frames(T0 + 6, [])
    one.close()
    many.close()
    assert one.lines == many.lines == len(frames) + 1
    assert one.files[0].read_bytes() == many.files[0].read_bytes()
    got = [f for _, f, m in read_capture(many.files[0]) if m is None]
    assert got == [f if isinstance(f, str) else f.decode("utf-8", "replace") for f in frames]


def test_capture_batch_rolls_to_the_next_hour_file(tmp_path):
    w = CaptureWriter(tmp_path, "x", compress=True)
    w.frames(T0 + NS_PER_HOUR - 1, ["a", "b"])
    w.frames(T0 + NS_PER_HOUR, ["c"])
    w.close()
    assert len(w.files) == 2
    assert [f for p in w.files for _, f, _ in read_capture(p)] == ["a", "b", "c"]


def test_split_groups_by_hour_source_market_in_arrival_order():
    rng = random.Random(5)
    for _ in range(50):
        n = rng.randint(1, 400)
        rows = [(rng.choice(["coinbase", "kalshi"]), rng.choice(["ETH-USD", "BTC-USD", "A"]),
                 T0 + rng.randint(0, 2) * NS_PER_HOUR + rng.randint(0, 10), i) for i in range(n)]
        cut = rng.randint(0, n)
        parts = [pa.table({"source": pa.array([r[0] for r in rows[a:b]], pa.string()).dictionary_encode(),
                           "market": pa.array([r[1] for r in rows[a:b]], pa.string()).dictionary_encode(),
                           "recv_ts": pa.array([r[2] for r in rows[a:b]], pa.int64()),
                           "i": pa.array([r[3] for r in rows[a:b]], pa.int64())}) for a, b in ((0, cut), (cut, n))]
        t = pa.concat_tables(parts)  # two chunks with different dictionaries
        groups = [g.to_pydict() for g in _split(t, "recv_ts")]
        want: dict[tuple, list[int]] = {}
        for s, m, ts, i in rows:
            want.setdefault((ts // NS_PER_HOUR, s, m), []).append(i)
        assert [g["i"] for g in groups] == [want[k] for k in sorted(want)]
        for g in groups:
            assert len({(ts // NS_PER_HOUR, s, m) for s, m, ts in zip(g["source"], g["market"], g["recv_ts"])}) == 1


def test_memory_tuning_and_release_run():
    done = memory.tune()
    assert done["arrow_pool"]
    if memory._LIBC is not None:  # glibc: arenas capped, freed blocks kept between releases
        want = {"malloc_arena_max": memory.ARENAS, "malloc_mmap_threshold": memory.MMAP_THRESHOLD,
                "malloc_trim_threshold": memory.TRIM_THRESHOLD}
        for k, v in want.items():
            if f"{k.upper()}{'' if k.endswith('max') else '_'}" not in os.environ:
                assert done[k] == v, (k, done)
        assert done["thp_disabled"] is True
        status = Path("/proc/self/status").read_text()
        if "THP_enabled:" in status:  # the kernel says so too (Linux >= 5.0)
            assert "THP_enabled:\t0" in status
    memory.release()
    memory.release()


def test_arrow_allocator_option_is_set_before_pyarrow_loads():
    """`data-engine collect` sets mimalloc's purge delay before pyarrow loads (it is read once, at
    load); an operator's own value wins; the memory module itself does not load pyarrow."""
    code = ("import os, sys; os.environ.pop('MIMALLOC_PURGE_DELAY', None)\n"
            "import engine.collect.memory as m\n"
            "assert 'pyarrow' not in sys.modules\n"
            "m.before_arrow(); print(os.environ['MIMALLOC_PURGE_DELAY'])\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(memory.MIMALLOC_PURGE_DELAY_MS)
    env["MIMALLOC_PURGE_DELAY"] = "250"
    out = subprocess.run([sys.executable, "-c", code.replace("os.environ.pop('MIMALLOC_PURGE_DELAY', None)", "pass")],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "250"
