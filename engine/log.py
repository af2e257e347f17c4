"""structlog configured once for JSON lines on stderr; every module logs through `get_logger`."""

from __future__ import annotations

import logging
import os
import re
import sys

import structlog

_configured = False
# Values that look like credentials are masked wherever they appear in an event.
_SECRET_KEYS = re.compile(r"(secret|password|token|private|signature|credential|authorization|access_key)", re.I)


# `scheme://user:password@host`: the userinfo of any URL (an endpoint with credentials in it)
_URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s\"'<>]+@")


def redact(text: str) -> str:
    """`text` with credentials inside URLs masked: the one helper for log events and error messages."""
    return _URL_USERINFO.sub(r"\1***@", text)


def _redact(_, __, event: dict) -> dict:
    for k in list(event):
        if _SECRET_KEYS.search(k):
            event[k] = "***"
        elif isinstance(event[k], str):
            event[k] = redact(event[k])
    return event


def configure(level: str | None = None) -> None:
    global _configured
    if _configured:
        return
    lvl = getattr(logging, (level or os.environ.get("ENGINE_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,  # after format_exc_info: tracebacks are masked too
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(**context):
    configure()
    return structlog.get_logger().bind(**context)
