"""`stealguard attack <name>`: each command's options come from its attack's typed Params."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from stealguard.artifacts import save_classifier
from stealguard.attacks import ATTACKS, attack_params_class
from stealguard.cli import app
from stealguard.models import build_model

runner = CliRunner()


def options_of(name: str) -> set[str]:
    """The option flags of `stealguard attack <name>`, as click builds the command."""
    import click
    import typer.main

    group = typer.main.get_command(app)
    with click.Context(group) as ctx:
        attack = group.get_command(ctx, "attack")
        command = attack.get_command(ctx, name)
    return {opt for p in command.params for opt in p.opts}


def test_each_attack_lists_only_its_own_options():
    knockoff = options_of("knockoff")
    assert {"--surrogate", "--labels", "--arch", "--nquery", "--query-aug", "--param"} <= knockoff
    assert not {"--preset", "--seed-size", "--rounds", "--k"} & knockoff
    jbda = options_of("jbda")
    assert {"--seed-set", "--preset", "--seed-size", "--rounds", "--step", "--nquery"} <= jbda
    assert "--k" in options_of("jb_top3") and "--k" not in jbda
    adaptive = options_of("adaptive_averaging")
    assert "--k" in adaptive and not {"--nquery", "--query-aug", "--preset"} & adaptive


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_scalar_param_has_an_option(name):
    flags = options_of(name)
    for field, info in attack_params_class(name).model_fields.items():
        nested = hasattr(info.annotation, "model_fields") or field == "clone"
        if not nested and field not in ("jitter", "round_config"):
            assert "--" + field.replace("_", "-") in flags, (name, field)


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    """An (untrained) MNIST-shaped victim artifact: the commands' plumbing, not its accuracy."""
    torch.manual_seed(0)
    model = build_model("conv3", in_channels=1, image_size=28, num_classes=10)
    out = tmp_path_factory.mktemp("v") / "victim"
    save_classifier(out, model, dataset="mnist", classes=[str(i) for i in range(10)])
    return out


def test_attack_params_from_own_options_and_generic_param(victim_dir):
    r = runner.invoke(app, ["attack", "knockoff", "--victim", str(victim_dir), "--surrogate",
                            "mnist", "--data-split", "test", "--budget", "30", "--epochs", "1",
                            "--labels", "hard", "--param", "query_batch=7", "--device", "cpu",
                            "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert (out["queries"], out["blackbox_count"], out["labels"], out["data"]) == (
        30, 30, "hard", "mnist/test")
    r = runner.invoke(app, ["attack", "jbda", "--victim", str(victim_dir), "--seed-set",
                            "mnist@train", "--preset", "edm", "--seed-size", "10", "--rounds",
                            "2", "--budget", "25", "--epochs", "1", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["queries"] == 20 and out["data"] == "mnist/train"  # 10 seeds + 10 new points


@pytest.mark.parametrize("args, message", [
    (["knockoff", "--param", "seed_size=10"], "attack 'knockoff': unknown parameter 'seed_size'"),
    (["jbda", "--rounds", "0"], "rounds must be >= 1"),
    (["jbda", "--preset", "papernot"], "preset='papernot' is invalid"),
    (["knockoff", "--param", "jitter.hue=2"], "jitter.hue='2' is invalid"),
    (["knockoff", "--param", "nquery"], "must look like name=value"),
])
def test_bad_attack_parameters_are_one_error_line(victim_dir, args, message):
    r = subprocess.run([sys.executable, "-c", "from stealguard.cli import main; main()",
                        "attack", *args, "--victim", str(victim_dir), "--data", "mnist",
                        "--budget", "20", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
