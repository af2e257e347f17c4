"""A source registered from the tests, end to end and live: the toy exchange's replay protocol
(registered in `engine.sim`) serves a capture over a real WebSocket on 127.0.0.1, and the live
collector (a subprocess that registers the toy `Source` before running the ordinary `collect`
command) stores it. Nothing in engine/ knows the toy's name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import Engine
from engine.sim import registry as sim_registry
from engine.sim.replay import ReplayServer
from engine_tests import test_sim_registry as sim_registry_test
from engine_tests import toy_source as toy
from engine_tests.test_collector import _env, _wait_read_all

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)

COLLECT = """
import sys
from engine.collect import registry
from engine_tests import toy_source
registry.register(toy_source.SOURCE)
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


class ToyProtocol(sim_registry_test.ToyProtocol):
    """The registry test's toy exchange, speaking the toy source's subscribe message: a client's
    `{"subscribe": [...]}` starts the feed (no ack); captured frames go out as they are."""

    async def session(self, conn) -> None:
        async for raw in conn.ws:
            if "subscribe" in json.loads(raw):
                conn.state["subscribed"] = True
                self.server.clients_changed()


def _capture(t0: int, n: int = 300) -> list[dict]:
    """A book, then levels and trades, stamped from `t0` (the toy carries exchange times as ns)."""
    out = [{"recv_ns": t0, "meta": {"type": "connect", "source": "toy", "conn": 1, "tick": 1.0}},
           {"recv_ns": t0 + 1, "frame": toy.book(1, t0, bids=[[100, 5], [99, 2]], asks=[[101, 4]])}]
    for i in range(2, n + 2):
        t = t0 + i * 1_000_000
        frame = (toy.trade(i, t, i, "buy" if i % 3 else "sell", 100 + i % 2, 1) if i % 4 == 0
                 else toy.level(i, t, "bid" if i % 2 else "ask", 99 + i % 5, i % 7))
        out.append({"recv_ns": t, "frame": frame})
    return out


@pytest.fixture
def toy_exchange():
    sim_registry.register(toy.NAME, ToyProtocol, lambda **kw: iter(()))
    try:
        yield
    finally:
        sim_registry.unregister(toy.NAME)


def test_toy_source_collected_live_through_the_replay_exchange(tmp_path, toy_exchange):
    cap = _capture(time.time_ns())
    levels = sum(1 for r in cap if '"level"' in r.get("frame", ""))
    trades = sum(1 for r in cap if '"trade"' in r.get("frame", ""))
    home = tmp_path / "live"
    with ReplayServer.run_in_thread(source=toy.NAME, capture=cap) as srv:
        proc = subprocess.Popen(
            [sys.executable, "-c", COLLECT, "collect", "--home", str(home), "--source", toy.NAME,
             "--toy-url", srv.ws_url, "--status-interval", "0.3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
        try:
            st = _wait_read_all(home, srv, source=toy.NAME)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
    assert st["skipped_frames"] == 0 and st["gaps"] == 0, st
    eng = Engine.open(home)
    l2 = eng.l2(allow_unsealed=True, raw_ns=True)
    tr = eng.trades(allow_unsealed=True, raw_ns=True)
    assert l2.filter(~l2["snapshot"]).height == levels and l2["snapshot"].sum() >= 3
    assert tr.height == trades and tr["trade_id"].n_unique() == trades
    assert set(l2["source"].cast(str)) == {toy.NAME} and os.path.isdir(home / "staging")
