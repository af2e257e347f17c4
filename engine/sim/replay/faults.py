"""Fault specs of the replay exchange (`drop`, `seq_jump`, `malformed`, `stall`, `close`, `corrupt`).

`corrupt[:N]` is carried out by the exchange's protocol (`ReplayProtocol.corrupt`): the next N book
messages that a venue's checksum covers go out damaged (Kraken); a protocol without a book checksum
does not support it."""

from __future__ import annotations

FAULTS = ("drop", "seq_jump", "malformed", "stall", "close", "corrupt")
MALFORMED_FRAMES = (
    '{"channel":"l2_data","timestamp":"2026-11-26T17:00:00Z","sequence_num":',
    "\x00\x01garbage frame \ufffd not json",
    '{"type":"orderbook_delta","sid":1,"seq":,"msg":{}}',
    "[1, 2, 3",
    "<html>502 Bad Gateway</html>",
)


def parse_fault(spec: str) -> tuple[str, float | None, int | None]:
    """'drop' | 'malformed:5' | 'stall:3' → (name, arg, None); 'stall@500:3' → ('stall', 3, 500)."""
    spec = spec.strip()
    at = None
    if "@" in spec:
        name, rest = spec.split("@", 1)
        idx, _, arg = rest.partition(":")
        at = int(idx)
    else:
        name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name not in FAULTS:
        raise ValueError(f"unknown fault {spec!r} ({', '.join(FAULTS)})")
    val = float(arg) if arg else None
    if name == "stall" and val is None:
        raise ValueError("stall needs a duration: stall:SECONDS or stall@INDEX:SECONDS")
    return name, val, at
