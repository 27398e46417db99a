"""runlog.wandb_mode_default: offline only when wandb is enabled and no key or login exists."""
from __future__ import annotations

import os

from ouroboros_ds.train.runlog import wandb_mode_default

ON = {"wandb": {"enabled": True, "project": "p"}}


def _clean(monkeypatch, tmp_path):
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.setenv(k, "")  # recorded, so what wandb_mode_default sets is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.netrc lives here


def test_offline_without_key_or_login(monkeypatch, tmp_path):
    _clean(monkeypatch, tmp_path)
    assert wandb_mode_default({}) is None  # wandb not enabled: nothing set
    assert "WANDB_MODE" not in os.environ
    assert wandb_mode_default(ON) == "offline"


def test_key_login_or_explicit_mode_is_respected(monkeypatch, tmp_path):
    _clean(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode_default(ON) == "online"
    _clean(monkeypatch, tmp_path)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode_default(ON) == "online"
    _clean(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode_default(ON) == "disabled"
