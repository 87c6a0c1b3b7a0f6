"""JSONPath expressions, compiled once at load.

jsonpath-rw is the reference implementation. Plain paths (`$.a.b`, `$.a[0].b`, `$['x-y']`) are
evaluated by direct lookups that return exactly what jsonpath-rw returns; everything else goes
through jsonpath-rw with its crashing nodes replaced by guarded twins.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import ply.lex
import ply.yacc
from jsonpath_rw import jsonpath as rw
from jsonpath_rw.lexer import JsonPathLexer, JsonPathLexerError
from jsonpath_rw.parser import IteratorToTokenStream, JsonPathParser, logger

__all__ = ["JsonPath", "JsonPathError", "MISSING", "compile_path"]


class JsonPathError(ValueError):
    """The text is not a JSONPath expression jsonpath-rw accepts."""


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class _Lexer(JsonPathLexer):
    """jsonpath-rw's lexer, its ply lexer built once: jsonpath-rw builds a new one per expression."""

    _built = None

    def tokenize(self, string):
        if _Lexer._built is None:
            _Lexer._built = ply.lex.lex(module=self, debug=self.debug, errorlog=logger)
        lexer = _Lexer._built.clone()
        lexer.latest_newline = 0
        lexer.string_value = None
        lexer.input(string)
        while (t := lexer.token()) is not None:
            t.col = t.lexpos - lexer.latest_newline
            yield t
        if lexer.string_value is not None:
            raise JsonPathLexerError("Unexpected EOF in string literal or identifier")


class _Parser(JsonPathParser):
    """jsonpath-rw's parser, with readable syntax errors (jsonpath-rw's own `p_error` crashes with
    "'NoneType' object has no attribute 'lineno'" when the expression ends too early), and its
    LALR tables built once per process: jsonpath-rw builds them for every expression (2.4 ms
    each, 48 s for 10,000 syncs with distinct paths). One parser, so parses take turns."""

    def __init__(self) -> None:
        super().__init__(lexer_class=_Lexer)
        self._yacc = ply.yacc.yacc(module=self, debug=False, write_tables=False, start="jsonpath", errorlog=logger)
        self._lock = threading.Lock()

    def parse_token_stream(self, token_iterator, start_symbol="jsonpath"):
        with self._lock:
            return self._yacc.parse(lexer=IteratorToTokenStream(token_iterator))

    def p_error(self, t):
        if t is None:
            raise JsonPathError("unexpected end of expression")
        raise JsonPathError(f"unexpected {t.value!r} at position {t.lexpos}")


@functools.cache
def _parser() -> _Parser:
    return _Parser()


class _SafeIndex(rw.Index):
    """`[n]` that matches nothing instead of crashing on null, objects, numbers or out-of-range negatives."""

    def find(self, datum):
        datum = rw.DatumInContext.wrap(datum)
        value = datum.value
        if isinstance(value, (list, str)) and -len(value) <= self.index < len(value):
            return [rw.DatumInContext(value[self.index], path=self, context=datum)]
        return []


class _Wrapped(rw.DatumInContext):
    """The one-item list jsonpath-rw's Slice puts a non-list value in; it exists only in the match
    tree, so the value's real location is this datum's own path and context."""


class _SafeSlice(rw.Slice):
    """`[*]` / `[a:b]` that matches nothing on null instead of crashing (floats are wrapped like ints)."""

    def find(self, datum):
        datum = rw.DatumInContext.wrap(datum)
        value = datum.value
        if value is None:
            return []
        if not isinstance(value, list):
            datum = _Wrapped([value], path=datum.path, context=datum.context)
        return super().find(datum)


class _SafeParent(rw.Parent):
    """`` `parent` `` that matches nothing at the top instead of yielding None (which crashes later)."""

    def find(self, datum):
        datum = rw.DatumInContext.wrap(datum)
        return [] if datum.context is None else [datum.context]


def _guard(node: Any) -> None:
    """Swap jsonpath-rw's Index, Slice and Parent nodes for guarded ones, in place, through the whole
    tree; reject `&`, which jsonpath-rw parses but cannot evaluate."""
    if type(node) is rw.Index:
        node.__class__ = _SafeIndex
    elif type(node) is rw.Slice:
        node.__class__ = _SafeSlice
    elif type(node) is rw.Parent:
        node.__class__ = _SafeParent
    elif type(node) is rw.Intersect:
        # jsonpath-rw parses `&` but Intersect.find always raises NotImplementedError.
        raise JsonPathError("'&' (intersection) is not implemented by jsonpath-rw")
    for attr in ("left", "right"):
        child = getattr(node, attr, None)
        if isinstance(child, rw.JSONPath):
            _guard(child)


def _plain_steps(node: Any) -> tuple[str | int, ...] | None:
    """The key/index steps of a plain path, or None when the path needs jsonpath-rw.

    A plain path is a chain of single-field and index steps, optionally starting with `$`. A `$`
    anywhere else (`$.a.($.b)`) jumps back to the top, so such paths are not plain."""
    leaves: list[Any] = []
    stack = [node]
    while stack:  # in-order leaves of the Child tree (`.` is associative for these steps)
        n = stack.pop()
        if type(n) is rw.Child:
            stack.append(n.right)
            stack.append(n.left)
        else:
            leaves.append(n)
    steps: list[str | int] = []
    for i, leaf in enumerate(leaves):
        kind = type(leaf)
        if kind is rw.Root and i == 0:
            continue
        if kind is rw.Fields and len(leaf.fields) == 1 and leaf.fields[0] != "*":
            steps.append(leaf.fields[0])
        elif kind is _SafeIndex or kind is rw.Index:
            steps.append(leaf.index)
        else:
            return None
    return tuple(steps)


class JsonPath:
    """A compiled JSONPath expression."""

    __slots__ = ("text", "steps", "_expr")

    def __init__(self, text: str, expr: Any, steps: tuple[str | int, ...] | None) -> None:
        self.text = text
        self._expr = expr
        #: Direct lookups for a plain path; None when jsonpath-rw evaluates it.
        self.steps = steps

    def __repr__(self) -> str:
        return f"JsonPath({self.text!r})"

    @property
    def is_plain(self) -> bool:
        return self.steps is not None

    def find(self, value: Any) -> list[Any]:
        """All matched values, in jsonpath-rw's order."""
        if self.steps is None:
            return [m.value for m in self._expr.find(value)]
        found = self.get(value)
        return [] if found is MISSING else [found]

    def get(self, value: Any) -> Any:
        """The single matched value of a plain path, or MISSING. Non-plain paths: the only match,
        MISSING when there is none, and ValueError when there are several."""
        steps = self.steps
        if steps is None:
            matches = self._expr.find(value)
            if not matches:
                return MISSING
            if len(matches) > 1:
                raise ValueError(f"{self.text} matched {len(matches)} values")
            return matches[0].value
        for step in steps:
            if type(step) is str:
                # jsonpath-rw's Fields only matches on objects (value[field] on a list or str fails).
                if type(value) is not dict:
                    return MISSING
                value = value.get(step, MISSING)
                if value is MISSING:
                    return MISSING
            else:
                if not isinstance(value, (list, str)) or not -len(value) <= step < len(value):
                    return MISSING
                value = value[step]
        return value

    def matches_with_paths(self, value: Any) -> list[tuple[tuple[str | int, ...], Any]]:
        """Each match with the concrete key/index steps that lead to it from the top."""
        if self.steps is not None:
            found = self.get(value)
            return [] if found is MISSING else [(self.steps, found)]
        out = []
        for m in self._expr.find(value):
            if type(m) is _Wrapped:  # `[*].`parent``: a list that exists only inside jsonpath-rw
                continue
            steps: list[str | int] = []
            d = m
            while d is not None and d.context is not None:
                if type(d.context) is _Wrapped:
                    # `[*]` on a non-list: the match is the wrapped value itself, found where the
                    # wrapper's path points, not at [0] of a list that does not exist.
                    d = d.context
                    continue
                p = d.path
                if type(p) is rw.Fields:
                    steps.append(p.fields[0])
                elif isinstance(p, rw.Index):
                    steps.append(p.index)
                else:  # a step we cannot address
                    break
                d = d.context
            else:
                out.append((tuple(reversed(steps)), m.value))
        return out


@functools.lru_cache(maxsize=1024)
def compile_path(text: str) -> JsonPath:
    """Parse `text` once (validation and the loaded sync share the result; reloads reuse it).
    Raises JsonPathError with jsonpath-rw's reason."""
    if not isinstance(text, str) or not text.strip():
        raise JsonPathError("empty JSONPath expression")
    try:
        expr = _parser().parse(text)
        _guard(expr)
    except Exception as exc:  # ours, or jsonpath-rw's bare Exception for lexer/parser errors
        raise JsonPathError(f"invalid JSONPath {text!r}: {exc}") from None
    return JsonPath(text, expr, _plain_steps(expr))


def without(value: Any, paths: list[JsonPath]) -> Any:
    """A copy of `value` with every match of `paths` removed; `value` itself is never modified.

    Only the containers on the way to a removed item are copied."""
    targets: set[tuple[str | int, ...]] = set()
    for path in paths:
        for steps, _ in path.matches_with_paths(value):
            normalized = _normalize(value, steps)
            if normalized:
                targets.add(normalized)
    if not targets:
        return value
    # Remove list items from the highest index down so earlier removals do not shift later ones.
    ordered = sorted(targets, key=lambda s: [(1, x) if type(x) is int else (0, x) for x in s], reverse=True)
    copies: set[int] = set()

    def own(container: Any) -> Any:
        if id(container) in copies:
            return container
        copy = dict(container) if isinstance(container, dict) else list(container)
        copies.add(id(copy))
        return copy

    root = own(value)
    for steps in ordered:
        parent = root
        for step in steps[:-1]:
            child = own(parent[step])
            parent[step] = child
            parent = child
        del parent[steps[-1]]
    return root


def _normalize(value: Any, steps: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    """`steps` with negative indices made absolute, or None if they do not lead through containers."""
    out: list[str | int] = []
    for step in steps:
        if isinstance(value, dict) and type(step) is str and step in value:
            out.append(step)
        elif isinstance(value, list) and type(step) is int and -len(value) <= step < len(value):
            step = step % len(value)
            out.append(step)
        else:
            return None
        value = value[step]
    return tuple(out)
