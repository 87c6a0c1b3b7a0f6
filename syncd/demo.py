"""`syncd demo`: a fake API that changes over time, a webhook receiver that prints what it gets,
and the real daemon between them, all on 127.0.0.1 with a temporary state directory."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiohttp import web

from syncd.daemon import Daemon
from syncd.settings import load_settings
from syncd.signing import secret_key
from syncd.units import parse_duration

NAMES = ["Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "Edsger", "Radia"]
DEPTS = ["eng", "ops", "sales", "hr"]


def _say(*parts: str) -> None:
    print(*parts, flush=True)


class FakeApi:
    """The HR API of the README's example; every few polls somebody joins, leaves or changes."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.next_id = 4
        self.people = {
            1: {"id": 1, "name": "John", "dept": "eng", "last_login": 0},
            2: {"id": 2, "name": "Jane", "dept": "ops", "last_login": 0},
            3: {"id": 3, "name": "Joan", "dept": "hr", "last_login": 0},
        }

    async def handle(self, request: web.Request) -> web.Response:
        for person in self.people.values():
            person["last_login"] = int(time.time())  # ignored via ignore_fields: never an event
        body = {"response": {"payload": {"employees": [{"employee": dict(p)} for p in self.people.values()]}}}
        return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())

    def mutate(self) -> None:
        action = self.rnd.choice(["hire", "rename", "move", "leave"] if len(self.people) > 2 else ["hire"])
        if action == "hire":
            pid, self.next_id = self.next_id, self.next_id + 1
            self.people[pid] = {"id": pid, "name": self.rnd.choice(NAMES), "dept": self.rnd.choice(DEPTS), "last_login": 0}
            _say(f"[api]  hired employee {pid} ({self.people[pid]['name']})")
        elif action == "rename":
            pid = self.rnd.choice(list(self.people))
            old, new = self.people[pid]["name"], self.rnd.choice(NAMES)
            self.people[pid]["name"] = new
            _say(f"[api]  renamed employee {pid}: {old} -> {new}")
        elif action == "move":
            pid = self.rnd.choice(list(self.people))
            self.people[pid]["dept"] = self.rnd.choice([d for d in DEPTS if d != self.people[pid]["dept"]])
            _say(f"[api]  moved employee {pid} to {self.people[pid]['dept']}")
        else:
            pid = self.rnd.choice(list(self.people))
            _say(f"[api]  employee {pid} ({self.people.pop(pid)['name']}) left")


class Receiver:
    """A webhook receiver that checks both signatures like a real one would, then prints the event."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.key = secret_key(secret)
        self.received = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        msg_id, ts = request.headers.get("webhook-id", ""), request.headers.get("webhook-timestamp", "")
        expected = base64.b64encode(hmac.new(self.key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
        given = [s.partition(",")[2] for s in request.headers.get("webhook-signature", "").split()]
        knit = base64.urlsafe_b64encode(hmac.new(self.secret.encode(), body, hashlib.sha256).digest()).rstrip(b"=").decode()
        ok = expected in given and hmac.compare_digest(knit, request.headers.get("X-Knit-Signature", ""))
        event = orjson.loads(body)
        self.received += 1
        data = orjson.dumps(event["eventData"]).decode()
        _say(f"[hook] {event['eventType']:<15} {event['syncJobId']}/{event['recordId']:<3} {event['syncType']:<12} "
             f"signature {'ok' if ok else 'INVALID'}  {data}")
        return web.Response(status=204 if ok else 401)


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def run_demo(args: argparse.Namespace) -> int:
    from syncd import config, logs
    from syncd.cli import _serve as serve_daemon

    try:
        interval = parse_duration(args.interval)
    except ValueError as exc:
        print(f"syncd demo: --interval: {exc}", file=sys.stderr)
        return 2
    if not config.MIN_INTERVAL <= interval <= 3600:
        print(f"syncd demo: --interval must be between {config.MIN_INTERVAL:g}s and 1h", file=sys.stderr)
        return 2
    rnd = random.Random()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    api, receiver = FakeApi(rnd), Receiver(secret)
    api_app, hook_app = web.Application(), web.Application()
    api_app.router.add_get("/api/v1/employees", api.handle)
    hook_app.router.add_post("/hook", receiver.handle)
    api_runner, api_port = await _serve(api_app)
    hook_runner, hook_port = await _serve(hook_app)

    with tempfile.TemporaryDirectory(prefix="syncd-demo-") as tmp:
        conf = Path(tmp) / "conf.d"
        conf.mkdir()
        (conf / "employees.toml").write_text(
            f'webhook_url = "http://127.0.0.1:{hook_port}/hook"\n'
            'list_identifier = "$.response.payload.employees"\n'
            'record_identifier = "$.employee.id"\n'
            'ignore_fields = ["$.employee.last_login"]\n'
            f'interval = "{args.interval}"\n'
            '\n[api_details]\n'
            f'base_url = "http://127.0.0.1:{api_port}"\n'
            'path = "/api/v1/employees"\n'
        )
        overrides = {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_")}
        # Everything with state or reach beyond the demo is its own, whatever the environment or the
        # settings file say: SYNCD_STATE_URL or SYNCD_API_CONFIG_DIR exported for the real daemon
        # must not let the demo poll real syncs or overwrite their fingerprints.
        overrides = {"log_level": "warning", "listen": "127.0.0.1:0", **overrides,
                     "config_dir": conf, "state_path": Path(tmp) / "state.db", "state_url": None,
                     "api_config_dir": Path(tmp) / "api.d", "api_keys": [], "integrations": {},
                     "webhook_secret": secret, "webhook_retry_schedule": ["1s", "2s", "5s"]}
        settings = load_settings(overrides, getattr(args, "settings", None) or _no_settings(tmp))
        logs.configure(settings.log_format, settings.log_level)
        daemon = Daemon(settings)

        _say(f"syncd demo: fake API http://127.0.0.1:{api_port}/api/v1/employees  ->  syncd  ->  "
             f"receiver http://127.0.0.1:{hook_port}/hook")
        _say(f"            the API changes every ~{interval * 2:g}s; syncd polls every {interval:g}s. "
             + ("Ctrl-C to stop." if args.duration is None else f"Stopping after {args.duration:g}s."))

        async def narrate() -> None:
            while daemon.address is None:
                await asyncio.sleep(0.01)
            host, port = daemon.address
            _say(f"            metrics http://{host}:{port}/metrics, status http://{host}:{port}/v1/syncs")
            started = time.monotonic()
            while True:
                await asyncio.sleep(interval * 2 * rnd.uniform(0.7, 1.3))
                api.mutate()
                if args.duration is not None and time.monotonic() - started > args.duration:
                    break

        async def stop_later() -> None:
            await asyncio.sleep(args.duration)
            daemon.request_stop()

        helpers = [asyncio.create_task(narrate())]
        if args.duration is not None:
            helpers.append(asyncio.create_task(stop_later()))
        try:
            code = await serve_daemon(settings, daemon)
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await api_runner.cleanup()
            await hook_runner.cleanup()
    _say(f"syncd demo: stopped; the receiver got {receiver.received} events.")
    return code


def _no_settings(tmp: str) -> Path:
    # The demo must not pick up /etc/syncd/syncd.toml (or SYNCD_SETTINGS_FILE): an empty settings file.
    path = Path(tmp) / "syncd.toml"
    path.write_text("")
    return path
