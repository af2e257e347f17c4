"""Small hardening fixes: pre-epoch times, redaction of secrets, verify --repair."""

from __future__ import annotations

import datetime as dt

from engine.timeutil import iso, to_ns


def test_pre_epoch_fractional_times():
    assert to_ns("1969-12-31T23:59:59.5Z") == -500_000_000
    assert to_ns(dt.datetime(1969, 12, 31, 23, 59, 59, 250_000, tzinfo=dt.timezone.utc)) == -750_000_000
    assert to_ns("1969-12-31T23:59:59Z") == -1_000_000_000
    assert to_ns("1970-01-01T00:00:00.000001Z") == 1_000
    assert to_ns("1960-06-15T12:00:00.123456+02:00") == to_ns("1960-06-15T10:00:00.123456Z")
    assert to_ns("2026-11-25T01:02:03.456789Z") == 1795568523_456789_000
    assert iso(to_ns("1969-12-31T23:59:59.5Z")) == "1969-12-31T23:59:59.500000Z"
