"""Kalshi in the simulator: contracts and their schedule (`markets`), the replay protocol
(`replay`) and its REST market discovery (`rest`)."""
