"""A small lake shaped like the demo's, built in seconds without sockets: protocol-exact captures
from the exchange generators, normalized by the collectors' own code (`ingest`), ending now.

For the research notebook's test, the README figures and anyone who wants a lake to try the
toolkit on. Coinbase is captured over two connections with a recorded disconnect between them
(the second starts with a fresh snapshot), so gaps, validity windows and coverage show something.
Command line: `python -m engine.sim.sample_lake HOME [--minutes M]`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.schema import NS_PER_HOUR
from engine.timeutil import NS

DISCONNECT_S = 45


@dataclass(frozen=True)
class SampleLake:
    home: Path
    start_ns: int  # first capture time
    end_ns: int  # last capture time
    gap: tuple[int, int]  # the recorded Coinbase disconnect [start, end)
    rows: int


def _without_trade_history(records):
    """The reconnection's capture with an empty trade snapshot: the second simulated exchange's
    history (its own prices, before the reconnect) would sit in the disconnect beside the first
    one's trades. Frames are kept (the connection's sequence numbers stay contiguous)."""
    import json

    for r in records:
        f = r.get("frame")
        if f is not None and f.startswith('{"channel":"market_trades"') and '"type":"snapshot"' in f:
            msg = json.loads(f)
            for ev in msg["events"]:
                if ev.get("type") == "snapshot":
                    ev["trades"] = []
            r = {**r, "frame": json.dumps(msg, separators=(",", ":"))}
        yield r


def build(home, *, minutes: float = 20.0, coinbase_rate: float = 100.0, kalshi_rate: float = 30.0, seed: int = 0,
          end_ns: int | None = None) -> SampleLake:
    """Fill a fresh lake at `home` with `minutes` of Coinbase (BTC/ETH/SOL-USD) and Kalshi
    (KXBTC/KXETH/KXSOL) data ending two minutes before `end_ns` (default now), so it is sealed."""
    from engine import Engine
    from engine.collect.ingest import ingest_files
    from engine.sim.capture_gen import generate_coinbase, generate_kalshi, write_capture
    from engine.sim.synth import gap_rows

    home = Path(home)
    end = (end_ns if end_ns is not None else time.time_ns()) - 120 * NS
    secs = minutes * 60
    start = end - int(secs * NS)
    # the disconnect: a little after the middle, not on an hour boundary's first minute
    cut = start + int(secs * 0.55 * NS)
    if (cut % NS_PER_HOUR) < 60 * NS:
        cut += 90 * NS
    resume = cut + DISCONNECT_S * NS
    rows = 0
    tmp = Path(tempfile.mkdtemp(prefix="sample-captures-"))
    try:
        caps = {
            "cb1": (generate_coinbase(seconds=(cut - start) / NS, rate=coinbase_rate, seed=seed, start_ns=start), "coinbase"),
            "cb2": (_without_trade_history(generate_coinbase(seconds=(end - resume) / NS, rate=coinbase_rate,
                                                             seed=seed + 1, start_ns=resume, conn=1)), "coinbase"),
            "k": (generate_kalshi(seconds=secs, rate=kalshi_rate, seed=seed + 2, start_ns=start), "kalshi"),
        }
        eng = Engine.open(home, background=False, writer=True, book_anchors=True)
        try:
            for name, (records, source) in caps.items():
                path = tmp / f"{name}.jsonl.zst"
                write_capture(records, path)
                # the second Coinbase connection is another simulated exchange: its trade ids do not
                # continue the first one's, so the lake's highest id must not filter them out
                rows += ingest_files(eng, [path], source, progress=False, seed=name != "cb2")["rows_appended"]
            eng.append("gaps", gap_rows([
                {"source": "coinbase", "market": m, "instrument": None, "start_ts": cut, "end_ts": resume,
                 "kind": "disconnect", "detail": "sample lake: socket closed, resubscribed with a fresh snapshot"}
                for m in ("BTC-USD", "ETH-USD", "SOL-USD")]))
            eng.flush()
        finally:
            eng.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SampleLake(home, start, end, (cut, resume), rows)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.sim.sample_lake", description=__doc__.splitlines()[0])
    ap.add_argument("home", help="lake home to create (must not exist)")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if Path(a.home).exists():
        print(f"{a.home} exists; give a new directory", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    s = build(a.home, minutes=a.minutes, seed=a.seed)
    print(f"sample lake at {s.home}: {s.rows:,} rows in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli(sys.argv[1:]))
