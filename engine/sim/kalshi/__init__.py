"""Kalshi in the simulator: contracts and their schedule (`markets`), the capture generator (`gen`),
the replay protocol (`replay`) and its REST market discovery (`rest`), registered as "kalshi" in
`engine.sim.registry`."""

from engine.sim.kalshi.gen import generate_kalshi
from engine.sim.kalshi.markets import DEFAULT_SERIES, KalshiMarketSpec, kalshi_markets, kalshi_schedule

__all__ = ["DEFAULT_SERIES", "KalshiMarketSpec", "generate_kalshi", "kalshi_markets", "kalshi_schedule"]
