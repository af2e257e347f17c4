"""Compatibility re-exports: Kalshi request signing now lives in `engine.collect.kalshi.auth` (the
replay exchange in `engine.sim` imports it from here)."""

from engine.collect.kalshi.auth import (  # noqa: F401
    HDR_KEY,
    HDR_SIG,
    HDR_TS,
    WS_PATH,
    KalshiAuthError,
    KalshiKeyError,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_headers,
    verify_headers,
)
