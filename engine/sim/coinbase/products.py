"""Coinbase Exchange REST products on the replay exchange: `GET /products` and `/products/{id}`.

The generator writes prices in cents and sizes in 1e-8 units (`engine.sim.coinbase.gen`), so every
product's `quote_increment` is 0.01 and `base_increment` 0.00000001, as on Coinbase for BTC-USD,
ETH-USD and SOL-USD. Field names and types are the Exchange API's (strings for decimals).
"""

from __future__ import annotations

from websockets.http11 import Response

from engine.sim.replay.protocol import json_response

QUOTE_INCREMENT = {"BTC-USD": "0.01", "ETH-USD": "0.01", "SOL-USD": "0.01"}
BASE_INCREMENT = {"BTC-USD": "0.00000001", "ETH-USD": "0.00000001", "SOL-USD": "0.00000001"}


def product_object(pid: str) -> dict:
    """The Exchange API's product object for `pid` (BASE-QUOTE)."""
    base, _, quote = pid.partition("-")
    return {
        "id": pid,
        "base_currency": base,
        "quote_currency": quote,
        "quote_increment": QUOTE_INCREMENT.get(pid, "0.01"),
        "base_increment": BASE_INCREMENT.get(pid, "0.00000001"),
        "display_name": f"{base}-{quote}",
        "min_market_funds": "1",
        "margin_enabled": False,
        "post_only": False,
        "limit_only": False,
        "cancel_only": False,
        "status": "online",
        "status_message": "",
        "trading_disabled": False,
        "fx_stablecoin": False,
        "max_slippage_percentage": "0.02000000",
        "auction_mode": False,
        "high_bid_limit_percentage": "",
    }


def answer(products: set[str], path: str) -> Response:
    """`path` is what follows `/products`: "" (every product) or "/{id}"."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return json_response(200, [product_object(p) for p in sorted(products)])
    if len(parts) == 1 and parts[0] in products:
        return json_response(200, product_object(parts[0]))
    return json_response(404, {"message": "NotFound"})
