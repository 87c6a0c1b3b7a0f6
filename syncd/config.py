"""Sync definitions: one TOML file per sync in `config_dir`.

Loading is three steps, each with errors that name file, key and reason:
read TOML -> validate the model -> resolve `${NAME}` and check what depends on resolved values.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import xxhash
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from yarl import URL

from syncd.errors import Problem
from syncd.jsonpath import JsonPath, compile_path
from syncd.signing import secret_key
from syncd.settings import Settings, problems_from_validation, toml_problem
from syncd.units import Duration

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_VAR = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _alias(name: str, *aliases: str) -> Any:
    return AliasChoices(name, *aliases)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        # With aliases, `webhook_url` and `webhookURL` in one file would silently shadow each other.
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                choices = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
                given = [c for c in choices if isinstance(c, str) and c in data]
                if len(given) > 1:
                    raise ValueError(f"{' and '.join(given)} are the same key; keep one")
        return data


class ApiDetails(_Model):
    """The request syncd sends on every poll."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field("GET", description="HTTP method.")
    base_url: str = Field(validation_alias=_alias("base_url", "baseUrl", "baseURL"), description="Scheme, host and optional path prefix, e.g. https://hr.example.com.")
    path: str = Field("", description="Appended to base_url; may carry a query string.")
    body: str | None = Field(None, description="Request body: a JSON document as a string (as Knit sends it).")
    headers: dict[str, str] = Field(default_factory=dict, repr=False, description="Extra request headers; values are redacted in logs.")

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("body", mode="before")
    @classmethod
    def _body_as_string(cls, value: Any) -> Any:
        # A TOML table is accepted too and sent as its JSON.
        if isinstance(value, dict | list):
            return orjson.dumps(value).decode()
        return value

    @field_validator("body")
    @classmethod
    def _body_is_json(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        return value

    @field_validator("base_url")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        try:
            url = URL(value)
            if url.scheme in ("http", "https") and url.host:
                return value
        except ValueError:
            pass
        raise ValueError("must be an absolute http:// or https:// URL, e.g. https://api.example.com")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ("/" + self.path.lstrip("/") if self.path else "")


class SyncSpec(_Model):
    """One sync definition, as written in a `conf.d/*.toml` file (Knit's camelCase names accepted)."""

    idempotency_id: str | None = Field(None, pattern=_ID_PATTERN, validation_alias=_alias("idempotency_id", "idempotencyId"), description="Unique id of the sync; default: the file name without .toml.")
    webhook_url: str = Field(validation_alias=_alias("webhook_url", "webhookURL", "webhookUrl"), description="Where events are POSTed. https://, or http:// to a loopback host.")
    list_identifier: str | None = Field(None, validation_alias=_alias("list_identifier", "listIdentifier"), description="JSONPath to the array of records; absent: the whole response is one record.")
    record_identifier: str | None = Field(None, validation_alias=_alias("record_identifier", "recordIdentifier"), description="JSONPath inside each record to its id; required with list_identifier.")
    interval: Duration = Field(300.0, gt=0, description="Time between polls.")
    timeout: Duration = Field(30.0, gt=0, description="Timeout of each request to the API.")
    ignore_fields: list[str] = Field(default_factory=list, validation_alias=_alias("ignore_fields", "ignoreFields"), description="JSONPaths inside each record left out of the fingerprint (still sent in eventData).")
    webhook_secret: str | None = Field(None, repr=False, validation_alias=_alias("webhook_secret", "webhookSecret"), description="Signing secret for this sync; overrides the daemon's webhook_secret.")
    api_details: ApiDetails = Field(validation_alias=_alias("api_details", "apiDetails"), description="The request to send.")

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None:
            secret_key(value)
        return value

    @field_validator("list_identifier", "record_identifier")
    @classmethod
    def _jsonpath(cls, value: str | None) -> str | None:
        if value is not None:
            compile_path(value)  # JsonPathError is a ValueError: pydantic reports it on this key
        return value

    @field_validator("ignore_fields")
    @classmethod
    def _jsonpaths(cls, value: list[str]) -> list[str]:
        for text in value:
            compile_path(text)
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str, info: ValidationInfo) -> str:
        try:
            url = URL(value)
        except ValueError:
            raise ValueError("not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an absolute https:// URL")
        insecure_ok = bool((info.context or {}).get("allow_insecure_webhooks"))
        if url.scheme == "http" and not is_loopback(url.host) and not insecure_ok:
            raise ValueError(
                f"http:// is only allowed to loopback hosts; use https:// or set allow_insecure_webhooks = true "
                f"in the daemon settings (host {url.host})"
            )
        return value


@dataclass(frozen=True)
class Sync:
    """A validated, resolved sync definition, ready to poll."""

    id: str
    file: Path
    spec: SyncSpec = field(repr=False)  # with ${NAME} resolved: never log it whole
    url: str = field(repr=False)
    list_path: JsonPath | None
    id_path: JsonPath | None
    ignore_paths: tuple[JsonPath, ...]
    #: Changes when list_identifier, record_identifier or ignore_fields change: the next run re-baselines.
    shape: str
    #: Changes when anything in the file changes (after resolution).
    digest: str
    #: Strings that came from ${NAME}: scrubbed from anything syncd prints.
    secrets: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def display_url(self) -> str:
        """The API URL without query string, credentials or ${NAME} values, safe to log."""
        return scrub(safe_url(self.url), self.secrets)


def safe_url(url: str) -> str:
    try:
        u = URL(url)
        return str(u.with_query(None).with_fragment(None).with_user(None).with_password(None))
    except (ValueError, TypeError):
        return "<invalid url>"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Resolver:
    """Replaces ${NAME} from the environment, else $CREDENTIALS_DIRECTORY/NAME; `$${` is a literal `${`."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.secrets: set[str] = set()
        self._creds = os.environ.get("CREDENTIALS_DIRECTORY")

    def resolve(self, value: Any, key: str) -> Any:
        if isinstance(value, str):
            return _VAR.sub(lambda m: self._lookup(m, key), value)
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    def _lookup(self, match: re.Match, key: str) -> str:
        if match.group(0) == "$${":
            return "${"
        name = match.group(1)
        if not _VAR_NAME.match(name):
            self.problems.append(Problem(self.source, key, f"invalid variable name ${{{name}}} (letters, digits and _ only; write $${{ for a literal ${{)"))
            return ""
        value = os.environ.get(name)
        if value is None and self._creds:
            path = Path(self._creds) / name
            try:
                value = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError:
                value = None
        if value is None:
            where = (f" or in {self._creds}" if self._creds else
                     " (nor CREDENTIALS_DIRECTORY: outside systemd, set it to the directory LoadCredential= reads, "
                     "e.g. CREDENTIALS_DIRECTORY=/etc/syncd/credentials)")
            self.problems.append(Problem(self.source, key, f"variable ${{{name}}} is not set in the environment{where}"))
            return ""
        if value:
            self.secrets.add(value)
        return value


def load_file(path: Path, settings: Settings) -> tuple[Sync | None, list[Problem]]:
    """Read and validate one definition. Returns the Sync, or None and the problems."""
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        return None, [toml_problem(source, exc)]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(source, "file", f"cannot read: {exc}")]

    resolver = _Resolver(source)
    resolved = resolver.resolve(data, "")
    problems = resolver.problems + _pair_problems(source, resolved)
    try:
        spec = SyncSpec.model_validate(resolved, context={"allow_insecure_webhooks": settings.allow_insecure_webhooks})
    except ValidationError as exc:
        problems += problems_from_validation(exc, source)
    if problems:
        return None, _scrub_problems(problems, resolver.secrets)
    sync_id = spec.idempotency_id or path.stem
    if not re.match(_ID_PATTERN, sync_id):
        return None, [Problem(source, "idempotency_id", f"the file name {path.stem!r} is not a valid sync id (letters, digits, '_', '.', '-'); set idempotency_id")]
    shape = xxhash.xxh3_64_hexdigest(orjson.dumps([spec.list_identifier, spec.record_identifier, sorted(spec.ignore_fields)]))
    digest = xxhash.xxh3_64_hexdigest(orjson.dumps(spec.model_dump(mode="json")))
    return (
        Sync(
            id=sync_id,
            file=path,
            spec=spec,
            url=spec.api_details.url,
            list_path=spec.list_identifier and compile_path(spec.list_identifier),
            id_path=spec.record_identifier and compile_path(spec.record_identifier),
            ignore_paths=tuple(compile_path(text) for text in spec.ignore_fields),
            shape=shape,
            digest=digest,
            secrets=frozenset(resolver.secrets),
        ),
        [],
    )


def _pair_problems(source: str, data: Any) -> list[Problem]:
    if not isinstance(data, dict):
        return []
    has_list = any(data.get(k) is not None for k in ("list_identifier", "listIdentifier"))
    has_id = any(data.get(k) is not None for k in ("record_identifier", "recordIdentifier"))
    if has_list and not has_id:
        return [Problem(source, "record_identifier", "required when list_identifier is set (JSONPath to the id inside each record, e.g. \"$.id\")")]
    if has_id and not has_list:
        return [Problem(source, "record_identifier", "only used with list_identifier; without list_identifier the whole response is one record")]
    return []


def _scrub_problems(problems: list[Problem], secrets: set[str]) -> list[Problem]:
    return [Problem(p.source, p.key, scrub(p.reason, secrets)) for p in problems]


def scrub(text: str, secrets: set[str] | frozenset[str]) -> str:
    """`text` with every secret value replaced by ***."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def declared_id(path: Path) -> str:
    """The id a definition file claims, read leniently (for messages about files that are invalid)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return path.stem
    value = data.get("idempotency_id", data.get("idempotencyId"))
    return value if isinstance(value, str) else path.stem


def definition_files(config_dir: Path) -> list[Path]:
    """The `*.toml` files of `config_dir`; hidden files (editor temporaries) are ignored."""
    return sorted(p for p in config_dir.glob("*.toml") if not p.name.startswith(".") and p.is_file())


def load_dir(settings: Settings) -> tuple[dict[str, Sync], list[Problem]]:
    """Every valid sync in `config_dir` by id, and every problem found (invalid files are left out)."""
    config_dir = settings.config_dir
    if not config_dir.is_dir():
        return {}, [Problem(str(config_dir), "config_dir", "directory not found; create it or set config_dir / SYNCD_CONFIG_DIR / --config-dir")]
    loaded: list[Sync] = []
    problems: list[Problem] = []
    for path in definition_files(config_dir):
        sync, found = load_file(path, settings)
        problems.extend(found)
        if sync is not None:
            loaded.append(sync)
    by_id: dict[str, list[Sync]] = {}
    for sync in loaded:
        by_id.setdefault(sync.id, []).append(sync)
    syncs: dict[str, Sync] = {}
    for sync_id, group in by_id.items():
        if len(group) == 1:
            syncs[sync_id] = group[0]
            continue
        for sync in group:
            others = ", ".join(str(o.file) for o in group if o is not sync)
            problems.append(Problem(str(sync.file), "idempotency_id", f"{sync_id!r} is also used by {others}; every sync needs its own id"))
    return syncs, problems
