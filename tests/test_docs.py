"""The README's reference and the shipped examples must match the code."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from syncd.config import ApiDetails, SyncSpec, load_dir
from syncd.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def table_keys(name: str) -> set[str]:
    block = README.split(f"<!-- reference:{name} -->")[1].split(f"<!-- /reference:{name} -->")[0]
    return set(re.findall(r"^\| `([a-z_.]+)` \|", block, re.M))


def test_sync_reference_lists_every_key():
    expected = set(SyncSpec.model_fields) - {"api_details"} | {f"api_details.{k}" for k in ApiDetails.model_fields}
    assert table_keys("sync") == expected


def test_settings_reference_lists_every_setting():
    assert table_keys("settings") == set(Settings.model_fields)


def test_the_sample_settings_file_shows_every_setting():
    text = (ROOT / "etc" / "syncd.toml").read_text()
    missing = [name for name in Settings.model_fields
               if f"# {name} =" not in text and not (name == "integrations" and "# [integrations." in text)]
    assert missing == []


def test_shipped_examples_are_valid(tmp_path, monkeypatch):
    for var in ("HR_TOKEN", "SUPPORT_API_KEY", "GITHUB_TOKEN", "STRIPE_API_KEY", "CMS_API_KEY", "ORDERS_CLIENT_SECRET"):
        monkeypatch.setenv(var, "x")
    conf = tmp_path / "conf.d"
    shutil.copytree(ROOT / "etc" / "conf.d", conf)
    settings = load_settings({"config_dir": conf}, ROOT / "etc" / "syncd.toml")
    syncs, problems = load_dir(settings)
    assert problems == [] and sorted(syncs) == ["employees", "github-issues", "jsonapi-articles", "oauth2-orders",
                                                "status-page", "stripe-customers", "tickets"]


def test_metrics_reference_matches_the_registry():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from syncd.metrics import Metrics

    m = Metrics()
    m.add_sync("x")
    names = set()
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
    assert table_keys("metrics") == names
