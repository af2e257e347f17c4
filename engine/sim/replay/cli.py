"""`data-engine replay-exchange` (also `python -m engine.sim.replay`): serve a capture until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from engine.sim import registry
from engine.sim.replay.faults import parse_fault
from engine.sim.replay.server import ReplayServer


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="data-engine replay-exchange",
                                 description="Serve a capture over a local WebSocket in the exchange's protocol.")
    ap.add_argument("--source", choices=registry.names(), required=True)
    ap.add_argument("--capture", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--speed", type=float, default=0.0, help="0 = as fast as possible, X = X times real time")
    ap.add_argument("--faults", default="", help="comma separated, e.g. drop@100,stall@500:3,close@800,corrupt@900 (corrupt: venues with book checksums)")
    ap.add_argument("--kalshi-public-key", default=None, help="PEM file; WS auth signatures must verify")
    ap.add_argument("--loop", action="store_true", help="play the capture again when it ends, as fresh data: exchange times moved on by whole capture lengths, new trade ids")
    ap.add_argument("--as-recorded", action="store_true",
                    help="send the capture's own exchange times (default: moved by whole seconds to the present)")
    a = ap.parse_args(argv)
    faults = [f for f in a.faults.split(",") if f.strip()]
    for f in faults:
        parse_fault(f)

    async def main() -> int:
        srv = ReplayServer(a.source, a.capture, host=a.host, port=a.port, speed=a.speed, faults=faults,
                           kalshi_public_key=a.kalshi_public_key, loop_capture=a.loop,
                           at_present=not a.as_recorded)
        await srv.start()
        print(f"replay-exchange {a.source} listening on {srv.ws_url}"
              + (f" (REST {srv.rest_url})" if srv.rest_url else ""), file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await srv.stop()
        return 0

    return asyncio.run(main())
