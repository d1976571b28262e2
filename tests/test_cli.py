"""The CLI end to end on a tiny configuration: real subcommands, real artifacts."""

import json

import pytest
from typer.testing import CliRunner

from stealguard.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=True)


from stealguard.attacks import ATTACKS  # noqa: E402


@pytest.mark.parametrize("cmd", [[], ["train"], ["evaluate"], ["attack"], ["demo"], ["models"],
                                 ["defenses"], ["data"], ["data", "list"], ["data", "download"],
                                 ["serve"], ["keys"], ["audit"], ["import"],
                                 *(["attack", name] for name in ATTACKS.names())])
def test_every_command_has_help(cmd):
    r = run(*cmd, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_lists():
    r = run("models", "--json")
    assert "conv3" in json.loads(r.output)["models"]
    r = run("data", "list")
    assert "mnist" in r.output and "imagefolder:<path>" in r.output


@pytest.fixture(scope="module")
def mnist_victim(tmp_path_factory):
    """A small real MNIST victim trained through the CLI."""
    out = tmp_path_factory.mktemp("v") / "victim"
    r = run("train", "--dataset", "mnist", "--arch", "conv3", "--out", str(out), "--epochs", "3",
            "--train-subset", "2000", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.output.strip().splitlines()[-1])


def test_train_evaluate_attack_end_to_end(mnist_victim, tmp_path):
    out, trained = mnist_victim
    assert trained["test_accuracy"] > 0.7
    r = run("evaluate", str(out), "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    clone_dir = tmp_path / "clone"
    r = run("attack", "knockoff", "--victim", str(out), "--surrogate", "fashionmnist",
            "--budget", "500", "--epochs", "2", "--lr", "0.05", "--save-clone", str(clone_dir),
            "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output.strip().splitlines()[-1])
    assert figures["queries"] == figures["blackbox_count"] == 500
    assert 0 <= figures["clone_accuracy"] <= 1 and 0 <= figures["agreement"] <= 1
    r = run("evaluate", str(clone_dir), "--json", "--device", "cpu")
    assert json.loads(r.output)["test_accuracy"] == pytest.approx(figures["clone_accuracy"])


def test_defended_evaluate_and_attack(mnist_victim):
    out, trained = mnist_victim
    r = run("evaluate", str(out), "--defense", "topk", "--defense-param", "k=1", "--json",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output)
    assert figures["defense"] == "topk"
    r = run("attack", "jbda", "--victim", str(out), "--seed-set", "mnist", "--seed-size", "20",
            "--budget", "80", "--epochs", "1", "--query-batch", "16",
            "--defense", "rounding", "--defense-param", "decimals=1", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output.strip().splitlines()[-1])
    assert figures["queries"] == figures["blackbox_count"] <= 80


def test_table_output(mnist_victim):
    out, _ = mnist_victim
    r = run("evaluate", str(out), "--device", "cpu")
    assert r.exit_code == 0 and "test_accuracy" in r.output


def test_errors_are_one_clear_line(tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-c", "from stealguard.cli import main; main()",
                               *args], capture_output=True, text=True)

    r = cli("train", "--dataset", "mnits", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown dataset 'mnits'" in r.stderr and "mnist" in r.stderr
    r = cli("train", "--dataset", "mnist", "--arch", "resnet9", "--out", str(tmp_path / "x"),
            "--train-subset", "10")
    assert r.returncode == 2 and "unknown model 'resnet9'" in r.stderr
    r = cli("evaluate", str(tmp_path / "missing"))
    assert r.returncode == 2 and "is missing" in r.stderr
    r = cli("train", "--dataset", "mnist", "--optimizer", "rmsprop", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "optimizer" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("attack", "knockoff", "--victim", str(tmp_path / "missing"), "--surrogate", "mnist",
            "--defense", "madness")
    assert r.returncode == 2 and "is missing" in r.stderr


def test_edm_train_evaluate_attack(tmp_path):
    """`train --defense edm` writes a bundle that evaluate and attack load like any victim."""
    out = tmp_path / "edm"
    r = run("train", "--dataset", "mnist", "--defense", "edm", "--members", "2",
            "--lambda-d", "0.5", "--train-subset", "600", "--epochs", "1", "--out", str(out),
            "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    trained = json.loads(r.output.strip().splitlines()[-1])
    assert trained["defense"] == "edm" and 0 <= trained["test_accuracy"] <= 1
    r = run("evaluate", str(out), "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    r = run("attack", "knockoff", "--victim", str(out), "--surrogate", "fashionmnist",
            "--budget", "100", "--epochs", "1", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output.strip().splitlines()[-1])
    assert figures["queries"] == figures["blackbox_count"] == 100
    assert "hash" not in r.output.lower()
    r = run("train", "--dataset", "mnist", "--defense", "mad", "--out", str(tmp_path / "x"))
    assert r.exit_code != 0
