"""Writing a sync definition as TOML (the standard library only reads it): a control-API sync is
kept as a file in api_config_dir, readable and editable like any other definition."""

from __future__ import annotations

import math
import re
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
#: A TOML basic string may hold any character but `"`, `\\` and the control characters other
#: than tab (U+0000-U+0008, U+000A-U+001F, U+007F): a raw one makes the file unreadable.
_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x09: "\\t",
            **{c: f"\\u{c:04x}" for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]}}


def dumps(document: dict[str, Any]) -> str:
    """`document` as TOML: top-level scalars and arrays first, then one [table] per nested table."""
    lines: list[str] = []
    _table(document, [], lines)
    return "\n".join(lines).strip() + "\n"


def _table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    tables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
    for key, value in table.items():
        if not isinstance(value, dict):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables:
        lines += ["", "[" + ".".join(_key(k) for k in [*path, key]) + "]"]
        _table(value, [*path, key], lines)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    # Not orjson.dumps: JSON leaves DEL (U+007F) raw, which TOML forbids.
    return '"' + text.translate(_ESCAPES) + '"'


def _value(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("TOML has no place for NaN or infinity here")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise ValueError("TOML has no null")
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
