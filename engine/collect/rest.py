"""REST answers as collected data: one blocking GET helper for the sources' `Link`s, and the capture
line that records an answer so the normalizer gets it the same way live and offline.

A `Link` fetches (on an executor: these calls block) and hands the body text to
`runner.rest(name, body)`, which writes `{"recv_ns": .., "meta": {"type": "rest", "name": .., "body":
..}}` to the capture and calls `norm.rest(recv_ns, name, body)`; `ingest` replays such lines
through the same method. `name` is the source's own word for the endpoint (`markets`, `product`).
"""

from __future__ import annotations

import urllib.request

MAX_BODY = 32 * 1024 * 1024  # a larger answer is refused, not read into memory
REST_META = "rest"


class RestError(Exception):
    """A REST answer that cannot be used (too large, not text); HTTP and network errors are urllib's."""


def rest_meta(name: str, body: str) -> dict:
    """The capture meta line recording one REST answer."""
    return {"type": REST_META, "name": name, "body": body}


def get_text(url: str, timeout: float = 10.0, headers: dict[str, str] | None = None) -> str:
    """GET `url` and return its body as text (blocking, bounded by `timeout` and `MAX_BODY`).
    HTTP errors raise `urllib.error.HTTPError`, network errors `OSError`."""
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "data-engine",
                                               **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise RestError(f"answer of {url} is larger than {MAX_BODY} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RestError(f"answer of {url} is not UTF-8 text: {e}") from None
