"""Coinbase Advanced Trade: `wire` (names, endpoints, subscription messages, msgspec Structs),
`normalize` (frames -> canonical rows), `source` (the `Source` the collector and ingest ask)."""
