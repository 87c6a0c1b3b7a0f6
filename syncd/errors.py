"""The few named errors syncd raises, each carrying what a sysadmin needs to act on it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One configuration problem: where it is, which key, and what is wrong."""

    source: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.reason}"


class SyncdError(Exception):
    """Base class of syncd's own errors."""


class ConfigError(SyncdError):
    """Settings or sync definitions are invalid; carries every problem found, not only the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RunError(SyncdError):
    """A poll failed; nothing of it may change the state. `stage` says where (fetch, parse, extract)."""

    stage = "run"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class FetchError(RunError):
    """The API could not be reached or did not answer 2xx with a body within the limits."""

    stage = "fetch"
    #: Unix time before which the API asked not to be polled again (a long Retry-After), if any.
    not_before: float | None = None


class ParseError(RunError):
    """The response body is not strict JSON."""

    stage = "parse"


class ExtractError(RunError):
    """The JSON does not have the shape the sync definition describes (list path missing, not an array)."""

    stage = "extract"


class CommitError(RunError):
    """The run's result could not be committed (the state changed under it); nothing was written."""

    stage = "commit"


def scrub(text: str, secrets: set[str] | frozenset[str]) -> str:
    """`text` with every secret value replaced by ***."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
