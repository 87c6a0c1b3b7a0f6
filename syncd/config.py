"""Sync definitions: one TOML file per sync in `config_dir`.

Loading is three steps, each with errors that name file, key and reason:
read TOML -> validate the model -> resolve `${NAME}` and check what depends on resolved values.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus

import orjson
import xxhash
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from yarl import URL

from syncd.errors import Problem, scrub  # noqa: F401 - scrub is syncd.config's too
from syncd.events import ALL_EVENTS, DEFAULT_EVENTS
from syncd.jsonpath import JsonPath, compile_path
from syncd.settings import Settings, problems_from_validation, toml_problem
from syncd.signing import secret_key
from syncd.source.auth import basic_credentials
from syncd.source.tls import ssl_context
from syncd.units import Duration, format_duration

#: The shortest poll interval accepted (DESIGN §7). The test suite lowers it for its own daemons.
MIN_INTERVAL = 1.0
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
            for info in cls.model_fields.values():
                choices = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
                given = [c for c in choices if isinstance(c, str) and c in data]
                if len(given) > 1:
                    found = _spellings.get()
                    if found is None:
                        raise ValueError(f"{' and '.join(given)} are the same key; keep one")
                    # Noted, and the first spelling validated: the file's other problems still show.
                    found.append(Problem("", given[0], f"{' and '.join(given)} are the same key; keep one"))
                    data = {k: v for k, v in data.items() if k not in given[1:]}
        return data


#: Set by parse_definition: where _Model notes keys written in two spellings (instead of stopping
#: the validation there, which would hide every other problem of the file).
_spellings: ContextVar[list[Problem] | None] = ContextVar("_spellings", default=None)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(text: str) -> float:
    """Requests per second from `"10/s"`, `"600/m"` or `"1000/h"`."""
    match = _RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"invalid rate {text!r}: write requests per unit of time, e.g. \"10/s\", \"600/m\" or \"1000/h\"")
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


#: Keys of [api_details.pagination] that belong to one pagination type only.
_PAGINATION_KEYS = {
    "page": ("start", "size_param", "size"),
    "offset": ("start", "limit_param", "limit", "total_path"),
    "cursor": ("cursor_path", "cursor_from_last_record"),
    "next_url": ("next_url_path",),
    "link_header": (),
}
_PARAM_DEFAULT = {"page": "page", "offset": "offset", "cursor": "cursor"}


class Pagination(_Model):
    """How to fetch every page of a list (DESIGN §7). Absent: one request."""

    type: Literal["page", "offset", "cursor", "next_url", "link_header"] = Field(description="page | offset | cursor | next_url | link_header (RFC 8288 rel=\"next\").")
    param: str | None = Field(None, description="page/offset/cursor: name of the parameter sent (default: page, offset, cursor).")
    param_in: Literal["query", "body", "header"] = Field("query", description="Where the parameter goes: query string, top level of the JSON body, or a header.")
    start: int | None = Field(None, ge=0, description="page: first page number (default 1); offset: first offset (default 0).")
    size_param: str | None = Field(None, description="page: name of the page-size parameter, e.g. per_page.")
    size: int | None = Field(None, ge=1, description="page: page size sent in size_param.")
    limit_param: str | None = Field(None, description="offset: name of the page-size parameter (default limit when limit is set).")
    limit: int | None = Field(None, ge=1, description="offset: page size sent in limit_param.")
    total_path: str | None = Field(None, description="offset: JSONPath to the total number of records; stop when the offset reaches it.")
    cursor_path: str | None = Field(None, description="cursor: JSONPath to the next cursor in the response.")
    cursor_from_last_record: str | None = Field(None, description="cursor: JSONPath inside the last record of a page to the next cursor (Stripe's starting_after).")
    next_url_path: str | None = Field(None, description="next_url: JSONPath to the URL of the next page.")
    stop_path: str | None = Field(None, description="Any type: stop when the value here is false, null or missing (e.g. $.has_more).")
    max_pages: int = Field(1000, ge=1, le=1_000_000, description="Reaching this many pages fails the run (a guard against endless lists).")

    @field_validator("total_path", "cursor_path", "cursor_from_last_record", "next_url_path", "stop_path")
    @classmethod
    def _jsonpath(cls, value: str | None) -> str | None:
        if value is not None:
            compile_path(value)
        return value

    @model_validator(mode="after")
    def _keys_fit_type(self) -> Pagination:
        own = _PAGINATION_KEYS[self.type]
        for other, keys in _PAGINATION_KEYS.items():
            for key in keys:
                if key not in own and getattr(self, key) is not None:
                    raise ValueError(f"{key} is not used with type = \"{self.type}\" (it belongs to type = \"{other}\")")
        if self.type in ("next_url", "link_header") and self.param is not None:
            raise ValueError(f"param is not used with type = \"{self.type}\": the next page's URL comes from the response")
        if self.type == "cursor" and (self.cursor_path is None) == (self.cursor_from_last_record is None):
            raise ValueError("type = \"cursor\" needs one of cursor_path (the cursor is in the response) or "
                             "cursor_from_last_record (the cursor is a field of the page's last record)")
        if self.type == "next_url" and self.next_url_path is None:
            raise ValueError("type = \"next_url\" needs next_url_path, the JSONPath to the next page's URL (e.g. \"$.links.next\")")
        if (self.size is None) != (self.size_param is None):
            raise ValueError("size and size_param go together: size_param names the parameter, size is its value")
        return self

    @property
    def param_name(self) -> str:
        return self.param or _PARAM_DEFAULT.get(self.type, "")


class Auth(_Model):
    """How to authenticate to the API (DESIGN §7). Absent: none (headers may still carry credentials)."""

    type: Literal["bearer", "basic", "api_key", "oauth2_client_credentials"] = Field(description="bearer | basic | api_key | oauth2_client_credentials.")
    token: str | None = Field(None, repr=False, description="bearer: the token.")
    username: str | None = Field(None, description="basic: the user name.")
    password: str | None = Field(None, repr=False, description="basic: the password.")
    name: str | None = Field(None, description="api_key: the header or query parameter name, e.g. X-Api-Key.")
    value: str | None = Field(None, repr=False, description="api_key: the key.")
    location: Literal["header", "query"] = Field("header", validation_alias=_alias("in"), description="api_key: header or query.")
    token_url: str | None = Field(None, description="oauth2_client_credentials: the token endpoint.")
    client_id: str | None = Field(None, description="oauth2_client_credentials: the client id.")
    client_secret: str | None = Field(None, repr=False, description="oauth2_client_credentials: the client secret.")
    scopes: list[str] = Field(default_factory=list, description="oauth2_client_credentials: scopes requested.")
    audience: str | None = Field(None, description="oauth2_client_credentials: audience parameter (Auth0 and others).")
    extra: dict[str, str] = Field(default_factory=dict, repr=False, description="oauth2_client_credentials: more form fields for the token request.")
    client_auth: Literal["basic", "body"] = Field("basic", description="oauth2_client_credentials: send the client credentials as HTTP Basic (RFC 6749 default) or in the form body.")

    _NEEDS = {
        "bearer": ("token",),
        "basic": ("username", "password"),
        "api_key": ("name", "value"),
        "oauth2_client_credentials": ("token_url", "client_id", "client_secret"),
    }

    @model_validator(mode="after")
    def _keys_fit_type(self) -> Auth:
        needs = self._NEEDS[self.type]
        missing = [key for key in needs if not getattr(self, key)]
        if missing:
            raise ValueError(f"type = \"{self.type}\" needs {' and '.join(missing)}")
        for other, keys in self._NEEDS.items():
            for key in keys:
                if key not in needs and getattr(self, key) is not None:
                    raise ValueError(f"{key} is not used with type = \"{self.type}\" (it belongs to type = \"{other}\")")
        if self.type != "oauth2_client_credentials" and (self.scopes or self.audience or self.extra):
            raise ValueError("scopes, audience and extra are only used with type = \"oauth2_client_credentials\"")
        if self.token_url is not None:
            absolute_url(self.token_url)
        return self

    def secret_values(self) -> set[str]:
        """Every form in which a credential may come back in an error body: raw, and encoded the
        way it was sent (Basic headers, form-encoded client secrets)."""
        values = {v for v in (self.token, self.password, self.value, self.client_secret, *self.extra.values()) if v}
        if self.type == "basic":
            values.add(basic_credentials(self.username, self.password))
        if self.type == "oauth2_client_credentials":
            values.add(basic_credentials(self.client_id, self.client_secret, form_encoded=True))
            values.add(quote_plus(self.client_secret))
        return values


class Retry(_Model):
    """In-poll retries of one request: connection errors, timeouts, 408, 429 and 5xx."""

    retries: int = Field(3, ge=0, le=20, description="Retries after the first attempt; 0 turns retries off.")
    backoff: Duration = Field(1.0, ge=0, description="First wait; doubled each time, with jitter.")
    max_backoff: Duration = Field(30.0, ge=0, description="Longest wait between attempts (Retry-After may ask for more, up to the interval).")


class ApiDetails(_Model):
    """The request syncd sends on every poll."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field("GET", description="HTTP method.")
    base_url: str = Field(validation_alias=_alias("base_url", "baseUrl", "baseURL"), description="Scheme, host and optional path prefix, e.g. https://hr.example.com.")
    path: str = Field("", description="Appended to base_url; may carry a query string.")
    body: str | None = Field(None, description="Request body: a JSON document as a string (as Knit sends it).")
    headers: dict[str, str] = Field(default_factory=dict, repr=False, description="Extra request headers; values are redacted in logs.")
    pagination: Pagination | None = Field(None, description="How to fetch every page; absent: one request.")
    auth: Auth | None = Field(None, description="How to authenticate; absent: none.")
    retry: Retry = Field(default_factory=Retry, description="Retries of each request on transient failures.")

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
        return absolute_url(value)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ("/" + self.path.lstrip("/") if self.path else "")


def absolute_url(value: str) -> str:
    """`value` if it is an absolute http(s) URL; ValueError otherwise."""
    try:
        url = URL(value)
        if url.scheme in ("http", "https") and url.host:
            return value
    except ValueError:
        pass
    raise ValueError("must be an absolute http:// or https:// URL, e.g. https://api.example.com")


class SyncSpec(_Model):
    """One sync definition, as written in a `conf.d/*.toml` file (Knit's camelCase names accepted)."""

    idempotency_id: str | None = Field(None, pattern=_ID_PATTERN, validation_alias=_alias("idempotency_id", "idempotencyId"), description="Unique id of the sync; default: the file name without .toml.")
    webhook_url: str = Field(validation_alias=_alias("webhook_url", "webhookURL", "webhookUrl"), description="Where events are POSTed. https://, or http:// to a loopback host.")
    list_identifier: str | None = Field(None, validation_alias=_alias("list_identifier", "listIdentifier"), description="JSONPath to the array of records; absent: the whole response is one record.")
    record_identifier: str | None = Field(None, validation_alias=_alias("record_identifier", "recordIdentifier"), description="JSONPath inside each record to its id; required with list_identifier.")
    interval: Duration = Field(300.0, description="Time between polls: 1s to 7d.")
    timeout: Duration = Field(30.0, description="Timeout of each request to the API: 100ms to 1h.")
    ignore_fields: list[str] = Field(default_factory=list, validation_alias=_alias("ignore_fields", "ignoreFields"), description="JSONPaths inside each record left out of the fingerprint (still sent in eventData).")
    webhook_secret: str | None = Field(None, repr=False, validation_alias=_alias("webhook_secret", "webhookSecret"), description="Signing secret for this sync; overrides the daemon's webhook_secret.")
    rate_limit: str | None = Field(None, validation_alias=_alias("rate_limit", "rateLimit"), description="Most requests per unit of time to the API for this sync, e.g. \"10/s\" or \"600/m\".")
    empty_on_status: list[int] = Field(default_factory=list, validation_alias=_alias("empty_on_status", "emptyOnStatus"), description="HTTP statuses that mean \"no records\" (on a later page: the end of the list) instead of a failure, e.g. [404].")
    tls_verify: bool = Field(True, validation_alias=_alias("tls_verify", "tlsVerify"), description="Verify the API's TLS certificate. false is logged as a warning at every load.")
    ca_file: str | None = Field(None, validation_alias=_alias("ca_file", "caFile"), description="PEM file of CA certificates to trust for the API instead of the system's.")
    client_cert: str | None = Field(None, validation_alias=_alias("client_cert", "clientCert"), description="PEM client certificate for mutual TLS.")
    client_key: str | None = Field(None, repr=False, validation_alias=_alias("client_key", "clientKey"), description="PEM private key of client_cert (if not inside it).")
    events: list[str] = Field(default_factory=lambda: list(DEFAULT_EVENTS), description="Event types this sync sends: record.new, record.modified, record.deleted, and the opt-in lifecycle events sync.events.processed and sync.events.allConsumed.")
    initial_sync: Literal["emit", "skip"] = Field("emit", validation_alias=_alias("initial_sync", "initialSync"), description="emit: the first run sends every record as record.new; skip: it only takes the baseline.")
    confirm_deletes_after: int = Field(1, ge=1, le=1000, validation_alias=_alias("confirm_deletes_after", "confirmDeletesAfter"), description="Consecutive successful runs a record must be missing before record.deleted is sent.")
    max_delete_fraction: float | None = Field(None, gt=0, le=1, validation_alias=_alias("max_delete_fraction", "maxDeleteFraction"), description="Fail a run that would delete more than this share of the stored records (syncs with fewer than 10 are exempt); `syncd once ID --accept-deletes` commits it once.")
    keep_records: bool = Field(False, validation_alias=_alias("keep_records", "keepRecords"), description="Store each record's last body: record.modified then carries changedFields, record.deleted the last body.")
    conditional_requests: bool = Field(True, validation_alias=_alias("conditional_requests", "conditionalRequests"), description="One-request syncs: send the last ETag/Last-Modified back; 304 Not Modified is an unchanged run.")
    api_details: ApiDetails = Field(validation_alias=_alias("api_details", "apiDetails"), description="The request to send.")

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in ALL_EVENTS]
        if unknown:
            raise ValueError(f"unknown event type {unknown[0]!r}; choose from {', '.join(ALL_EVENTS)}")
        if len(set(value)) != len(value):
            raise ValueError("an event type is listed twice")
        return value

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: float) -> float:
        if not MIN_INTERVAL <= value <= 7 * 86400.0:
            raise ValueError(f"{format_duration(value)} is out of range: between {format_duration(MIN_INTERVAL)} and 7d")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0.1 <= value <= 3600.0:
            raise ValueError(f"{format_duration(value)} is out of range: between 100ms and 1h")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @field_validator("empty_on_status")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if not 300 <= status <= 599:
                raise ValueError(f"{status} is not an error status (300-599); 2xx answers are read as they are")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SyncSpec:
        api = self.api_details
        pagination = api.pagination
        if pagination is not None:
            if self.list_identifier is None:
                raise ValueError("api_details.pagination needs list_identifier: pages are lists of records")
            if pagination.param_in == "body" and pagination.type in ("page", "offset", "cursor"):
                if api.method in ("GET", "DELETE"):
                    raise ValueError(f"api_details.pagination.param_in = \"body\" needs a method with a body (POST, PUT, PATCH), not {api.method}")
                if api.body is not None and not isinstance(orjson.loads(api.body), dict):
                    raise ValueError("api_details.pagination.param_in = \"body\" needs api_details.body to be a JSON object")

        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        if not self.tls_verify and self.ca_file is not None:
            raise ValueError("ca_file has no effect with tls_verify = false; remove one of them")
        if self.api_details.url.startswith("http://") and (self.ca_file or self.client_cert):
            raise ValueError("ca_file and client_cert are for https:// APIs; base_url is http://")
        return self

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
    #: Where the definition came from: "file" (config_dir) or "api" (the control API, api_config_dir).
    origin: str = "file"

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

    def __init__(self, source: str, *, lenient: bool = False) -> None:
        self.source = source
        #: A variable that is not set stays as written (`syncd status` in a shell without the
        #: service's environment: the definition is still shown, not called invalid).
        self.lenient = lenient
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
            except FileNotFoundError:
                value = None
            except OSError as exc:
                self.problems.append(Problem(self.source, key, f"cannot read ${{{name}}} from {path} ({exc.strerror or exc}): "
                                             "let the user syncd runs as read it"))
                return ""
            except UnicodeDecodeError:
                self.problems.append(Problem(self.source, key, f"${{{name}}} in {path} is not UTF-8 text"))
                return ""
        if value is None and self.lenient:
            return match.group(0)
        if value is None:
            where = (f" or in {self._creds}" if self._creds else
                     " (nor CREDENTIALS_DIRECTORY: outside systemd, set it to the directory LoadCredential= reads, "
                     "e.g. CREDENTIALS_DIRECTORY=/etc/syncd/credentials)")
            self.problems.append(Problem(self.source, key, f"variable ${{{name}}} is not set in the environment{where}"))
            return ""
        if value:
            self.secrets.add(value)
        return value


def load_file(path: Path, settings: Settings, *, lenient_vars: bool = False) -> tuple[Sync | None, list[Problem]]:
    """Read and validate one definition. Returns the Sync, or None and the problems."""
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        return None, [toml_problem(source, exc)]
    except (OSError, UnicodeDecodeError) as exc:
        if path.is_symlink() and not path.exists():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            reason = (f"a symbolic link to {target}, which does not exist or is a loop of links; "
                      "fix or remove the link")
            return None, [Problem(source, "file", reason)]
        return None, [Problem(source, "file", f"cannot read: {exc}")]

    origin = "api" if path.parent == settings.api_dir else "file"
    return parse_definition(data, settings, source=source, default_id=path.stem, file=path, origin=origin,
                            lenient_vars=lenient_vars)


def parse_definition(data: Any, settings: Settings, *, source: str, default_id: str | None, file: Path,
                     origin: str = "file", lenient_vars: bool = False) -> tuple[Sync | None, list[Problem]]:
    """Validate one definition, from a TOML file or a control-API body alike: the Sync, or None
    and every problem (each naming `source`, the key and the reason). ${NAME} is resolved."""
    if not isinstance(data, dict):
        return None, [Problem(source, "(top level)", "a definition is a table (a JSON object)")]
    resolver = _Resolver(source, lenient=lenient_vars)
    resolved = resolver.resolve(data, "")
    problems = resolver.problems + _pair_problems(source, resolved)
    spellings: list[Problem] = []
    token = _spellings.set(spellings)
    try:
        spec = SyncSpec.model_validate(resolved, context={"allow_insecure_webhooks": settings.allow_insecure_webhooks})
    except ValidationError as exc:
        problems += problems_from_validation(exc, source)
    finally:
        _spellings.reset(token)
    problems += [Problem(source, p.key, p.reason) for p in spellings]
    if not problems:
        problems += _resolved_problems(source, spec)
    if problems:
        return None, _scrub_problems(problems, resolver.secrets)
    sync_id = spec.idempotency_id or default_id
    if sync_id is None or not re.match(_ID_PATTERN, sync_id):
        return None, [Problem(source, "idempotency_id", f"the file name {default_id!r} is not a valid sync id (letters, digits, '_', '.', '-'); set idempotency_id")]
    shape = xxhash.xxh3_64_hexdigest(orjson.dumps([spec.list_identifier, spec.record_identifier, sorted(spec.ignore_fields)]))
    digest = xxhash.xxh3_64_hexdigest(orjson.dumps(spec.model_dump(mode="json")))
    return (
        Sync(
            id=sync_id,
            file=file,
            origin=origin,
            spec=spec,
            url=spec.api_details.url,
            list_path=spec.list_identifier and compile_path(spec.list_identifier),
            id_path=spec.record_identifier and compile_path(spec.record_identifier),
            ignore_paths=tuple(compile_path(text) for text in spec.ignore_fields),
            shape=shape,
            digest=digest,
            secrets=secret_variants(resolver.secrets | _literal_secrets(spec)
                                    | (spec.api_details.auth.secret_values() if spec.api_details.auth else set())),
        ),
        [],
    )


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Header and query parameter names whose values are credentials, however they were written.
_SECRET_NAME = re.compile(r"(?i)auth|token|key|secret|pass|cookie|session|sig|credential|bearer|code")


def _literal_secrets(spec: SyncSpec) -> set[str]:
    """Credentials written into the definition itself rather than as ${NAME}: the values of
    header and query parameters named like one. They are scrubbed from errors and logs too (an
    API that echoes the request in its error page must not put them in the journal)."""
    from urllib.parse import parse_qsl, urlsplit

    api = spec.api_details
    found = {value for name, value in api.headers.items() if _SECRET_NAME.search(name)}
    for url in (api.base_url, api.path):
        try:
            query = urlsplit(url).query
        except ValueError:
            continue
        found |= {value for name, value in parse_qsl(query) if _SECRET_NAME.search(name)}
    bearer = {value.split(None, 1)[1] for value in found if " " in value.strip()}  # "Bearer X": X alone too
    return {value for value in found | bearer if value}


def _resolved_problems(source: str, spec: SyncSpec) -> list[Problem]:
    """Checks that need the values after ${NAME} substitution: header values, credentials in the
    URL, TLS files. Each would otherwise fail every poll instead of `syncd check`."""
    problems = []
    api = spec.api_details
    for name, value in api.headers.items():
        key = f"api_details.headers.{name}"
        if not _HEADER_NAME.match(name):
            problems.append(Problem(source, key, "not a valid header name (letters, digits and !#$%&'*+.^_`|~-)"))
        elif "\r" in value or "\n" in value or "\0" in value:
            problems.append(Problem(source, key, "the value contains a line break (CR or LF) or NUL, which would "
                                                 "split the request; check the value it gets from ${NAME}"))
    auth = api.auth
    if auth is not None:
        for field_name in ("token", "username", "password", "name", "value", "client_id", "client_secret"):
            value = getattr(auth, field_name)
            if value and ("\r" in value or "\n" in value or "\0" in value):
                problems.append(Problem(source, f"api_details.auth.{field_name}", "contains a line break (CR or LF) or "
                                        "NUL; check the value it gets from ${NAME} (a trailing newline in a file?)"))
    url = URL(api.url)
    if url.user is not None or url.password is not None:
        sets_auth = auth is not None and (auth.type != "api_key" or auth.location == "header" and auth.name.lower() == "authorization")
        if sets_auth or any(k.lower() == "authorization" for k in api.headers):
            problems.append(Problem(source, "api_details.base_url", "has a user name or password and the sync also sets "
                                    "Authorization (a header or [api_details.auth]); keep one of them"))
    try:
        ssl_context(spec.tls_verify, spec.ca_file, spec.client_cert, spec.client_key)
    except ValueError as exc:
        key = "ca_file" if str(exc).startswith("cannot use ca_file") else "client_cert"
        problems.append(Problem(source, key, str(exc)))
    return problems


def load_warnings(sync: Sync) -> list[str]:
    """What is allowed but weakens the sync, logged at every load and printed by `syncd check`."""
    warnings = []
    if not sync.spec.tls_verify:
        warnings.append("tls_verify = false: the API's certificate is not checked, so anyone on the network path "
                        "can read the credentials and forge the data; prefer ca_file with the API's CA")
    return warnings


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


def secret_variants(values: set[str]) -> frozenset[str]:
    """`values` and the forms an API or a library may echo them in: JSON-escaped (\\/, \\u...),
    percent-encoded (as yarl writes a query, and with + for spaces). An error quoting any of them
    must not show the credential."""
    from urllib.parse import quote, quote_plus

    out = set()
    for value in values:
        if not value:
            continue
        json = orjson.dumps(value).decode()[1:-1]
        out |= {value, json, json.replace("/", "\\/"), quote(value, safe=""), quote(value, safe="/"),
                quote_plus(value), quote_plus(value, safe="/"), URL.build(query={"k": value}).raw_query_string[2:]}
    return frozenset(out)


def declared_id(path: Path) -> str:
    """The id a definition file claims, read leniently (for messages about files that are invalid)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return path.stem
    value = data.get("idempotency_id", data.get("idempotencyId"))
    return value if isinstance(value, str) else path.stem


def definition_files(config_dir: Path) -> list[Path]:
    if directory_problem(config_dir) is not None:
        return []
    return _definition_files(config_dir)


def is_dir(path: Path) -> bool:
    """Path.is_dir, False also where a parent cannot be entered or the name is too long."""
    try:
        return path.is_dir()
    except OSError:
        return False


#: directory_problem's answer for a directory that is not there (an optional one may not be).
NO_DIRECTORY = "directory not found"


def directory_problem(path: Path) -> str | None:
    """Why the definitions in directory `path` cannot be listed (None: they can). A directory
    that cannot be read must not pass for an empty one: every sync in it would be dropped."""
    try:
        if not path.is_dir():
            return NO_DIRECTORY
        with os.scandir(path):
            return None
    except OSError as exc:
        return f"cannot read the directory ({exc.strerror or exc})"


def _definition_files(config_dir: Path) -> list[Path]:
    """The `*.toml` files of `config_dir`; hidden files (editor temporaries) are ignored. A
    symbolic link that leads nowhere is listed too, so that it is reported instead of dropped."""
    return sorted(p for p in config_dir.glob("*.toml")
                  if not p.name.startswith(".") and (p.is_file() or (p.is_symlink() and not p.exists())))


def integration_problems(settings: Settings) -> list[Problem]:
    """[integrations.NAME] tables of the settings file: base_url, headers and auth, checked like a sync's."""
    problems = []
    for name, table in settings.integrations.items():
        where = f"settings: integrations.{name}"
        if not isinstance(table, dict):
            problems.append(Problem(where, name, "must be a table with base_url, headers and auth"))
            continue
        unknown = set(table) - {"base_url", "headers", "auth"}
        if unknown:
            problems.append(Problem(where, sorted(unknown)[0], "unknown key (base_url, headers, auth)"))
        if "base_url" in table:
            try:
                absolute_url(str(table["base_url"]))
            except ValueError as exc:
                problems.append(Problem(where, "base_url", str(exc)))
        headers = table.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            problems.append(Problem(where, "headers", "must be a table of strings"))
        if "auth" in table:
            try:
                Auth.model_validate(table["auth"])
            except ValidationError as exc:
                problems += problems_from_validation(exc, where)
    return problems


def load_dir(settings: Settings, *, lenient_vars: bool = False) -> tuple[dict[str, Sync], list[Problem]]:
    """Every valid sync in `config_dir` (and api_config_dir) by id, and every problem found
    (invalid files are left out). `lenient_vars`: a ${NAME} not set here is no problem (see
    _Resolver.lenient)."""
    config_dir = settings.config_dir
    problem = directory_problem(config_dir)
    if problem == NO_DIRECTORY:
        return {}, [Problem(str(config_dir), "config_dir", "directory not found; create it or set config_dir / SYNCD_CONFIG_DIR / --config-dir")]
    if problem is not None:
        return {}, [Problem(str(config_dir), "config_dir", f"{problem}; let the user syncd runs as read and enter it")]
    loaded: list[Sync] = []
    problems: list[Problem] = []
    paths = _definition_files(config_dir)
    api_problem = directory_problem(settings.api_dir)
    if api_problem is None and settings.api_dir.resolve() != config_dir.resolve():
        paths += _definition_files(settings.api_dir)  # syncs created through the control API
    elif api_problem != NO_DIRECTORY:
        problems.append(Problem(str(settings.api_dir), "api_config_dir",
                                f"{api_problem}; the syncs created through the control API are not loaded"))
    for path in paths:
        sync, found = load_file(path, settings, lenient_vars=lenient_vars)
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
