"""The systemd unit and the Dockerfile say what the README promises."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "syncd.service"


def directives(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_is_a_notify_service_that_checks_its_config():
    d = directives(UNIT)
    assert d["Type"] == ["notify"]
    assert any(v.endswith("syncd check --quiet") for v in d["ExecStartPre"])
    assert d["ExecStart"][0].endswith("syncd run")
    assert d["RestartPreventExitStatus"] == ["78"]
    assert d["DynamicUser"] == ["yes"] and d["StateDirectory"] == ["syncd"] and d["ConfigurationDirectory"] == ["syncd"]
    assert "WatchdogSec" in d and "ExecReload" in d
    assert "LoadCredential" in UNIT.read_text()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze (Debian package systemd) not installed")
def test_unit_hardening_scores_three_or_lower():
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for syncd.service: ([0-9.]+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    score = float(match.group(1))
    assert score <= 3.0
    readme = (ROOT / "README.md").read_text()
    assert f"scores {score}" in readme, f"README must state the score {score}"


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert 'VOLUME ["/var/lib/syncd"]' in text and "/etc/syncd" in text
    assert re.search(r'^ENTRYPOINT \["syncd"\]', text, re.M)  # exec form
    assert re.search(r"^HEALTHCHECK .*\n?.*healthz", text, re.M)
