"""Collection: the live runner, offline ingest, raw captures, and one package per exchange
(`coinbase`, `kalshi`) implementing `source.Source`, registered in `registry`.

Collect feeds the lake through `engine.api.Engine`; it never imports `engine.research` or `engine.sim`.
`sources` and `kalshi_auth` only re-export names from their old addresses.
"""
