"""The generator names in one import, as before the split (many tests and benchmarks, and the
process supervisor, import them from here). Each exchange's generator lives with the exchange
(`engine.sim.coinbase.gen`, `engine.sim.kalshi.gen`, the Kalshi contract schedule in
`engine.sim.kalshi.markets`); capture I/O is `engine.sim.capture`, the wire formats
`engine.sim.fmt`, the `gen-capture` CLI `engine.sim.generate`.
"""

from engine.sim.capture import read_capture, write_capture
from engine.sim.coinbase.gen import DEFAULT_PRODUCTS, generate_coinbase
from engine.sim.fmt import DEFAULT_START_NS, fmt_dp, fmt_fixed, fmt_iso_seconds, fmt_rfc3339, parse_start
from engine.sim.generate import cli
from engine.sim.kalshi.gen import generate_kalshi
from engine.sim.kalshi.markets import (
    DEFAULT_SERIES,
    KalshiMarketSpec,
    kalshi_event_code,
    kalshi_markets,
    kalshi_schedule,
    market_object,
)

__all__ = ["DEFAULT_PRODUCTS", "DEFAULT_SERIES", "DEFAULT_START_NS", "KalshiMarketSpec", "cli", "fmt_dp",
           "fmt_fixed", "fmt_iso_seconds", "fmt_rfc3339", "generate_coinbase", "generate_kalshi",
           "kalshi_event_code", "kalshi_markets", "kalshi_schedule", "market_object", "parse_start",
           "read_capture", "write_capture"]
