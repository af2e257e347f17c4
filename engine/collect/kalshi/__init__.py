"""Kalshi: `wire` (names, endpoints, commands, msgspec Structs, exact units), `normalize` (frames ->
canonical rows, books per contract), `discovery` (REST: open contracts per series), `auth` (API-key
signing), `source` (the `Source` the collector and ingest ask)."""
