"""Response bodies as JSON values: strict parsing that keeps every number exact, and serialising.

orjson, the fast parser, reads an integer beyond 64 bits or a decimal beyond double precision as
a (rounded) double: `eventData` would differ from what the API sent, and a change hidden by the
rounding would never be reported. Such numbers need 16 or more significant digits (or an exponent
beyond a double's range), so a quick scan of the raw bytes sends the rare body that has one to an
exact parser; every other body takes the fast path unchanged. Numbers a double cannot hold become
`ExactNumber`s, written back as the same digits.

A large list need not become one big document: `split_list` finds the array a plain list path
leads to in one pass (msgspec) and hands back each record as its raw bytes, so each record is
parsed alone (`parse_record`) and can be dropped, or kept as bytes, once it is fingerprinted.
"""

from __future__ import annotations

import codecs
import functools
import json
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
import orjson

from syncd.errors import ParseError

#: Digits and '.' -> '0', everything else -> ' ': a run of 16 '0's marks a number that may need
#: more than a double (or a long digit string, which only costs the slow path).
_SCAN = bytes(0x30 if 0x30 <= c <= 0x39 or c == 0x2E else 0x20 for c in range(256))
_RUN = b"0" * 16


class ExactNumber(str):
    """A JSON number kept as its literal text (`123456789012345678901234567890`); serialised as
    that number, not as a string."""

    __slots__ = ()


def _default(value: Any) -> Any:
    if type(value) is ExactNumber:
        return orjson.Fragment(value.encode())
    raise TypeError(f"cannot serialise {type(value).__name__}")


#: Options and hook for orjson.dumps of anything that came from parse_json.
DUMPS_OPTION = orjson.OPT_PASSTHROUGH_SUBCLASS


def dumps(value: Any, option: int = 0) -> bytes:
    """orjson.dumps that writes ExactNumbers as the numbers they are."""
    return orjson.dumps(value, default=_default, option=option | DUMPS_OPTION)


_CHUNK = 1 << 16  # scanned a piece at a time: the translated copy stays in the CPU cache


def _may_need_exact(body: bytes) -> bool:
    for start in range(0, len(body), _CHUNK):
        if body[start:start + _CHUNK + 15].translate(_SCAN).find(_RUN) != -1:
            return True
    return False


def parse_record(raw: Any, exact_possible: bool) -> tuple[Any, bool]:
    """One record from split_list (`raw`: its bytes, or a buffer over them), and whether it holds
    ExactNumbers. `exact_possible`: the whole body may hold such numbers (records.may_need_exact)."""
    view = memoryview(raw)
    if not exact_possible:
        try:
            return orjson.loads(view), False
        except orjson.JSONDecodeError:
            pass  # 1e400 (the exact path reads it), or deeper than orjson allows (reported below)
    return parse_document(bytes(view))


def may_need_exact(body: Any) -> bool:
    """Whether `body` may hold a number that only the exact parser keeps (see the module doc)."""
    return _may_need_exact(body)


#: The top-level keys that hint at more pages (source.paginate.next_page_hint reads them).
HINT_KEYS = ("has_more", "next", "next_url", "next_cursor", "nextPageToken", "links", "meta")


@functools.lru_cache(maxsize=256)
def _list_decoder(steps: tuple[str | int, ...]) -> msgspec.json.Decoder | None:
    """A decoder that keeps only the array at `steps` (as raw items) and the top level's hint keys,
    skipping everything else without building it. None for paths it cannot express."""
    if any(type(step) is not str for step in steps) or (steps and steps[0] in HINT_KEYS):
        return None
    kind: Any = list[msgspec.Raw]
    for depth, key in enumerate(reversed(steps)):
        fields: list[tuple] = [("value", kind)]
        rename = {"value": key}
        if depth == len(steps) - 1:
            for i, hint in enumerate(HINT_KEYS):
                fields.append((f"hint{i}", msgspec.Raw, None))
                rename[f"hint{i}"] = hint
        kind = msgspec.defstruct(f"Level{len(steps) - 1 - depth}", fields, rename=rename)
    return msgspec.json.Decoder(kind)


def split_list(body: Any, steps: tuple[str | int, ...]) -> tuple[list[msgspec.Raw], dict[str, Any]] | None:
    """The items of the array that the plain list path `steps` leads to, each as raw bytes, and the
    top-level hint keys present (parsed); in one pass that builds nothing else.

    None when this cannot decide: an index step, a value of another type on the way, invalid or
    too deeply nested JSON, a body that is not UTF-8. Then parse the whole document: that path
    gives the result, or the error, exactly as before. Each item still has to go through
    parse_record, which is as strict as parse_json about what is inside it."""
    decoder = _list_decoder(steps)
    if decoder is None:
        return None
    try:
        found = decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    if not _valid_utf8(body):  # msgspec does not check the strings it skips
        return None
    hints: dict[str, Any] = {}
    if steps:
        for i, key in enumerate(HINT_KEYS):
            value = getattr(found, f"hint{i}")
            if value is not None:
                try:  # as the whole document would give it: a number beyond a double stays exact
                    hints[key] = parse_document(bytes(value))[0]
                except ParseError:
                    return None
        for _ in steps:
            found = found.value
    return found, hints


def _valid_utf8(body: Any) -> bool:
    if body.isascii():
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(body)
    try:
        for start in range(0, len(view), _CHUNK * 16):
            decoder.decode(view[start:start + _CHUNK * 16])
        decoder.decode(b"", True)
    except UnicodeDecodeError:
        return False
    finally:
        view.release()
    return True


def parse_json(body: bytes) -> Any:
    """Strict RFC 8259 JSON (no NaN/Infinity, valid UTF-8, bounded nesting), numbers kept exact."""
    return parse_document(body)[0]


def parse_document(body: bytes) -> tuple[Any, bool]:
    """parse_json, and whether the value may hold ExactNumbers (then serialise it with `dumps`)."""
    if not _may_need_exact(body):
        try:
            return orjson.loads(body), False
        except orjson.JSONDecodeError as exc:
            if "infinity" not in str(exc):  # 1e400: exact path below; anything else is not JSON
                raise ParseError(_not_json(body, exc)) from None
    return _parse_exact(body), True


def _parse_exact(body: bytes) -> Any:
    # Validate with orjson first (strictness, nesting, UTF-8 and its messages) unless only a number
    # beyond a double's range stopped it; then parse again keeping numbers as written.
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "infinity" not in str(exc):
            raise ParseError(_not_json(body, exc)) from None
    try:
        return json.loads(body.decode("utf-8"), parse_int=_int, parse_float=_float, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        raise ParseError(_not_json(body, exc)) from None


def _int(text: str) -> Any:
    value = int(text)
    # orjson writes integers of up to 64 bits exactly; wider ones stay text.
    return value if -(2**63) <= value < 2**64 else ExactNumber(text)


def _float(text: str) -> Any:
    value = float(text)
    try:
        exact = value not in (float("inf"), float("-inf")) and Decimal(repr(value)) == Decimal(text)
    except InvalidOperation:
        exact = False
    return value if exact else ExactNumber(text)


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _not_json(body: bytes, exc: BaseException) -> str:
    start = " ".join(body[:60].decode("utf-8", "replace").split())
    hint = " (an HTML page: is the URL or the token right?)" if start.lstrip().startswith("<") else ""
    return f"response is not valid JSON: {exc}; it starts with {start!r}{hint}"
