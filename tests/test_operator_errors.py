"""What an operator sees when the machine around syncd is wrong: unreadable directories and
credentials, malformed settings, a closed pipe, a doubled stop signal. One line that says what,
where and what to do; never a traceback, never a secret."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys

import aiohttp
import pytest

from syncd.settings import redact_url

from conftest import cli_env, run_cli, write_sync

ROOT = os.geteuid() == 0
CAPSH = shutil.which("capsh")


async def run_unprivileged(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """The CLI as root without the capabilities that let root ignore file modes."""
    command = " ".join(["exec", sys.executable, "-m", "syncd", *args])
    proc = await asyncio.create_subprocess_exec(CAPSH, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", command,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


needs_capsh = pytest.mark.skipif(not (ROOT and CAPSH), reason="needs root and capsh to drop CAP_DAC_OVERRIDE")


def assert_clean(err: str) -> None:
    assert "Traceback" not in err and "Error:" not in err.replace("syncd:", ""), err


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "postgresql://syncd:S3cretPart/rest@db.internal:5432/syncd",  # an unencoded '/' in the password
    "postgresql://syncd:S3cret?Part@db.internal/syncd",
    "postgresql://syncd:S3cret[Part@db.internal/syncd",
    "postgresql://syncd:S3cretPart@db.internal:port/syncd",
])
async def test_a_malformed_state_url_is_a_config_error_without_the_password(url, conf_dir):
    for command in ("check", "status"):
        rc, out, err = await run_cli(command, "--config-dir", str(conf_dir), env=cli_env(SYNCD_STATE_URL=url))
        assert rc == 78, (command, rc, err)
        assert "S3cret" not in out + err and "state_url" in err and "percent-encode" in err
        assert_clean(err)
    assert "S3cret" not in redact_url(url)


def test_redacted_urls_hide_the_password_wherever_it_ends():
    assert redact_url("postgresql://u:pa/ss@host:5432/db") == "postgresql://u:***@host:5432/db"
    assert redact_url("postgresql://u:pw@host/db?sslmode=require&password=zz") == \
        "postgresql://u:***@host/db?sslmode=require&password=***"
    assert redact_url("postgresql://root@127.0.0.1:5432/test") == "postgresql://root@127.0.0.1:5432/test"


async def test_integrations_in_the_environment_must_be_json(conf_dir):
    rc, _, err = await run_cli("check", "--config-dir", str(conf_dir), env=cli_env(SYNCD_INTEGRATIONS="x"))
    assert rc == 78 and "SYNCD_INTEGRATIONS (environment): integrations: is not valid JSON" in err
    assert_clean(err)


async def test_an_empty_path_variable_means_the_default_not_the_current_directory(tmp_path):
    # SYNCD_CONFIG_DIR= left empty in an EnvironmentFile: the default, never the current directory
    # (/ under systemd), whose broken.toml here would otherwise be reported.
    (tmp_path / "broken.toml").write_text("this is not toml [")
    (tmp_path / "settings.toml").write_text("")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncd", "check", cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(SYNCD_CONFIG_DIR="", SYNCD_API_CONFIG_DIR=" ", SYNCD_SETTINGS_FILE=str(tmp_path / "settings.toml")))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = (out + err).decode()
    assert "broken.toml" not in text and "/etc/syncd/conf.d" in text, text


async def test_api_config_dir_may_not_be_config_dir(conf_dir):
    rc, _, err = await run_cli("check", "--config-dir", str(conf_dir), "--api-config-dir", str(conf_dir))
    assert rc == 78 and "--api-config-dir: api_config_dir: must not be config_dir" in err
    assert_clean(err)


async def test_a_credential_that_is_not_utf8_is_named(conf_dir, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "webhook_secret").write_bytes(b"\xff\xfe")
    (creds / "API_TOKEN").write_bytes(b"\xff\xfe")
    rc, _, err = await run_cli("check", "--config-dir", str(conf_dir), env=cli_env(CREDENTIALS_DIRECTORY=str(creds)))
    assert rc == 78 and f"{creds / 'webhook_secret'}: webhook_secret: the credential is not UTF-8 text" in err
    (creds / "webhook_secret").unlink()
    write_sync(conf_dir, "emp", "http://127.0.0.1:9", api_extra='headers = { Authorization = "Bearer ${API_TOKEN}" }')
    rc, _, err = await run_cli("check", "--config-dir", str(conf_dir), env=cli_env(CREDENTIALS_DIRECTORY=str(creds)))
    assert rc == 78 and "${API_TOKEN} in" in err and "is not UTF-8 text" in err
    assert_clean(err)


@needs_capsh
async def test_an_unreadable_credential_is_named(conf_dir, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "webhook_secret").write_text("whsec_" + "A" * 40)
    (creds / "webhook_secret").chmod(0)
    rc, _, err = await run_unprivileged("check", "--config-dir", str(conf_dir), env=cli_env(CREDENTIALS_DIRECTORY=str(creds)))
    assert rc == 78 and "webhook_secret: cannot read the credential (Permission denied)" in err
    assert_clean(err)


# -- directories ---------------------------------------------------------------------------------


async def test_a_config_dir_that_cannot_be_listed_is_not_an_empty_one(tmp_path):
    too_long = tmp_path / ("x" * 300) / "conf.d"  # ENAMETOOLONG: is_dir() raises, as for EACCES
    rc, _, err = await run_cli("check", "--config-dir", str(too_long))
    assert rc == 78 and "config_dir: cannot read the directory (File name too long)" in err
    rc, _, err = await run_cli("status", "--config-dir", str(too_long), "--state-path", str(too_long / "s.db"))
    assert "Traceback" not in err, err


@needs_capsh
async def test_an_unreadable_config_dir_fails_check_and_a_locked_parent_is_one_line(tmp_path):
    conf = tmp_path / "conf.d"
    conf.mkdir()
    write_sync(conf, "emp", "http://127.0.0.1:9")
    conf.chmod(0)
    try:
        rc, out, err = await run_unprivileged("check", "--config-dir", str(conf), env=cli_env())
        assert rc == 78 and "config_dir: cannot read the directory (Permission denied)" in err, out + err
        locked = tmp_path / "locked"
        (locked / "state").mkdir(parents=True)
        locked.chmod(0)
        for args in (("check", "--config-dir", str(locked / "conf.d")),
                     ("status", "--config-dir", str(tmp_path), "--state-path", str(locked / "state" / "s.db")),
                     ("once", "emp", "--config-dir", str(tmp_path), "--state-path", str(locked / "state" / "s.db"))):
            rc, out, err = await run_unprivileged(*args, env=cli_env())
            assert rc != 0 and "Traceback" not in err, (args, err)
    finally:
        conf.chmod(0o700)
        if (tmp_path / "locked").exists():
            (tmp_path / "locked").chmod(0o700)


@needs_capsh
async def test_status_reads_a_database_whose_directory_is_read_only(upstream, conf_dir, state_path):
    upstream.body = {"response": {"payload": {"employees": [{"employee": {"id": 1}}]}}}
    write_sync(conf_dir, "emp", upstream.url)
    rc, _, err = await run_cli("once", "emp", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert rc == 0, err
    state_path.parent.chmod(0o500)
    try:
        rc, out, err = await run_unprivileged("status", "--config-dir", str(conf_dir), "--state-path", str(state_path),
                                              env=cli_env())
        assert rc == 0 and "emp" in out, err
    finally:
        state_path.parent.chmod(0o700)


# -- secrets -------------------------------------------------------------------------------------


async def test_credentials_written_into_a_definition_are_scrubbed_from_errors(upstream, conf_dir, state_path):
    # An API that echoes the request in its error page must not put the token in the journal.
    upstream.status, upstream.content_type = 401, "text/plain"
    upstream.body = b"denied: Authorization=Bearer literalbearer666 api_token=literalquerytok X-Tenant=acme"
    write_sync(conf_dir, "lit", upstream.url, path="/api?api_token=literalquerytok&page_size=10",
               api_extra='headers = { Authorization = "Bearer literalbearer666", X-Tenant = "acme" }')
    rc, out, err = await run_cli("once", "lit", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert rc == 1 and "401" in err
    assert "literalbearer666" not in out + err and "literalquerytok" not in out + err and "acme" in err
    rc, out, err = await run_cli("status", "--json", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert rc == 0 and "literalbearer666" not in out and "literalquerytok" not in out


# -- the command line ----------------------------------------------------------------------------


async def test_every_setting_is_a_flag_of_every_command(conf_dir, state_path, tmp_path):
    for args in (("status", "--api-config-dir", str(tmp_path / "api.d")),
                 ("deliveries", "list", "--log-level", "debug", "--webhook-concurrency", "4"),
                 ("reset", "nope", "--api-config-dir", str(tmp_path / "api.d")),
                 ("secret", "--log-level", "debug")):
        rc, _, err = await run_cli(*args, "--config-dir", str(conf_dir), "--state-path", str(state_path))
        assert rc in (0, 2) and "unrecognized arguments" not in err, (args, err)
    _, out, _ = await run_cli("deliveries", "list", "--help")
    assert "--webhook-concurrency" not in out  # accepted, but not listed where it does nothing


async def test_replay_and_purge_without_a_database_exit_0(conf_dir, state_path):
    for args in (("deliveries", "replay"), ("deliveries", "purge", "--dead", "--before", "1d")):
        rc, _, err = await run_cli(*args, "--config-dir", str(conf_dir), "--state-path", str(state_path))
        assert rc == 0 and "no state database" in err, (args, rc, err)


async def test_once_piped_into_head_commits_and_exits_0(upstream, conf_dir, state_path):
    upstream.body = {"response": {"payload": {"employees": [{"employee": {"id": i, "pad": "x" * 200}}
                                                            for i in range(2000)]}}}
    write_sync(conf_dir, "emp", upstream.url)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write is EPIPE
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "syncd", "once", "emp", "--config-dir", str(conf_dir), "--state-path", str(state_path),
            stdout=write, stderr=asyncio.subprocess.PIPE, env=cli_env())
    finally:
        os.close(write)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
    rc, out, _ = await run_cli("status", "--json", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert '"records": 2000' in out.replace('"records":2000', '"records": 2000'), out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_stop_signal_delivered_twice_is_one_stop(conf_dir, state_path):
    # timeout(1) signals the daemon and then its process group: two SIGTERMs at once, one request.
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncd", "run", "--config-dir", str(conf_dir), "--state-path", str(state_path),
        "--listen", f"127.0.0.1:{port}", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=cli_env())
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the daemon did not start")
        proc.send_signal(signal.SIGTERM)
        seen = b""
        while b"stop requested" not in seen:  # the first one is handled: the second is not coalesced with it
            line = await asyncio.wait_for(proc.stderr.readline(), 10)
            assert line, seen.decode()[-2000:]
            seen += line
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, (seen + err).decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_status_in_a_shell_without_the_services_variables_calls_no_file_invalid(conf_dir, state_path):
    write_sync(conf_dir, "emp", "https://${HR_HOST}", extra='webhook_secret = "${HOOK_SECRET}"',
               api_extra='headers = { Authorization = "Bearer ${HR_TOKEN}" }')
    rc, out, err = await run_cli("status", "--config-dir", str(conf_dir), "--state-path", str(state_path))
    assert rc == 0 and "emp" in out and "invalid" not in out and "warning" not in err, out + err
    rc, _, err = await run_cli("check", "--config-dir", str(conf_dir))  # check still wants them: it checks for run
    assert rc == 78 and "${HR_TOKEN} is not set" in err


@pytest.mark.parametrize("listen, reason", [
    ("999.1.1.1:80", "'999.1.1.1' is not an IPv4 address"),
    ("[zz]:9731", "'zz' in brackets is not an IPv6 address"),
])
async def test_a_listen_address_that_cannot_be_bound_fails_check(listen, reason, conf_dir):
    rc, _, err = await run_cli("check", "--config-dir", str(conf_dir), env=cli_env(SYNCD_LISTEN=listen))
    assert rc == 78 and f"SYNCD_LISTEN (environment): listen: {reason}" in err
    assert_clean(err)


async def test_a_malformed_request_to_the_listener_is_one_json_line_without_its_headers(conf_dir, state_path, daemons):
    key = "supersecretapikey1234567"
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path), env=cli_env(SYNCD_API_KEYS=key))
    host, port = d.address.rsplit(":", 1)
    for raw in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                b"GET /v1.0/sync.custom.list HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"\x01\r\n\r\n"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        assert (await asyncio.wait_for(reader.read(100), 10)).startswith(b"HTTP/1.")
        writer.close()
    for _ in range(100):
        if len([e for e in d.logs if e.get("logger") == "aiohttp.server"]) >= 2:
            break
        await asyncio.sleep(0.05)
    assert await d.stop() == 0
    bad = [e for e in d.logs if e.get("logger") == "aiohttp.server"]
    assert len(bad) == 2 and all(e["level"] == "warning" and e["error"] == "BadHttpMessage" for e in bad), d.logs
    assert not [e for e in d.logs if e.get("raw")], d.logs  # every line JSON
    assert key not in repr(d.logs)
