"""Coinbase Advanced Trade in the simulator: its replay protocol (`replay`)."""
