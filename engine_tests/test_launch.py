"""The main job's demo preparation (engine_defs/launch.py)."""

from __future__ import annotations

import time

from engine.capture import read_capture
from engine_defs.launch import prepare_demo


def test_demo_captures_are_never_stamped_in_the_future(tmp_path):
    """Playback starts when prepare_demo returns: a frame stamped later would put exchange times
    ahead of receive times (negative feed lag) for the whole demo."""
    d = prepare_demo(tmp_path, minutes=0.05)
    now = time.time_ns()
    for src, path in d["captures"].items():
        first = next(recv_ns for recv_ns, frame, _meta in read_capture(path) if frame is not None)
        assert first <= now, (src, (first - now) / 1e9)
        assert now - first < 30 * 10**9, (src, (now - first) / 1e9)  # and not stale either
    assert d["private_key"].exists() and d["public_key"].exists()
