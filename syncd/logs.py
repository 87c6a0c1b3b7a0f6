"""structlog set-up: one event per line, JSON off a TTY, `sync` and `run` bound through contextvars."""

from __future__ import annotations

import logging
import sys

import structlog

_REDACT = {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "apikey"}


def _redact_headers(_logger, _name, event: dict) -> dict:
    headers = event.get("headers")
    if isinstance(headers, dict):
        event["headers"] = {k: ("***" if k.lower() in _REDACT or "token" in k.lower() or "secret" in k.lower() else v) for k, v in headers.items()}
    return event


def configure(log_format: str = "auto", level: str = "info", stream=None) -> None:
    """Configure structlog for the process. `auto` means console on a TTY, JSON lines otherwise."""
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_headers,
    ]
    if log_format == "json":
        # dict_tracebacks without locals: a traceback must never carry a token held in a variable.
        renderer = [structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
                    structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound):
    return structlog.get_logger("syncd").bind(**bound)
