"""The `lorafleet` command: keys, config check, and the storage package's adapters commands."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import yaml

from deploy.cli import main
from router.auth import hash_api_key


def test_keys_add_prints_the_key_once_and_stores_its_hash(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "add", "acme", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("lf-") and key not in path.read_text()
    [entry] = json.loads(path.read_text())["keys"]
    assert entry["hash"] == hash_api_key(key) and entry["tenant"] == "acme"

    assert main(["keys", "ls", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "acme" in listing and entry["prefix"] in listing and key not in listing

    assert main(["keys", "revoke", "lf-nope", "--file", str(path)]) == 1
    assert main(["keys", "revoke", entry["prefix"], "--file", str(path)]) == 0
    assert json.loads(path.read_text())["keys"] == []


def test_config_check(tmp_path, capsys):
    assert main(["config", "check", "serve_config.yaml"]) == 0
    assert "ok" in capsys.readouterr().out
    config = yaml.safe_load(pathlib.Path("serve_config.yaml").read_text())
    config["applications"][0]["args"]["engine"]["max_loras"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    assert main(["config", "check", str(bad)]) == 2
    assert "engine.max_loras" in capsys.readouterr().err


def test_console_entry_point_has_all_commands():
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("keys", "config", "adapters"):
        assert command in out
