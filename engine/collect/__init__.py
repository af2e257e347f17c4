"""Collection: the live runner, offline ingest, raw captures and the exchange normalizers (`sources`).

Collect feeds the lake through `engine.api.Engine`; it never imports `engine.research` or `engine.sim`.
"""
