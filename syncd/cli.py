"""The `syncd` command. Only this module maps errors to exit codes and wires signals."""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncd import __version__
from syncd.errors import ConfigError

if TYPE_CHECKING:
    from syncd.settings import Settings

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_CONFIG = 78  # sysexits.h EX_CONFIG: systemd's RestartPreventExitStatus=78 stops restart loops
#: A stop signal this soon after the first is the same one delivered twice, not an impatient user.
DUPLICATE_SIGNAL_WINDOW = 1.0

_SETTINGS_HELP_GROUP = "settings (each also SYNCD_<NAME> in the environment or <name> in the settings file)"


#: The settings each command uses (besides config_dir, state_path and state_url, which every command takes).
#: Its --help lists these only. Every setting is still a flag of every command (DESIGN §3), left out
#: of the help where the command does not use it. `run` and `check` (which validates what `run`
#: would use, like nginx -t) list every setting.
_COMMAND_SETTINGS = {
    "once": {"log_format", "log_level", "allow_insecure_webhooks", "max_response_bytes", "max_requests_per_host",
             "api_config_dir"},
    "status": {"api_config_dir"},
    "reset": {"api_config_dir"},
    "deliveries": set(),
    "demo": {"log_format", "log_level"},
    "secret": None,  # uses none: every flag accepted, none listed
}


def _settings_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Flags for the settings `command` uses (all of them for `run`), named after each in kebab
    case. Unset flags stay out of the namespace."""
    parser = argparse.ArgumentParser(add_help=False)
    wanted = _COMMAND_SETTINGS.get(command) if command else None
    none = command is not None and wanted is None  # the command uses no setting
    group = parser.add_argument_group(_SETTINGS_HELP_GROUP)
    group.add_argument("--settings", metavar="FILE", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS if none else
                       "settings file (TOML); default /etc/syncd/syncd.toml if it exists, or SYNCD_SETTINGS_FILE")
    from pydantic_core import PydanticUndefined

    from syncd.settings import Settings
    from syncd.units import format_duration

    for name, info in Settings.model_fields.items():
        hidden = none or wanted is not None and name not in wanted | {"config_dir", "state_path", "state_url"}
        if name == "integrations":
            continue  # tables: the settings file only
        flag = "--" + name.replace("_", "-")
        text = info.description or ""
        choices = getattr(info.annotation, "__args__", ()) if "Literal" in str(info.annotation) else ()
        if choices:
            text += f" One of: {', '.join(choices)}."
        default = info.default
        if name == "webhook_retry_schedule":
            default = ",".join(default)
        elif name == "max_response_bytes":
            default = f"{default // 2**30}GiB" if default % 2**30 == 0 else f"{default // 2**20}MiB"
        elif info.annotation is bool:
            default = "on" if default else "off"
        elif any(getattr(m, "func", None) is format_duration for m in info.metadata):
            default = format_duration(default)
        elif default is PydanticUndefined or name == "webhook_secret":
            default = None  # computed (state_path) or none (webhook_secret): the description says
        if default is not None:
            text += f" Default: {default}."
        kwargs: dict[str, Any] = {"dest": f"setting_{name}", "default": argparse.SUPPRESS,
                                  "help": argparse.SUPPRESS if hidden else text.replace("%", "%%")}
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in ("webhook_retry_schedule", "api_keys", "api_allowed_hosts"):
            kwargs["metavar"] = "LIST"
            if not hidden:
                kwargs["help"] += " Comma-separated on the command line."
        elif info.annotation is int:
            kwargs["metavar"] = "N"
        else:
            kwargs["metavar"] = name.split("_")[-1].upper()
        group.add_argument(flag, **kwargs)
    return parser


def _load_settings(args: argparse.Namespace) -> Settings:
    from syncd.settings import load_settings

    overrides = {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_")}
    return load_settings(overrides, getattr(args, "settings", None))


def build_parser() -> argparse.ArgumentParser:
    common = _settings_parser()
    flags = {name: _settings_parser(name) for name in _COMMAND_SETTINGS}
    parser = argparse.ArgumentParser(
        prog="syncd",
        description="Watch HTTP APIs and send signed webhooks for every record added, changed or removed.",
        epilog="Exit codes: 0 success, 1 a run failed, 2 usage error, 78 invalid configuration. "
               "Run 'syncd COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check", parents=[common], help="validate settings and every sync definition (like nginx -t)",
                       description="Validate the settings and every *.toml file in config_dir. Prints each problem "
                                   "as 'FILE: key: reason'. Exit 0 if everything is valid, 78 if not.")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but warnings when the configuration is valid")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("once", parents=[flags["once"]], help="run one poll of one sync now and print its events",
                       description="Poll sync ID once, commit the result to the state database like the daemon "
                                   "(events go to the outbox for delivery), and print each event as one JSON line. "
                                   "Exit 0 if the poll succeeded, 1 if it failed.")
    p.add_argument("sync_id", metavar="ID", help="the sync's idempotency_id (default: its file name without .toml)")
    p.add_argument("--dry-run", action="store_true", help="print the events but write nothing to the state database")
    p.add_argument("--accept-deletes", action="store_true",
                   help="commit this run even if it deletes more than the sync's max_delete_fraction (once)")
    p.set_defaults(func=cmd_once)

    p = sub.add_parser("run", parents=[common], help="run the daemon (polls, webhooks, /metrics)",
                       description="Run the daemon: poll every sync in config_dir on its interval, deliver webhooks, "
                                   "serve /metrics, /healthz, /readyz and /v1/syncs on --listen. Reloads config_dir "
                                   "on changes and on SIGHUP; SIGTERM/SIGINT stop it gracefully (exit 0).")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", parents=[flags["status"]], help="show each sync's last run, records, pending and dead events",
                       description="Per sync: last run, outcome, record count, pending and dead webhook events, read "
                                   "from the state database (works while the daemon runs).")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("reset", parents=[flags["reset"]], help="forget a sync's fingerprints (its next run is an initial sync)",
                       description="Forget the stored fingerprints of sync ID: its next run sends every record as "
                                   "record.new with syncType initial_sync. Queued webhooks are kept.")
    p.add_argument("sync_id", metavar="ID")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser("deliveries", help="list, replay or purge undelivered webhook events (dead letters)",
                       description="Inspect and manage webhook events that are not delivered yet. TIME is an ISO 8601 "
                                   "time (2026-11-27T10:00:00Z, 2026-11-27) or a duration meaning that long ago (2h, 3d).")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    d = dsub.add_parser("list", parents=[flags["deliveries"]], help="list pending events and dead letters")
    d.add_argument("--sync", metavar="ID", help="only this sync")
    d.add_argument("--dead", action="store_true", help="only dead letters")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.add_argument("--limit", type=int, default=1000, help="at most this many rows (default 1000)")
    d.set_defaults(func=cmd_deliveries_list)
    d = dsub.add_parser("replay", parents=[flags["deliveries"]], help="put dead letters back in the queue with fresh attempts")
    d.add_argument("--sync", metavar="ID", help="only this sync")
    d.add_argument("--since", metavar="TIME", type=parse_time, help="only events that died at or after TIME")
    d.add_argument("--event", metavar="EVENT_ID", help="only this event")
    d.set_defaults(func=cmd_deliveries_replay)
    d = dsub.add_parser("purge", parents=[flags["deliveries"]], help="delete dead letters for good")
    d.add_argument("--dead", action="store_true", required=True, help="required: only dead letters can be purged")
    d.add_argument("--before", metavar="TIME", type=parse_time, required=True, help="delete dead letters that died before TIME")
    d.add_argument("--sync", metavar="ID", help="only this sync")
    d.set_defaults(func=cmd_deliveries_purge)

    p = sub.add_parser("demo", parents=[flags["demo"]], help="a self-contained showcase: fake API, webhook receiver, daemon",
                       description="Start a local fake API whose records change over time, a local webhook receiver "
                                   "that verifies signatures and prints every event, and the daemon between them, all "
                                   "on 127.0.0.1 with a temporary state. Stop with Ctrl-C.")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS", help="stop by itself after this long")
    p.add_argument("--interval", default="2s", metavar="DURATION", help="poll interval of the demo sync (default 2s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("secret", parents=[flags["secret"]], help="print a new random webhook signing secret (whsec_...)",
                       description="Print a fresh Standard Webhooks secret: whsec_ followed by base64 of 32 random bytes.")
    p.set_defaults(func=cmd_secret)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Most commands are short-lived: no cyclic GC while pydantic, aiohttp and the rest are imported
    # (~35 ms of passes over their new objects) and while a command works on parsed JSON, which has
    # no reference cycles. The long-running ones turn it back on once started (_collect_garbage).
    gc.disable()
    parser = build_parser()
    args = parser.parse_args(argv)
    # Everything syncd writes (state, API-created definitions) holds record data or secrets.
    os.umask(0o077)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"syncd: configuration is invalid ({len(exc.problems)} problem{'s' * (len(exc.problems) != 1)})", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except StateUnusable as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return EX_FAILURE
    except BrokenPipeError:  # `syncd status | head`: the reader has what it wanted
        _stdout_gone()
        return EX_OK


def _stdout_gone() -> None:
    """The reader of stdout went away: send what is still buffered nowhere, quietly (a flush at
    exit would raise BrokenPipeError again)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _configure_logs(settings: Settings) -> None:
    from syncd import logs

    logs.configure(settings.log_format, settings.log_level)


def cmd_check(args: argparse.Namespace) -> int:
    from syncd.config import integration_problems, load_dir, load_warnings

    settings = _load_settings(args)
    syncs, problems = load_dir(settings)
    problems += integration_problems(settings)
    if problems:
        raise ConfigError(problems)
    from syncd.signing import check_secret

    default = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    if default and (warning := check_secret(default)):
        print(f"settings: webhook_secret: warning: {warning}", file=sys.stderr)
    for sync in syncs.values():
        if sync.spec.webhook_secret and (warning := check_secret(sync.spec.webhook_secret)):
            print(f"{sync.file}: webhook_secret: warning: {warning}", file=sys.stderr)
        if not sync.spec.webhook_secret and not default:
            print(f"{sync.file}: webhook_secret: warning: no secret here nor in the daemon settings: events go out "
                  "unsigned and receivers cannot tell them from forgeries (set webhook_secret; generate one with "
                  "'syncd secret')", file=sys.stderr)
        for warning in load_warnings(sync):
            print(f"{sync.file}: tls_verify: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        n = len(syncs)
        print(f"syncd: configuration OK: {n} sync{'s' * (n != 1)} in {settings.config_dir}"
              + ("" if n else " (no *.toml files: nothing will be polled)"))
    return EX_OK


def cmd_once(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    _configure_logs(settings)
    # The cyclic GC stays off (see main): its passes over 100k records' objects cost more than the
    # work itself (loading the stored fingerprints).
    code = asyncio.run(_once(settings, args.sync_id, args.dry_run, args.accept_deletes))
    # Everything is written (the database closed, events printed): skip the interpreter's teardown,
    # which frees every object one by one (~0.1 s for 100k records) only for the process to end.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (syncd once ID | head): nothing more to say there
            pass
    os._exit(code)


async def _once(settings: Settings, sync_id: str, dry_run: bool, accept_deletes: bool = False) -> int:
    from syncd.config import declared_id, load_dir, load_warnings
    from syncd.engine import poll
    from syncd.http import poll_session
    from syncd.source.fetcher import Source

    syncs, problems = load_dir(settings)
    sync = syncs.get(sync_id)
    if sync is None:
        mine = [p for p in problems if p.source.endswith(".toml") and declared_id(Path(p.source)) == sync_id]
        if mine or any(p.key == "config_dir" for p in problems):
            raise ConfigError(mine or problems)
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        known = ", ".join(sorted(syncs)) or "none"
        print(f"syncd: no sync with id {sync_id!r} in {settings.config_dir} (valid syncs: {known})", file=sys.stderr)
        return EX_USAGE
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)

    store = None
    if not dry_run:
        store = await _open_store(settings, fallback_readonly=False)
    elif settings.state_url is not None or _exists(settings.state_path):
        store = await _open_store(settings, readonly=True)
    for warning in load_warnings(sync):
        print(f"warning: {sync.file}: {warning}", file=sys.stderr)
    try:
        async with poll_session() as session:
            source = Source(session, max_bytes=int(settings.max_response_bytes),
                            max_requests_per_host=settings.max_requests_per_host)
            result = await poll(sync, store, source, dry_run=dry_run, accept_deletes=accept_deletes)
    except BaseException:
        if store is not None:
            await store.close()
        raise
    # The run is committed. The store's close (SQLite: the WAL checkpoint, ~150 ms after an
    # initial run of 100k records, in its own thread) overlaps rendering and printing the events.
    closing = asyncio.ensure_future(store.close()) if store is not None else None
    await asyncio.sleep(0)  # let the close start
    out = sys.stdout.buffer
    try:
        for body in result.events:
            out.write(body + b"\n")
        out.flush()
    except BrokenPipeError:  # `syncd once ID | head`: the run is committed all the same
        _stdout_gone()
    if closing is not None:
        await closing
    if result.warning:
        print(f"syncd: warning: {sync_id}: {result.warning}", file=sys.stderr)
    if dry_run:
        print(_dry_run_summary(result), file=sys.stderr)
    if not result.ok:
        print(f"syncd: poll of {sync_id} failed: {result.error}", file=sys.stderr)
        return EX_FAILURE
    return EX_OK


def _dry_run_summary(result) -> str:
    """One screen on what a dry run found and would have done."""
    lines = [f"syncd: dry run of {result.sync_id}: nothing was written and nothing sent"]
    lines.append(f"  pages fetched:  {result.pages} ({result.requests} request{'s' * (result.requests != 1)})")
    if not result.ok:
        lines.append(f"  outcome:        failed: {result.error}")
        return "\n".join(lines)
    lines.append(f"  records:        {result.records if result.records is not None else 'unknown'}")
    skipped = f"  skipped ids:    {result.invalid_ids}"
    if result.invalid_examples:
        skipped += " (" + "; ".join(result.invalid_examples) + ")"
    lines.append(skipped)
    lines.append(f"  duplicate ids:  {result.duplicate_ids}")
    lines.append(f"  next-page hint: {result.warning or 'none'}")
    counts = {"record.new": result.new, "record.modified": result.modified, "record.deleted": result.deleted}
    detail = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    lines.append(f"  would queue:    {result.queued} event{'s' * (result.queued != 1)} ({detail})"
                 + (f" as {result.sync_type}" if result.sync_type else ""))
    if result.pending_deletes:
        lines.append(f"  pending:        {result.pending_deletes} missing record(s) waiting for confirm_deletes_after")
    lines.append(f"  outcome:        {result.outcome}")
    return "\n".join(lines)


def _collect_garbage() -> None:
    """For a long-running command, after start-up: the cyclic GC on again, and what start-up
    created (modules, classes, settings) moved out of its way for good."""
    gc.freeze()
    gc.enable()


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    _configure_logs(settings)
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings, daemon=None) -> int:
    import signal

    import structlog

    from syncd.daemon import Daemon
    from syncd.systemd import Notifier

    _collect_garbage()
    log = structlog.get_logger("syncd")
    daemon = daemon or Daemon(settings, notifier=Notifier())
    loop = asyncio.get_running_loop()
    first_stop: float | None = None
    stopped = False

    def on_stop(signame: str) -> None:
        nonlocal first_stop
        now = time.monotonic()
        if stopped:
            return  # everything is shut down already: the exit status stays that of a clean stop
        if first_stop is not None:
            # The same stop delivered twice (timeout(1) signals the process and then its group; a
            # terminal's Ctrl-C reaches every process of the group): not a second request.
            if now - first_stop < DUPLICATE_SIGNAL_WINDOW:
                return
            # A second Ctrl-C: leave now. Safe: every commit is one transaction; pending events stay queued.
            log.warning("second stop signal: exiting immediately", signal=signame)
            os._exit(130)
        first_stop = now
        log.info("stop requested", signal=signame)
        daemon.request_stop()

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    from syncd.store import StateLocked, StoreError

    try:
        await daemon.run()
        stopped = True
    except StateLocked as exc:
        log.error("cannot start: the state database is in use", error=str(exc))
        return EX_FAILURE
    except OSError as exc:
        log.error("cannot start", error=str(exc),
                  hint="check --listen (is the port free?) and that state_path's directory is writable")
        return EX_FAILURE
    except StoreError as exc:
        log.error("cannot use the state database", state=settings.state_location, error=str(exc),
                  hint=state_error(settings, exc))
        return EX_FAILURE
    return EX_OK


class StateUnusable(Exception):
    """The state database cannot be used; the message says why and what to do, in one line."""


def state_error(settings: Settings, exc: BaseException) -> str:
    """One line about a state database that cannot be used: which, why, and what to do."""
    from syncd.store import StoreError

    where = settings.state_location
    text = str(exc)
    kind = exc.kind if isinstance(exc, StoreError) else "readonly" if isinstance(exc, PermissionError) else "other"
    if settings.state_url is not None:
        if kind == "unavailable":
            return (f"cannot reach the PostgreSQL state database {where} ({text}): check that the server runs and "
                    "accepts this user (state_url), and the network between them")
        if kind == "readonly":
            return (f"PostgreSQL refused a write to the state database {where} ({text}): grant this user CREATE and "
                    "write rights on the database (state_url)")
        if kind == "schema":
            return text
        return f"cannot use the PostgreSQL state database {where}: {text}"
    if kind == "readonly":
        return (f"cannot write the state database {where} ({text}): run as the user that owns it "
                f"(e.g. sudo -u syncd syncd ...), or check its and its directory's permissions")
    if kind == "locked":
        return f"the state database {where} stayed locked by another process ({text}); try again"
    if kind == "full":
        return f"the state database {where} cannot grow: {text}; free disk space where it lives"
    if kind == "schema":
        return text
    if kind == "corrupt":
        return (f"{where} is not a usable SQLite state database ({text}): restore it from a backup, or move it "
                "away to start afresh (its fingerprints and queued webhooks are then lost)")
    return f"cannot use the state database {where}: {text}"


def _exists(path: Path) -> bool:
    """Path.exists, but True where the answer is "cannot tell" (a parent that cannot be entered):
    opening it then says why, in one line."""
    try:
        return path.exists()
    except OSError:
        return True


async def _open_store(settings: Settings, *, readonly: bool = False, fallback_readonly: bool = True):
    """Open the state database, or raise StateUnusable with a one-line reason. An SQLite file the
    user may read but not write is opened read-only (enough for status and deliveries list)."""
    from syncd.store import StoreError, open_store

    path = settings.state_path
    url = settings.state_url.get_secret_value() if settings.state_url is not None else None
    # A CLI process is short-lived: SQLite checkpoints its WAL once, at close, not inside a commit.
    options = dict(pool_size=2, instance=False) if url else dict(autocheckpoint=False)
    try:
        return await open_store(state_path=path, state_url=url, readonly=readonly, **options)
    except (StoreError, OSError) as exc:
        # Read-only where this user may read the file but not write it or its directory (which
        # must take the -wal and -shm files): enough for status and deliveries list.
        if (not url and fallback_readonly and not readonly and _exists(path) and os.access(path, os.R_OK)
                and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))):
            try:
                return await open_store(state_path=path, readonly=True)
            except (StoreError, OSError):
                pass
        raise StateUnusable(state_error(settings, exc)) from None


def _with_store(settings: Settings, fn):
    """`await fn(store)` on the state database; None (after saying why) when there is none yet."""
    from syncd.store import StoreError

    async def go():
        if settings.state_url is None and not _exists(settings.state_path):
            print(f"syncd: no state database at {settings.state_path} yet (nothing has run; check --state-path)",
                  file=sys.stderr)
            return None
        store = await _open_store(settings)
        try:
            return await fn(store)
        except StoreError as exc:
            raise StateUnusable(state_error(settings, exc)) from None
        finally:
            await store.close()

    return asyncio.run(go())


def _deletes(view: dict) -> str:
    """Deletions not sent: held by max_delete_fraction, and waiting for confirm_deletes_after."""
    parts = []
    if view["deletes_held"]:
        parts.append(f"{view['deletes_held']} held")
    if view["pending_deletions"]:
        parts.append(f"{view['pending_deletions']} pending")
    return ", ".join(parts) or "-"


def _fmt_iso(text: str | None) -> str:
    """An ISO time from a status view, as the tables show times."""
    return "-" if text is None else text[:19].replace("T", " ") + "Z"


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    from datetime import datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    import orjson

    from syncd.config import declared_id, load_dir
    from syncd.status import sync_view

    settings = _load_settings(args)
    # Run by an operator whose shell lacks the service's environment and credentials: a ${NAME}
    # not set here does not make a definition invalid (the daemon resolves it in its own).
    syncs, problems = load_dir(settings, lenient_vars=True)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    # A broken file still declares its sync: the daemon keeps running that sync's last good version.
    invalid = {declared_id(Path(p.source)) for p in problems if p.source.endswith(".toml")}

    async def collect(store):
        return await store.all_states(), await store.outbox_stats(), await store.paused(), await store.lease_owners()

    states, stats, paused, owners = _with_store(settings, collect) or ([], {}, set(), {})
    by_id = {s.sync_id: s for s in states}
    out = []
    for sync_id in sorted(set(syncs) | set(by_id) | invalid):
        definition = "ok" if sync_id in syncs else "invalid" if sync_id in invalid else "removed"
        out.append(sync_view(sync_id, sync=syncs.get(sync_id), state=by_id.get(sync_id), stats=stats.get(sync_id),
                             definition=definition, paused=sync_id in paused, owner=owners.get(sync_id)))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps({"syncs": out}, option=orjson.OPT_INDENT_2) + b"\n")
        return EX_OK
    if not out:
        print(f"no syncs in {settings.config_dir} and no state in {settings.state_location}")
        return EX_OK
    label = {"ok": "", "invalid": " (invalid file)", "removed": " (removed)"}
    rows = [[o["id"] + label[o["definition"]] + (" (paused)" if o["paused"] else ""), o.get("origin", "-"),
             _fmt_iso(o["last_run_at"]), o["last_outcome"] or "never run", str(o["records"]), str(o["pending_events"]),
             str(o["dead_events"]), _deletes(o), (o["last_error"] or "")[:80]] for o in out]
    header = ["SYNC", "ORIGIN", "LAST RUN", "OUTCOME", "RECORDS", "PENDING", "DEAD", "DELETES", "LAST ERROR"]
    if settings.state_url is not None:  # several instances: which one polls each sync
        header.insert(2, "OWNER")
        for row, o in zip(rows, out, strict=True):
            row.insert(2, o["owner"] or "-")
    print(_table(rows, header))
    for o in out:
        if o["last_warning"]:
            print(f"warning: {o['id']}: {o['last_warning']}")
    if invalid:
        print("(invalid file): the definition file has problems (see above); 'syncd run' keeps polling the sync's "
              "last good version, if it had one, until the file is fixed")
    return EX_OK


def cmd_reset(args: argparse.Namespace) -> int:
    settings = _load_settings(args)

    found = _with_store(settings, lambda store: store.reset(args.sync_id))
    if not found:
        print(f"syncd: no state for sync {args.sync_id!r} in {settings.state_location}; nothing to reset", file=sys.stderr)
        return EX_USAGE
    print(f"reset {args.sync_id}: fingerprints forgotten; its next run is an initial sync (every record sent as record.new)")
    return EX_OK


def parse_time(text: str) -> float:
    """An ISO 8601 time or date, or a duration meaning that long ago."""
    from datetime import datetime

    from syncd.units import parse_duration

    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid TIME {text!r}: use ISO 8601 (2026-11-27T10:00:00Z, 2026-11-27) or a duration ago (2h, 3d)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def cmd_deliveries_list(args: argparse.Namespace) -> int:
    import orjson

    from syncd.status import iso_time

    settings = _load_settings(args)
    rows = _with_store(settings, lambda st: st.deliveries(sync_id=args.sync, dead_only=args.dead, limit=args.limit)) or []
    if args.json:
        data = [{
            "eventId": d.event_id, "sync": d.sync_id, "recordId": d.record_id, "eventType": d.event_type,
            "state": d.state, "attempts": d.attempts, "createdAt": iso_time(d.created_at),
            "nextAttemptAt": None if d.dead_at else iso_time(max(d.next_attempt_at, d.created_at)),
            "deadAt": iso_time(d.dead_at), "lastStatus": d.last_status, "lastError": d.last_error,
        } for d in rows]
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
        return EX_OK
    if not rows:
        print("no undelivered events" + (" (dead letters)" if args.dead else ""))
        return EX_OK
    table = [[d.event_id, d.sync_id, d.record_id, d.event_type, d.state, str(d.attempts),
              _fmt_time(d.dead_at if d.dead_at else max(d.next_attempt_at, d.created_at)), (d.last_error or "")[:60]] for d in rows]
    print(_table(table, ["EVENT", "SYNC", "RECORD", "TYPE", "STATE", "ATTEMPTS", "NEXT/DIED", "LAST ERROR"]))
    return EX_OK


def cmd_deliveries_replay(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    counts = _with_store(settings, lambda st: st.replay(sync_id=args.sync, since=args.since, event_id=args.event, now=time.time()))
    if counts is None:
        return EX_OK  # no database yet: no dead letters (said on stderr)
    count, skipped = counts
    print(f"replayed {count} dead letter{'s' * (count != 1)}: queued again with fresh attempts"
          + ("" if count or skipped else " (nothing matched)"))
    if skipped:
        print(f"skipped {skipped} superseded dead letter{'s' * (skipped != 1)}: a later event of the same record was "
              "delivered or is queued, and sending the older one after it would undo it at the receiver "
              "(see 'syncd deliveries list --dead'; 'syncd deliveries purge' removes them)")
    return EX_OK


def cmd_deliveries_purge(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    count = _with_store(settings, lambda st: st.purge_dead(before=args.before, sync_id=args.sync))
    if count is None:
        return EX_OK  # no database yet: no dead letters (said on stderr)
    print(f"purged {count} dead letter{'s' * (count != 1)}")
    return EX_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from syncd.demo import run_demo

    _collect_garbage()
    return asyncio.run(run_demo(args))


def cmd_secret(args: argparse.Namespace) -> int:
    print("whsec_" + base64.b64encode(os.urandom(32)).decode())
    return EX_OK
