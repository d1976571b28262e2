"""The CLI's promise on bad input: one `error:` line that says what to do, exit 2, checked
before any work; strict JSON; tables in the README's format; a fast `--help`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stealguard.cli import main
from tinydata import make_tiny_root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_root(tmp_path_factory.mktemp("tiny"), train=64, test=50)


def cli(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    """Run `stealguard ARGS --data-root ROOT` in this process: (exit code, stdout, stderr)."""
    argv = [*args] + (["--data-root", str(root)] if args and args[0] in DATA_COMMANDS else [])
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


DATA_COMMANDS = ("train", "evaluate", "attack", "demo")


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "pydantic" not in err and "http" not in err
    return lines[0]


@pytest.fixture(scope="module")
def victim(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from typer.testing import CliRunner

    from stealguard.cli import app

    out = tmp_path_factory.mktemp("art") / "mnist-conv3"
    r = CliRunner().invoke(app, ["train", "--dataset", "mnist", "--epochs", "2", "--out",
                                 str(out), "--data-root", str(root), "--json"])
    assert r.exit_code == 0, r.output
    return out


# ---- each error case: (arguments, what the line must say) -----------------------------------

TRAIN = ("train", "--dataset", "mnist", "--epochs", "1")


@pytest.mark.parametrize("args, says", [
    ((*TRAIN, "--device", "tpu"), "unknown device 'tpu'; use --device auto, cpu, cuda"),
    ((*TRAIN, "--device", "gpu"), "unknown device 'gpu'"),
    (("train", "--dataset", "mnist", "--epochs", "0"), "--epochs got 0: must be >= 1"),
    ((*TRAIN, "--lr", "-1"), "--lr got -1.0: must be > 0"),
    ((*TRAIN, "--optimizer", "rmsprop"), "--optimizer got 'rmsprop': must be one of 'sgd'"),
    ((*TRAIN, "--train-subset", "-3"), "'--train-subset'"),
])
def test_train_option_errors(capsys, root, tmp_path, args, says):
    code, _, err = cli(capsys, root, *args, "--out", str(tmp_path / "v"))
    assert says in one_error_line(code, err)
    assert not (tmp_path / "v").exists()  # refused before any work


def test_train_subset_refused_by_the_library_too():
    from stealguard.errors import InputError
    from synthetic import quadrant_dataset

    with pytest.raises(InputError, match="n >= 1"):
        quadrant_dataset(10).subset(-3)


@pytest.mark.parametrize("make_bad", [
    lambda tmp: tmp / "a-file" / "out",  # an ancestor is a file
    lambda tmp: tmp / "a-file",  # the path itself is a file
])
def test_unwritable_outputs_are_refused_before_the_work(capsys, root, victim, tmp_path,
                                                        make_bad):
    (tmp_path / "a-file").write_text("x")
    bad = str(make_bad(tmp_path))
    code, _, err = cli(capsys, root, *TRAIN, "--out", bad)
    assert "--out" in one_error_line(code, err)
    code, _, err = cli(capsys, root, "attack", "knockoff", "--victim", str(victim),
                       "--surrogate", "fashionmnist", "--budget", "10", "--save-clone", bad)
    line = one_error_line(code, err)
    assert "--save-clone" in line
    code, _, err = cli(capsys, root, "reproduce", "edm-table3", "--results", bad)
    assert "--results" in one_error_line(code, err)


def test_existing_artifact_needs_force(capsys, root, victim, tmp_path):
    before = (victim / "manifest.json").read_bytes()
    code, _, err = cli(capsys, root, *TRAIN, "--out", str(victim))
    assert "pass --force" in one_error_line(code, err)
    code, _, err = cli(capsys, root, "attack", "knockoff", "--victim", str(victim),
                       "--surrogate", "fashionmnist", "--budget", "10", "--save-clone",
                       str(victim))
    assert "pass --force" in one_error_line(code, err)
    assert (victim / "manifest.json").read_bytes() == before
    copy = tmp_path / "copy"
    code, out, err = cli(capsys, root, *TRAIN, "--out", str(copy), "--json")
    assert code == 0, err
    code, out, err = cli(capsys, root, *TRAIN, "--out", str(copy), "--force", "--json")
    assert code == 0, err


def test_dataset_artifact_shape_mismatch_before_any_work(capsys, root, victim):
    code, _, err = cli(capsys, root, "evaluate", str(victim), "--dataset", "cifar10")
    line = one_error_line(code, err)
    assert "(1, 28, 28)" in line and "(3, 32, 32)" in line and "cifar10" in line


def test_flat_imagefolder_is_not_its_own_test_set(capsys, root, tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "flat" / cls / f"{i}.png")
    code, _, err = cli(capsys, root, *TRAIN, "--dataset", f"imagefolder:{tmp_path / 'flat'}",
                       "--out", str(tmp_path / "v"))
    line = one_error_line(code, err)
    assert "train and test splits are the same images" in line and "train/<class>" in line


def test_usage_errors_are_one_line(capsys, root):
    code, _, err = cli(capsys, root, "frobnicate")
    assert "No such command 'frobnicate'" in one_error_line(code, err)
    code, _, err = cli(capsys, root, "train", "--dataset", "mnist")
    assert "Missing option '--out'" in one_error_line(code, err)


# ---- output -------------------------------------------------------------------------------


def strict_loads(text: str):
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict(capsys, root, victim):
    code, out, err = cli(capsys, root, "evaluate", str(victim), "--defense", "topk",
                         "--defense-param", "k=1", "--json")
    assert code == 0, err
    figures = strict_loads(out)
    assert figures["kl_mean"] is None and figures["non_finite"]["kl_mean"] == "+inf"
    assert figures["n"] == 50 and isinstance(figures["n"], int)


def test_to_json_replaces_non_finite_values_everywhere():
    from stealguard.console import to_json

    text = to_json({"a": float("nan"), "b": [1.0, float("-inf")], "c": {"d": float("inf")}})
    assert strict_loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None,
                                  "non_finite": {"d": "+inf"}}, "non_finite": {"a": "nan"}}


def test_tables_print_percents_and_counts(capsys, root, victim):
    code, out, err = cli(capsys, root, "evaluate", str(victim), "--defense", "topk",
                         "--defense-param", "k=1")
    assert code == 0, err
    row = {ln.split("│")[1].strip(): ln.split("│")[2].strip() for ln in out.splitlines()
           if ln.count("│") == 3}
    assert row["accuracy"].endswith(" %") and row["accuracy_undefended"].endswith(" %")
    assert row["n"] == "50" and row["test_images"] == "50"
    assert row["kl_mean"] == "inf"


@pytest.mark.parametrize("key, value, shown", [
    ("test_accuracy", 0.85324, "85.32 %"), ("normalized_accuracy", 0.861, "0.86x"),
    ("queries", 10000, "10000"), ("seconds", 9.43, "9.4 s"), ("l1_mean", 1.0, "1.0000"),
    ("l1_std", 7.5e-9, "7.500e-09"), ("kl_mean", float("nan"), "-"),
])
def test_format_value(key, value, shown):
    from stealguard.console import format_value

    assert format_value(key, value) == shown


def test_models_and_data_list(capsys, root):
    code, out, _ = cli(capsys, root, "models", "--json")
    details = {r["name"]: r["params"] for r in strict_loads(out)["details"]}
    assert details["conv3"]["1x28x28"] > 10_000 and details["lenet"]["3x32x32"] > 10_000
    code, out, _ = cli(capsys, root, "data", "list", "--data-root", str(root), "--json")
    status = {r["name"]: r for r in strict_loads(out)["status"]}
    assert status["mnist"]["train"] and status["mnist"]["test"]
    assert status["kmnist"]["test"] and not status["kmnist"]["train"]
    assert not status["svhn"]["train"]


# ---- speed of --help: no torch import to register commands ---------------------------------


def test_importing_the_cli_imports_no_torch():
    code = ("import sys; import stealguard.cli; "
            "bad = [m for m in ('torch', 'stealguard.attacks') if m in sys.modules]; "
            "print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_version(capsys, root):
    from stealguard import __version__

    code, out, _ = cli(capsys, root, "--version")
    assert code == 0 and out.strip() == __version__


def test_query_progress_follows_the_black_box_counter():
    import time
    from types import SimpleNamespace

    from stealguard.progress import query_progress

    bb = SimpleNamespace(queries_used=5)
    with query_progress(bb, total=10, enabled=True, every_s=0.01) as bar:
        bb.queries_used = 12  # 7 since the start
        deadline = time.monotonic() + 5
        while bar.n != 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bar.n == 7
    with query_progress(bb, total=10, enabled=False) as bar:
        assert bar is None


def test_no_progress_bars_under_json_or_when_piped(monkeypatch):
    from stealguard import console

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(console.sys, "stdout", Tty())
    monkeypatch.setattr(console.sys, "stderr", Tty())
    assert console.show_progress(False) and not console.show_progress(True)
    monkeypatch.setattr(console.sys, "stdout", open(os.devnull, "w"))
    assert not console.show_progress(False)


def test_key_value_items_share_one_checker() -> None:
    """--param (defenses, attacks) and --set name what is wrong the same way."""
    from stealguard.attacks import parse_attack_params
    from stealguard.defenses.builder import parse_defense_params
    from stealguard.errors import ConfigError
    from stealguard.reproduce.spec import parse_overrides

    for parse, what in ((parse_defense_params, "defense parameter"),
                        (parse_attack_params, "attack parameter"), (parse_overrides, "--set")):
        with pytest.raises(ConfigError, match=f"{what} 'epsilon' must look like"):
            parse(["epsilon"])
        with pytest.raises(ConfigError, match="must look like"):
            parse(["=3"])
    for parse in (parse_defense_params, parse_attack_params):
        with pytest.raises(ConfigError, match="given twice"):
            parse(["k=1", "k=2"])
    assert parse_overrides(["budget=1", "budget=2"]) == {"budget": 2}  # the last one wins
    assert parse_attack_params(["clone.lr=0.1", "seed_size= 20"]) == {
        "clone": {"lr": "0.1"}, "seed_size": "20"}
