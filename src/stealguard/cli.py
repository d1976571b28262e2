"""The `stealguard` command. It parses options and hands off to the library.

Every command that reports figures prints a table, or with --json one strict JSON object
(`stealguard.console`). Every failure prints one line `error: ...` that says what was wrong
and what to do, and exits with status 2 (`main`).

Adding a command: register it below; import torch and the library inside the command body,
never at module level, so that `stealguard --help` and `--version` stay fast (a test checks
that importing this module imports no torch). The `attack` group builds its commands only
when they are asked for (`LazyAttackGroup`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as cli_errors
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as cli_errors  # type: ignore[no-redef]

from stealguard import __version__
from stealguard.console import (
    check_output_dir,
    console,
    emit,
    os_error_line,
    print_json,
    show_progress,
    validation_line,
)
from stealguard.errors import StealguardError

DataRoot = typer.Option(None, "--data-root", envvar="STEALGUARD_DATA",
                        help="Dataset root (default: $STEALGUARD_DATA or the user cache).")
Device = typer.Option("auto", "--device",
                      help="auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
Json = typer.Option(False, "--json", help="Print the figures as one JSON object.")
Seed = typer.Option(0, "--seed", help="Random seed.")
DefenseOpt = typer.Option(None, "--defense", help="Output defense (see `stealguard defenses`).")
DefenseParam = typer.Option([], "--defense-param", help="Defense parameter key=value (repeat).")
Force = typer.Option(False, "--force", help="Overwrite an existing artifact at the output path.")


def _version_callback(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


app = typer.Typer(help="Defend image classifiers against model stealing, and measure it.",
                  pretty_exceptions_enable=False, no_args_is_help=True, add_completion=False)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback,
                                       is_eager=True, help="Print the version and exit.")
          ) -> None:
    """Defend image classifiers against model stealing, and measure it."""


# ---- helpers ---------------------------------------------------------------------------------


def _device(device: str) -> str:
    """Resolve --device once, at the boundary: 'auto' -> 'cuda' or 'cpu'; unknown -> error."""
    from stealguard.training import resolve_device

    return str(resolve_device(device))


def _config(**kw: Any) -> Any:
    """A TrainConfig from command-line values; a bad value is one line naming the flag."""
    from pydantic import ValidationError

    from stealguard.training import TrainConfig

    try:
        return TrainConfig(**{k: v for k, v in kw.items() if v is not None})
    except ValidationError as e:
        raise StealguardError(f"invalid training option: {validation_line(e)}") from None


def _defense(victim_model: Any, name: Optional[str], params: list[str]) -> Any:
    """--defense NAME --defense-param k=v ... -> a Defense bound to the victim, or None."""
    from stealguard.defenses import DefenseConfig

    cfg = DefenseConfig.from_cli(name, params)  # refuses --defense-param without --defense
    return None if name is None else cfg.build(victim_model)


def _check_shape(artifact: Path, model_shape: tuple[int, ...], trained_on: str,
                 dataset: str, data_shape: tuple[int, ...]) -> None:
    """An artifact answers images of one shape; refuse a dataset of another before the work."""
    if tuple(model_shape) != tuple(data_shape):
        raise StealguardError(
            f"{artifact} expects images of shape {tuple(model_shape)} (trained on {trained_on}), "
            f"but {dataset} has {tuple(data_shape)}; evaluate it on a dataset of that shape")


# ---- train / evaluate ------------------------------------------------------------------------


@app.command()
def train(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (see `stealguard data list`)."),
    arch: str = typer.Option("conv3", "--arch", help="Model architecture (see `stealguard models`)."),
    out_dir: Path = typer.Option(..., "--out", help="Artifact directory to write."),
    force: bool = Force,
    epochs: int = typer.Option(10, help="Training epochs (>= 1)."),
    batch_size: int = typer.Option(128, help="Batch size (>= 1)."),
    optimizer: str = typer.Option("sgd", help="sgd, adam or adagrad."),
    lr: float = typer.Option(0.05, help="Initial learning rate (> 0, cosine schedule)."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay (>= 0)."),
    augment: bool = typer.Option(False, help="Random crop (pad 4) and horizontal flip."),
    train_subset: Optional[int] = typer.Option(None, min=1, help="Train on a random subset of "
                                               "N >= 1 images."),
    defense: str = typer.Option("none", "--defense", help="none (one model) or edm (an "
                                "ensemble of diverse models with a secret hash)."),
    members: int = typer.Option(5, min=1, help="EDM: ensemble members N."),
    lambda_d: float = typer.Option(0.5, "--lambda-d", help="EDM: diversity weight lambda_D "
                                   "(0: the regular ensemble)."),
    ood: str = typer.Option("kmnist", help="EDM: out-of-distribution set for diversity."),
    hash_task: str = typer.Option("kmnist", help="EDM: the secret hash network's task."),
    seed: int = Seed, device: str = Device, data_root: Optional[str] = DataRoot, as_json: bool = Json,
) -> None:
    """Train a victim (one model, or with --defense edm an EDM ensemble) and save it as an
    artifact (safetensors + manifest)."""
    if defense not in ("none", "edm"):
        raise StealguardError(f"unknown training defense {defense!r}; valid: none, edm "
                              "(output defenses are applied at query time: --defense on "
                              "attack, evaluate and serve)")
    check_output_dir(out_dir, "--out", force=force)
    cfg = _config(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                  weight_decay=weight_decay, augment=augment, seed=seed)
    device = _device(device)
    from stealguard.data import check_disjoint_splits

    check_disjoint_splits(dataset, data_root=data_root)
    progress = show_progress(as_json)
    t0 = time.perf_counter()
    from stealguard.formats import save_victim
    from stealguard.victim import Victim

    victim: Victim
    if defense == "edm":
        from stealguard.ensemble import train_edm

        victim = train_edm(dataset, arch, cfg, members=members, lambda_d=lambda_d, ood=ood,
                           hash_task=hash_task, data_root=data_root, train_subset=train_subset,
                           device=device, progress=progress)
    else:
        from stealguard.pipeline import train_victim

        victim = train_victim(dataset, arch, cfg, data_root=data_root,
                              train_subset=train_subset, device=device, progress=progress)
    save_victim(victim, out_dir)  # the artifact format that handles the trained model
    emit({"dataset": dataset, "arch": arch, "defense": defense,
          "test_accuracy": victim.test_accuracy,
          "seconds": round(time.perf_counter() - t0, 1), "artifact": str(out_dir)},
         as_json, "victim")


@app.command()
def evaluate(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    dataset: Optional[str] = typer.Option(None, help="Test set (default: the artifact's)."),
    defense: Optional[str] = DefenseOpt, defense_param: list[str] = DefenseParam,
    device: str = Device, data_root: Optional[str] = DataRoot, as_json: bool = Json,
) -> None:
    """Report an artifact's accuracy on a test split (the final model, as saved); with
    --defense, the defender's accuracy with it on and the size of its perturbations."""
    from stealguard.data import load_dataset
    from stealguard.data.loaders import known_shape
    from stealguard.formats import load_victim
    from stealguard.pipeline import test_set_for
    from stealguard.training import accuracy
    from stealguard.victim import describe

    device = _device(device)
    victim = load_victim(artifact)
    shape = tuple(victim.model.input_shape)
    data_shape = known_shape(dataset) if dataset is not None else None
    if dataset is not None and data_shape is not None:
        _check_shape(artifact, shape, victim.dataset, dataset, data_shape)
    d = _defense(victim.model, defense, defense_param)
    test = (test_set_for(victim, data_root=data_root) if dataset is None
            else load_dataset(dataset, "test", data_root=data_root))
    _check_shape(artifact, shape, victim.dataset, test.name, test.image_shape)
    figures: dict[str, Any] = {"artifact": str(artifact), "arch": describe(victim.model),
                               "dataset": test.name, "test_images": len(test)}
    if d is None:
        figures["test_accuracy"] = accuracy(victim.model, test.images, test.labels, device=device)
    else:
        from stealguard.defenses.metrics import defense_metrics

        figures["defense"] = defense
        figures.update(defense_metrics(victim.model, d, test.images, test.labels,
                                       batch_size=64, device=device,
                                       progress=show_progress(as_json)))
    emit(figures, as_json, "evaluation")


# ---- attack <name>: one command per registered attack, built on demand ----------------------


# Options every attack command has (the attack's own come from its Params, below).
_ATTACK_COMMON: list[tuple[str, Any, Any]] = [
    ("victim_path", Path, typer.Option(..., "--victim", help="Victim artifact directory (the "
                                       "owner's copy: its test set and agreement are measured).")),
    ("target", Optional[str], typer.Option(None, "--target", help="Attack a stealguard "
                                           "service at this URL instead of a local black box.")),
    ("api_key", Optional[str], typer.Option(None, "--api-key", envvar="STEALGUARD_API_KEY",
                                            help="API key for --target.")),
    ("data", Optional[str], typer.Option(None, "--data", "--surrogate", "--seed-set",
                                         help="The attacker's images (a dataset; name@split "
                                              "picks the split): the surrogate set, or the "
                                              "in-distribution images seeds are drawn from.")),
    ("data_split", str, typer.Option("train", "--data-split",
                                     help="Split of --data to draw from.")),
    ("budget", int, typer.Option(50_000, "--budget", min=0, help="Query budget.")),
    ("output", str, typer.Option("probs", "--output", help="What the black box returns: "
                                 "probs, topk, label.")),
    ("defense", Optional[str], DefenseOpt),
    ("defense_param", list[str], DefenseParam),
    ("param", list[str], typer.Option([], "--param", help="Attack parameter key=value, also "
                                      "nested ones (jitter.hue=0.1); repeat. See `stealguard "
                                      "attacks`.")),
    ("epochs", Optional[int], typer.Option(None, "--epochs", help="Clone epochs (default: "
                                           "the attack's).")),
    ("batch_size", int, typer.Option(128, "--batch-size", help="Clone batch size.")),
    ("optimizer", Optional[str], typer.Option(None, "--optimizer", help="sgd, adam or adagrad.")),
    ("lr", Optional[float], typer.Option(None, "--lr", help="Clone learning rate.")),
    ("save_clone", Optional[Path], typer.Option(None, "--save-clone",
                                                help="Save the clone as an artifact.")),
    ("force", bool, Force),
    ("device", str, Device),
    ("data_root", Optional[str], DataRoot),
    ("as_json", bool, Json),
]
# Params fields with their own option elsewhere (clone: --epochs/--lr/...) or only as --param.
_NOT_AN_OPTION = {"clone"}


def _param_options(params_cls: Any) -> list[tuple[str, Any, Any]]:
    """One `--field-name` option per scalar field of an attack's Params; values are handed
    to the Params model as strings (it converts and validates them). Nested models (jitter,
    round_config) are set with --param field.sub=value."""
    from pydantic import BaseModel

    out = []
    for field, info in params_cls.model_fields.items():
        ann = info.annotation
        nested = any(isinstance(a, type) and issubclass(a, BaseModel)
                     for a in (ann, *getattr(ann, "__args__", ())))
        if field in _NOT_AN_OPTION or nested:
            continue
        default = info.get_default(call_default_factory=True)
        shown = "the victim's" if field == "arch" else repr(default)
        help_text = info.description or field
        if default is not None:  # None: the description says what the default is
            help_text += f" (default: {shown})"
        flag = "--" + field.replace("_", "-")
        out.append((f"p_{field}", Optional[str], typer.Option(None, flag, help=help_text)))
    return out


def _attack_command(group: typer.Typer, name: str, doc: str) -> None:
    """Register `stealguard attack <name>` on `group`, listing only the options this attack
    has."""
    import inspect

    from stealguard.attacks import attack_params_class

    params_cls = attack_params_class(name)
    specs = _ATTACK_COMMON + _param_options(params_cls)

    def command(**kw: Any) -> None:
        _run_attack(name, kw)

    command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
        for n, ann, opt in specs])
    command.__annotations__ = {n: ann for n, ann, _ in specs}
    group.command(name, help=doc)(command)


def _run_attack(name: str, kw: dict[str, Any]) -> None:
    if kw["target"] is not None and (kw["api_key"] is None or kw["defense"] is not None):
        raise StealguardError("--target needs --api-key, and takes no --defense (the "
                              "service applies its own)")
    if kw["save_clone"] is not None:
        check_output_dir(kw["save_clone"], "--save-clone", force=kw["force"])
    from stealguard.artifacts import save_classifier
    from stealguard.attacks import AttackConfig, parse_attack_params
    from stealguard.formats import load_victim
    from stealguard.pipeline import steal

    params: dict[str, Any] = parse_attack_params(kw["param"])
    for key, value in kw.items():
        if key.startswith("p_") and value is not None:
            if key[2:] in params:
                raise StealguardError(f"attack parameter {key[2:]!r} given twice (--param "
                                      "and its own option)")
            params[key[2:]] = value
    given = {"epochs": kw["epochs"], "optimizer": kw["optimizer"], "lr": kw["lr"]}
    if any(v is not None for v in given.values()):
        params["clone"] = _config(batch_size=kw["batch_size"], seed=params.get("seed", 0),
                                  **given)
    data = kw["data"]
    if data is not None and "@" not in data:
        data = f"{data}@{kw['data_split']}"
    AttackConfig.parse({"name": name, "params": params, "data": data})  # before any work
    device = _device(kw["device"])
    victim = load_victim(kw["victim_path"])
    if "arch" not in params:  # the victim's, or a registered default (with a warning)
        from stealguard.victim import clone_arch

        params["arch"] = clone_arch(victim.model)
    cfg = AttackConfig.parse({"name": name, "params": params, "data": data})
    blackbox = None
    if kw["target"] is not None:
        from stealguard.service.client import HttpBlackBox

        blackbox = HttpBlackBox(kw["target"], kw["api_key"])
        _check_remote_budget(blackbox, kw["budget"])
    r = steal(victim, cfg, budget=kw["budget"],
              defense=_defense(victim.model, kw["defense"], kw["defense_param"]),
              output=kw["output"], data_root=kw["data_root"], device=device,
              progress=show_progress(kw["as_json"]), blackbox=blackbox)
    clone = r.pop("clone")
    if kw["save_clone"] is not None:
        clone_cfg = params.get("clone")
        save_classifier(kw["save_clone"], clone, dataset=victim.dataset, classes=victim.classes,
                        train_config=clone_cfg.model_dump() if clone_cfg else {},
                        metrics={"test_accuracy": r["clone_accuracy"]},
                        extra={"stolen_from": str(kw["victim_path"]), "attack": name})
        r["clone_artifact"] = str(kw["save_clone"])
    emit(r, kw["as_json"], name)


def _check_remote_budget(blackbox: Any, budget: int) -> None:
    """Over HTTP the key's own budget caps the attack: refuse before spending any of it."""
    left = blackbox.remaining
    if left is not None and left < budget:
        raise StealguardError(
            f"the API key has {left} queries left, fewer than --budget {budget}; pass "
            f"--budget {left} (or less), or ask the service's operator for a larger budget")


class LazyAttackGroup(TyperGroup):
    """`stealguard attack`: its commands come from the attack registry (which imports torch),
    so they are listed and built only when this group is used, not for `stealguard --help`."""

    def list_commands(self, ctx: Any) -> list[str]:
        from stealguard.attacks import ATTACKS

        return list(ATTACKS.names())

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands:
            from stealguard.attacks import ATTACKS

            if cmd_name not in ATTACKS:
                return None
            one = typer.Typer()
            doc = (ATTACKS.get(cmd_name).__doc__ or cmd_name).strip().splitlines()[0]
            _attack_command(one, cmd_name, doc)
            self.commands[cmd_name] = typer.main.get_command(one)
        return self.commands[cmd_name]


attack_app = typer.Typer(cls=LazyAttackGroup, no_args_is_help=True,
                         help="Steal a model through its black box (one command per attack).")
app.add_typer(attack_app, name="attack")


# ---- service and reproduce (their modules import no torch at module level) ------------------


def _register_service_commands() -> None:
    from stealguard.service.cli import audit_app, keys_app, serve_command

    app.command("serve")(serve_command)
    app.add_typer(keys_app, name="keys")
    app.add_typer(audit_app, name="audit")


def _register_import_command() -> None:
    from stealguard.importing import import_command

    app.command("import")(import_command)


def _register_reproduce_commands() -> None:
    from stealguard.reproduce.cli import (
        demo_command,
        headline_command,
        rekey_command,
        reproduce_command,
        specs_command,
    )

    app.command("reproduce")(reproduce_command)
    app.command("specs")(specs_command)
    app.command("demo")(demo_command)
    app.command("rekey")(rekey_command)
    app.command("headline")(headline_command)


_register_service_commands()
_register_reproduce_commands()
_register_import_command()


# ---- listings -------------------------------------------------------------------------------


@app.command()
@app.command()
def defenses(as_json: bool = Json) -> None:
    """List the registered output defenses and their parameters."""
    from stealguard.defenses import describe_defenses

    described = describe_defenses()
    if as_json:
        print_json({"defenses": described})
        return
    for name, params in described.items():
        print(name + "".join(f"\n    {k}: {v}" for k, v in params.items()))


@app.command()
def attacks(as_json: bool = Json) -> None:
    """List the registered attacks and their parameters (--param key=value on `attack`)."""
    from stealguard.attacks import describe_attacks

    described = describe_attacks()
    if as_json:
        print_json({"attacks": described})
        return
    for name, params in described.items():
        print(name + "".join(f"\n    {k}: {v}" for k, v in params.items()))


@app.command()
def models(as_json: bool = Json) -> None:
    """List the registered model architectures, with their parameter counts for 1x28x28
    (MNIST-like) and 3x32x32 (CIFAR-like) inputs and 10 classes."""
    from stealguard.models import describe_models

    rows = describe_models()
    if as_json:
        print_json({"models": [r["name"] for r in rows], "details": rows})
        return
    from rich.table import Table

    table = Table(title="models (parameters for 10 classes)")
    for col in ("model", "1x28x28", "3x32x32"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["name"], *(f"{p:,}" if p is not None else "-" for p in
                                   (r["params"].get("1x28x28"), r["params"].get("3x32x32"))))
    console().print(table)


data_app = typer.Typer(help="Datasets: list and download.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list(data_root: Optional[str] = DataRoot, as_json: bool = Json) -> None:
    """List the registered datasets (plus imagefolder:<path>) and which splits are present
    under the data root."""
    from stealguard.data import dataset_status, resolve_data_root

    root = resolve_data_root(data_root)
    rows = dataset_status(root)
    if as_json:
        print_json({"data_root": str(root), "datasets": [r["name"] for r in rows]
                    + ["imagefolder:<path>"], "status": rows})
        return
    from rich.table import Table

    table = Table(title=f"datasets under {root}")
    for col in ("dataset", "train", "test"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], *("present" if r[s] else "missing" for s in ("train", "test")))
    table.add_row("imagefolder:<path>", "<path>/train/<class>/", "<path>/test/<class>/")
    console().print(table)
    missing = [r["name"] for r in rows if not (r["train"] or r["test"])]
    if missing:
        print("missing ones: `stealguard data download <name>` (needs internet)")


@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., help="Dataset name."),
    data_root: Optional[str] = DataRoot,
) -> None:
    """Download a public dataset into the data root, checking its checksums."""
    from stealguard.data import resolve_data_root
    from stealguard.data.download import download_dataset

    root = resolve_data_root(data_root)
    download_dataset(name, root)
    print(f"{name}: downloaded and verified under {root}")


@app.command()
def version() -> None:
    """Print the package version."""
    print(__version__)


# ---- the entry point: one `error:` line, exit 2 ----------------------------------------------


def _error(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Run the CLI; every failure ends with one `error: ...` line on stderr and exit 2."""
    try:
        code = app(args=argv, prog_name="stealguard", standalone_mode=False)
    except cli_errors.NoArgsIsHelpError as e:
        print(e.format_message(), file=sys.stderr)
        sys.exit(2)
    except cli_errors.UsageError as e:
        where = f"; see `{e.ctx.command_path} --help`" if e.ctx else ""
        _error(f"{e.format_message().rstrip('.')}{where}")
    except cli_errors.ClickException as e:
        _error(e.format_message())
    except (typer.Abort, KeyboardInterrupt):
        _error("interrupted", 130)
    except StealguardError as e:
        _error(str(e))
    except OSError as e:
        _error(os_error_line(e))
    except Exception as e:  # pydantic's ValidationError, from a library call
        from pydantic import ValidationError

        if not isinstance(e, ValidationError):
            raise
        _error(f"invalid {e.title}: {validation_line(e, flags=False)}")
    else:
        if isinstance(code, int) and code:
            sys.exit(code)
