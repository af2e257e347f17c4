"""Collector runtime against the replay exchange on 127.0.0.1 (real sockets, subprocess collectors)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from engine.sim.capture_gen import generate_coinbase, generate_kalshi, write_capture
from engine.sim.replay import ReplayServer

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALSHI_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _cmd(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "collect", "--home", str(home), "--backoff-base", "0.05",
            "--backoff-max", "0.3", "--status-interval", "0.3", *args]


def _open(home: Path):
    from engine import Engine

    return Engine.open(home=home)


def _tables(home: Path):
    eng = _open(home)
    try:
        return (eng.l2(allow_unsealed=True, raw_ns=True), eng.trades(allow_unsealed=True, raw_ns=True),
                eng.gaps(allow_unsealed=True, raw_ns=True))  # int ns: the checks below do arithmetic
    finally:
        eng.close()


def _ingest(home: Path, files, source: str) -> None:
    from engine.collect.ingest import ingest_files

    from engine import Engine

    eng = Engine.open(home=home, writer=True, book_anchors=True)
    try:
        ingest_files(eng, files, source, progress=False)
    finally:
        eng.close()


def _canon_l2(df: pl.DataFrame, with_recv: bool, shift: int = 0) -> list:
    """Rows comparable across runs; `shift` is taken off exchange times (the replay exchange moves a
    capture to the present by `stats()["shift_ns"]`)."""
    cols = ["instrument", "side", "price", "size", "ts", "snapshot"] + (["recv_ts", "seq"] if with_recv else [])
    df = df.with_columns(pl.col("ts") - shift)
    return sorted(df.select([pl.col(c).cast(pl.Utf8) if c in ("instrument", "side") else pl.col(c) for c in cols]).rows())


def _canon_trades(df: pl.DataFrame, shift: int = 0) -> list:
    return sorted(df.select(pl.col("instrument").cast(pl.Utf8), "trade_id", pl.col("ts") - shift, "price", "size",
                            pl.col("side").cast(pl.Utf8)).rows())


@pytest.fixture(scope="module")
def cb_capture(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cap") / "coinbase.jsonl.zst"
    write_capture(generate_coinbase(seconds=12, rate=150, seed=3, depth=100), p)
    return p


@pytest.fixture(scope="module")
def cb_reference(cb_capture, tmp_path_factory) -> tuple:
    home = tmp_path_factory.mktemp("ref")
    _ingest(home, [cb_capture], "coinbase")
    return _tables(home)


def _final_books(l2: pl.DataFrame) -> dict:
    """Book per instrument from the rows (receive order), resetting at each snapshot group."""
    l2 = l2.with_row_index("i").sort(["recv_ts", "seq", "i"])
    books: dict = {}
    last_group: dict = {}
    for inst, side, price, size, snap, recv, seq in l2.select(
        pl.col("instrument").cast(pl.Utf8), pl.col("side").cast(pl.Utf8), "price", "size", "snapshot", "recv_ts", "seq"
    ).iter_rows():
        if snap and last_group.get(inst) != (recv, seq):
            books[inst] = {}
            last_group[inst] = (recv, seq)
        elif not snap:
            last_group.pop(inst, None)
        b = books.setdefault(inst, {})
        if size == 0:
            b.pop((side, price), None)
        else:
            b[(side, price)] = size
    return books


# ------------------------------------------------------------------------------------------------


def test_live_equals_offline_malformed_frames_and_kalshi_skipped(cb_capture, cb_reference, tmp_path):
    home, cap = tmp_path / "live", tmp_path / "cap"
    with ReplayServer.run_in_thread(source="coinbase", capture=str(cb_capture), speed=0,
                                    faults=["malformed@900:1000"]) as srv:
        err = _collect_all(home, srv, "--source", "coinbase", "kalshi", "--coinbase-url", srv.ws_url,
                           "--capture-dir", str(cap), "--coinbase-stall", "30")
        assert srv.stats()["malformed_sent"] == 1000
        shift = srv.stats()["shift_ns"]
    # Kalshi without credentials: one clear line, Coinbase ran anyway
    assert err.count('"kalshi_skipped"') == 1
    st = json.loads((home / "status" / "coinbase.json").read_text())
    assert st["skipped_frames"] == 1000 and st["skip_reasons"] == {"malformed_json": 1000}
    assert st["gaps"] == 0 and st["reconnects"] == 0
    l2, tr, gaps = _tables(home)
    assert gaps.height == 0
    # live == offline over the collector's own capture: identical rows, receive times included
    files = sorted(cap.glob("coinbase-*.jsonl.zst"))
    assert files
    _ingest(tmp_path / "offline", files, "coinbase")
    l2o, tro, gapso = _tables(tmp_path / "offline")
    assert _canon_l2(l2, True) == _canon_l2(l2o, True)
    assert _canon_trades(tr) == _canon_trades(tro)
    # ... and the same rows as ingesting the capture the exchange served (receive times aside):
    # every good row kept despite 1,000 malformed frames
    ref_l2, ref_tr, _ = cb_reference
    assert _canon_l2(l2, False, shift) == _canon_l2(ref_l2, False)
    # trades: the exchange's trade snapshot holds the last 100 trades at subscribe time, so the
    # oldest few of the capture's initial snapshot can fall out of that window; everything from
    # the first trade we hold on is identical
    live_t, ref_t = _canon_trades(tr, shift), _canon_trades(ref_tr)
    first = {}
    for inst, tid, *_ in live_t:
        first[inst] = min(first.get(inst, int(tid)), int(tid))
    assert live_t == [r for r in ref_t if int(r[1]) >= first[r[0]]]
    assert len(ref_t) - len(live_t) < 30
    assert l2.height > 3000 and tr.height > 300


def test_capture_stamped_30_days_ago_plays_at_the_present(tmp_path):
    """A capture from another day (recorded last month, or generated on a fixed date) is played as
    fresh data: the collector would refuse exchange times a day away from its receive time."""
    old = time.time_ns() - 30 * 86400 * 10**9
    cap = list(generate_coinbase(seconds=6, rate=60, seed=21, depth=30, start_ns=old))
    home = tmp_path / "live"
    with ReplayServer.run_in_thread(source="coinbase", capture=cap, speed=0) as srv:
        _collect_all(home, srv, "--source", "coinbase", "--coinbase-url", srv.ws_url, "--coinbase-stall", "30")
        shift = srv.stats()["shift_ns"]
    assert shift > 29 * 86400 * 10**9
    st = _status(home, "coinbase")
    assert st["skipped_frames"] == 0 and st.get("skipped_rows", 0) == 0 and st["skip_reasons"] == {}, st
    l2, tr, _ = _tables(home)
    ref_home = tmp_path / "ref"
    path = tmp_path / "cap.jsonl"
    write_capture(cap, path)
    _ingest(ref_home, [path], "coinbase")
    ref_l2, ref_tr, _ = _tables(ref_home)
    # every trade the exchange sent after the subscription's snapshot window is stored, at its own time
    live_t, ref_t = _canon_trades(tr, shift), _canon_trades(ref_tr)
    first = {}
    for inst, tid, *_ in live_t:
        first[inst] = min(first.get(inst, int(tid)), int(tid))
    assert live_t == [r for r in ref_t if int(r[1]) >= first[r[0]]]
    assert len(live_t) > 0.9 * len(ref_t)
    assert _canon_l2(l2, False, shift) == _canon_l2(ref_l2, False)
    # stored exchange times are today's, close to the receive times
    assert (l2["recv_ts"] - l2["ts"]).abs().max() < 60 * 10**9


def test_faults_drop_close_stall_give_gaps_and_resync(cb_capture, cb_reference, tmp_path):
    home = tmp_path / "live"
    with ReplayServer.run_in_thread(source="coinbase", capture=str(cb_capture), speed=4.0,
                                    faults=["drop@300", "close@800", "stall@1300:2.5"]) as srv:
        proc = subprocess.Popen(_cmd(home, "--source", "coinbase", "--coinbase-url", srv.ws_url, "--coinbase-stall", "1.2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            _wait_reconnect_after_end(srv)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        s = srv.stats()
        assert s["dropped"] >= 1 and s["closes"] == 1 and s["stalls"] == 1
        shift = s["shift_ns"]
    l2, tr, gaps = _tables(home)
    g = gaps.with_columns(pl.col("kind").cast(pl.Utf8), pl.col("market").cast(pl.Utf8))
    kinds = set(g["kind"])
    assert {"sequence", "disconnect", "stale"} <= kinds, g
    products = {"BTC-USD", "ETH-USD", "SOL-USD"}
    seq_gaps = g.filter(pl.col("kind") == "sequence")
    assert set(seq_gaps["market"]) == products and seq_gaps["instrument"].null_count() == seq_gaps.height
    last_rx = l2["recv_ts"].max()
    assert g.filter((pl.col("kind") == "stale") & (pl.col("start_ts") < last_rx)).height >= 3  # the injected stall
    # after every gap a fresh snapshot rebuilds each book
    for end in g["end_ts"].to_list():
        after = l2.filter(pl.col("snapshot") & (pl.col("recv_ts") >= end))
        if l2.filter(pl.col("recv_ts") > end).height:
            assert set(after["instrument"].cast(pl.Utf8)) == products
    # resynced books end equal to the exchange's books (reference: the full capture, nothing lost)
    ref_l2, ref_tr, _ = cb_reference
    assert _final_books(l2) == _final_books(ref_l2)
    # trades: no duplicate despite 3 reconnect snapshots, and a subset of the real ones
    assert tr.select("instrument", "trade_id").unique().height == tr.height
    assert set(_canon_trades(tr, shift)) <= set(_canon_trades(ref_tr))


def _status(home: Path, source: str) -> dict:
    try:
        return json.loads((home / "status" / f"{source}.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_read_all(home: Path, srv, source: str = "coinbase", timeout: float = 40) -> dict:
    """Counter handshake: until the capture is exhausted (`srv.done`) and the collector's status
    counts every frame the exchange sent (`frames` == `frames_sent`), on two status writes in a
    row with nothing more sent in between (a frame still queued on the server would have gone out
    by the second). Returns that status. For runs on one connection only: frames sent on a
    connection the collector dropped are not all read."""
    end = time.monotonic() + timeout
    matched = None  # (updated_ns, frames) of the status that first equalled frames_sent
    st: dict = {}
    while time.monotonic() < end:
        if srv.done.is_set():
            sent = srv.stats()["frames_sent"]
            st = _status(home, source)
            if st.get("frames") == sent:
                if matched is not None and matched[1] == sent and st["updated_ns"] > matched[0]:
                    return st
                if matched is None or matched[1] != sent:
                    matched = (st["updated_ns"], sent)
            else:
                matched = None
        time.sleep(0.05)
    raise AssertionError(f"collector read {st.get('frames')} frames, the exchange sent {srv.stats()['frames_sent']} "
                         f"(capture exhausted: {srv.done.is_set()})")


def _wait_reconnect_after_end(srv, timeout: float = 40) -> None:
    """Until the capture is exhausted and the collector, connected at that point, has connected again.

    For runs whose faults make the collector drop connections (frames sent on a dropped connection
    are never read, so frame counts cannot be compared). Once the capture is over the exchange sends
    nothing, so the next connection follows the collector's `stale` watchdog (a short
    --coinbase-stall) on a connection whose every frame it had read."""
    end = time.monotonic() + timeout
    n0 = None
    while time.monotonic() < end:
        s = srv.stats()
        if n0 is None:
            if srv.done.is_set() and s["clients"] >= 1:
                n0 = s["connections"]
        elif s["connections"] > n0:
            return
        time.sleep(0.05)
    raise AssertionError(f"no reconnect after the end of the capture (done: {srv.done.is_set()}, {srv.stats()})")


def _collect_all(home: Path, srv, *args: str, source: str = "coinbase", env=None) -> str:
    """Run a collector until it has read every frame the exchange sent (`_wait_read_all`), then
    SIGTERM it; returns its stderr (a file, not a pipe nobody reads while it runs)."""
    errf = home.parent / f"{home.name}-collector.err"
    with open(errf, "w") as ef:
        proc = subprocess.Popen(_cmd(home, *args), stdout=subprocess.DEVNULL, stderr=ef, text=True,
                                env=env or _env(), cwd=ROOT)
        try:
            _wait_read_all(home, srv, source)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    err = errf.read_text()
    assert proc.returncode == 0, err[-3000:]
    return err


def _wait_status_where(home: Path, pred, what: str, timeout: float = 20, source: str = "coinbase") -> dict:
    """Until the collector's status file satisfies `pred` (bounded); returns that status."""
    end = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < end:
        st = _status(home, source)
        if st and pred(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"collector status never showed {what}: {st}")


def _wait_status(home: Path, key: str, minimum: int, timeout: float = 20, source: str = "coinbase") -> dict:
    end = time.monotonic() + timeout
    p = home / "status" / f"{source}.json"
    while time.monotonic() < end:
        try:
            st = json.loads(p.read_text())
            if st.get(key, 0) >= minimum:
                return st
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"status {key} never reached {minimum}")


def _parquet_files(home: Path) -> list[Path]:
    return sorted(p for p in home.rglob("*.parquet") if "/data/" in str(p))


def test_flush_request_status_and_sigterm(cb_capture, tmp_path):
    from engine.collect.status import request_flush, status_cli

    home = tmp_path / "live"
    with ReplayServer.run_in_thread(source="coinbase", capture=str(cb_capture), speed=2.0) as srv:
        proc = subprocess.Popen(_cmd(home, "--source", "coinbase", "--coinbase-url", srv.ws_url),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            _wait_status(home, "rows", 1000)
            assert _parquet_files(home) == []
            assert request_flush(home) == 1  # SIGUSR1 to the pid in {home}/status
            end = time.monotonic() + 10
            while len(_parquet_files(home)) < 6 and time.monotonic() < end:  # l2 + trades x 3 products
                time.sleep(0.1)
            # the flush has started: a row received from now on is appended after it, into a new buffer
            t_flushed = time.time_ns()
            n_flushed = len(_parquet_files(home))
            assert n_flushed >= 6
            assert status_cli(["--home", str(home)]) == 0
            # handshake: rows keep arriving after the requested flush (only the final flush stores them)
            _wait_status_where(home, lambda st: (st.get("last_recv_ns") or 0) > t_flushed and st["rows_trades"] > 0,
                               "a frame received after the requested flush")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert len(_parquet_files(home)) > n_flushed  # the final flush on SIGTERM
    st = json.loads((home / "status" / "coinbase.json").read_text())
    l2, tr, gaps = _tables(home)
    assert l2.filter(pl.col("recv_ts") > t_flushed).height > 0  # rows only the final flush wrote
    # every row the collector produced is stored (l2 also holds the engine's book anchor at the top
    # of the second file)
    assert tr.height == st["rows_trades"]
    assert l2.height >= st["rows_l2"]
    assert not list((home / "status").glob("collector-*.pid"))


def test_sigkill_then_restart_recovers_spool_and_records_restart_gap(cb_capture, tmp_path):
    home = tmp_path / "live"
    with ReplayServer.run_in_thread(source="coinbase", capture=str(cb_capture), speed=2.0) as srv:
        proc = subprocess.Popen(_cmd(home, "--source", "coinbase", "--coinbase-url", srv.ws_url),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            # handshake: a status written after the rows it counts were appended (the status is written
            # right after pending rows are handed to the appender; no append pending = all in the spool)
            st = _wait_status_where(home, lambda st: st.get("rows", 0) >= 2000 and st["pending_appends"] == 0,
                                    "2000 rows, all appended to the spool")
        finally:
            proc.kill()
            proc.communicate(timeout=10)
        assert _parquet_files(home) == []  # nothing was flushed: the rows live only in the spool
        first_rows = st["rows_l2"]
        # the restart, until it has reconnected once on its own (a `stale` reconnect: the exchange sent
        # nothing for 1 s, so the restart connection and its snapshots were read to the end)
        proc = subprocess.Popen(_cmd(home, "--source", "coinbase", "--coinbase-url", srv.ws_url, "--coinbase-stall", "1"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            _wait_status_where(home, lambda st: st.get("pid") == proc.pid and st.get("reconnects", 0) >= 1,
                               "a reconnect of the restarted collector", timeout=40)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
    l2, tr, gaps = _tables(home)
    g = gaps.with_columns(pl.col("kind").cast(pl.Utf8))
    restart = g.filter(pl.col("kind") == "restart")
    assert restart.height == 3 and restart["instrument"].null_count() == 3
    t_restart = restart["start_ts"][0]
    before = l2.filter(pl.col("recv_ts") <= t_restart)
    assert before.height >= first_rows  # recovered from the spool after SIGKILL
    assert (restart["end_ts"] > restart["start_ts"]).all()
    # the restart got a fresh snapshot per product
    after = l2.filter(pl.col("snapshot") & (pl.col("recv_ts") > restart["end_ts"][0]))
    assert set(after["instrument"].cast(pl.Utf8)) == {"BTC-USD", "ETH-USD", "SOL-USD"}


def test_kalshi_discovery_rotation_auth_and_live_equals_offline(tmp_path):
    from engine.collect.kalshi.auth import generate_keypair

    priv, pub = generate_keypair(tmp_path / "keys", bits=2048)
    capf = tmp_path / "kalshi.jsonl.zst"
    write_capture(generate_kalshi(series=["KXBTC", "KXETH"], seconds=240, rate=40, seed=5, contract_minutes=2,
                                  strikes=3, use_yes_price=False), capf)
    home, cap = tmp_path / "live", tmp_path / "cap"
    env = _env(KALSHI_API_KEY_ID="0f6a1c9e-test-key", KALSHI_PRIVATE_KEY_PATH=str(priv))
    with ReplayServer.run_in_thread(source="kalshi", capture=str(capf), speed=40.0, kalshi_public_key=str(pub),
                                    faults=["seq_jump@600:3"]) as srv:
        proc = subprocess.Popen(
            _cmd(home, "--source", "kalshi", "--series", "KXBTC", "KXETH", "--kalshi-url", srv.ws_url,
                 "--kalshi-rest-url", srv.rest_url, "--discovery-interval", "0.2", "--capture-dir", str(cap),
                 "--no-use-yes-price"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            _wait_read_all(home, srv, "kalshi")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        assert srv.stats()["auth_rejected"] == 0 and srv.stats()["rest_requests"] > 3
    st = json.loads((home / "status" / "kalshi.json").read_text())
    assert st["markets_added"] > 6 and st["markets_dropped"] >= 3, st
    assert st["skipped_frames"] == 0 and st["errors"] == 0
    l2, tr, gaps = _tables(home)
    assert set(l2["market"].cast(pl.Utf8)) == {"KXBTC", "KXETH"}
    # the sequence jump: gap rows, then get_snapshot answers (snapshot rows right after the gap)
    seq_gaps = gaps.filter(pl.col("kind").cast(pl.Utf8) == "sequence")
    assert seq_gaps.height >= 1
    g_end = seq_gaps["end_ts"].min()
    resync = l2.filter(pl.col("snapshot") & (pl.col("recv_ts") >= g_end) & (pl.col("recv_ts") < g_end + 2 * 10**9))
    assert resync.height > 0
    assert "get_snapshot_sent" in err
    events = {i.rsplit("-", 1)[0] for i in l2["instrument"].cast(pl.Utf8).unique()}
    assert len(events) >= 4  # contracts rotated: several hourly events' contracts were collected
    assert tr.height > 0 and set(tr["side"].cast(pl.Utf8)) <= {"buy", "sell"}
    # books are never crossed at the end
    for inst, b in _final_books(l2).items():
        bids = [p for s, p in b if s == "bid"]
        asks = [p for s, p in b if s == "ask"]
        if bids and asks:
            assert max(bids) < min(asks), inst
    # live == offline over the collector's capture (use_yes_price comes from the meta lines)
    files = sorted(cap.glob("kalshi-*.jsonl*"))
    _ingest(tmp_path / "offline", files, "kalshi")
    l2o, tro, gapso = _tables(tmp_path / "offline")
    assert _canon_l2(l2, True) == _canon_l2(l2o, True)
    assert _canon_trades(tr) == _canon_trades(tro)


def test_looped_capture_reads_as_fresh_data(cb_capture, cb_reference, tmp_path):
    """The demo loops its capture: every pass after the first must move the exchange times forward
    and bring new trade ids, or the lake would repeat the same minutes and the collector would drop
    every looped trade as a duplicate."""
    l2_ref, tr_ref, _ = cb_reference
    span = (l2_ref["ts"].max() - l2_ref["ts"].min()) / 1e9
    home = tmp_path / "live"
    with ReplayServer.run_in_thread(source="coinbase", capture=str(cb_capture), speed=0, loop_capture=True) as srv:
        proc = subprocess.Popen(_cmd(home, "--source", "coinbase", "--coinbase-url", srv.ws_url, "--coinbase-stall", "30"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:  # handshake: until the collector holds more than two passes' trades
            _wait_status_where(home, lambda st: st.get("rows_trades", 0) > 2 * tr_ref.height,
                               "more than two passes of trades", timeout=40)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        loops = srv.stats()["loops"]
    assert loops >= 2, loops
    st = _status(home, "coinbase")
    assert st["gaps"] == 0 and st["skipped_frames"] == 0 and st["dup_trades"] <= tr_ref.height, st
    l2, tr, gaps = _tables(home)
    assert gaps.height == 0
    # every pass brought new trades (none dropped as duplicates) and later exchange times
    passes = tr.height // tr_ref.height  # whole passes the collector read (the server reads ahead of it)
    assert passes >= 2 and tr["trade_id"].n_unique() == tr.height, (passes, tr.height)
    assert (tr["ts"].max() - tr["ts"].min()) / 1e9 > (passes - 1) * span
    assert (l2["ts"].max() - l2["ts"].min()) / 1e9 > (passes - 1) * span
    # within a product, exchange times never go back by a capture's length (no pass replays old minutes)
    for (pid,), g in l2.filter(~pl.col("snapshot")).sort("recv_ts").group_by("instrument"):
        back = (g["ts"].cum_max() - g["ts"]).max()
        assert back < 10**9, (pid, back)
