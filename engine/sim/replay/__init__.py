"""The replay exchange: serves a capture over a real local WebSocket (and REST, where the exchange
has one) in the exchange's own protocol, with faults on command.

* `server`: the core (clock, playback, faults, connections, WebSocket + HTTP plumbing, time shifts);
* `protocol`: `ReplayProtocol`, the interface each exchange implements (`engine.sim.coinbase.replay`,
  `engine.sim.kalshi.replay`), registered by name in `engine.sim.registry`;
* `conn`, `faults`: a client connection; fault specs;
* `cli`: `data-engine replay-exchange` / `python -m engine.sim.replay`.
"""

from engine.sim.replay.cli import cli
from engine.sim.replay.conn import Conn
from engine.sim.replay.faults import MALFORMED_FRAMES, parse_fault
from engine.sim.replay.protocol import ReplayProtocol
from engine.sim.replay.server import ReplayServer

__all__ = ["MALFORMED_FRAMES", "Conn", "ReplayProtocol", "ReplayServer", "cli", "parse_fault"]
