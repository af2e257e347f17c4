"""Input and spool integrity: damaged spool records, all-or-nothing appends, names, values.

Everything runs against real parts: a real spool written by a real (killed) writer process,
recovery in child processes (a segfault is a failure, not a lost test run), real files.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from engine import Engine
from engine.schema import NS_PER_DAY, NS_PER_HOUR, SchemaError
from engine.sim import synth
from engine.timeutil import to_ns

ROOT = Path(__file__).resolve().parents[1]
START = to_ns("2026-11-03")
MARKETS = ["BTC-USD", "ETH-USD", "SOL-USD"]
FUZZ_BATCHES = 30
FUZZ_ROWS = 150


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALSHI_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ENGINE_LOG_LEVEL"] = "WARNING"
    return env


# ------------------------------------------------------------------------------------------ spool fuzz

def fuzz_batch(i: int) -> tuple[str, str, pa.Table]:
    """Batch i of the fuzz spool: l2, trades or (every 5th) gaps rows of one market, one hour."""
    market = MARKETS[i % len(MARKETS)]
    at = START + i * 60 * 10**9
    if i % 5 == 4:
        return "gaps", market, synth.gap_rows([{"source": "coinbase", "market": market, "instrument": None,
                                                "start_ts": at, "end_ts": at + 10**9, "kind": "disconnect",
                                                "detail": f"fuzz-b{i}"}])
    if i % 2:
        return "trades", market, synth.trade_rows("coinbase", market, at, FUZZ_ROWS, 60 * 10**9, seed=i,
                                                  id_start=i * 1000)
    return "l2", market, synth.l2_rows("coinbase", market, at, FUZZ_ROWS, 60 * 10**9, seed=i, seq_start=i * 1000)


def batch_rows(eng: Engine, table: str, i: int) -> pl.DataFrame:
    df = eng.read(table, allow_unsealed=True, raw_ns=True)
    if df.height == 0:
        return df
    df = df.with_columns(pl.col(pl.Categorical).cast(pl.String))
    if table == "gaps":
        return df.filter(pl.col("detail") == f"fuzz-b{i}")
    return df.filter((pl.col("seq") >= i * 1000) & (pl.col("seq") < i * 1000 + 1000)).sort("seq")


# Writes the fuzz spool and dies (SIGKILL) before any flush; prints each batch's byte range.
WRITER = textwrap.dedent(r"""
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    from engine import Engine
    from engine_tests.test_integrity import fuzz_batch, FUZZ_BATCHES
    eng = Engine.open(sys.argv[1], background=False, writer=True, flush_rows=10**9)
    spool = eng.layout.spool
    sizes = {{}}
    for i in range(FUZZ_BATCHES):
        table, market, t = fuzz_batch(i)
        eng.append(table, t)
        seg = [p for p in sorted(spool.glob("*.arrow")) if p.name.split(".")[1] == table][-1]
        start = sizes.get(seg.name, 0)
        sizes[seg.name] = seg.stat().st_size
        print(json.dumps({{"i": i, "seg": seg.name, "start": start, "end": sizes[seg.name]}}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")

# Recovers each damaged copy in turn (one line per trial); a crash ends the process mid-list.
RECOVER = textwrap.dedent(r"""
    import json, sys
    sys.path.insert(0, {root!r})
    import polars as pl
    from engine import Engine
    from engine_tests.test_integrity import fuzz_batch, batch_rows, FUZZ_BATCHES
    for home in sys.argv[1:]:
        print(json.dumps({{"home": home, "started": True}}), flush=True)
        try:
            eng = Engine.open(home, background=False, writer=True)
        except Exception as e:
            print(json.dumps({{"home": home, "error": repr(e)[:300]}}), flush=True)
            continue
        status = {{}}
        for i in range(FUZZ_BATCHES):
            table, market, want = fuzz_batch(i)
            got = batch_rows(eng, table, i)
            if got.height == 0:
                status[i] = "absent"
            else:
                want = pl.from_arrow(want).with_columns(pl.col(pl.Categorical).cast(pl.String))
                want = want if table == "gaps" else want.sort("seq")
                status[i] = "ok" if got.select(want.columns).equals(want) else (
                    "partial" if got.height < want.height else "altered")
        gaps = eng.gaps(allow_unsealed=True, raw_ns=True).with_columns(pl.col(pl.Categorical).cast(pl.String))
        corrupt = gaps.filter(pl.col("kind") == "corrupt").select("source", "market", "start_ts", "end_ts", "detail")
        eng.close()
        print(json.dumps({{"home": home, "status": status, "corrupt": corrupt.to_dicts()}}), flush=True)
""")


def _run_trials(homes: list[str]) -> tuple[dict[str, dict], int]:
    """Recovery of every home in child processes; a child that dies mid-trial counts one crash
    for that trial and a new child takes the rest."""
    results: dict[str, dict] = {}
    crashes = 0
    todo = list(homes)
    while todo:
        p = subprocess.run([sys.executable, "-c", RECOVER.format(root=str(ROOT)), *todo], capture_output=True,
                           text=True, timeout=600, env=_env(), cwd=ROOT)
        current = None
        for line in p.stdout.splitlines():
            o = json.loads(line)
            if o.get("started"):
                current = o["home"]
            else:
                results[o["home"]] = o
                current = None
        if current is not None:  # died inside this trial's recovery
            crashes += 1
            results[current] = {"home": current, "crash": p.returncode, "stderr": p.stderr[-500:]}
        todo = [h for h in todo if h not in results]
        if p.returncode == 0 and todo:
            raise AssertionError(f"recovery child stopped early: {p.stderr[-2000:]}")
    return results, crashes


@pytest.fixture(scope="module")
def fuzz_spool(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A lake home whose writer was killed with every fuzz batch only in the spool, and each
    batch's byte range there."""
    pristine = tmp_path_factory.mktemp("fuzz") / "pristine"
    w = subprocess.run([sys.executable, "-c", WRITER.format(root=str(ROOT)), str(pristine)], capture_output=True,
                       text=True, timeout=300, env=_env(), cwd=ROOT)
    layout = [json.loads(x) for x in w.stdout.splitlines()]
    assert len(layout) == FUZZ_BATCHES, w.stderr[-2000:]
    return pristine, layout


def test_spool_fuzz_damaged_records_quarantined_rest_recovered(tmp_path, fuzz_spool):
    """16 random bytes over 50 random offsets of a real spool (one damage per copy, seeded).
    Recovery never crashes; every batch whose bytes were not changed comes back exactly; every
    batch that did not come back is reported by a `corrupt` gap of its market covering its rows
    and its bytes are kept in spool/quarantine/; nothing damaged reaches the lake."""
    pristine, layout = fuzz_spool
    segs = sorted({b["seg"] for b in layout})
    sizes = {s: (pristine / "spool" / s).stat().st_size for s in segs}
    total = sum(sizes.values())
    rng = random.Random(20261103)
    trials = []
    for k in range(50):
        off = rng.randrange(total - 16)
        noise = bytes(rng.randrange(256) for _ in range(16))
        seg = next(s for s in segs if off < sizes[s] or (off := off - sizes[s]) < 0)
        home = tmp_path / f"t{k:02d}"
        shutil.copytree(pristine, home)
        path = home / "spool" / seg
        data = bytearray(path.read_bytes())
        before = bytes(data[off:off + 16])
        data[off:off + 16] = noise
        path.write_bytes(bytes(data))
        changed = {off + j for j in range(16) if before[j] != noise[j]}
        touched = {b["i"] for b in layout if b["seg"] == seg and any(b["start"] <= c < b["end"] for c in changed)}
        trials.append((str(home), seg, off, touched))
    results, crashes = _run_trials([h for h, *_ in trials])

    stats = {"offsets": len(trials), "crashes": crashes, "open_errors": 0, "batches": 0, "recovered": 0,
             "touched": 0, "lost_reported": 0, "lost_unreported": 0, "altered": 0, "untouched_lost": 0}
    problems = []
    for home, seg, off, touched in trials:
        r = results[home]
        if "crash" in r:
            problems.append(f"{seg}@{off}: recovery crashed (rc {r['crash']}): {r['stderr']}")
            continue
        if "error" in r:
            stats["open_errors"] += 1
            problems.append(f"{seg}@{off}: open failed: {r['error']}")
            continue
        stats["touched"] += len(touched)
        for i_s, st in r["status"].items():
            i = int(i_s)
            table, market, t = fuzz_batch(i)
            stats["batches"] += 1
            if st == "ok":
                stats["recovered"] += 1
                continue
            if st in ("altered", "partial"):
                stats["altered"] += 1
                problems.append(f"{seg}@{off}: batch {i} ({table}) {st}: damaged rows reached the lake")
                continue
            if i not in touched:
                stats["untouched_lost"] += 1
                problems.append(f"{seg}@{off}: undamaged batch {i} ({table}) not recovered")
            col = "start_ts" if table == "gaps" else "recv_ts"
            lo, hi = t.column(col).to_numpy().min(), t.column(col).to_numpy().max()
            if any(g["market"] == market and g["source"] == "coinbase" and g["start_ts"] <= lo and g["end_ts"] >= hi
                   for g in r["corrupt"]):
                stats["lost_reported"] += 1
            else:
                stats["lost_unreported"] += 1
                problems.append(f"{seg}@{off}: batch {i} ({table}) lost without a corrupt gap: {r['corrupt']}")
        lost = [i for i, st in r["status"].items() if st == "absent"]
        if lost and not list((Path(home) / "spool" / "quarantine").glob("*")):
            problems.append(f"{seg}@{off}: batches {lost} lost but nothing in spool/quarantine/")
    print("SPOOL_FUZZ " + json.dumps(stats))
    assert not problems, "\n".join(problems[:20]) + f"\n{stats}"
    assert stats["lost_reported"] > 0  # the offsets did hit records, not only their redundant parts


def _damage(home: Path, seg: str, ranges: list[tuple[int, int]]) -> None:
    path = home / "spool" / seg
    data = bytearray(path.read_bytes())
    for a, b in ranges:
        data[a:b] = bytes(x ^ 0xFF for x in data[a:b])
    path.write_bytes(bytes(data))


def test_spool_torn_tail_unidentified_record_and_old_format(tmp_path, fuzz_spool):
    """A record cut short at the end (a crash mid-write: never acknowledged) is dropped with a
    warning, the rest recovered. A record whose header and trailer are both damaged is reported
    by `corrupt` gaps of the markets around it, over the time between them. A segment in the
    previous format (plain IPC stream) is still recovered, less a batch stored with a 300-character
    market (it held every later open hostage): that one is quarantined."""
    pristine, layout = fuzz_spool
    by_seg = {}
    for b in layout:
        by_seg.setdefault(b["seg"], []).append(b)
    l2 = next(s for s in by_seg if ".l2." in s)
    k = len(by_seg[l2]) // 2
    torn, mid = by_seg[l2][-1], by_seg[l2][k]
    homes = {k: tmp_path / k for k in ("torn", "both_ends", "legacy")}
    shutil.copytree(pristine, homes["torn"])
    with open(homes["torn"] / "spool" / l2, "r+b") as f:
        f.truncate(torn["end"] - 10)
    shutil.copytree(pristine, homes["both_ends"])
    _damage(homes["both_ends"], l2, [(mid["start"], mid["start"] + 16), (mid["end"] - 16, mid["end"])])
    legacy = [i for i in range(FUZZ_BATCHES) if fuzz_batch(i)[0] == "l2"][:4]
    (homes["legacy"] / "spool").mkdir(parents=True)
    with open(homes["legacy"] / "spool" / "0000000000.l2.arrow", "wb") as f:
        w = pa.ipc.new_stream(f, fuzz_batch(0)[2].schema)
        for i in legacy + [99]:
            if i == 99:
                market = "M" * 300
                t = synth.l2_rows("coinbase", market, START, 10, 10**9, seq_start=99_000)
            else:
                _, market, t = fuzz_batch(i)
            for b in t.to_batches():
                w.write_batch(b, custom_metadata={"bufkey": f"l2|coinbase|{market}", "batch": str(i)})
    results, crashes = _run_trials([str(h) for h in homes.values()])
    assert crashes == 0, results

    r = results[str(homes["torn"])]
    assert {i for i, st in r["status"].items() if st != "ok"} == {str(torn["i"])} and r["corrupt"] == []

    r = results[str(homes["both_ends"])]
    assert {i for i, st in r["status"].items() if st != "ok"} == {str(mid["i"])}
    recv = fuzz_batch(mid["i"])[2].column("recv_ts").to_numpy()
    around = {fuzz_batch(b["i"])[1] for b in (by_seg[l2][k - 1], by_seg[l2][k + 1])}
    covering = [g for g in r["corrupt"] if g["start_ts"] <= recv.min() and g["end_ts"] >= recv.max()]
    assert {g["market"] for g in covering} == around and all("unidentified" in g["detail"] for g in covering)
    assert len(list((homes["both_ends"] / "spool" / "quarantine").glob("*.bad"))) == 1

    r = results[str(homes["legacy"])]
    assert {int(i) for i, st in r["status"].items() if st == "ok"} == set(legacy) and r["corrupt"] == []
    assert len(list((homes["legacy"] / "spool" / "quarantine").glob("*.bad"))) == 1


# ------------------------------------------------------------------------------------------ append: all or nothing

def test_append_is_all_or_nothing(tmp_path):
    """A batch whose second group (market) is bad is refused whole: no row of the good group is
    spooled or buffered, so retrying the good rows stores them exactly once (also after a restart)."""
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    good = synth.l2_rows("coinbase", "BTC-USD", START, 5, 10**9)
    bad = synth.l2_rows("coinbase", "Z/BAD", START, 5, 10**9, seq_start=5)
    mixed = pa.concat_tables([good, bad]).unify_dictionaries()
    with pytest.raises(SchemaError, match=r"table l2, column market: 5 row\(s\).*'Z/BAD'"):
        eng.append("l2", mixed)
    assert eng.buffered_rows() == 0
    spooled = sum(p.stat().st_size for p in eng.layout.spool.glob("*.arrow"))
    assert spooled == 0, "the refused batch left bytes in the spool"
    assert eng.append("l2", good) == 5
    eng.close()
    eng = Engine.open(tmp_path / "h", background=False)
    assert eng.l2(allow_unsealed=True).height == 5
    eng.close()


# ------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("column,value,why", [
    ("market", "M" * 300, "longer than 64"),
    ("market", "BTC-USD\n", "letters, digits"),
    ("source", "coinbase\n", "letters, digits"),
    ("market", "BTC USD", "letters, digits"),
    ("instrument", "BTC-USD\x00", "control character"),
    ("instrument", "I" * 300, "longer than 128"),
])
def test_bad_names_refused(tmp_path, column, value, why):
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    t = synth.l2_rows("coinbase", "BTC-USD", START, 4, 10**9)
    t = t.set_column(t.schema.get_field_index(column), column,
                     pa.array([value] * 4).dictionary_encode().cast(t.schema.field(column).type))
    with pytest.raises(SchemaError, match=rf"table l2, column {column}: 4 row\(s\).*{why}"):
        eng.append("l2", t)
    eng.append("l2", synth.l2_rows("coinbase", "BTC-USD", START, 4, 10**9))
    assert eng.flush() == 1
    eng.close()
    assert [p.name for p in (tmp_path / "h" / "staging" / "data" / "l2" / "source=coinbase").iterdir()] == ["market=BTC-USD"]


def test_flush_failure_of_one_buffer_blocks_neither_the_others_nor_open(tmp_path):
    """ETH-USD cannot be written (a file stands where its partition directory goes). Flushing
    writes BTC-USD and SOL-USD and then reports ETH-USD; closing and reopening (recovery) works;
    once the obstacle is gone every row is stored exactly once."""
    home = tmp_path / "h"
    eng = Engine.open(home, background=False, writer=True)
    blocker = home / "staging" / "data" / "l2" / "source=coinbase" / "market=ETH-USD"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    tables = {m: synth.l2_rows("coinbase", m, START, 1000, NS_PER_HOUR // 2, seed=i, seq_start=i * 1000)
              for i, m in enumerate(MARKETS)}
    for t in tables.values():
        eng.append("l2", t)
    with pytest.raises(Exception, match="ETH-USD"):
        eng.flush()
    assert {e.market for e in eng.catalog.files("l2")} == {"BTC-USD", "SOL-USD"}
    # more rows of the stuck market and of another hour are still accepted
    late = synth.l2_rows("coinbase", "ETH-USD", START + NS_PER_HOUR, 100, 10**9, seed=9, seq_start=9000)
    assert eng.append("l2", late) == 100
    with pytest.raises(Exception, match="ETH-USD"):
        eng.close()
    eng = Engine.open(home, background=False, writer=True)  # recovery: the stuck buffer stays, open goes on
    assert eng.buffered_rows() == 1100
    blocker.unlink()
    eng.flush()
    eng.close()
    eng = Engine.open(home, background=False, writer=True)
    got = eng.l2()
    assert got.height == 3100 and got["seq"].n_unique() == 3100
    assert not list(eng.layout.spool.glob("*.arrow"))
    eng.close()


# ------------------------------------------------------------------------------------------ values

def _l2(n: int = 10) -> pa.Table:
    return synth.l2_rows("coinbase", "BTC-USD", START, n, 10**9)


def _with(t: pa.Table, column: str, values) -> pa.Table:
    i = t.schema.get_field_index(column)
    return t.set_column(i, column, pa.array(values, t.schema.field(column).type))


def _bad_value_cases():
    t = _l2()
    ts, recv = t.column("ts").to_numpy(), t.column("recv_ts").to_numpy()
    price = t.column("price").to_numpy()
    size = t.column("size").to_numpy()
    yield "price NaN", "l2", _with(t, "price", np.where(np.arange(10) < 2, math.nan, price)), "price", 2, "finite"
    yield "price inf", "l2", _with(t, "price", np.where(np.arange(10) < 3, math.inf, price)), "price", 3, "finite"
    yield "price negative", "l2", _with(t, "price", np.where(np.arange(10) < 1, -1.0, price)), "price", 1, "negative"
    yield "size -inf", "l2", _with(t, "size", np.where(np.arange(10) < 4, -math.inf, size)), "size", 4, "finite"
    yield "size negative", "l2", _with(t, "size", np.where(np.arange(10) < 5, -0.5, size)), "size", 5, "negative"
    yield "ts negative", "l2", _with(t, "ts", np.where(np.arange(10) < 2, -ts, ts)), "ts", 2, "before 1973"
    yield "ts in ms", "l2", _with(_with(t, "ts", ts // 10**6), "recv_ts", recv // 10**6), "ts", 10, "ms or µs"
    yield "ts in µs", "l2", _with(_with(t, "ts", ts // 10**3), "recv_ts", recv // 10**3), "recv_ts", 10, "ms or µs"
    yield "ts a day early", "l2", _with(t, "ts", recv - np.where(np.arange(10) < 6, NS_PER_DAY, 0)), "ts", 6, "a day"
    tr = synth.trade_rows("coinbase", "BTC-USD", START, 10, 10**9)
    yield "trade size NaN", "trades", _with(tr, "size", [math.nan] * 10), "size", 10, "finite"
    yield "trade ts a day late", "trades", _with(tr, "ts", tr.column("recv_ts").to_numpy() + NS_PER_DAY), "ts", 10, "a day"
    g = synth.gap_rows([{"source": "coinbase", "market": "BTC-USD", "instrument": None, "start_ts": START,
                         "end_ts": START, "kind": "stale", "detail": None}])
    g = _with(g, "end_ts", [START - 1])
    yield "gap ends before it starts", "gaps", g, "end_ts", 1, "before start_ts"


@pytest.mark.parametrize("case", list(_bad_value_cases()), ids=lambda c: c[0])
def test_bad_values_refused_with_table_column_and_count(tmp_path, case):
    _, table, t, column, n, why = case
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    with pytest.raises(SchemaError, match=rf"table {table}, column {column}: {n} row\(s\) .*{why}"):
        eng.append(table, t)
    assert eng.buffered_rows() == 0
    eng.close()


def test_edge_values_accepted(tmp_path):
    """Zero sizes (level removed), ts just under a day from recv_ts, an instrument with spaces."""
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    t = _l2()
    recv = t.column("recv_ts").to_numpy()
    t = _with(_with(t, "size", [0.0] * 10), "ts", recv - NS_PER_DAY + 1)
    assert eng.append("l2", t) == 10
    eng.close()


# ------------------------------------------------------------------------------------------ collectors

def test_collector_counts_refused_rows_and_keeps_the_rest(tmp_path):
    """Rows a normalizer produced but append would refuse (a product name with a newline or 300
    characters, an exchange time 1.5 days off under a 2-day skew setting) are counted as skipped
    rows with a reason; the rest of the chunk is appended."""
    from engine.collect.append import append_tables
    from engine.collect.coinbase.normalize import CoinbaseNormalizer
    from engine_tests.test_coinbase import T0, l2_frame, trades_frame

    n = CoinbaseNormalizer(max_skew_ns=2 * NS_PER_DAY)
    n.on_connect(T0, conn=1)
    n.feed(T0, l2_frame(0, "BTC-USD", [("bid", "100.5", "1"), ("offer", "101", "2")], typ="snapshot"))
    n.feed(T0, l2_frame(1, "ETH-USD\n", [("bid", "10", "1")], typ="snapshot"))
    n.feed(T0, l2_frame(2, "X" * 300, [("bid", "10", "1"), ("offer", "11", "1")], typ="snapshot"))
    n.feed(T0, trades_frame(3, [("BTC-USD", 1, "100", "1", "BUY"), ("BTC-USD", 2, "100", "1", "SELL")]))
    n.feed(T0 + NS_PER_DAY * 3 // 2, trades_frame(4, [("BTC-USD", 3, "100", "1", "BUY")], t=T0))
    out = n.take()
    assert out["l2"].num_rows == 2 and out["trades"].num_rows == 2
    assert n.c.skipped_rows == 4
    assert n.c.skip_reasons == {"refused_l2_market": 3, "refused_trades_ts": 1}
    eng = Engine.open(tmp_path / "h", background=False, writer=True)
    assert append_tables(eng, out) == 4
    eng.close()
