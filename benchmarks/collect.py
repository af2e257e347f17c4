"""Collector benchmark: `scripts/bench_collect` (or `python benchmarks/collect.py` in the project venv).

1. Coinbase `l2_data` frames -> columnar buffer -> Arrow, rows/s, against a stdlib-json + row-dict
   baseline on the same frames that ends where ours ends, in Arrow rows of the l2 schema (the only
   thing the engine's buffer accepts); its dict-building part alone is reported too. Real recording
   from ../shared/fixtures when present, else generated.
2. Kalshi `orderbook_delta` frames -> absolute-size rows, messages/s.
3. End to end: replay exchange (this process, its own thread) -> `data-engine collect` subprocess
   over a local WebSocket at full speed -> lake; rows/s, collector CPU %, peak RSS.

In-process timings use the process CPU clock (time.process_time): the development machine is shared,
and wall time there measures the neighbours as much as the code. Wall-clock figures are printed too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)

FIX = ROOT.parent / "shared" / "fixtures" / "coinbase" / "advanced-trade" / "cryptofeed-v3-COINBASE.jsonl.zst"
T0 = 1_795_712_400_000_000_000


def coinbase_update_frames() -> tuple[list[dict], str]:
    """Parsed l2_data update messages (and the two snapshots), real when the fixture exists."""
    if FIX.is_file():
        import zstandard

        msgs = []
        with open(FIX, "rb") as f:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
                o = json.loads(line)
                if o.get("t") == "recv" and '"l2_data"' in o["data"][:40]:
                    msgs.append(json.loads(o["data"]))
        return msgs, "real recording (cryptofeed v3, 2026-08-09)"
    from engine.sim.capture_gen import generate_coinbase

    msgs = []
    for rec in generate_coinbase(seconds=60, rate=300, seed=1):
        f = rec.get("frame")
        if f and '"l2_data"' in f[:40]:
            msgs.append(json.loads(f))
    return msgs, "generated (capture_gen)"


def make_stream(msgs: list[dict], target_rows: int) -> tuple[list[str], list[str], int]:
    snaps = [m for m in msgs if m["events"][0]["type"] == "snapshot"]
    ups = [m for m in msgs if m["events"][0]["type"] == "update"]
    # snapshots truncated to a realistic 1,000 levels so the book stays small; not timed
    head = []
    seq = 0
    for m in snaps:
        m = json.loads(json.dumps(m))
        m["events"][0]["updates"] = m["events"][0]["updates"][:1000]
        m["sequence_num"] = seq
        seq += 1
        head.append(json.dumps(m, separators=(",", ":")))
    frames, rows = [], 0
    while rows < target_rows:
        for m in ups:
            m["sequence_num"] = seq
            seq += 1
            frames.append(json.dumps(m, separators=(",", ":")))
            rows += len(m["events"][0]["updates"])
    return head, frames, rows


def _frame_times(d: dict) -> list[str]:
    """The exchange times a Coinbase frame carries (envelope, l2 event times, trade times)."""
    out = [d["timestamp"]] if d.get("timestamp") else []
    for ev in d.get("events") or ():
        out += [u["event_time"] for u in ev.get("updates") or () if u.get("event_time")]
        out += [t["time"] for t in ev.get("trades") or () if t.get("time")]
    return out


def real_shaped_records(target_rows: int, levels: int = 500) -> tuple[list[dict], str]:
    """A Coinbase capture of the real recording's frames (level2, market_trades, heartbeats; ~6.3
    rows per l2 update frame), played back to back until `target_rows` l2+trade rows: each pass
    moves every exchange time forward by the recording's length (whole seconds) and trade ids by
    10**12, so a pass is fresh data in time order; times start at the present (serve it with
    `at_present=False`: no per-frame shift in the replay exchange). Snapshots cut to `levels` per
    side. Generated frames (~3 rows per frame) when the recording is absent."""
    if not FIX.is_file():
        from engine.sim.capture_gen import generate_coinbase

        return list(generate_coinbase(seconds=target_rows / 6000, rate=2000, seed=7, depth=200,
                                      start_ns=time.time_ns())), "generated (capture_gen; the recording is absent)"
    import zstandard

    from engine.collect.timestamps import parse_ts
    from engine.sim.replay.protocol import shift_rfc3339

    head, body = [], []  # (recv_ns, frame dict)
    with open(FIX, "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            o = json.loads(line)
            if o.get("t") != "recv":
                continue
            d = json.loads(o["data"])
            ch = d.get("channel")
            if ch not in ("l2_data", "market_trades", "heartbeats", "subscriptions"):
                continue
            recv = int(o["ts"] * 1e9)
            snap = bool(d.get("events")) and d["events"][0].get("type") == "snapshot"
            if ch == "l2_data" and snap:
                for ev in d["events"]:
                    bids = [u for u in ev["updates"] if u["side"] == "bid"][:levels]
                    asks = [u for u in ev["updates"] if u["side"] != "bid"][:levels]
                    ev["updates"] = bids + asks
            (head if snap or ch == "subscriptions" else body).append((recv, d))
    t0 = head[0][0]
    # a pass lasts longer than its receive times and its exchange times span (whole seconds), so the
    # next pass starts after the last one in both clocks, as a live feed does (each product's
    # exchange times rise within the recording). Until 2026-12-05 the period was the receive span
    # rounded down, so every pass boundary stepped back ~0.6 s in exchange time.
    times = [parse_ts(t) for _, d in body for t in _frame_times(d)]
    lo, hi = min([t0, *times]), max([body[-1][0], *times])
    period = (-(-(hi - lo) // 10**9) + 1) * 10**9
    base = (time.time_ns() - t0) // 10**9 * 10**9

    def moved(d: dict, sh: int, tid_step: int) -> str:
        d = json.loads(json.dumps(d))
        d["timestamp"] = shift_rfc3339(d.get("timestamp", ""), sh)
        for ev in d.get("events") or ():
            for u in ev.get("updates") or ():
                u["event_time"] = shift_rfc3339(u.get("event_time", ""), sh)
            for t in ev.get("trades") or ():
                t["time"] = shift_rfc3339(t.get("time", ""), sh)
                t["trade_id"] = str(int(t["trade_id"]) + tid_step)
        return json.dumps(d, separators=(",", ":"))

    recs = [{"recv_ns": base + t0, "meta": {"type": "connect", "source": "coinbase", "conn": 0}}]
    recs += [{"recv_ns": r + base, "frame": moved(d, base, 0)} for r, d in head]
    rows, k = 0, 0
    while rows < target_rows:
        sh = base + k * period
        for r, d in body:
            recs.append({"recv_ns": r + sh, "frame": moved(d, sh, k * 10**12)})
            for ev in d.get("events") or ():
                rows += len(ev.get("updates") or ()) + len(ev.get("trades") or ())
        k += 1
    return recs, f"real recording's frames x {k} passes"


def bench_coinbase(target_rows: int) -> dict:
    from engine.collect.coinbase.normalize import CoinbaseNormalizer

    msgs, what = coinbase_update_frames()
    head, frames, rows = make_stream(msgs, target_rows)
    recv = [T0] * len(frames)
    # receive times near the event times so the skew check passes
    et = json.loads(frames[0])["events"][0]["updates"][0]["event_time"]
    from engine.collect.timestamps import parse_ts

    r0 = parse_ts(et) + 10**8

    def ours() -> tuple[float, int]:
        n = CoinbaseNormalizer()
        n.on_connect(r0, conn=1)
        for f in head:
            n.feed(r0, f)
        n.take()
        t, w = time.process_time(), time.perf_counter()
        out_rows = 0
        feed, take, l2 = n.feed, n.take, n.l2
        for f in frames:
            feed(r0, f)
            if l2.rows >= 65_536:
                out_rows += take()["l2"].num_rows
        out_rows += take().get("l2").num_rows
        return time.process_time() - t, out_rows, time.perf_counter() - w

    import pyarrow as pa

    from engine.schema import L2_SCHEMA

    def baseline() -> tuple[float, int, float, float]:
        """The same frames the row-dict way: stdlib json, one dict per row, and (every 65,536 rows,
        as ours) `pa.Table.from_pylist` into the same Arrow rows, since the engine's buffer takes
        Arrow and nothing else. The dict-building part is timed on its own too."""
        clock = time.process_time
        t, w = clock(), time.perf_counter()
        out, n_rows, t_arrow = [], 0, 0.0

        def to_arrow(rows: list) -> tuple[int, float]:
            a = clock()
            n = pa.Table.from_pylist(rows, schema=L2_SCHEMA).num_rows
            return n, clock() - a

        for f in frames:
            d = json.loads(f)
            for ev in d["events"]:
                for u in ev["updates"]:
                    ts = dt.datetime.fromisoformat(u["event_time"].replace("Z", "+00:00"))
                    out.append({
                        "ts": int(ts.timestamp()) * 10**9 + ts.microsecond * 1000, "recv_ts": r0, "source": "coinbase",
                        "market": ev["product_id"], "instrument": ev["product_id"],
                        "side": "ask" if u["side"] == "offer" else "bid", "price": float(u["price_level"]),
                        "size": float(u["new_quantity"]), "seq": d["sequence_num"], "snapshot": ev["type"] == "snapshot",
                    })
            if len(out) >= 65_536:
                n, dt_ = to_arrow(out)
                n_rows, t_arrow, out = n_rows + n, t_arrow + dt_, []
        n, dt_ = to_arrow(out)
        n_rows, t_arrow = n_rows + n, t_arrow + dt_
        total = clock() - t
        return total, n_rows, time.perf_counter() - w, total - t_arrow

    ours()  # warm-up (Arrow kernels, caches)
    t_ours, n_ours, w_ours = min(ours() for _ in range(3))
    t_base, n_base, w_base, t_dicts = min(baseline() for _ in range(2))
    assert n_ours == n_base == rows, (n_ours, n_base, rows)
    return {"what": what, "frames": len(frames), "rows": rows, "rows_per_frame": rows / len(frames),
            "ours_rows_s": rows / t_ours, "base_rows_s": rows / t_base, "ours_wall": rows / w_ours, "base_wall": rows / w_base,
            "dicts_rows_s": rows / t_dicts}


def bench_kalshi(n_msgs: int) -> dict:
    from engine.collect.kalshi.normalize import KalshiNormalizer

    tickers = [f"KXBTC-26NOV2617-B{97000 + 250 * i}" for i in range(20)]
    head = [json.dumps({"id": 1, "type": "subscribed", "msg": {"channel": "orderbook_delta", "sid": 1}})]
    seq = 0
    for t in tickers:
        seq += 1
        head.append(json.dumps({"type": "orderbook_snapshot", "sid": 1, "seq": seq, "msg": {
            "market_ticker": t, "market_id": "x",
            "yes_dollars_fp": [[f"0.{p:02d}00", "100.00"] for p in range(1, 40)],
            "no_dollars_fp": [[f"0.{p:02d}00", "100.00"] for p in range(1, 40)]}}, separators=(",", ":")))
    frames = []
    ts_ms = T0 // 10**6
    for i in range(n_msgs):
        seq += 1
        t = tickers[i % 20]
        side = "yes" if i & 1 else "no"
        px = 1 + (i * 7) % 39
        d = "25.00" if (i // 40) & 1 else "-25.00"
        frames.append(json.dumps({"type": "orderbook_delta", "sid": 1, "seq": seq, "msg": {
            "market_ticker": t, "market_id": "5ac66685-e9c9-49f5-9885-d0302f74ad29", "price_dollars": f"0.{px:02d}00",
            "delta_fp": d, "side": side, "ts": "2026-11-26T17:00:00.123456Z", "ts_ms": ts_ms + i // 1000}},
            separators=(",", ":")))

    def run() -> tuple[float, int]:
        n = KalshiNormalizer()
        n.on_connect(T0, conn=1, use_yes_price=False)
        for f in head:
            n.feed(T0, f)
        n.take()
        t0, w0 = time.process_time(), time.perf_counter()
        rows = 0
        feed, l2 = n.feed, n.l2
        for f in frames:
            feed(T0, f)
            if l2.rows >= 65_536:
                rows += n.take()["l2"].num_rows
        rows += n.take()["l2"].num_rows
        return time.process_time() - t0, rows, time.perf_counter() - w0

    run()
    t, rows, w = min(run() for _ in range(3))
    assert rows == n_msgs
    return {"msgs": n_msgs, "rows": rows, "msgs_s": n_msgs / t, "msgs_wall": n_msgs / w}


def _proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process by thread id (for the profile's per-thread split)."""
    out = {}
    tck = os.sysconf("SC_CLK_TCK")
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
            out[t.name] = (int(f[11]) + int(f[12])) / tck
        except (OSError, IndexError, ValueError):
            pass
    return out


def _reap_cpu(proc: subprocess.Popen, timeout: float) -> float | None:
    """Wait for `proc` to exit; its whole CPU time (user + system) from its rusage, None if it
    did not exit in time (then killed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return None


def real_capture(real_rows: int) -> tuple[Path, str]:
    """`real_shaped_records` written once as a capture file (reused by several runs)."""
    from engine.sim.capture_gen import write_capture

    cap = Path(tempfile.mkdtemp(prefix="bench_collect_cap_")) / "cb.jsonl"
    recs, what = real_shaped_records(real_rows)
    write_capture(recs, cap)
    return cap, what


def bench_e2e(seconds: float, rate: float, real_rows: int = 0, collector_env: dict | None = None,
              profile: Path | None = None, collector_args: list[str] | None = None,
              capture: tuple[Path, str] | None = None) -> dict:
    """`real_rows`: play the real recording's frames (`real_shaped_records`) up to this many rows
    instead of a generated capture of `seconds` at `rate`; `capture`: that capture already written
    (`real_capture`). `profile`: py-spy samples the collector (raw collapsed stacks written there)."""
    from engine.sim.capture_gen import generate_coinbase, write_capture
    from engine.sim.replay import ReplayServer

    tmp = Path(tempfile.mkdtemp(prefix="bench_collect_"))
    cap = tmp / "cb.jsonl"
    what = "generated"
    if capture is not None:
        cap, what = capture
        real_rows = real_rows or 1
    elif real_rows:
        recs, what = real_shaped_records(real_rows)
        write_capture(recs, cap)
        del recs
    else:
        write_capture(generate_coinbase(seconds=seconds, rate=rate, seed=7, depth=200), cap)
    home = tmp / "lake"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALSHI_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(collector_env or {})
    with ReplayServer.run_in_thread(source="coinbase", capture=str(cap), speed=0, at_present=not real_rows) as srv:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "collect", "--source", "coinbase", "--coinbase-url", srv.ws_url,
             "--home", str(home), "--coinbase-stall", "60", "--status-interval", "0.2",
             *(["--products", "BTC-USD", "ETH-USD"] if real_rows and FIX.is_file() else []), *(collector_args or [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        spy = None
        st_path = home / "status" / "coinbase.json"
        cpu0 = w0 = None
        try:
            end = time.monotonic() + 300
            last_rows, stable_since = -1, None
            while time.monotonic() < end:
                time.sleep(0.05)
                if cpu0 is None and srv.stats()["frames_sent"] > 0:
                    cpu0, w0 = _proc_cpu(proc.pid), time.monotonic()
                    threads0 = _thread_cpu(proc.pid)
                    if profile is not None:  # the steady state only: start-up (imports, lake open) left out
                        spy = subprocess.Popen(
                            [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(proc.pid), "-o", str(profile),
                             "--format", "raw", "--rate", "200", "--threads", "--function"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if srv.done.is_set():
                    try:
                        rows = json.loads(st_path.read_text())["frames"]
                    except (OSError, ValueError, KeyError):
                        continue
                    if rows == srv.stats()["frames_sent"]:
                        break
            cpu1, w1 = _proc_cpu(proc.pid), time.monotonic()
            hwm = _proc_hwm_mb(proc.pid)
            threads = _thread_cpu(proc.pid)
            threads = {"main": threads.pop(str(proc.pid), 0.0) - threads0.pop(str(proc.pid), 0.0),
                       "other": sum(threads.values()) - sum(threads0.values())}
        finally:
            proc.send_signal(signal.SIGTERM)
            cpu_end = _reap_cpu(proc, 60)  # with the final flush of the rows still buffered
            if spy is not None:
                spy.wait(60)
    from engine import Engine

    eng = Engine.open(home=home)
    try:
        l2 = eng.l2(allow_unsealed=True, raw_ns=True)  # int ns: the span below is arithmetic
        tr = eng.trades(allow_unsealed=True, raw_ns=True)
    finally:
        eng.close()
    rows = l2.height + tr.height
    span = (max(l2["recv_ts"].max(), tr["recv_ts"].max()) - min(l2["recv_ts"].min(), tr["recv_ts"].min())) / 1e9
    return {"rows": rows, "span_s": span, "rows_s": rows / max(w1 - w0, 1e-9), "rows_s_recv": rows / max(span, 1e-9),
            "cpu_pct": 100 * (cpu1 - cpu0) / max(w1 - w0, 1e-9), "rss_mb": hwm, "wall_s": w1 - w0, "tmp": str(tmp), "what": what,
            "rows_per_cpu_s": rows / max(cpu1 - cpu0, 1e-9),
            "rows_per_cpu_s_total": rows / max(cpu_end - cpu0, 1e-9) if cpu_end is not None else None,
            "thread_cpu_s": threads}


def profile_summary(raw: Path, top: int = 25) -> str:
    """py-spy's raw collapsed stacks as text: samples per thread, then the top functions by own
    and by inclusive samples (shares of all samples), for the event-loop thread and the others."""
    from collections import Counter

    waits = ("Condition.wait (", "Event.wait (", "_worker (concurrent/futures/thread.py", "_wait_for_tstate_lock (")
    rows, waiting = [], 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            fr = stack.split(";")
            if fr[-1].startswith(waits):  # a worker thread blocked on its queue or a lock: idle
                waiting += int(n)
                continue
            rows.append((fr, int(n)))
    total = sum(n for _, n in rows) or 1
    out = [f"samples: {total} at 200 Hz ({waiting} more of threads waiting on a queue or lock left out; the event "
           "loop's own native time, waiting in epoll included, shows as `Runner.run`)", "", "share  thread"]
    threads = Counter()
    for fr, n in rows:
        threads[fr[0].split(":", 1)[-1].strip().rstrip("_0123456789") or fr[0]] += n
    out += [f"{100 * n / total:5.1f}% {t}" for t, n in threads.most_common()]
    for title, pick in (("event-loop thread (MainThread)", lambda t: "MainThread" in t),
                        ("other threads (append, encoder, spool sync, flush)", lambda t: "MainThread" not in t)):
        own, incl = Counter(), Counter()
        sel = [(fr, n) for fr, n in rows if pick(fr[0])]
        for fr, n in sel:
            own[fr[-1]] += n
            for f in set(fr[1:]):
                incl[f] += n
        out += ["", f"== {title}: {100 * sum(n for _, n in sel) / total:.1f}% of samples", "-- own"]
        out += [f"{100 * n / total:5.1f}% {f}" for f, n in own.most_common(top)]
        out += ["-- inclusive"]
        out += [f"{100 * n / total:5.1f}% {f}" for f, n in incl.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000, help="Coinbase rows to normalize")
    ap.add_argument("--kalshi-msgs", type=int, default=500_000)
    ap.add_argument("--e2e-seconds", type=float, default=60.0, help="generated capture length for the e2e run")
    ap.add_argument("--e2e-rate", type=float, default=2000.0, help="generated updates per second")
    ap.add_argument("--e2e-real-rows", type=int, default=1_000_000,
                    help="rows of the real recording's frames played end to end (0: skip)")
    ap.add_argument("--e2e-runs", type=int, default=3, help="real-frames end-to-end runs (their range is reported)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="only the real-frames end-to-end runs (and the stdlib baseline)")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="only the real-frames end-to-end run, py-spy sampling the collector; its summary to FILE")
    a = ap.parse_args(argv)
    if a.profile:
        os.environ.setdefault("ENGINE_LOG_LEVEL", "ERROR")
        raw = Path(tempfile.mkdtemp(prefix="collect_profile_")) / "collector.raw"
        e = bench_e2e(0, 0, real_rows=a.e2e_real_rows or 1_000_000, profile=raw)
        head = (f"collector end to end ({e['what']}): {e['rows']} rows in {e['wall_s']:.2f} s, collector CPU "
                f"{e['cpu_pct']:.0f}%, {e['rows_per_cpu_s'] / 1e6:.3f} M rows per CPU-second (steady), "
                f"{e['rows_per_cpu_s_total'] / 1e6:.3f} M with the final flush; CPU s main/other threads "
                f"{e['thread_cpu_s']['main']:.2f}/{e['thread_cpu_s']['other']:.2f}; load {os.getloadavg()[0]:.1f} on "
                f"{os.cpu_count()} cores\n")
        Path(a.profile).parent.mkdir(parents=True, exist_ok=True)
        Path(a.profile).write_text(head + profile_summary(raw))
        print(head, end="")
        return 0
    os.environ.setdefault("ENGINE_LOG_LEVEL", "ERROR")
    from engine.collect.base import tune_gc

    tune_gc()  # the collector and ingest processes run with these GC settings
    cb = bench_coinbase(a.rows)
    ks = None if a.e2e_only else bench_kalshi(a.kalshi_msgs)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'benchmark (per CPU-second of this process)':<48}{'result':>16}{'target':>14}{'wall':>12}")
    print("-" * 90)
    print(f"{'Coinbase l2_data -> buffer (' + cb['what'][:18] + ')':<48}{cb['ours_rows_s'] / 1e6:>12.2f} M/s{'>= 1.5 M/s':>14}"
          f"{cb['ours_wall'] / 1e6:>8.2f} M/s")
    print(f"{'  stdlib json + row dicts -> same Arrow rows':<48}{cb['base_rows_s'] / 1e6:>12.2f} M/s{'':>14}{cb['base_wall'] / 1e6:>8.2f} M/s")
    print(f"{'  ratio':<48}{cb['ours_rows_s'] / cb['base_rows_s']:>14.1f} x{'>= 5x':>14}")
    print(f"{'  baseline without from_pylist (dicts only)':<48}{cb['dicts_rows_s'] / 1e6:>12.2f} M/s")
    print(f"{'  ratio against the dicts alone':<48}{cb['ours_rows_s'] / cb['dicts_rows_s']:>14.1f} x")
    print(f"{'  frames / rows / rows per frame':<48}{cb['frames']:>8} / {cb['rows']} / {cb['rows_per_frame']:.1f}")
    if ks is not None:
        print(f"{'Kalshi orderbook_delta -> absolute-size rows':<48}{ks['msgs_s'] / 1e6:>12.2f} M/s{'>= 0.5 M/s':>14}"
              f"{ks['msgs_wall'] / 1e6:>8.2f} M/s")
    if not a.skip_e2e and not a.e2e_only:
        e = bench_e2e(a.e2e_seconds, a.e2e_rate)
        print(f"{'End to end: replay -> WS -> collector -> lake':<48}{e['rows_s'] / 1e6:>12.3f} M/s")
        print(f"{'  rows, wall seconds':<48}{e['rows']:>16} {e['wall_s']:.2f} s")
        print(f"{'  collector CPU (one process)':<48}{e['cpu_pct']:>14.0f} %")
        print(f"{'  rows per collector CPU-second':<48}{e['rows_per_cpu_s'] / 1e6:>12.3f} M/s")
        print(f"{'  collector peak RSS':<48}{e['rss_mb']:>13.0f} MB")
    if not a.skip_e2e and a.e2e_real_rows:
        print_real_e2e(a.e2e_real_rows, max(1, a.e2e_runs), cb)
    return 0


def print_real_e2e(rows: int, runs: int, cb: dict) -> None:
    """The real-frames end-to-end runs: rows per collector CPU-second in the steady state (CPU from
    the first frame sent to the last one counted in the status file) and with the final flush (CPU
    from the first frame to the collector's exit after SIGTERM: the figure the target is about),
    each as a range over `runs` runs, and against this run's stdlib parse baseline (above)."""
    import shutil

    cap = real_capture(rows)
    rs = []
    try:
        for _ in range(runs):
            r = bench_e2e(0, 0, capture=cap)
            rs.append(r)
            shutil.rmtree(r["tmp"], ignore_errors=True)
    finally:
        shutil.rmtree(cap[0].parent, ignore_errors=True)

    def rng(key: str) -> str:
        v = sorted(r[key] / 1e6 for r in rs)
        return f"{v[0]:.3f}" if len(v) == 1 else f"{v[0]:.3f}-{v[-1]:.3f}"

    base = cb["base_rows_s"] / 1e6
    total = sorted(r["rows_per_cpu_s_total"] / 1e6 for r in rs)
    print(f"End to end, real frames ({rs[0]['what']}), {runs} run(s) of {rs[0]['rows']} rows; target: >= 0.6 M rows")
    print("  per collector CPU-second, everything the collector does from the first frame to its exit counted")
    print(f"{'  rows/s (wall), M':<48}{rng('rows_s'):>16}")
    print(f"{'  rows per collector CPU-s, steady, M':<48}{rng('rows_per_cpu_s'):>16}")
    print(f"{'  ... with the final flush, M (the target)':<48}{rng('rows_per_cpu_s_total'):>16}{'>= 0.6':>14}"
          f"{'  met' if total[0] >= 0.6 else '  NOT met'}")
    print(f"{'  ... against the stdlib baseline above':<48}{total[0] / base:>11.2f}-{total[-1] / base:.2f} x"
          f"  (stdlib json + row dicts: {base:.2f} M/s)")
    print(f"{'  collector CPU %, peak RSS (highest run)':<48}{max(r['cpu_pct'] for r in rs):>14.0f} % "
          f"{max(r['rss_mb'] for r in rs):.0f} MB")


if __name__ == "__main__":
    raise SystemExit(main())
