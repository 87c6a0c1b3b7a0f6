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


class _FromStdlib(logging.Handler):
    """Records of libraries that log through the logging module (aiohttp's server, asyncio) as
    structlog events: one JSON line like every other, never a multi-line traceback. aiohttp's
    errors name only their type: its messages quote the raw request line or header, which may
    be an Authorization header."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                detail = "" if record.name.startswith("aiohttp") else ": " + " ".join(str(exc).split())[:200]
                fields["error"] = type(exc).__name__ + detail
            # By number, so that a library's own level names (NOTICE, ...) land on the next one below.
            level = ("debug" if record.levelno < logging.INFO else "info" if record.levelno < logging.WARNING else
                     "warning" if record.levelno < logging.ERROR else "error" if record.levelno < logging.CRITICAL
                     else "critical")
            if record.exc_info and type(record.exc_info[1]).__module__ == "aiohttp.http_exceptions":
                level = "warning"  # a client's malformed request: its problem, not syncd's
            getattr(structlog.get_logger("syncd.lib"), level)(record.getMessage(), **fields)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


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
    # Warnings and errors of libraries, as Python's last-resort handler showed them before, but as
    # one structlog line each.
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _FromStdlib)]
    handler = _FromStdlib(level=max(logging.WARNING, getattr(logging, level.upper())))
    root.addHandler(handler)


def get_logger(**bound):
    return structlog.get_logger("syncd").bind(**bound)
