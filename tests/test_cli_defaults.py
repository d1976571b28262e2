"""The CLI with its defaults (no --device) on a tiny data root, as a new user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stealguard.cli import app
from tinydata import make_tiny_root

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_root(tmp_path_factory.mktemp("tiny"), train=64, test=50)


def run(root: Path, *args: str):
    r = runner.invoke(app, [*args, "--data-root", str(root)], catch_exceptions=False)
    return r


@pytest.fixture(scope="module")
def victim(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "mnist-conv3"
    r = run(root, "train", "--dataset", "mnist", "--epochs", "2", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    return out


def test_attack_with_default_device(root: Path, victim: Path, tmp_path: Path) -> None:
    """`--device auto` (the default) used to reach torch.device("auto") and crash."""
    r = run(root, "attack", "knockoff", "--victim", str(victim), "--surrogate", "fashionmnist",
            "--budget", "40", "--epochs", "1", "--json")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output.strip().splitlines()[-1])
    assert figures["queries"] == figures["blackbox_count"] == 40
