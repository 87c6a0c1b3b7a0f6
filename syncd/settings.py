"""Daemon settings: defaults < settings file < $CREDENTIALS_DIRECTORY < SYNCD_* environment < command line."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ByteSize, Field, SecretStr, ValidationError, field_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from syncd.errors import ConfigError, Problem
from syncd.signing import secret_key
from syncd.units import Duration

DEFAULT_SETTINGS_FILE = Path("/etc/syncd/syncd.toml")
#: Attempts span 5 days (at least 4 with the ±20% jitter), as Knit retries for 4 days (DESIGN §9).
DEFAULT_RETRY_SCHEDULE = ["5s", "30s", "2m", "10m", "30m", "1h", "2h", "4h", "8h", "16h", "24h", "24h", "24h", "24h"]
#: Settings that hold secrets: read from $CREDENTIALS_DIRECTORY/<name> too, and never printed.
SECRET_SETTINGS = ("webhook_secret", "api_keys", "state_url")


SYSTEM_STATE_DIR = Path("/var/lib/syncd")


def _default_state_path() -> Path:
    """$STATE_DIRECTORY/state.db (systemd), else /var/lib/syncd/state.db where that is writable
    (root), else $XDG_STATE_HOME/syncd/state.db, else ~/.local/state/syncd/state.db (DESIGN §10)."""
    # systemd's StateDirectory= may list several directories separated by ':'; ours is the first.
    state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir:
        return Path(state_dir) / "state.db"
    system = SYSTEM_STATE_DIR
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system / "state.db"
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "syncd" / "state.db"


def _split_list(value: Any) -> Any:
    """A list from TOML, or from the environment as JSON (`["5s","30s"]`) or commas (`5s,30s`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import orjson

            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON list: {exc}") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _split_keys(value: Any) -> Any:
    """API keys: a list, JSON, commas, or lines (the credential file has one key a line)."""
    if isinstance(value, str) and "\n" in value.strip():
        return [line.strip() for line in value.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return _split_list(value)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `:PORT` (all interfaces) into (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9731, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address (e.g. [::1]:9731), got {value!r}") from None
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:9731, got {value!r}")
    elif host and all(c.isdigit() or c == "." for c in host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address, got {value!r}") from None
    return host, int(port)


class Settings(BaseSettings):
    """How the daemon runs. Each setting is also `SYNCD_<NAME>` and `--<name-in-kebab-case>`."""

    model_config = SettingsConfigDict(env_prefix="SYNCD_", extra="forbid", validate_default=True)

    config_dir: Path = Field(Path("/etc/syncd/conf.d"), description="Directory of sync definitions (*.toml, one sync per file).")
    state_path: Path = Field(default_factory=_default_state_path, description="SQLite state database (fingerprints, outbox, run history). Default: $STATE_DIRECTORY/state.db, else /var/lib/syncd/state.db when writable (root), else $XDG_STATE_HOME/syncd/state.db or ~/.local/state/syncd/state.db.")
    listen: str = Field("127.0.0.1:9731", description="HOST:PORT for /metrics, /healthz and /readyz.")
    log_format: Literal["auto", "json", "console"] = Field("auto", description="auto = console on a TTY, JSON lines otherwise.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    webhook_concurrency: int = Field(16, ge=1, le=1024, description="Webhook deliveries in flight at once.")
    webhook_timeout: Duration = Field(30.0, gt=0, description="Timeout of one delivery attempt.")
    webhook_retry_schedule: Annotated[list[Duration], NoDecode, BeforeValidator(_split_list)] = Field(
        DEFAULT_RETRY_SCHEDULE, min_length=1, description="Delays between delivery attempts (±20% jitter); after the last one an event becomes a dead letter. The default's attempts span about 5 days (at least 4 with jitter: Knit retries for 4 days)."
    )
    webhook_secret: SecretStr | None = Field(None, description="Default signing secret (whsec_...) for syncs without their own. Prefer $CREDENTIALS_DIRECTORY/webhook_secret or the environment: a flag shows in ps.")
    max_concurrent_polls: int = Field(16, ge=1, le=1024, description="Polls running at once across all syncs. A poll that has read nothing yet gives its place back while it waits out a Retry-After or a backoff.")
    max_requests_per_host: int = Field(8, ge=1, le=1024, description="Requests in flight at once to one API host (host:port) across all syncs, token requests included.")
    allow_insecure_webhooks: bool = Field(False, description="Allow http:// webhook URLs to non-loopback hosts.")
    shutdown_timeout: Duration = Field(10.0, ge=0, description="On SIGTERM/SIGINT, how long in-flight polls and deliveries may take to finish; what is left stays queued.")
    max_response_bytes: ByteSize = Field(ByteSize(1024**3), gt=0, description="Largest API response accepted (after decompression; a paginated sync's pages together); larger fails the run. Memory per run grows with the records too: ~1.4 GB for 1M records of ~300 bytes, ~0.6 KB per record however small. Accepts 256MiB, 1GB, ...")
    per_sync_histograms: bool = Field(False, description="Give the poll and delivery duration histograms a sync label (13 series a sync each); off, they count all syncs together, which keeps /metrics small with thousands of syncs.")
    api_keys: Annotated[list[SecretStr], NoDecode, BeforeValidator(_split_keys)] = Field(
        default_factory=list, description="Keys of the Knit-compatible control API under /v1.0/ (off while empty): JSON or comma-separated, or $CREDENTIALS_DIRECTORY/api_keys with one key a line. A flag shows in ps: prefer the credential.")
    api_config_dir: Path | None = Field(None, description="Where syncs created through the control API are kept as TOML files. Default: api.d beside the state database.")
    api_allowed_hosts: Annotated[list[str], NoDecode, BeforeValidator(_split_list)] = Field(
        default_factory=list, description="Host patterns (fnmatch: api.example.com, *.example.com) that base, webhook and OAuth2 token URLs of API-created syncs must match; empty: any host.")
    integrations: dict[str, dict[str, Any]] = Field(default_factory=dict, description="[integrations.NAME] tables (settings file only): base_url, headers and auth for control-API syncs that name the integration in X-Knit-Integration-Id.")
    state_url: SecretStr | None = Field(None, description="postgresql://USER[:PASSWORD]@HOST[:PORT]/DB: keep the state in PostgreSQL instead of the state_path file, so that several syncd instances share the syncs (each polled by one instance at a time under a lease). Prefer $CREDENTIALS_DIRECTORY/state_url or the environment when it holds a password.")
    lease_ttl: Duration = Field(30.0, ge=3, le=3600, description="With state_url: how long an instance's lease on a sync lasts without renewal (renewed every third of it); a dead instance's syncs move to the others after this.")
    instance_id: str | None = Field(None, min_length=1, max_length=100, description="With state_url: this instance's name in leases, metrics and status. Default: HOSTNAME:PID.")
    state_pool_size: int = Field(10, ge=2, le=200, description="With state_url: connections to PostgreSQL this instance keeps open at most.")

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            text = key.get_secret_value()
            if len(text) < 16 or any(c.isspace() for c in text):
                raise ValueError("each API key must be at least 16 characters without spaces (generate one with 'syncd secret')")
        return value

    @field_validator("state_url", mode="before")
    @classmethod
    def _blank_url(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("config_dir", "state_path", "api_config_dir", mode="before")
    @classmethod
    def _blank_path(cls, value: Any) -> Any:
        # SYNCD_CONFIG_DIR= (an EnvironmentFile line left empty) means the default, never the
        # current directory (which is / under systemd).
        if isinstance(value, str) and not value.strip():
            raise PydanticUseDefault()
        return value

    @field_validator("state_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = value.get_secret_value().strip()
            if not text.startswith(("postgresql://", "postgres://")):
                raise ValueError("must be a PostgreSQL URL: postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
            if any(c in text for c in "\r\n\0"):
                raise ValueError("must not contain line breaks")
            problem = _url_problem(text)
            if problem:  # never the URL itself in the message: it holds the password
                raise ValueError(problem)
            return SecretStr(text)
        return value

    @property
    def state_location(self) -> str:
        """Where the state lives, for messages: the SQLite path, or the PostgreSQL URL without its password."""
        if self.state_url is None:
            return str(self.state_path)
        return redact_url(self.state_url.get_secret_value())

    @property
    def api_dir(self) -> Path:
        """api_config_dir, or api.d beside the state database."""
        return self.api_config_dir or self.state_path.parent / "api.d"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _no_blank_secret(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_secret")
    @classmethod
    def _usable_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret_key(value.get_secret_value())
        return value

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _CredentialsSource(settings_cls), _FileSource(settings_cls))


class _CredentialsSource(PydanticBaseSettingsSource):
    """Secrets handed over by systemd's LoadCredential= as files in $CREDENTIALS_DIRECTORY."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the base class
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return {}
        found = {}
        problems = []
        for name in SECRET_SETTINGS:
            path = Path(directory) / name
            try:
                if not path.is_file():
                    continue
                found[name] = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                problems.append(Problem(str(path), name, f"cannot read the credential ({exc.strerror or exc}): "
                                        "let the user syncd runs as read it (systemd's LoadCredential= does)"))
            except UnicodeDecodeError:
                problems.append(Problem(str(path), name, "the credential is not UTF-8 text"))
        if problems:
            raise ConfigError(problems)
        return found


_settings_file_data: ContextVar[dict[str, Any] | None] = ContextVar("_settings_file_data", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The TOML settings file, already read by `load_settings` (so its errors carry the file name)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the base class
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_settings_file_data.get() or {})


def settings_file_path(explicit: str | Path | None) -> tuple[Path | None, bool]:
    """The settings file to read and whether the user named it (then it must exist)."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get("SYNCD_SETTINGS_FILE")
    if env:
        return Path(env), True
    return DEFAULT_SETTINGS_FILE, False


def load_settings(overrides: dict[str, Any] | None = None, settings_file: str | Path | None = None) -> Settings:
    """Read every settings source. Raises ConfigError listing every problem."""
    path, required = settings_file_path(settings_file)
    source = str(path) if path else "settings"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if required:
                raise ConfigError([Problem(source, "settings", "file not found (given by --settings or SYNCD_SETTINGS_FILE)")]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([Problem(source, "settings", f"cannot read: {exc}")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([toml_problem(source, exc)]) from None
    overrides = overrides or {}

    def source_of(key: str) -> str:
        """Where the value of setting `key` came from, so the operator looks in the right place."""
        if key in overrides:
            return "--" + key.replace("_", "-")
        env = "SYNCD_" + key.upper()
        if env in os.environ:
            return f"{env} (environment)"
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if key in SECRET_SETTINGS and credentials and _is_file(Path(credentials) / key):
            return str(Path(credentials) / key)
        return source if key in data else "settings"

    token = _settings_file_data.set(data)
    try:
        settings = Settings(**overrides)
        if _same_dir(settings.api_dir, settings.config_dir):
            raise ConfigError([Problem(source_of("api_config_dir"), "api_config_dir", (
                "must not be config_dir: syncs created through the control API would be indistinguishable from your "
                "own files (and the API's stop would delete them); give it a directory of its own, e.g. "
                "/var/lib/syncd/api.d"))])
        return settings
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, source_of)) from None
    except SettingsError as exc:  # a setting that must be JSON in the environment, and is not
        field = re.search(r'field "(\w+)"', str(exc))
        key = field.group(1) if field else "settings"
        raise ConfigError([Problem(source_of(key), key, "is not valid JSON (in the environment this setting is a JSON "
                                   "object; tables are easier in the settings file)")]) from None
    finally:
        _settings_file_data.reset(token)


def toml_problem(source: str, exc: tomllib.TOMLDecodeError) -> Problem:
    """tomllib says '... (at line 3, column 7)'; put the line where a reader looks for it."""
    message = str(exc)
    key = "toml"
    if "(at line " in message:
        message, _, where = message.rpartition(" (at ")
        line, _, column = where.rstrip(")").partition(", ")
        key = line
        message = f"invalid TOML: {message} ({column})"
    else:
        message = f"invalid TOML: {message}"
    return Problem(source, key, message)


def problems_from_validation(exc: ValidationError, source: str | Callable[[str], str]) -> list[Problem]:
    """One Problem per pydantic error, with the dotted key the user wrote and a plain reason.
    `source` is the file, or a function from the top-level key to where its value came from."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        where = source(str(err["loc"][0]) if err["loc"] else "") if callable(source) else source
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown key (check the spelling; see the configuration reference in the README)"
        elif err["type"] == "missing":
            reason = "required key is missing"
        elif reason.startswith("Value error, "):
            reason = reason[len("Value error, "):]
        problems.append(Problem(where, key, reason))
    return problems


_ENCODE_HINT = ("percent-encode '/', '?', '#', '@' and ':' in the user name and password (%2F, %3F, %23, %40, %3A), "
                "e.g. with python3 -c 'import urllib.parse,sys; print(urllib.parse.quote(sys.argv[1], safe=\"\"))' PASSWORD")


def _url_problem(url: str) -> str | None:
    """What is wrong with a PostgreSQL URL as the driver will read it (None: nothing), without
    quoting any part of it."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
        host = parts.hostname
    except ValueError:
        return "is not a valid PostgreSQL URL: the part after '@' is not HOST[:PORT]; " + _ENCODE_HINT
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        return "is not a valid PostgreSQL URL: an '@' comes after the host; " + _ENCODE_HINT
    if not host and "host=" not in parts.query:
        return "names no host: postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return a == b


def redact_url(url: str) -> str:
    """A connection URL with its password (and any password= parameter) replaced by ***. Reads
    the user information up to the last '@', so a password holding an unencoded '/', '?' or '#'
    is hidden too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "postgresql://(unparsable URL)"
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        rest = (f"{user}:***@" if ":" in userinfo else f"{user}@") + rest
    return f"{scheme}://" + re.sub(r"(?i)(password=)[^&#]*", r"\1***", rest)
