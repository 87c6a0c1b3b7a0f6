"""Sync definitions and settings: what `syncd check` accepts and what it says about everything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd.config import load_dir
from syncd.errors import ConfigError
from syncd.settings import Settings, load_settings

from conftest import cli_env, run_cli

GOOD = """\
idempotency_id = "employees"
webhook_url = "https://hooks.example.com/hr"
list_identifier = "$.response.payload.employees"
record_identifier = "$.employee.id"
interval = "5m"
ignore_fields = ["$.employee.last_login"]

[api_details]
method = "GET"
base_url = "https://hr.example.com"
path = "/api/v1/employees"
body = "{}"
headers = { Authorization = "Bearer ${HR_TOKEN}" }
"""

KNIT = """\
idempotencyId = "knit-style"
webhookURL = "https://hooks.example.com/hr"
listIdentifier = "$.data"
recordIdentifier = "$.id"

[apiDetails]
method = "post"
baseUrl = "https://api.example.com"
path = "/v2/items"
body = '{"page": 1}'
"""


def load(conf_dir: Path, **settings):
    return load_dir(load_settings({"config_dir": conf_dir, "state_path": conf_dir / "x.db", **settings}))


def test_valid_definitions_and_knit_aliases(conf_dir, monkeypatch):
    monkeypatch.setenv("HR_TOKEN", "t0ken")
    (conf_dir / "employees.toml").write_text(GOOD)
    (conf_dir / "knit.toml").write_text(KNIT)
    (conf_dir / "README.txt").write_text("not a definition")
    (conf_dir / ".employees.toml.swp").write_text("garbage")
    syncs, problems = load(conf_dir)
    assert problems == []
    assert sorted(syncs) == ["employees", "knit-style"]
    emp = syncs["employees"]
    assert emp.url == "https://hr.example.com/api/v1/employees"
    assert emp.spec.api_details.headers == {"Authorization": "Bearer t0ken"}
    assert emp.spec.interval == 300 and emp.id_path.text == "$.employee.id"
    knit = syncs["knit-style"]
    assert knit.spec.api_details.method == "POST" and knit.spec.api_details.body == '{"page": 1}'
    assert "t0ken" not in repr(emp)


def test_id_defaults_to_file_name(conf_dir):
    (conf_dir / "orders.toml").write_text('webhook_url = "https://h.example.com"\n[api_details]\nbase_url = "https://a.example.com"\n')
    syncs, problems = load(conf_dir)
    assert problems == [] and list(syncs) == ["orders"]
    assert syncs["orders"].list_path is None  # whole mode


def test_variables_from_credentials_directory(conf_dir, tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "HR_TOKEN").write_text("from-file\n")
    monkeypatch.delenv("HR_TOKEN", raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    (conf_dir / "employees.toml").write_text(GOOD)
    syncs, problems = load(conf_dir)
    assert problems == []
    assert syncs["employees"].spec.api_details.headers["Authorization"] == "Bearer from-file"


def test_literal_dollar_brace_escape(conf_dir):
    (conf_dir / "a.toml").write_text('webhook_url = "https://h.example.com"\n[api_details]\nbase_url = "https://a.example.com"\npath = "/x?q=$${not_a_var}"\n')
    syncs, problems = load(conf_dir)
    assert problems == [] and syncs["a"].url.endswith("/x?q=${not_a_var}")


BROKEN = {
    "jsonpath.toml": ('webhook_url = "https://h.example.com"\nlist_identifier = "$.items[("\nrecord_identifier = "$.id"\n'
                      '[api_details]\nbase_url = "https://a.example.com"\n', "list_identifier", "JSONPath"),
    "pair.toml": ('webhook_url = "https://h.example.com"\nlist_identifier = "$.items"\n'
                  '[api_details]\nbase_url = "https://a.example.com"\n', "record_identifier", "required"),
    "method.toml": ('webhook_url = "https://h.example.com"\n[api_details]\nmethod = "FETCH"\nbase_url = "https://a.example.com"\n',
                    "api_details.method", "GET"),
    "insecure.toml": ('webhook_url = "http://hooks.example.com/x"\n[api_details]\nbase_url = "https://a.example.com"\n',
                      "webhook_url", "https"),
    "var.toml": ('webhook_url = "https://h.example.com"\n[api_details]\nbase_url = "https://a.example.com"\n'
                 'headers = { Authorization = "Bearer ${NO_SUCH_VARIABLE_X}" }\n', "api_details.headers.Authorization", "NO_SUCH_VARIABLE_X"),
    "toml.toml": ('webhook_url = "https://h.example.com"\n[api_details\nbase_url = "x"\n', "line 2", "invalid TOML"),
    "unknown.toml": ('webhook_url = "https://h.example.com"\nintervall = "5m"\n[api_details]\nbase_url = "https://a.example.com"\n',
                     "intervall", "unknown key"),
    "duration.toml": ('webhook_url = "https://h.example.com"\ninterval = "5 minutes"\n[api_details]\nbase_url = "https://a.example.com"\n',
                      "interval", "duration"),
    "body.toml": ('webhook_url = "https://h.example.com"\n[api_details]\nbase_url = "https://a.example.com"\nbody = "{not json"\n',
                  "api_details.body", "JSON"),
    "baseurl.toml": ('webhook_url = "https://h.example.com"\n[api_details]\nbase_url = "a.example.com/x"\n',
                     "api_details.base_url", "http"),
    "missing.toml": ('[api_details]\nbase_url = "https://a.example.com"\n', "webhook_url", "missing"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_each_problem_names_file_key_and_reason(conf_dir, name):
    text, key, reason = BROKEN[name]
    (conf_dir / name).write_text(text)
    syncs, problems = load(conf_dir)
    assert syncs == {}
    assert any(p.source == str(conf_dir / name) and p.key == key and reason in p.reason for p in problems), problems


def test_loopback_http_webhooks_are_allowed_and_the_setting_allows_others(conf_dir):
    for i, url in enumerate(["http://127.0.0.1:8080/h", "http://localhost/h", "http://[::1]:9/h"]):
        (conf_dir / f"l{i}.toml").write_text(f'webhook_url = "{url}"\n[api_details]\nbase_url = "https://a.example.com"\n')
    (conf_dir / "remote.toml").write_text('webhook_url = "http://hooks.example.com/h"\n[api_details]\nbase_url = "https://a.example.com"\n')
    syncs, problems = load(conf_dir)
    assert sorted(syncs) == ["l0", "l1", "l2"] and len(problems) == 1
    syncs, problems = load(conf_dir, allow_insecure_webhooks=True)
    assert len(syncs) == 4 and problems == []


def test_duplicate_ids_reject_both_files(conf_dir):
    for name in ("a", "b"):
        (conf_dir / f"{name}.toml").write_text('idempotency_id = "same"\nwebhook_url = "https://h.example.com"\n[api_details]\nbase_url = "https://a.example.com"\n')
    (conf_dir / "c.toml").write_text('webhook_url = "https://h.example.com"\n[api_details]\nbase_url = "https://a.example.com"\n')
    syncs, problems = load(conf_dir)
    assert list(syncs) == ["c"]
    assert {p.source for p in problems} == {str(conf_dir / "a.toml"), str(conf_dir / "b.toml")}
    assert all(p.key == "idempotency_id" for p in problems)
    assert str(conf_dir / "b.toml") in next(p.reason for p in problems if p.source.endswith("a.toml"))


def test_all_problems_of_a_file_are_reported_not_only_the_first(conf_dir):
    (conf_dir / "bad.toml").write_text(
        'webhookURL = "http://hooks.example.com/x"\nlistIdentifier = "$.["\ninterval = "5x"\ntypo = 1\n'
        '[apiDetails]\nmethod = "FETCH"\nbaseUrl = "ftp://x"\n'
    )
    _, problems = load(conf_dir)
    keys = {p.key for p in problems}
    assert {"webhookURL", "listIdentifier", "interval", "typo", "apiDetails.method", "apiDetails.baseUrl", "record_identifier"} <= keys


def test_settings_sources_and_errors(tmp_path, monkeypatch):
    settings_file = tmp_path / "syncd.toml"
    settings_file.write_text('webhook_concurrency = 4\nwebhook_retry_schedule = ["1s", "2m"]\nlisten = "[::1]:9999"\n')
    monkeypatch.setenv("SYNCD_WEBHOOK_CONCURRENCY", "8")
    s = load_settings({}, settings_file)
    assert s.webhook_concurrency == 8 and s.webhook_retry_schedule == [1.0, 120.0] and s.listen_address == ("::1", 9999)
    assert load_settings({"webhook_concurrency": 2}, settings_file).webhook_concurrency == 2
    monkeypatch.setenv("SYNCD_WEBHOOK_RETRY_SCHEDULE", "100ms, 200ms")
    assert load_settings({}, settings_file).webhook_retry_schedule == [0.1, 0.2]
    settings_file.write_text('webhook_concurency = 4\nlisten = "nope"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings({}, settings_file)
    assert {(p.source, p.key) for p in exc.value.problems} == {(str(settings_file), "webhook_concurency"), (str(settings_file), "listen")}
    with pytest.raises(ConfigError, match="file not found"):
        load_settings({}, tmp_path / "absent.toml")


def test_state_path_follows_systemd_state_directory(monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/syncd-x:/other")
    assert str(load_settings().state_path) == "/var/lib/syncd-x/state.db"


def test_webhook_secret_from_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "webhook_secret").write_text("whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    s = load_settings()
    assert s.webhook_secret.get_secret_value() == "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"
    assert "c2VjcmV0" not in repr(s)


# -- the real CLI -----------------------------------------------------------------------------

async def test_check_cli_valid_and_invalid(conf_dir, tmp_path):
    env = cli_env(HR_TOKEN="x")
    (conf_dir / "employees.toml").write_text(GOOD)
    code, out, err = await run_cli("check", "--config-dir", str(conf_dir), env=env)
    assert code == 0, err
    assert "OK" in out and "1 sync" in out

    for name, (text, _key, _reason) in BROKEN.items():
        (conf_dir / name).write_text(text)
    code, out, err = await run_cli("check", "--config-dir", str(conf_dir), env=env)
    assert code == 78
    lines = err.splitlines()
    for name, (_text, key, reason) in BROKEN.items():
        assert any(line.startswith(f"{conf_dir / name}: {key}: ") and reason in line for line in lines), (name, err)
    assert "NO_SUCH_VARIABLE_X" in err


async def test_check_cli_bad_settings_and_missing_dir(tmp_path):
    code, _, err = await run_cli("check", "--config-dir", str(tmp_path / "nope"))
    assert code == 78 and "config_dir" in err and "not found" in err
    code, _, err = await run_cli("check", "--config-dir", str(tmp_path), "--webhook-concurrency", "zero")
    assert code == 78 and "--webhook-concurrency: webhook_concurrency:" in err
    code, _, err = await run_cli("check", "--config-dir", str(tmp_path), env=cli_env(SYNCD_LOG_LEVEL="loud"))
    assert code == 78 and "SYNCD_LOG_LEVEL (environment): log_level:" in err
    code, out, _ = await run_cli("check", "--config-dir", str(tmp_path), env=cli_env(SYNCD_SETTINGS_FILE=str(tmp_path / "x.toml")))
    assert code == 78


async def test_check_warns_about_secrets_without_prefix(conf_dir):
    (conf_dir / "a.toml").write_text('webhook_url = "https://h.example.com"\nwebhook_secret = "plain-words"\n[api_details]\nbase_url = "https://a.example.com"\n')
    code, out, err = await run_cli("check", "--config-dir", str(conf_dir))
    assert code == 0 and "whsec_" in err and "plain-words" not in err + out


async def test_secret_command():
    import base64

    code, out, _ = await run_cli("secret")
    assert code == 0 and out.startswith("whsec_")
    assert 24 <= len(base64.b64decode(out.strip()[len("whsec_"):])) <= 64


def test_a_key_and_its_knit_alias_together_are_an_error(conf_dir):
    (conf_dir / "a.toml").write_text('webhook_url = "https://h.example.com"\nwebhookURL = "https://other.example.com"\n'
                                     '[api_details]\nbase_url = "https://a.example.com"\n')
    syncs, problems = load(conf_dir)
    assert syncs == {} and any("webhook_url and webhookURL" in p.reason for p in problems), problems


def test_a_key_in_two_spellings_does_not_hide_the_files_other_problems(tmp_path):
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "d.toml").write_text('webhookURL = "http://127.0.0.1:9/h"\nwebhook_url = "http://127.0.0.1:9/h"\n'
                                 'typo = 1\ninterval = "0s"\n[api_details]\nbaseUrl = "https://x.example"\n'
                                 'base_url = "ftp://x"\n')
    _, problems = load_dir(Settings(config_dir=conf, state_path=tmp_path / "s.db"))
    reasons = {p.key: p.reason for p in problems}
    assert reasons["webhook_url"] == "webhook_url and webhookURL are the same key; keep one"
    assert reasons["base_url"] == "base_url and baseUrl are the same key; keep one"
    # The rest is checked as if only the first spelling were there: base_url is "ftp://x".
    assert {"typo", "interval", "api_details.base_url"} <= set(reasons) and len(problems) == 5, problems
