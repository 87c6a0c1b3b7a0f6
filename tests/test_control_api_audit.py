"""Defects found by an audit of the control API, each pinned by a test against a real daemon:
control characters in a start body, errors a handler did not expect, secrets in URLs, stop and
start again under the same id, ${NAME} in integrations, and sync.events.processed on a
byte-identical response."""

from __future__ import annotations

import tomllib

from test_control_api import KEY, LIST, call, seed_body

from syncd import tomlw

from conftest import wait_for

#: Every character TOML forbids raw in a basic string: U+0000-U+0008, U+000A-U+001F, U+007F.
FORBIDDEN = "".join(chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def test_toml_writer_escapes_every_control_character():
    text = "tab\there " + FORBIDDEN + ' quote" backslash\\ é \u2028 \U0001f600'
    document = {"s": text, "list": [text], text: "key", "table": {text: {"inline": text}}}
    written = tomlw.dumps(document)
    assert tomllib.loads(written) == document
    assert "\x7f" not in written and "\\u007f" in written


async def test_start_body_with_a_delete_character_round_trips(upstream, receiver, inproc_daemons, conf_dir,
                                                              state_path):
    upstream.body = LIST
    d = await inproc_daemons(conf_dir, state_path, api_keys=[KEY])
    body = seed_body(upstream, receiver)
    body["apiDetails"].update(method="POST", body='{"note": "a\x7fb\\u0001c"}')
    status, answer = await call(d.address, "POST", "sync.custom.start", body)
    assert status == 200, answer
    await wait_for(lambda: upstream.requests, timeout=10)
    assert upstream.requests[0]["body"] == b'{"note": "a\x7fb\\u0001c"}'
