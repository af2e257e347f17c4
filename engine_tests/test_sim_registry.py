"""The simulator's exchange registry: a toy exchange registered from a test plays through the
replay server core to a plain websockets client, and names are looked up (and listed) in one place."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest
from websockets.asyncio.client import connect

from engine.sim import registry
from engine.sim.fmt import DEFAULT_START_NS
from engine.sim.replay import ReplayProtocol, ReplayServer
from engine.sim.replay import server as server_mod

pytestmark = pytest.mark.timeout(60)


class ToyProtocol(ReplayProtocol):
    """Send `subscribe`, get `subscribed`, then every captured frame as it is."""

    ws_path = "/toy"

    def new_conn_state(self) -> dict:
        return {"subscribed": False}

    def is_subscribed(self, conn) -> bool:
        return conn.state["subscribed"]

    async def session(self, conn) -> None:
        async for raw in conn.ws:
            if raw == "subscribe":
                conn.state["subscribed"] = True
                conn.put("subscribed")
                self.server.clients_changed()

    def on_frame(self, text: str) -> None:
        srv = self.server
        srv.deliver([(c, None) for c in srv.conns if c.alive and c.state["subscribed"]], lambda c, _: text)


def toy_generator(seconds: float = 1.0, rate: float | None = None, seed: int = 0,
                  start_ns: int = DEFAULT_START_NS):
    rate = rate or 100.0
    yield {"recv_ns": start_ns, "meta": {"type": "connect", "source": "toy", "conn": 0}}
    for i in range(int(seconds * rate)):
        yield {"recv_ns": start_ns + i * int(1e9 / rate), "frame": json.dumps({"n": i, "seed": seed})}


@pytest.fixture
def toy():
    registry.register("toy", ToyProtocol, toy_generator)
    try:
        yield
    finally:
        registry.unregister("toy")


async def _read(url: str, n: int) -> list[str]:
    async with connect(url, close_timeout=1) as ws:
        await ws.send("subscribe")
        return [await asyncio.wait_for(ws.recv(), 10) for _ in range(n)]


def test_toy_exchange_plays_through_the_server_in_order(toy):
    cap = list(toy_generator(seconds=2, rate=100))
    with ReplayServer.run_in_thread(source="toy", capture=cap, faults=["drop@10"]) as srv:
        assert srv.ws_url == f"ws://127.0.0.1:{srv.port}/toy" and srv.rest_url == ""
        got = asyncio.run(_read(srv.ws_url, 200))
        assert srv.done.wait(10)
        st = srv.stats()
    assert got[0] == "subscribed"
    ns = [json.loads(g)["n"] for g in got[1:]]
    assert ns == [n for n in range(200) if n != 10]  # in capture order; the core's drop fault applies
    assert st["frames_read"] == 200 and st["dropped"] == 1 and st["frames_sent"] == 200


def test_names_are_looked_up_in_the_registry(toy):
    assert {"coinbase", "kalshi", "kraken", "toy"} <= set(registry.names())
    assert registry.get("toy").generator is toy_generator
    with pytest.raises(ValueError, match=r"unknown exchange 'nope'; known: coinbase, kalshi, kraken, toy"):
        ReplayServer(source="nope", capture=[])
    with pytest.raises(ValueError, match="already registered"):
        registry.register("toy", ToyProtocol, toy_generator)
    with pytest.raises(TypeError, match="ReplayProtocol subclass"):
        registry.register("toy2", object, toy_generator)


def test_replay_cli_lists_known_names(toy, capsys):
    from engine.sim.replay.cli import cli

    with pytest.raises(SystemExit):
        cli(["--source", "nope", "--capture", "x"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "toy" in err and "kalshi" in err


def test_the_server_core_never_branches_on_an_exchange():
    src = inspect.getsource(server_mod)
    assert "self.source ==" not in src and "source !=" not in src
    assert "registry.get(source)" in src


def test_gen_capture_runs_a_registered_generator(toy, tmp_path, capsys):
    from engine.sim.capture import read_capture
    from engine.sim.generate import cli

    out = tmp_path / "toy.jsonl.zst"
    assert cli(["--source", "toy", "--seconds", "1", "--rate", "50", "--seed", "3", "--out", str(out)]) == 0
    recs = list(read_capture(out))
    assert recs == list(toy_generator(seconds=1, rate=50, seed=3))
    with pytest.raises(SystemExit):
        cli(["--source", "nope", "--out", str(out)])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    # the file plays like the list
    with ReplayServer.run_in_thread(source="toy", capture=str(out)) as srv:
        got = asyncio.run(_read(srv.ws_url, 51))
    assert [json.loads(g)["n"] for g in got[1:]] == list(range(50))
