"""Soak: the replay exchange plays 6 Coinbase-protocol markets at N x a typical deployment's rate
through collector -> spool -> files -> upload (moto S3 on 127.0.0.1) -> compaction -> queries.

    scripts/soak --minutes 10 --markets 6 --rate-x 50

A typical deployment writes ~2 GB/day of Parquet for 6 instruments at ~12 B/row, i.e.
2e9 / 12 / 86400 ~ 1,930 rows/s; 50x ~ 96,000 rows/s.

Rows in are counted on the wire by the replay exchange (a child process): every l2 row and trade
it sent, per sequence number. Rows stored are read back from the lake after the final upload and
compaction (queries through the S3 read cache). The report asserts equality per sequence number
(so neither loss nor duplication can hide in a total) and unique trade ids.

The capture is generated once (protocol-exact generator) and cached under the work directory; for
runs longer than the capture it is looped; the replay exchange moves each pass's exchange times
forward and gives its trades new ids, so that a loop is new data, not a duplicate.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python benchmarks/<name>.py`: the repo root on sys.path, not benchmarks/
    sys.path[0] = str(ROOT)
TYPICAL_ROWS_PER_S = 2e9 / 12 / 86400  # ~1,930
ROWS_PER_FRAME = 2.84  # generate_coinbase's average rows per frame (l2 updates, trades, heartbeats)
PRODUCTS = ["BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD", "AVAX-USD", "LINK-USD", "ADA-USD", "XRP-USD"]


# ---------------------------------------------------------------------------------------------- capture

def capture_for(workdir: Path, products: list[str], seconds: float, frames_per_s: float, seed: int = 7) -> Path:
    from engine.sim.capture_gen import generate_coinbase, write_capture

    now_h = time.time_ns() // 3_600_000_000_000 * 3_600_000_000_000
    name = f"soak-{len(products)}m-{int(seconds)}s-{int(frames_per_s)}fps-{seed}-{now_h // 86_400_000_000_000}.jsonl"
    p = workdir / "captures" / name
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp = p.with_suffix(".tmp")
        write_capture(generate_coinbase(products=products, seconds=seconds, rate=frames_per_s, seed=seed, depth=100,
                                        start_ns=now_h), tmp)
        os.replace(tmp, p)
        print(f"generated capture {p.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return p


# ---------------------------------------------------------------------------------------------- replay child

def replay_child(a) -> int:
    """Serve the capture (looped), counting on the wire what goes to the collector."""
    import asyncio

    from engine.sim.replay import Conn, ReplayServer

    counts = {"l2_update_rows": 0, "l2_snapshot_rows": 0, "trades": 0, "frames": 0}
    per_seq: dict[int, array] = {}

    class CountingConn(Conn):
        def put(self, item) -> None:
            if self.alive and isinstance(item, str):
                counts["frames"] += 1
                h = item[:40]
                if '"l2_data"' in h:
                    n = item.count('"price_level"')
                    if '"snapshot"' in item[:200]:
                        counts["l2_snapshot_rows"] += n
                    else:
                        counts["l2_update_rows"] += n
                        i = item.find('"sequence_num":') + 15
                        j = item.find(",", i)
                        seq = int(item[i:j])
                        arr = per_seq.setdefault(self.id, array("I"))
                        if seq >= len(arr):
                            arr.extend([0] * (seq + 1 - len(arr) + 65536))
                        arr[seq] += n
                elif '"market_trades"' in h:
                    counts["trades"] += item.count('"trade_id"')
            super().put(item)

    class CountingServer(ReplayServer):
        conn_cls = CountingConn

    stop_feed = {"flag": False}
    signal.signal(signal.SIGUSR1, lambda *_: stop_feed.__setitem__("flag", True))
    done = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: done.__setitem__("flag", True))
    with CountingServer.run_in_thread(source="coinbase", capture=a.capture, speed=a.speed, loop_capture=True) as srv:
        Path(a.url_file).write_text(srv.ws_url)
        while not stop_feed["flag"] and not done["flag"]:
            time.sleep(0.1)
        # stop feeding, then wait until every queued frame has gone out
        srv._loop.call_soon_threadsafe(lambda: srv._feed_task.cancel() if srv._feed_task else None)
        end = time.monotonic() + 60
        while time.monotonic() < end and any(c.alive and c.q.qsize() for c in list(srv._conns)):
            time.sleep(0.05)
        time.sleep(0.3)
        st = srv.stats()
        out = dict(counts, frames_sent=st["frames_sent"], connections=st["connections"], loops=st["loops"],
                   per_seq_file=a.out + ".seq")
        import numpy as np

        conns = sorted(per_seq)
        np.savez(a.out + ".seq", **{f"c{c}": np.frombuffer(per_seq[c], dtype=np.uint32) for c in conns})
        Path(a.out).write_text(json.dumps(out))
        while not done["flag"]:
            time.sleep(0.1)
    return 0


# ---------------------------------------------------------------------------------------------- sampling

def _proc_sample(pid: int) -> tuple[float, int] | None:
    """(cpu seconds, rss bytes) of a process from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        rss = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        return cpu, rss
    except (OSError, IndexError, ValueError):
        return None


def _status(home: Path) -> dict:
    try:
        return json.loads((home / "status" / "coinbase.json").read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------- soak

def run_soak(minutes: float, markets: int = 6, rate_x: float = 50.0, workdir: Path | None = None,
             flush_age_s: float = 60.0, maint_every_s: float = 10.0, compact_every_s: float = 120.0,
             capture_seconds: float | None = None, log=print) -> dict:
    import numpy as np
    import polars as pl

    from engine_tests.conftest import MotoServer

    workdir = Path(workdir or (ROOT / ".bench" / "soak")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    run_dir.mkdir()
    home = run_dir / "lake"
    products = PRODUCTS[:markets]
    duration = minutes * 60.0
    target_rows_s = TYPICAL_ROWS_PER_S * rate_x
    fps = target_rows_s / ROWS_PER_FRAME
    cap_s = capture_seconds or min(duration, 120.0)
    t_gen = time.perf_counter()
    cap = capture_for(workdir, products, cap_s, fps)
    gen_s = time.perf_counter() - t_gen
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALSHI_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    moto = MotoServer().start()
    procs: list[subprocess.Popen] = []
    report: dict = {"minutes": minutes, "markets": products, "rate_x": rate_x, "target_rows_per_s": round(target_rows_s),
                    "capture_seconds": cap_s, "capture_generation_s": round(gen_s, 1)}
    try:
        for k, v in moto.env().items():
            env[k] = v
            os.environ[k] = v
        moto.make_bucket("soak")
        store = "s3://soak/lake"
        url_file, counts_file = run_dir / "replay.url", run_dir / "replay_counts.json"
        replay = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "_replay", "--capture", str(cap),
                                   "--speed", "1", "--url-file", str(url_file), "--out", str(counts_file)],
                                  env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(run_dir / "replay.log", "w"),
                                  start_new_session=True)
        procs.append(replay)
        end = time.monotonic() + 60
        while not url_file.exists() and time.monotonic() < end:
            time.sleep(0.05)
        url = url_file.read_text()
        cenv = dict(env, ENGINE_FLUSH_AGE_S=str(flush_age_s))
        collector_log = run_dir / "collector.log"
        coll = subprocess.Popen([sys.executable, "-m", "engine.cli", "collect", "--home", str(home), "--source", "coinbase",
                                 "--products", *products, "--coinbase-url", url, "--coinbase-stall", "30",
                                 "--status-interval", "1"], env=cenv, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=open(collector_log, "w"), start_new_session=True)
        procs.append(coll)
        from engine import Engine

        samples, maint, lags, queries = [], [], [], []
        t_start = time.monotonic()
        last_maint = last_compact = t_start
        prev = None
        prev_r = None
        while time.monotonic() - t_start < duration:
            time.sleep(1.0)
            now = time.monotonic()
            s = _proc_sample(coll.pid)
            r = _proc_sample(replay.pid)
            st = _status(home)
            if s:
                cpu_pct = None if prev is None else 100 * (s[0] - prev[1]) / (now - prev[0])
                rcpu = None if (prev_r is None or r is None) else 100 * (r[0] - prev_r[1]) / (now - prev_r[0])
                samples.append({"t": round(now - t_start, 1), "rss_mb": round(s[1] / 2**20, 1), "cpu_pct": cpu_pct,
                                "replay_cpu_pct": rcpu, "rows": st.get("rows", 0)})
                prev = (now, s[0])
                if r:
                    prev_r = (now, r[0])
            if now - last_maint >= maint_every_s:
                last_maint = now
                t0 = time.perf_counter()
                eng = Engine.open(home, store, background=False, writer=True)
                up = eng.upload()
                wm = eng.catalog.watermark("coinbase")
                lags.append((time.time_ns() - wm) / 1e9 if wm else None)
                compacted = 0
                if now - last_compact >= compact_every_s:  # open-day compaction while the collector writes
                    last_compact = now
                    from engine.lake.compaction import compact_partition

                    for part in eng.catalog.partitions(table="l2"):
                        if len(eng.catalog.files_in(part)) >= 2 and all(e.remote for e in eng.catalog.files_in(part)):
                            compacted += compact_partition(eng, part) is not None
                q0 = time.perf_counter()
                n = eng.l2(market=products[0], start=time.time_ns() - 120 * 10**9).height
                queries.append(time.perf_counter() - q0)
                maint.append({"t": round(now - t_start, 1), "uploaded": up["uploaded"], "failed": up["failed"],
                              "compacted": compacted, "query_rows": n, "seconds": round(time.perf_counter() - t0, 2)})
                eng.close()
                log(f"[soak {now - t_start:6.0f}s] rows {st.get('rows', 0):>11,}  rss {samples[-1]['rss_mb']:7.1f} MB  "
                    f"cpu {samples[-1]['cpu_pct'] or 0:5.1f}%  uploaded {up['uploaded']}  compacted {compacted}  "
                    f"lag {lags[-1] or 0:.1f}s")
        # stop the exchange's feed, let the collector drain, then stop it (final flush)
        replay.send_signal(signal.SIGUSR1)
        end = time.monotonic() + 120
        while not counts_file.exists() and time.monotonic() < end:
            time.sleep(0.1)
        counts = json.loads(counts_file.read_text())
        end = time.monotonic() + 60
        while time.monotonic() < end and _status(home).get("frames", 0) < counts["frames_sent"]:
            time.sleep(0.2)
        feed_s = time.monotonic() - t_start
        final_status = _status(home)
        coll.send_signal(signal.SIGTERM)
        coll.wait(120)
        replay.send_signal(signal.SIGTERM)
        replay.wait(30)
        # final maintenance: upload everything, compact every partition, then read back from S3
        eng = Engine.open(home, store, background=False, writer=True)
        t0 = time.perf_counter()
        up = eng.upload()
        from engine.lake.compaction import compact_partition

        for part in eng.catalog.partitions():
            if part[0] in ("l2", "trades", "gaps"):
                compact_partition(eng, part)
        final_maint_s = time.perf_counter() - t0
        problems = eng.verify()
        entries = eng.catalog.entries()
        t0 = time.perf_counter()
        l2 = eng.l2(allow_unsealed=True, columns=["seq", "snapshot"])
        read_s = time.perf_counter() - t0
        tr = eng.trades(allow_unsealed=True, columns=["instrument", "trade_id"])
        gaps = eng.gaps(allow_unsealed=True)
        eng.close()
        upd = l2.filter(~pl.col("snapshot"))
        stored_updates = upd.height
        seqs = np.load(counts["per_seq_file"] + ".npz")
        per_seq_equal = None
        if counts["connections"] == 1 and len(seqs.files) == 1:
            sent = seqs[seqs.files[0]].astype(np.int64)
            got = np.bincount(upd["seq"].to_numpy(), minlength=len(sent)).astype(np.int64)
            if len(got) > len(sent):
                sent = np.pad(sent, (0, len(got) - len(sent)))
            diff = np.nonzero(got != sent)[0]
            per_seq_equal = diff.size == 0
            report["per_seq_mismatches"] = int(diff.size)
            report["per_seq_first_mismatch"] = (
                None if not diff.size else {"seq": int(diff[0]), "sent": int(sent[diff[0]]), "stored": int(got[diff[0]])})
        trade_dups = tr.height - tr.select("instrument", "trade_id").unique().height
        # flush latency from the collector's log
        flush_s = []
        for line in collector_log.read_text().splitlines():
            if '"file_written"' in line:
                try:
                    flush_s.append(json.loads(line)["seconds"])
                except (ValueError, KeyError):
                    pass
        raw = [e for e in entries if not e.compacted]
        rss = [x["rss_mb"] for x in samples]
        cpu = [x["cpu_pct"] for x in samples if x["cpu_pct"] is not None]
        rcpu = [x["replay_cpu_pct"] for x in samples if x["replay_cpu_pct"] is not None]
        hours = feed_s / 3600
        n_files_written = len(flush_s)
        bytes_written = sum(e.bytes for e in entries if e.table in ("l2", "trades"))
        third = max(1, len(rss) // 3)
        report.update({
            "feed_seconds": round(feed_s, 1),
            "rows_in": {"l2_updates": counts["l2_update_rows"], "l2_snapshot_rows": counts["l2_snapshot_rows"],
                        "trades": counts["trades"], "frames": counts["frames_sent"], "connections": counts["connections"],
                        "capture_loops": counts["loops"]},
            "rows_stored": {"l2_updates": stored_updates, "l2_snapshot_and_anchor_rows": l2.height - stored_updates,
                            "trades": tr.height, "gaps": gaps.height},
            "rows_equal": stored_updates == counts["l2_update_rows"] and tr.height == counts["trades"],
            "per_seq_equal": per_seq_equal,
            "trade_duplicates": trade_dups,
            "rows_per_s_sustained": round((counts["l2_update_rows"] + counts["l2_snapshot_rows"] + counts["trades"]) / feed_s),
            "collector_frames_received": final_status.get("frames"),
            "rss_mb": {"start": rss[min(2, len(rss) - 1)] if rss else None, "end": rss[-1] if rss else None,
                       "max": max(rss) if rss else None, "mean": round(sum(rss) / len(rss), 1) if rss else None,
                       "first_third_mean": round(sum(rss[:third]) / third, 1) if rss else None,
                       "last_third_mean": round(sum(rss[-third:]) / third, 1) if rss else None,
                       **rss_trend(samples)},
            "collector_cpu_pct_mean": round(sum(cpu) / len(cpu), 1) if cpu else None,
            "replay_cpu_pct_mean": round(sum(rcpu) / len(rcpu), 1) if rcpu else None,
            "files_written": n_files_written, "files_per_hour": round(n_files_written / hours),
            "bytes_per_hour": round(sum(e.bytes for e in raw if e.table in ("l2", "trades")) / hours) if raw else
            round(bytes_written / hours),
            "bytes_per_row": round(bytes_written / max(1, l2.height + tr.height), 2),
            "flush_latency_s": {"p50": _pct(flush_s, 50), "p95": _pct(flush_s, 95), "max": max(flush_s) if flush_s else None},
            "sync_lag_s": {"p50": _pct([x for x in lags if x is not None], 50),
                           "max": max([x for x in lags if x is not None], default=None)},
            "query_s": {"p50": _pct(queries, 50), "max": max(queries, default=None)},
            "final_upload": {"uploaded": up["uploaded"], "failed": up["failed"]},
            "final_maintenance_s": round(final_maint_s, 2),
            "read_all_l2_from_s3_s": round(read_s, 2),
            "verify_problems": [f"{p.key}: {p.problem}" for p in problems],
            "files_after_compaction": len([e for e in entries if e.table in ("l2", "trades")]),
            "samples": samples, "maintenance": maint, "run_dir": str(run_dir),
        })
        return report
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait(10)
        moto.stop()


def rss_trend(samples: list[dict]) -> dict:
    """Linear fit of RSS over the last third of the run: its slope (MB/min) and the growth it makes
    over that third as a share of the run's mean RSS (memory that has levelled off: a few %)."""
    if len(samples) < 6:
        return {"last_third_slope_mb_per_min": None, "last_third_growth_pct_of_mean": None}
    import numpy as np

    t = np.array([x["t"] for x in samples], float)
    rss = np.array([x["rss_mb"] for x in samples], float)
    last = t >= t[0] + (t[-1] - t[0]) * 2 / 3
    slope = float(np.polyfit(t[last], rss[last], 1)[0])  # MB/s
    growth = slope * (t[last][-1] - t[last][0])
    return {"last_third_slope_mb_per_min": round(slope * 60, 2),
            "last_third_growth_pct_of_mean": round(100 * growth / float(rss.mean()), 2)}


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * q / 100))], 3)


def summary_lines(r: dict) -> list[str]:
    ri, rs = r["rows_in"], r["rows_stored"]
    return [
        f"soak: {r['minutes']} min, {len(r['markets'])} markets, {r['rate_x']}x typical (target {r['target_rows_per_s']:,} rows/s)",
        f"  rows in (on the wire):  l2 updates {ri['l2_updates']:,}  snapshot rows {ri['l2_snapshot_rows']:,}  trades {ri['trades']:,}"
        f"  ({ri['frames']:,} frames, {ri['connections']} connection(s), {ri['capture_loops']} capture loop(s))",
        f"  rows stored:            l2 updates {rs['l2_updates']:,}  snapshot+anchor rows {rs['l2_snapshot_and_anchor_rows']:,}"
        f"  trades {rs['trades']:,}  gaps {rs['gaps']}",
        f"  equal: {r['rows_equal']}  per-sequence equal: {r['per_seq_equal']}  trade duplicates: {r['trade_duplicates']}"
        f"  verify problems: {len(r['verify_problems'])}",
        f"  sustained {r['rows_per_s_sustained']:,} rows/s; collector CPU {r['collector_cpu_pct_mean']}% (replay {r['replay_cpu_pct_mean']}%)",
        f"  collector RSS MB start {r['rss_mb']['start']} end {r['rss_mb']['end']} mean {r['rss_mb'].get('mean')}"
        f" max {r['rss_mb']['max']} (first third mean {r['rss_mb']['first_third_mean']}, last third"
        f" {r['rss_mb']['last_third_mean']}); last third: slope {r['rss_mb'].get('last_third_slope_mb_per_min')} MB/min,"
        f" growth {r['rss_mb'].get('last_third_growth_pct_of_mean')}% of the mean",
        f"  files {r['files_written']} ({r['files_per_hour']:,}/h), {r['bytes_per_hour'] / 2**20:,.0f} MiB/h raw, "
        f"{r['bytes_per_row']} B/row after compaction; flush latency p50 {r['flush_latency_s']['p50']} s max {r['flush_latency_s']['max']} s",
        f"  sync-boundary lag p50 {r['sync_lag_s']['p50']} s max {r['sync_lag_s']['max']} s; query p50 {r['query_s']['p50']} s;"
        f" final upload+compaction {r['final_maintenance_s']} s; read all l2 back from S3 {r['read_all_l2_from_s3_s']} s",
    ]


def budget_problems(r: dict, min_rate_fraction: float = 0.8, max_rss_growth_mb: float = 100.0,
                    max_rss_slope_pct: float | None = None) -> list[str]:
    """The soak's performance budgets (throughput, memory growth), checked here by the benchmark and
    by the `-m slow` long soak, not by the default test suite: a shared machine's timings are not a
    test verdict."""
    out = []
    if r["rows_per_s_sustained"] <= min_rate_fraction * r["target_rows_per_s"]:
        out.append(f"sustained {r['rows_per_s_sustained']:,} rows/s <= {min_rate_fraction} x target "
                   f"{r['target_rows_per_s']:,}")
    rss = r["rss_mb"]
    if rss["first_third_mean"] is not None and rss["last_third_mean"] - rss["first_third_mean"] >= max_rss_growth_mb:
        out.append(f"collector RSS grew {rss['last_third_mean'] - rss['first_third_mean']:.1f} MB "
                   f"(first to last third of the run) >= {max_rss_growth_mb} MB")
    g = rss.get("last_third_growth_pct_of_mean")
    if max_rss_slope_pct is not None and g is not None and g > max_rss_slope_pct:
        out.append(f"collector RSS still growing over the last third: {g}% of the mean RSS "
                   f"({rss['last_third_slope_mb_per_min']} MB/min) > {max_rss_slope_pct}%")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_replay":
        ap = argparse.ArgumentParser()
        ap.add_argument("--capture")
        ap.add_argument("--speed", type=float, default=1.0)
        ap.add_argument("--url-file")
        ap.add_argument("--out")
        return replay_child(ap.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--markets", type=int, default=6)
    ap.add_argument("--rate-x", type=float, default=50.0, help="multiple of a typical deployment's ~1,930 rows/s")
    ap.add_argument("--flush-age", type=float, default=60.0, help="collector flush age (s), besides the hour close")
    ap.add_argument("--maint-every", type=float, default=10.0, help="upload + query period (s)")
    ap.add_argument("--compact-every", type=float, default=120.0, help="open-day compaction period (s)")
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "soak"))
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--min-rate-fraction", type=float, default=0.8,
                    help="budget: sustained rows/s above this fraction of the target")
    ap.add_argument("--max-rss-growth-mb", type=float, default=100.0,
                    help="budget: collector RSS growth (mean of the last third minus the first third of the run)")
    ap.add_argument("--max-rss-slope-pct", type=float, default=5.0,
                    help="budget: RSS growth over the last third of the run (linear fit) as %% of the mean RSS")
    a = ap.parse_args(argv)
    r = run_soak(a.minutes, a.markets, a.rate_x, Path(a.workdir), a.flush_age, a.maint_every, a.compact_every,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(summary_lines(r)))
    over = budget_problems(r, a.min_rate_fraction, a.max_rss_growth_mb, a.max_rss_slope_pct)
    print(f"  budgets (rate > {a.min_rate_fraction} x target, RSS growth < {a.max_rss_growth_mb} MB, last-third RSS "
          f"growth <= {a.max_rss_slope_pct}% of the mean): "
          + ("; ".join(over) if over else "met"))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=1))
    ok = r["rows_equal"] and r["per_seq_equal"] is not False and not r["trade_duplicates"] and not r["verify_problems"]
    return 0 if ok and not over else 1


if __name__ == "__main__":
    raise SystemExit(main())
