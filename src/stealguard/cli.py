"""The `stealguard` command. It parses options and hands off to the library.

Every command that reports figures prints a table, or with --json one JSON object.
Errors on bad input print one line that says what was wrong and exit with status 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from stealguard import __version__
from stealguard.errors import StealguardError

app = typer.Typer(help="Defend image classifiers against model stealing, and measure it.",
                  pretty_exceptions_enable=False,
                  no_args_is_help=True, add_completion=False)
attack_app = typer.Typer(help="Steal a model through its black box.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: list and download.", no_args_is_help=True)
app.add_typer(attack_app, name="attack")
app.add_typer(data_app, name="data")
# A wide console when piped, so tables are not squeezed into 80 columns in logs.
out = Console(width=None if sys.stdout.isatty() else 140)

DataRoot = typer.Option(None, "--data-root", envvar="STEALGUARD_DATA",
                        help="Dataset root (default: $STEALGUARD_DATA or the user cache).")
Device = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto.")
Json = typer.Option(False, "--json", help="Print the figures as one JSON object.")
Seed = typer.Option(0, "--seed", help="Random seed.")
DefenseOpt = typer.Option(None, "--defense", help="Output defense (see `stealguard defenses`).")
DefenseParam = typer.Option([], "--defense-param", help="Defense parameter key=value (repeat).")


def _emit(figures: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(figures, default=str))
        return
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in figures.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)


def _device(device: str) -> str:
    """Resolve --device once, at the boundary: 'auto' -> 'cuda' or 'cpu'; unknown -> error."""
    from stealguard.training import resolve_device

    return str(resolve_device(device))


def _config(**kw: Any) -> Any:
    from stealguard.training import TrainConfig

    try:
        return TrainConfig(**{k: v for k, v in kw.items() if v is not None})
    except ValidationError as e:
        raise StealguardError(f"invalid training option: {e}") from None


@app.command()
def train(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (see `stealguard data list`)."),
    arch: str = typer.Option("conv3", "--arch", help="Model architecture (see `stealguard models`)."),
    out_dir: Path = typer.Option(..., "--out", help="Artifact directory to write."),
    epochs: int = typer.Option(10, help="Training epochs."),
    batch_size: int = typer.Option(128, help="Batch size."),
    optimizer: str = typer.Option("sgd", help="sgd, adam or adagrad."),
    lr: float = typer.Option(0.05, help="Initial learning rate (cosine schedule)."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay."),
    augment: bool = typer.Option(False, help="Random crop (pad 4) and horizontal flip."),
    train_subset: Optional[int] = typer.Option(None, help="Train on a random subset of N images."),
    defense: str = typer.Option("none", "--defense", help="none (one model) or edm (an "
                                "ensemble of diverse models with a secret hash)."),
    members: int = typer.Option(5, help="EDM: ensemble members N."),
    lambda_d: float = typer.Option(0.5, "--lambda-d", help="EDM: diversity weight lambda_D "
                                   "(0: the regular ensemble)."),
    ood: str = typer.Option("kmnist", help="EDM: out-of-distribution set for diversity."),
    hash_task: str = typer.Option("kmnist", help="EDM: the secret hash network's task."),
    seed: int = Seed, device: str = Device, data_root: Optional[str] = DataRoot, as_json: bool = Json,
) -> None:
    """Train a victim (one model, or with --defense edm an EDM ensemble) and save it as an
    artifact (safetensors + manifest)."""
    from stealguard.formats import save_victim
    from stealguard.pipeline import train_victim

    device = _device(device)
    cfg = _config(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                  weight_decay=weight_decay, augment=augment, seed=seed)
    t0 = time.perf_counter()
    if defense == "edm":
        from stealguard.ensemble import train_edm

        victim = train_edm(dataset, arch, cfg, members=members, lambda_d=lambda_d, ood=ood,
                           hash_task=hash_task, data_root=data_root, train_subset=train_subset,
                           device=device, progress=not as_json)
    elif defense == "none":
        victim = train_victim(dataset, arch, cfg, data_root=data_root,
                              train_subset=train_subset, device=device, progress=not as_json)
    else:
        raise StealguardError(f"unknown training defense {defense!r}; valid: none, edm "
                              "(output defenses are applied at query time: --defense on "
                              "attack, evaluate and serve)")
    save_victim(victim, out_dir)  # the artifact format that handles the trained model
    _emit({"dataset": dataset, "arch": arch, "defense": defense,
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
    from stealguard.formats import load_victim
    from stealguard.pipeline import test_set_for
    from stealguard.training import accuracy
    from stealguard.victim import describe

    device = _device(device)
    victim = load_victim(artifact)
    test = (test_set_for(victim, data_root=data_root) if dataset is None
            else load_dataset(dataset, "test", data_root=data_root))
    figures: dict[str, Any] = {"artifact": str(artifact), "arch": describe(victim.model),
                               "dataset": test.name, "test_images": len(test)}
    d = _defense(victim.model, defense, defense_param)
    if d is None:
        figures["test_accuracy"] = accuracy(victim.model, test.images, test.labels, device=device)
    else:
        from stealguard.defenses.metrics import defense_metrics
        from stealguard.training import resolve_device

        figures["defense"] = defense
        figures.update(defense_metrics(victim.model, d, test.images, test.labels,
                                       device=resolve_device(device)))
    _emit(figures, as_json, "evaluation")


def _defense(victim_model: Any, name: Optional[str], params: list[str]) -> Any:
    """--defense NAME --defense-param k=v ... -> a Defense bound to the victim, or None."""
    from stealguard.defenses import DefenseConfig

    cfg = DefenseConfig.from_cli(name, params)  # refuses --defense-param without --defense
    return None if name is None else cfg.build(victim_model)


# ---- stealguard attack <name>: options from the attack's typed Params ---------------------

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
    ("budget", int, typer.Option(50_000, "--budget", help="Query budget.")),
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


def _attack_command(name: str) -> None:
    """Register `stealguard attack <name>`, listing only the options this attack has."""
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
    doc = (ATTACKS_DOC.get(name) or name)
    attack_app.command(name, help=doc)(command)


ATTACKS_DOC: dict[str, str] = {}


def _run_attack(name: str, kw: dict[str, Any]) -> None:
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
        if kw["api_key"] is None or kw["defense"] is not None:
            raise StealguardError("--target needs --api-key, and takes no --defense (the "
                                  "service applies its own)")
        from stealguard.service.client import HttpBlackBox

        blackbox = HttpBlackBox(kw["target"], kw["api_key"])
    r = steal(victim, cfg, budget=kw["budget"],
              defense=_defense(victim.model, kw["defense"], kw["defense_param"]),
              output=kw["output"], data_root=kw["data_root"], device=device,
              progress=not kw["as_json"], blackbox=blackbox)
    clone = r.pop("clone")
    if kw["save_clone"] is not None:
        clone_cfg = params.get("clone")
        save_classifier(kw["save_clone"], clone, dataset=victim.dataset, classes=victim.classes,
                        train_config=clone_cfg.model_dump() if clone_cfg else {},
                        metrics={"test_accuracy": r["clone_accuracy"]},
                        extra={"stolen_from": str(kw["victim_path"]), "attack": name})
        r["clone_artifact"] = str(kw["save_clone"])
    _emit(r, kw["as_json"], name)


def _register_service_commands() -> None:
    from stealguard.service.cli import audit_app, keys_app, serve_command

    app.command("serve")(serve_command)
    app.add_typer(keys_app, name="keys")
    app.add_typer(audit_app, name="audit")


def _register_attack_commands() -> None:
    from stealguard.attacks import ATTACKS

    for name in ATTACKS.names():
        ATTACKS_DOC[name] = (ATTACKS.get(name).__doc__ or name).strip().splitlines()[0]
        _attack_command(name)


def _register_import_command() -> None:
    from stealguard.importing import import_command

    app.command("import")(import_command)


def _register_reproduce_commands() -> None:
    from stealguard.reproduce.cli import headline_command, reproduce_command, specs_command

    app.command("reproduce")(reproduce_command)
    app.command("specs")(specs_command)
    app.command("headline")(headline_command)


_register_attack_commands()
_register_service_commands()
_register_reproduce_commands()
_register_import_command()


@app.command()
def demo(
    scale: str = typer.Option("quick", help="quick (2-core CPU, minutes) or full (papers' sizes)."),
    device: str = Device, data_root: Optional[str] = DataRoot, as_json: bool = Json,
) -> None:
    """The main job: MNIST victim, KnockoffNets clones (FashionMNIST queries), one table."""
    from stealguard.demo import SCALES, run_demo

    if scale not in SCALES:
        raise StealguardError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    device = _device(device)
    t0 = time.perf_counter()
    rows = run_demo(scale=scale, device=device, data_root=data_root, progress=not as_json)
    seconds = round(time.perf_counter() - t0, 1)
    if as_json:
        print(json.dumps({"scale": scale, "seconds": seconds, "rows": rows}))
        return
    table = Table(title=f"stealguard demo (scale={scale}, {seconds} s)")
    for col in ("row", "dataset", "defense", "attack", "labels", "queries", "accuracy",
                "normalized", "agreement"):
        table.add_column(col, justify="right" if col in ("queries", "accuracy") else "left")
    for r in rows:
        table.add_row(r["row"], r["dataset"], r["defense"], r["attack"], r["labels"],
                      str(r["queries"]), f"{100 * r['accuracy']:.2f} %",
                      f"{r['normalized_accuracy']:.2f}x", f"{100 * r['agreement']:.2f} %")
    out.print(table)


@app.command()
def defenses(as_json: bool = Json) -> None:
    """List the registered output defenses and their parameters."""
    from stealguard.defenses import describe_defenses

    described = describe_defenses()
    if as_json:
        print(json.dumps({"defenses": described}))
        return
    for name, params in described.items():
        print(name + "".join(f"\n    {k}: {v}" for k, v in params.items()))


@app.command()
def attacks(as_json: bool = Json) -> None:
    """List the registered attacks and their parameters (--param key=value on `attack`)."""
    from stealguard.attacks import describe_attacks

    described = describe_attacks()
    if as_json:
        print(json.dumps({"attacks": described}, default=str))
        return
    for name, params in described.items():
        print(name + "".join(f"\n    {k}: {v}" for k, v in params.items()))


@app.command()
def models(as_json: bool = Json) -> None:
    """List the registered model architectures."""
    from stealguard.models import MODELS

    names = MODELS.names()
    print(json.dumps({"models": names}) if as_json else "\n".join(names))


@data_app.command("list")
def data_list(as_json: bool = Json) -> None:
    """List the registered datasets (plus imagefolder:<path>)."""
    from stealguard.data import DATASETS

    names = [*DATASETS.names(), "imagefolder:<path>"]
    print(json.dumps({"datasets": names}) if as_json else "\n".join(names))


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


def main() -> None:
    try:
        app()
    except StealguardError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
