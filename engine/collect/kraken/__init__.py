"""Kraken spot, public WebSocket v2: `wire` (names, endpoints, subscription messages, msgspec
Structs), `book` (the book kept per pair and Kraken's CRC32 checksum), `normalize` (frames ->
canonical rows, checksum verified on every book message), `source` (the `Source` and its `Link`:
resubscribing a pair's book after a checksum mismatch). Protocol notes: docs/kraken-protocol.md."""
