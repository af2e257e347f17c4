"""Coinbase Advanced Trade in the simulator: its capture generator (`gen`) and replay protocol
(`replay`), registered as "coinbase" in `engine.sim.registry`."""

from engine.sim.coinbase.gen import DEFAULT_PRODUCTS, generate_coinbase

__all__ = ["DEFAULT_PRODUCTS", "generate_coinbase"]
