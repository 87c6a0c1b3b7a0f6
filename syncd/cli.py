"""The `syncd` command. Only this module maps errors to exit codes and wires signals."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from pathlib import Path
from typing import Any

from syncd import __version__
from syncd.errors import ConfigError
from syncd.settings import Settings

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_CONFIG = 78  # sysexits.h EX_CONFIG: systemd's RestartPreventExitStatus=78 stops restart loops

_SETTINGS_HELP_GROUP = "settings (each also SYNCD_<NAME> in the environment or <name> in the settings file)"


def _settings_parser() -> argparse.ArgumentParser:
    """Flags for every setting, named after it in kebab case. Unset flags stay out of the namespace."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group(_SETTINGS_HELP_GROUP)
    group.add_argument("--settings", metavar="FILE", default=argparse.SUPPRESS,
                       help="settings file (TOML); default /etc/syncd/syncd.toml if it exists, or SYNCD_SETTINGS_FILE")
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f"setting_{name}", "default": argparse.SUPPRESS, "help": (info.description or "").replace("%", "%%")}
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name == "webhook_retry_schedule":
            kwargs["metavar"] = "LIST"
            kwargs["help"] += " Comma-separated, e.g. 5s,30s,2m."
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
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when the configuration is valid")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("once", parents=[common], help="run one poll of one sync now and print its events",
                       description="Poll sync ID once, commit the result to the state database like the daemon "
                                   "(events go to the outbox for delivery), and print each event as one JSON line. "
                                   "Exit 0 if the poll succeeded, 1 if it failed.")
    p.add_argument("sync_id", metavar="ID", help="the sync's idempotency_id (default: its file name without .toml)")
    p.add_argument("--dry-run", action="store_true", help="print the events but write nothing to the state database")
    p.set_defaults(func=cmd_once)

    p = sub.add_parser("secret", help="print a new random webhook signing secret (whsec_...)",
                       description="Print a fresh Standard Webhooks secret: whsec_ followed by base64 of 32 random bytes.")
    p.set_defaults(func=cmd_secret)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"syncd: configuration is invalid ({len(exc.problems)} problem{'s' * (len(exc.problems) != 1)})", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _configure_logs(settings: Settings) -> None:
    from syncd import logs

    logs.configure(settings.log_format, settings.log_level)


def cmd_check(args: argparse.Namespace) -> int:
    from syncd.config import load_dir

    settings = _load_settings(args)
    syncs, problems = load_dir(settings)
    if problems:
        raise ConfigError(problems)
    for sync in syncs.values():
        secret = sync.spec.webhook_secret or (settings.webhook_secret.get_secret_value() if settings.webhook_secret else None)
        if secret and not secret.startswith("whsec_"):
            print(f"{sync.file}: webhook_secret: warning: not a whsec_ secret; it is used as its UTF-8 bytes "
                  "(generate one with 'syncd secret')", file=sys.stderr)
    if settings.webhook_secret and not settings.webhook_secret.get_secret_value().startswith("whsec_"):
        print("settings: webhook_secret: warning: not a whsec_ secret; it is used as its UTF-8 bytes "
              "(generate one with 'syncd secret')", file=sys.stderr)
    if not args.quiet:
        n = len(syncs)
        print(f"syncd: configuration OK: {n} sync{'s' * (n != 1)} in {settings.config_dir}"
              + ("" if n else " (no *.toml files: nothing will be polled)"))
    return EX_OK


def cmd_once(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    _configure_logs(settings)
    return asyncio.run(_once(settings, args.sync_id, args.dry_run))


async def _once(settings: Settings, sync_id: str, dry_run: bool) -> int:
    from syncd.config import load_dir
    from syncd.engine import poll
    from syncd.errors import Problem
    from syncd.fetch import client_session
    from syncd.store import Store

    syncs, problems = load_dir(settings)
    sync = syncs.get(sync_id)
    if sync is None:
        mine = [p for p in problems if Path(p.source).stem == sync_id or f"'{sync_id}'" in p.reason]
        if mine or any(p.key == "config_dir" for p in problems):
            raise ConfigError(mine or problems)
        known = ", ".join(sorted(syncs)) or "none"
        print(f"syncd: no sync with id {sync_id!r} in {settings.config_dir} (valid syncs: {known})", file=sys.stderr)
        return EX_USAGE
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)

    store = None
    if not dry_run:
        store = await Store.open(settings.state_path)
    elif settings.state_path.exists():
        store = await Store.open(settings.state_path, readonly=True)
    try:
        async with client_session() as session:
            result = await poll(sync, store, session, max_bytes=int(settings.max_response_bytes), dry_run=dry_run)
    finally:
        if store is not None:
            await store.close()
    out = sys.stdout.buffer
    for body in result.events:
        out.write(body + b"\n")
    out.flush()
    if not result.ok:
        print(f"syncd: poll of {sync_id} failed: {result.error}", file=sys.stderr)
        return EX_FAILURE
    return EX_OK


def cmd_secret(args: argparse.Namespace) -> int:
    print("whsec_" + base64.b64encode(os.urandom(32)).decode())
    return EX_OK
