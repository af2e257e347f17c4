"""The lake: buffer, spool, writer, anchors, catalog, manifest, store, uploader, compaction, verify.

Data flows one way, collect → lake → research: nothing here imports `engine.collect`,
`engine.research` or `engine.sim` (engine_tests/test_layers.py checks it).
"""
