"""Simulation: the replay exchange, capture generators, synthetic rows and the demo.

One package per simulated exchange (`coinbase/`, `kalshi/`: its capture generator and its replay
protocol), registered by name in `registry.py`; `replay/` is the exchange-independent replay server;
`capture.py` reads and writes capture files; `generate.py` is `gen-capture`.

`sim` may use `engine.collect` (protocol definitions, auth); nothing outside `sim` imports it
except tests, benchmarks and the process supervisor.
"""
