"""Compatibility re-exports: Coinbase now lives in the package `engine.collect.coinbase`."""

from engine.collect.coinbase.normalize import *  # noqa: F401,F403
from engine.collect.coinbase.normalize import CoinbaseNormalizer, L2Chunk  # noqa: F401
from engine.collect.coinbase.wire import *  # noqa: F401,F403
