"""Durations and sizes as people write them in config files."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: Any) -> float:
    """Seconds from `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"`, `"1h30m"` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s', '5m' or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"invalid duration {value!r}: use a number with a unit (250ms, 30s, 5m, 1h, 1d) "
                    "or a plain number of seconds"
                ) from None
    else:
        raise ValueError("expected a duration such as '30s', '5m' or a number of seconds")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"invalid duration {value!r}: must be a finite, non-negative time")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 0.25 -> '250ms', 300 -> '5m', 90 -> '90s'."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


#: A duration field: accepts "30s" or 30, holds float seconds, prints back as "30s".
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)]


def iso_time(ts: float | None) -> str | None:
    """`2026-11-30T11:43:53.123Z` (UTC, milliseconds: the webhook `timestamp` format), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
