"""Scale soak: 100 Coinbase-like products and 20 Kalshi-like series, at the generators' own rate per
instrument, played by the replay exchange to 1 and then 2 collector shards, side by side.

    scripts/bench_scale --minutes 10 --products 100 --series 20 --shards 1 2

Rates: a generator's default `rate` is for its default markets (Coinbase 200 messages/s for 3
products, Kalshi 100/s for 3 series), so one instrument is 66.7 (Coinbase) and 33.3 (Kalshi)
messages/s; the soak scales the instrument count, not the rate (100 products: 6,667 messages/s;
20 series: 667/s). Names: products `P000-USD`..., series `KXS00`....

Per configuration (N shards, as `./scripts/run --shards N` runs them: each collector its own home,
a keeper beside each, one store): the replay exchanges (one child process per exchange) count on the
wire, per connection, market and table, the rows of every frame they sent (`wire_rows` of the
exchange's replay protocol) and the time it went out; after the feed stops and the collectors have
read every frame sent, the collectors are stopped (final flush), then the keepers (final upload).
Rows stored are counted through a fresh reader merging every shard's manifest part, and compared
per (source, market): l2 updates, l2 snapshot rows (book anchors, the designed extra snapshot rows
at the start of each later file, are told apart by their sequence numbers) and trades.

Reported per configuration: CPU per shard (user+sys CPU-seconds of each collector process / wall
over the feed), each collector's peak RSS (its /proc VmHWM, final flush included), rows/s, rows in = stored, lag: exchange time to receive time (p50/p99, the replay's
start-up offset removed; it includes the simulated exchange's own delay, e.g. Coinbase l2 event
times 20-300 ms before the frame), and how far behind the feed each collector fell: its receive time
minus the time the exchange sent the same frame (matched by connection and sequence number).
"""

from __future__ import annotations

import argparse
import inspect
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

# the simulated instruments: (generator keyword naming them, name of the i-th)
MARKETS = {"coinbase": ("products", "P{:03d}-USD"), "kalshi": ("series", "KXS{:02d}")}


def market_names(counts: dict[str, int]) -> dict[str, list[str]]:
    return {src: [MARKETS[src][1].format(i) for i in range(n)] for src, n in counts.items() if n}


def per_market_rate(source: str) -> float:
    """The generator's default messages/s divided by its default number of markets."""
    from engine.sim import registry

    params = inspect.signature(registry.get(source).generator).parameters
    return params["rate"].default / len(params[MARKETS[source][0]].default)


# ---------------------------------------------------------------------------------------------- captures

def capture_for(workdir: Path, source: str, markets: list[str], seconds: float, seed: int = 11) -> Path:
    """A generated capture (cached per day: the replay exchange moves its times to the present)."""
    from engine.sim import registry
    from engine.sim.capture import write_capture

    day_ns = time.time_ns() // 86_400_000_000_000 * 86_400_000_000_000
    rate = per_market_rate(source) * len(markets)
    p = workdir / "captures" / f"{source}-{len(markets)}m-{int(seconds)}s-{seed}-{day_ns // 10**9}.jsonl"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp = p.with_suffix(".tmp")
        gen = registry.get(source).generator
        write_capture(gen(**{MARKETS[source][0]: markets}, seconds=seconds, rate=rate, seed=seed,
                          start_ns=day_ns + 12 * 3600 * 10**9), tmp)
        os.replace(tmp, p)
        print(f"generated {p.name} ({rate:,.0f} messages/s) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return p


# ---------------------------------------------------------------------------------------------- replay child

def replay_child(a) -> int:
    """Serve a capture (looped), counting on the wire the rows of every frame sent, per connection."""
    import numpy as np
    from websockets.exceptions import ConnectionClosed

    from engine.sim.replay import Conn, ReplayServer
    from engine.sim.replay.conn import ABORT, STOP

    rows: dict[tuple[int, str, str, bool], int] = {}  # (conn, market, table, snapshot) -> rows sent
    sent: dict[tuple[int, str, bool], tuple[array, array]] = {}  # (conn, table, snapshot) -> seqs, send times
    late = array("q")  # per data frame: feed time - scheduled exchange time (offset not removed)
    span = [0, 0]  # wall times of the first and the last data frame sent

    class CountingConn(Conn):
        def put(self, item) -> None:
            if self.alive and isinstance(item, str):
                srv = self.server
                item = (item, time.time_ns() - srv.clock_ns - srv.shift_ns)
            super().put(item)

        async def writer(self) -> None:
            st = self.server.counters
            wire_rows = self.server.protocol.wire_rows
            try:
                while True:
                    item = await self.q.get()
                    if item is STOP:
                        return
                    if item is ABORT:
                        self.ws.transport.abort()
                        return
                    text, lateness = item
                    await self.ws.send(text)
                    now = time.time_ns()
                    st["frames_sent"] += 1
                    st["bytes_sent"] += len(text)
                    data = False
                    for w in wire_rows(text):
                        k = (self.id, w.market, w.table, w.snapshot)
                        rows[k] = rows.get(k, 0) + w.rows
                        if w.seq is not None:
                            seqs, times = sent.setdefault((self.id, w.table, w.snapshot), (array("q"), array("q")))
                            seqs.append(w.seq)
                            times.append(now)
                        data = data or not w.snapshot
                    if data:
                        late.append(lateness)
                        span[0] = span[0] or now
                        span[1] = now
            except ConnectionClosed:
                pass
            finally:
                self.alive = False

    class CountingServer(ReplayServer):
        conn_cls = CountingConn

    flags = {"drain": False, "done": False}
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("drain", True))
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("done", True))
    out = Path(a.out)
    with CountingServer.run_in_thread(source=a.source, capture=a.capture, speed=a.speed, loop_capture=True,
                                      kalshi_public_key=a.kalshi_public_key) as srv:
        _write_json(out.with_suffix(".port"), {"port": srv.port})
        while not flags["drain"] and not flags["done"]:
            _write_json(out.with_suffix(".stats"), srv.stats())
            time.sleep(0.5)
        # stop feeding, then wait until every queued frame has gone out
        srv._loop.call_soon_threadsafe(lambda: srv._feed_task.cancel() if srv._feed_task else None)
        end = time.monotonic() + 60
        while time.monotonic() < end and any(c.alive and c.q.qsize() for c in list(srv._conns)):
            time.sleep(0.05)
        time.sleep(0.3)
        _write_json(out.with_suffix(".drained"), srv.stats())
        while not flags["done"]:
            time.sleep(0.1)
        stats = srv.stats()
    lat = np.frombuffer(late, dtype=np.int64) if len(late) else np.zeros(1, dtype=np.int64)
    offset = int(lat.min())
    _write_json(out, {
        "stats": stats,
        "first_data_ns": span[0], "last_data_ns": span[1],
        "offset_ns": offset,  # when the first frames were sent, relative to their (shifted) capture times
        "feed_late_ms": {"p50": _ms(np.percentile(lat - offset, 50)), "p99": _ms(np.percentile(lat - offset, 99)),
                         "max": _ms((lat - offset).max())},
        "rows": [{"conn": c, "market": m, "table": t, "snapshot": s, "rows": n} for (c, m, t, s), n in rows.items()],
    })
    np.savez(out.with_suffix(".npz"), **{f"{c}|{t}|{int(s)}|{kind}": np.frombuffer(arr, dtype=np.int64)
                                          for (c, t, s), pair in sent.items() for kind, arr in zip(("seq", "sent"), pair)})
    return 0


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _ms(ns) -> float:
    return round(float(ns) / 1e6, 1)


# ---------------------------------------------------------------------------------------------- processes

def _cpu_s(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _hwm_mb(pid: int) -> float | None:
    """A live process's peak RSS since its exec (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reap(p: subprocess.Popen, timeout: float) -> dict:
    """Wait for a child: its CPU time (wait4) and its peak RSS (VmHWM, read until it exits).

    Not wait4's ru_maxrss: Linux carries the parent's peak across fork and exec into the child's,
    so every child this soak starts after counting a lake reports at least the soak's own peak."""
    end = time.monotonic() + timeout
    hwm = None
    while True:
        h = _hwm_mb(p.pid)
        hwm = h if hwm is None or (h is not None and h > hwm) else hwm
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return {"rc": p.returncode, "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
                    "hwm_mb": None if hwm is None else round(hwm), "ru_maxrss_mb": round(ru.ru_maxrss / 1024)}
        if time.monotonic() > end:
            return {"rc": None, "cpu_s": None, "hwm_mb": None, "ru_maxrss_mb": None}
        time.sleep(0.05)


def _logged_peak_mb(log_path: Path) -> float | None:
    """The peak RSS a collector logged as it stopped (after its final flush)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if '"collector_stopped"' in line:
            try:
                return json.loads(line).get("peak_rss_mb")
            except ValueError:
                return None
    return None


def _status(home: Path, source: str) -> dict:
    try:
        return json.loads((home / "status" / f"{source}.json").read_text())
    except (OSError, ValueError):
        return {}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _wait(cond, timeout: float, what: str, step: float = 0.2, procs=()):
    """cond() once true; an error on timeout or when one of `procs` exited."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{' '.join(dead[0].args[:6])}... exited ({dead[0].returncode}) while waiting for {what}")
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


# ---------------------------------------------------------------------------------------------- one configuration

def run_config(n_shards: int, markets: dict[str, list[str]], caps: dict[str, Path], run_dir: Path, seconds: float,
               flush_age_s: float = 60.0, keep_every_s: float = 30.0, log=print) -> dict:
    """N collector shards (+ keepers) against one replay exchange per source for `seconds` of feed."""
    from engine.collect import registry, shards
    from engine.lake import shard as shard_id
    from engine.paths import Layout

    d = run_dir / f"shards{n_shards}"
    d.mkdir(parents=True)
    store, home = d / "store", d / "lake"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KALSHI_", "ENGINE_", "COINBASE_"))}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), ENGINE_STORE=str(store),
               ENGINE_FLUSH_AGE_S=str(flush_age_s), PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], e: dict) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(d / f"{name}.log", "wb"),
                             stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        return p

    try:
        replays, outs, collect = {}, {}, []
        for src, cap in caps.items():
            demo = registry.get(src).demo(d / "demo")  # throw-away credentials (Kalshi signs its connections)
            outs[src] = d / f"replay-{src}.json"
            replays[src] = start(f"replay-{src}", [sys.executable, str(Path(__file__).resolve()), "_replay", "--source", src,
                                                   "--capture", str(cap), "--out", str(outs[src]), *demo.replay_args],
                                 dict(env, PYTHONPATH=env["PYTHONPATH"]))
            env.update(demo.env)
        collect = ["--source", *markets, "--status-interval", "1"]
        for src, ms in markets.items():
            s = registry.get(src)
            port = _wait(lambda: (_read_json(outs[src].with_suffix(".port")) or {}).get("port"), 120, f"replay {src}",
                         procs=[replays[src]])
            collect += [s.markets_option or f"--{src}-markets", *ms, *s.local_args(port), f"--{src}-stall", "30"]
        plan = shards.assign(markets, n_shards)
        homes = [shards.shard_home(home, i) for i in range(n_shards)] if n_shards > 1 else [home]
        colls, keepers = [], []
        soak_hwm = round(_hwm_mb(os.getpid()) or 0)
        for i, h in enumerate(homes):
            ids = []
            if n_shards > 1:  # claimed before either process opens the home (as scripts/run does)
                shard_id.claim(Layout(h), i, shards=n_shards, markets=plan[i], store=str(store))
                ids = ["--shard-id", str(i)]
            colls.append(start(f"collector-{i}", [sys.executable, "-m", "engine.cli", "collect", "--home", str(h), *collect,
                                                  *ids, *(["--shards", str(n_shards)] if ids else [])], env))
            keepers.append(start(f"keeper-{i}", [sys.executable, "-m", "engine.cli", "keep", "--home", str(h),
                                                 "--every", str(keep_every_s), *ids], env))
        want = [(h, src) for h, part in zip(homes, plan) for src in part]
        _wait(lambda: all(_status(h, src).get("connected") for h, src in want), 120, "every collector connected",
              procs=[*colls, *replays.values()])
        t0 = time.monotonic()
        cpu0 = [_cpu_s(p.pid) for p in colls]
        last_log = t0
        while time.monotonic() - t0 < seconds:
            time.sleep(1.0)
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a process exited during the feed; see the logs in {d}")
            if time.monotonic() - last_log >= 15:
                last_log = time.monotonic()
                el = last_log - t0
                cpus = [((_cpu_s(p.pid) or 0) - (c or 0)) / el for p, c in zip(colls, cpu0)]
                log(f"[shards {n_shards} {el:5.0f}s] rows " + "  ".join(
                    f"{src} {sum(_status(h, src).get('rows', 0) for h in homes):,}" for src in markets)
                    + "  collector cpu " + " ".join(f"{c:.0%}" for c in cpus))
        # stop the feeds; the collectors read what was sent; then stop them (final flush), then the keepers
        for p in replays.values():
            p.send_signal(signal.SIGUSR1)
        drained = {src: _wait(lambda: _read_json(outs[src].with_suffix(".drained")), 90, f"replay {src} drained",
                                 procs=[replays[src]])
                   for src in markets}
        t_drain = time.monotonic()
        for src in markets:
            _wait(lambda: sum(_status(h, src).get("frames", 0) for h, part in zip(homes, plan) if src in part)
                  >= drained[src]["frames_sent"], 180, f"the collectors to read every {src} frame sent",
                  procs=colls)
        caught_up_s = time.monotonic() - t_drain
        wall = time.monotonic() - t0
        cpu1 = [_cpu_s(p.pid) for p in colls]
        status = {src: [_status(h, src) for h, part in zip(homes, plan) if src in part] for src in markets}
        for p in colls:
            p.send_signal(signal.SIGTERM)
        coll_ru = [_reap(p, 180) for p in colls]
        peak_mb = [max((x for x in (r["hwm_mb"], _logged_peak_mb(d / f"collector-{i}.log")) if x is not None), default=None)
                   for i, r in enumerate(coll_ru)]
        for p in keepers:
            p.send_signal(signal.SIGTERM)
        keep_ru = [_reap(p, 180) for p in keepers]
        for p in replays.values():
            p.send_signal(signal.SIGTERM)
        replay_ru = {src: _reap(p, 60) for src, p in replays.items()}
        wire = {src: _read_json(outs[src]) for src in markets}
        if any(w is None for w in wire.values()):
            raise RuntimeError(f"a replay exchange wrote no counts; see {d}/replay-*.log")
        stored = lake_counts(d / "reader", store)
        out = compare(markets, wire, {src: outs[src].with_suffix(".npz") for src in markets}, stored)
        out.update({
            "shards": n_shards, "plan": plan, "feed_s": round(t_drain - t0, 1), "caught_up_after_feed_s": round(caught_up_s, 1),
            "cpu_per_shard": [round((b - a) / wall, 3) if a is not None and b is not None else None
                              for a, b in zip(cpu0, cpu1)],
            "collector_cpu_s_total": [r["cpu_s"] for r in coll_ru], "collector_max_rss_mb": [None if x is None else round(x) for x in peak_mb],
            # wait4's figure, for comparison only: at least the soak's own peak when the collector started
            "collector_ru_maxrss_mb": [r["ru_maxrss_mb"] for r in coll_ru], "soak_peak_rss_mb_at_start": soak_hwm,
            "collector_rc": [r["rc"] for r in coll_ru], "keeper_cpu_s": [r["cpu_s"] for r in keep_ru],
            "replay_cpu_s": {src: r["cpu_s"] for src, r in replay_ru.items()},
            "reconnects": {src: sum(s.get("reconnects", 0) for s in sts) for src, sts in status.items()},
            "skipped": {src: sum(s.get("skipped_frames", 0) + s.get("skipped_rows", 0) for s in sts)
                        for src, sts in status.items()},
            "replay": {src: {"offset_ms": _ms(w["offset_ns"]), "feed_late_ms": w["feed_late_ms"],
                             "frames_sent": w["stats"]["frames_sent"], "loops": w["stats"]["loops"],
                             "connections": w["stats"]["connections"]} for src, w in wire.items()},
            "dir": str(d),
        })
        # over the time data went out (from the first subscription, a little before every shard had connected)
        sent_s = (max(w["last_data_ns"] for w in wire.values()) - min(w["first_data_ns"] for w in wire.values())) / 1e9
        out["rows_per_s"] = round(out["rows_in_total"] / sent_s)
        return out
    finally:
        for p in procs:
            if p.poll() is None and p.returncode is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                _reap(p, 10)


# ---------------------------------------------------------------------------------------------- lake side

def lake_counts(reader_home: Path, store: Path) -> dict:
    """What a fresh reader merging every shard's manifest part sees: rows per (table, source, market,
    snapshot), snapshot row groups, each frame's first receive time per sequence number, gaps, the
    shard of every file, and exchange-to-receive lag quantiles."""
    from engine import Engine
    from engine.paths import parse_key

    r = Engine.open(reader_home, store=str(store))
    try:
        q = lambda s: r.sql(s, allow_unsealed=True, raw_ns=True)  # noqa: E731
        counts = q("SELECT 'l2' AS tbl, source, market, snapshot, count(*) AS n FROM l2 GROUP BY ALL "
                   "UNION ALL SELECT 'trades', source, market, false, count(*) FROM trades GROUP BY ALL")
        snaps = q("SELECT source, market, seq, recv_ts AS recv, count(*) AS n FROM l2 WHERE snapshot GROUP BY ALL")
        frames = q("SELECT 'l2' AS tbl, source, market, seq, min(recv_ts) AS recv FROM l2 WHERE NOT snapshot GROUP BY ALL "
                   "UNION ALL SELECT 'trades', source, market, seq, min(recv_ts) FROM trades GROUP BY ALL")
        lag = q("SELECT source, quantile_cont(recv_ts - ts, 0.5) AS p50, quantile_cont(recv_ts - ts, 0.99) AS p99, "
                "max(recv_ts - ts) AS mx FROM l2 WHERE NOT snapshot GROUP BY source")
        gaps = r.gaps(allow_unsealed=True, raw_ns=True)
        shard_of: dict[tuple[str, str], set] = {}
        for e in r.catalog.entries():
            if e.table in ("l2", "trades"):
                shard_of.setdefault((e.source, e.market), set()).add(parse_key(e.key).shard)
        return {"counts": counts, "snaps": snaps, "frames": frames, "lag": lag, "gaps": gaps, "shard_of": shard_of}
    finally:
        r.close()


def compare(markets: dict[str, list[str]], wire: dict, npz: dict[str, Path], lake: dict) -> dict:
    """Rows in (on the wire) against rows stored, per (source, market); lags."""
    import numpy as np
    import polars as pl

    out_markets, mismatches, anchors = [], [], 0
    feed_lag, exch_lag = {}, {}
    totals = {"in": {"l2_updates": 0, "l2_snapshot": 0, "trades": 0}, "stored": {"l2_updates": 0, "l2_snapshot": 0, "trades": 0}}
    counts = {(t, s, m, bool(sn)): n for t, s, m, sn, n in lake["counts"].iter_rows()}
    for src, ms in markets.items():
        rows = wire[src]["rows"]
        conns: dict[str, set] = {}
        for x in rows:
            conns.setdefault(x["market"], set()).add(x["conn"])
        arrays = np.load(npz[src])
        sent = {}
        for k in arrays.files:
            c, t, s, kind = k.split("|")
            sent.setdefault((int(c), t, s == "1"), {})[kind] = arrays[k]
        snaps = lake["snaps"].filter(pl.col("source") == src)
        for m in ms:
            w = {key: sum(x["rows"] for x in rows if x["market"] == m and (x["table"], x["snapshot"]) == key)
                 for key in (("l2", False), ("l2", True), ("trades", False))}
            # snapshot rows sent as snapshots: groups whose seq is a snapshot frame's of that connection, at
            # its first receive time; the other snapshot groups are book anchors (a later file's first rows)
            wire_seqs = set()
            for c in conns.get(m, ()):
                wire_seqs |= set(sent.get((c, "l2", True), {}).get("seq", np.zeros(0, np.int64)).tolist())
            sm = snaps.filter(pl.col("market") == m)
            firsts = sm.filter(pl.col("seq").is_in(list(wire_seqs))).group_by("seq").agg(
                pl.col("n").sort_by("recv").first())
            snap_stored = int(firsts["n"].sum() or 0)
            anchors += int(sm["n"].sum() or 0) - snap_stored
            st = {("l2", False): counts.get(("l2", src, m, False), 0), ("l2", True): snap_stored,
                  ("trades", False): counts.get(("trades", src, m, False), 0)}
            for key, name in ((("l2", False), "l2_updates"), (("l2", True), "l2_snapshot"), (("trades", False), "trades")):
                totals["in"][name] += w[key]
                totals["stored"][name] += st[key]
                if w[key] != st[key]:
                    mismatches.append({"source": src, "market": m, "rows": name, "in": w[key], "stored": st[key]})
            out_markets.append({"source": src, "market": m, "in": sum(w.values()), "stored": sum(st.values()),
                                "shards": sorted(x for x in lake["shard_of"].get((src, m), set()) if x is not None)
                                or ([None] if (src, m) in lake["shard_of"] else [])})
        # behind the feed: receive time minus the time the exchange sent that frame (one connection per market)
        fr = lake["frames"].filter(pl.col("source") == src)
        lags = []
        for (c, t, snap), a in sent.items():
            if snap:
                continue
            mine = [m for m, cs in conns.items() if cs == {c}]
            got = fr.filter((pl.col("tbl") == t) & pl.col("market").is_in(mine)).group_by("seq").agg(pl.col("recv").min())
            s = pl.DataFrame({"seq": a["seq"], "sent": a["sent"]}).group_by("seq").agg(pl.col("sent").min())
            j = got.join(s, on="seq")
            lags.append((j["recv"] - j["sent"]).to_numpy())
        v = np.concatenate(lags) if lags else np.zeros(0)
        feed_lag[src] = ({"p50": _ms(np.percentile(v, 50)), "p99": _ms(np.percentile(v, 99)), "max": _ms(v.max()),
                          "frames": int(v.size)} if v.size else None)
        off = wire[src]["offset_ns"]
        lg = lake["lag"].filter(pl.col("source") == src)
        exch_lag[src] = ({"p50": _ms(lg["p50"][0] - off), "p99": _ms(lg["p99"][0] - off), "max": _ms(lg["mx"][0] - off)}
                         if lg.height else None)
    gaps = lake["gaps"]
    return {
        "rows_in": totals["in"], "rows_stored": totals["stored"], "rows_in_total": sum(totals["in"].values()),
        "rows_equal": not mismatches, "mismatches": mismatches[:20], "n_mismatches": len(mismatches),
        "book_anchor_rows": anchors, "markets": out_markets,
        "markets_on_one_shard": all(len(x["shards"]) == 1 for x in out_markets),
        "gaps": [{k: v for k, v in g.items()} for g in gaps.select("source", "market", "kind", "detail").iter_rows(named=True)],
        "lag_exchange_to_recv_ms": exch_lag, "lag_behind_feed_ms": feed_lag,
    }


# ---------------------------------------------------------------------------------------------- the soak

def run_scale_soak(minutes: float = 10.0, products: int = 100, series: int = 20, shard_counts=(1, 2),
                   workdir: Path | None = None, flush_age_s: float = 60.0, keep_every_s: float = 30.0,
                   capture_seconds: float | None = None, log=print) -> dict:
    workdir = Path(workdir or (ROOT / ".bench" / "scale_soak")).resolve()
    run_dir = workdir / f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    markets = market_names({"coinbase": products, "kalshi": series})
    seconds = minutes * 60.0
    cap_s = capture_seconds or min(seconds + 30, 150.0)  # looped by the exchange when shorter than the run
    t0 = time.perf_counter()
    caps = {src: capture_for(workdir, src, ms, cap_s) for src, ms in markets.items()}
    report = {"minutes": minutes, "markets": {s: len(m) for s, m in markets.items()},
              "messages_per_s": {s: round(per_market_rate(s) * len(m)) for s, m in markets.items()},
              "capture_seconds": cap_s, "capture_generation_s": round(time.perf_counter() - t0, 1),
              "flush_age_s": flush_age_s, "keep_every_s": keep_every_s, "load_before": os.getloadavg()[0],
              "configs": []}
    for n in shard_counts:
        log(f"== {n} shard(s), {minutes} min")
        report["configs"].append(run_config(n, markets, caps, run_dir, seconds, flush_age_s, keep_every_s, log))
    report["run_dir"] = str(run_dir)
    return report


def summary_lines(r: dict) -> list[str]:
    from benchmarks.common import table

    cs = r["configs"]
    ms = r["markets"]
    head = (f"scale soak: {r['minutes']} min per configuration; "
            + ", ".join(f"{src} {n} markets at {r['messages_per_s'][src]:,} messages/s" for src, n in ms.items())
            + f" (the generators' per-instrument rates); files flushed every {r['flush_age_s']:.0f} s, keepers every "
            f"{r['keep_every_s']:.0f} s; load average before {r['load_before']:.1f} on {os.cpu_count()} cores")

    def lag(c, key, src):
        x = c[key].get(src)
        return f"{x['p50']:,.1f} / {x['p99']:,.1f}" if x else "-"

    def ratio(a, b):
        return f"{b / a:.2f}x" if a and b is not None else "-"

    def row(name, f, num=None):
        vals = [f(c) for c in cs]
        out = [name, *vals]
        if num is not None and len(cs) == 2:
            out.append(ratio(num(cs[0]), num(cs[1])))
        elif len(cs) == 2:
            out.append("")
        return tuple(out)

    rows = [
        row("feed seconds (caught up after the feed)", lambda c: f"{c['feed_s']} ({c['caught_up_after_feed_s']})"),
        row("rows in (wire) / s", lambda c: f"{c['rows_per_s']:,}", lambda c: c["rows_per_s"]),
        row("rows in: l2 updates / snapshot / trades",
            lambda c: " / ".join(f"{c['rows_in'][k]:,}" for k in ("l2_updates", "l2_snapshot", "trades"))),
        row("rows stored (fresh reader, all shards)",
            lambda c: " / ".join(f"{c['rows_stored'][k]:,}" for k in ("l2_updates", "l2_snapshot", "trades"))
            + f" (+{c['book_anchor_rows']:,} book anchor rows)"),
        row("in == stored per (source, market)", lambda c: f"{c['rows_equal']} ({c['n_mismatches']} differ)"),
        row("every market on exactly one shard", lambda c: str(c["markets_on_one_shard"])),
        row("gap rows", lambda c: str(len(c["gaps"]))),
        row("CPU per shard (CPU-s / wall)", lambda c: " + ".join(f"{x:.2f}" for x in c["cpu_per_shard"]),
            lambda c: max(c["cpu_per_shard"])),
        row("collectors' CPU-s / wall, summed", lambda c: f"{sum(c['cpu_per_shard']):.2f}", lambda c: sum(c["cpu_per_shard"])),
        row("collector CPU µs per row", lambda c: f"{sum(c['cpu_per_shard']) * 1e6 / c['rows_per_s']:.1f}",
            lambda c: sum(c["cpu_per_shard"]) / c["rows_per_s"]),
        row("collectors' CPU-s, start to exit (final flush included)",
            lambda c: " + ".join(f"{x:.0f}" for x in c["collector_cpu_s_total"] if x is not None),
            lambda c: sum(x or 0 for x in c["collector_cpu_s_total"])),
        row("collector peak RSS MB (VmHWM, final flush included)", lambda c: " + ".join(str(x) for x in c["collector_max_rss_mb"]),
            lambda c: max((x for x in c["collector_max_rss_mb"] if x is not None), default=None)),
        row("keeper / replay CPU-s", lambda c: f"{sum(x or 0 for x in c['keeper_cpu_s']):.0f} / "
            + " ".join(f"{v:.0f}" for v in c["replay_cpu_s"].values() if v is not None)),
    ]
    for src in ms:
        rows += [
            row(f"{src} lag exchange→recv p50 / p99 ms", lambda c, s=src: lag(c, "lag_exchange_to_recv_ms", s),
                lambda c, s=src: (c["lag_exchange_to_recv_ms"].get(s) or {}).get("p99")),
            row(f"{src} behind the feed (recv − sent) p50 / p99 ms", lambda c, s=src: lag(c, "lag_behind_feed_ms", s),
                lambda c, s=src: (c["lag_behind_feed_ms"].get(s) or {}).get("p99")),
            row(f"{src} exchange's own lateness p50 / p99 ms", lambda c, s=src: " / ".join(
                f"{c['replay'][s]['feed_late_ms'][k]:,.1f}" for k in ("p50", "p99"))),
            row(f"{src} reconnects / skipped", lambda c, s=src: f"{c['reconnects'][s]} / {c['skipped'][s]}"),
        ]
    headers = ("", *(f"{c['shards']} shard{'s' if c['shards'] > 1 else ''}" for c in cs)) + (("2 vs 1",) if len(cs) == 2 else ())
    lines = [head, "", table(rows, headers)]
    for c in cs:
        if c["mismatches"]:
            lines.append(f"{c['shards']} shard(s) first mismatches: {c['mismatches'][:3]}")
        if c["gaps"]:
            lines.append(f"{c['shards']} shard(s) gaps: {c['gaps'][:3]}")
    return lines


def ok(r: dict) -> bool:
    return all(c["rows_equal"] and c["markets_on_one_shard"] and not c["gaps"] and all(x == 0 for x in c["collector_rc"])
               for c in r["configs"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_replay":
        ap = argparse.ArgumentParser()
        ap.add_argument("--source", required=True)
        ap.add_argument("--capture", required=True)
        ap.add_argument("--speed", type=float, default=1.0)
        ap.add_argument("--kalshi-public-key", default=None)
        ap.add_argument("--out", required=True)
        return replay_child(ap.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(prog="scripts/bench_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="feed minutes per configuration")
    ap.add_argument("--products", type=int, default=100)
    ap.add_argument("--series", type=int, default=20)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="shard counts run one after the other")
    ap.add_argument("--flush-age", type=float, default=60.0, help="collector flush age (s), besides the hour close")
    ap.add_argument("--keep-every", type=float, default=30.0, help="keeper upload period (s)")
    ap.add_argument("--capture-seconds", type=float, default=None, help="generated capture length (looped)")
    ap.add_argument("--workdir", default=str(ROOT / ".bench" / "scale_soak"))
    ap.add_argument("--json", default=None, help="also write the report here")
    a = ap.parse_args(argv)
    r = run_scale_soak(a.minutes, a.products, a.series, a.shards, Path(a.workdir), a.flush_age, a.keep_every,
                       a.capture_seconds, log=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(summary_lines(r)))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=1, default=str))
    return 0 if ok(r) else 1


if __name__ == "__main__":
    raise SystemExit(main())
