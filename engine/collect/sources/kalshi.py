"""Compatibility re-exports: Kalshi now lives in the package `engine.collect.kalshi`."""

from engine.collect.kalshi.discovery import fetch_markets, open_tickers  # noqa: F401
from engine.collect.kalshi.normalize import *  # noqa: F401,F403
from engine.collect.kalshi.normalize import KalshiNormalizer, L2Rows  # noqa: F401
from engine.collect.kalshi.wire import *  # noqa: F401,F403
