"""Kraken spot WebSocket v2 in the simulator: its capture generator (`gen`) and replay protocol
(`replay`), registered as "kraken" in `engine.sim.registry`."""

from engine.sim.kraken.gen import generate_kraken

__all__ = ["generate_kraken"]
