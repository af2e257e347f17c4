"""Coinbase reference data: an Exchange REST product (`GET /products/{id}`) as the columns of the
`instruments` table. market = instrument = the product id, kind = spot, base / quote currencies,
`tick_size` = `quote_increment` (the price step), `size_increment` = `base_increment`, `min_size` =
`base_min_size` when the answer still has it, `status` as sent (online, delisted, ...)."""

from __future__ import annotations

from typing import Any

from engine.collect.coinbase.wire import Product

KIND = "spot"


def _dec(s: str | None, what: str) -> float | None:
    if s is None or s == "":
        return None
    try:
        v = float(s)
    except ValueError as e:
        raise ValueError(f"bad {what} {s!r}") from e
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"bad {what} {s!r}")
    return v


def product_fields(p: Product) -> dict[str, Any]:
    """The columns of one product (besides market, instrument and kind)."""
    return {
        "base": p.base_currency,
        "quote": p.quote_currency,
        "tick_size": _dec(p.quote_increment, "quote_increment"),
        "size_increment": _dec(p.base_increment, "base_increment"),
        "min_size": _dec(p.base_min_size, "base_min_size"),
        "status": p.status or None,
        "title": p.display_name or None,
    }
