"""Simulation: the replay exchange, capture generators, synthetic rows and the demo.

`sim` may use `engine.collect` (protocol definitions, auth); nothing outside `sim` imports it
except tests, benchmarks and the process supervisor.
"""
