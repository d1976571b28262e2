"""`stealguard import`: bring your own model in as an artifact, mounted in the main CLI.

    stealguard import --factory mypkg.nets:build --weights net.pt --input-shape 1,28,28 \
        --num-classes 10 --dataset mnist --mean 0.1307 --std 0.3081 --out artifacts/mine
    stealguard import --onnx net.onnx --num-classes 10 --dataset mnist --out artifacts/onnx

Everything is checked before anything is written (factory, checkpoint keys, a probe forward
pass, the ONNX input); the result is an artifact like any other: evaluate, attack, serve
and reproduce take it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stealguard.console import print_json
from stealguard.errors import ConfigError


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated numbers, got {text!r}") from None


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise ConfigError(f"--input-shape expects C,H,W (three positive ints, e.g. 1,28,28), "
                          f"got {text!r}")
    return dims


def import_command(
    out_dir: Path = typer.Option(..., "--out", help="Artifact directory to write."),
    factory: Optional[str] = typer.Option(
        None, "--factory", help="package.module:function that returns your nn.Module (called "
                                "with no arguments; its package must be importable)."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="The module's state_dict: .safetensors, or .pt/.pth (read with "
                                "torch.load(weights_only=True) only)."),
    onnx: Optional[Path] = typer.Option(
        None, "--onnx", help="An ONNX model (instead of --factory/--weights), answered by "
                             "onnxruntime: probabilities only."),
    input_shape: Optional[str] = typer.Option(
        None, "--input-shape", help="C,H,W of one image (--onnx: read from the graph)."),
    num_classes: int = typer.Option(..., "--num-classes", help="K, the size of its output."),
    dataset: str = typer.Option(..., "--dataset", help="The dataset it was trained on (its "
                                "test split is what evaluate and attack measure on)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class "
                                          "names (default 0..K-1)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean, comma-"
                                       "separated: inputs are (x - mean) / std (default: none)."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std, comma-separated."),
    last_layer: Optional[str] = typer.Option(
        None, "--last-layer", help="--factory: the name of the final nn.Linear (for MAD's "
                                   "last-layer form)."),
    onnx_outputs: str = typer.Option("logits", "--onnx-outputs", help="--onnx: what the graph "
                                     "outputs, logits or probs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Import a model trained elsewhere (a factory + state_dict, or ONNX) as an artifact."""
    from stealguard.data import DATASETS
    from stealguard.formats import describe_artifact

    if (factory is None) == (onnx is None):
        raise ConfigError("give either --factory (with --weights and --input-shape) or --onnx")
    if not dataset.startswith("imagefolder:"):
        DATASETS.get(dataset)  # UnknownNameError lists the valid names
    names = [c.strip() for c in classes.split(",")] if classes is not None else None
    shape, m, s = _shape(input_shape), _floats(mean, "--mean"), _floats(std, "--std")
    if factory is not None:
        if weights is None or shape is None:
            raise ConfigError("--factory needs --weights (its state_dict) and --input-shape C,H,W")
        if onnx_outputs != "logits":
            raise ConfigError("--onnx-outputs is for --onnx")
        from stealguard.formats.imported import import_factory

        import_factory(out_dir, factory=factory, weights=weights, input_shape=shape,
                       num_classes=num_classes, dataset=dataset, classes=names, mean=m, std=s,
                       last_layer=last_layer)
    else:
        if weights is not None or last_layer is not None:
            raise ConfigError("--weights and --last-layer are for --factory; an ONNX file holds "
                              "its weights, and its last layer is not reachable")
        if onnx_outputs not in ("logits", "probs"):
            raise ConfigError(f"--onnx-outputs must be logits or probs, got {onnx_outputs!r}")
        from stealguard.formats.onnx import import_onnx

        assert onnx is not None
        import_onnx(out_dir, onnx_path=onnx, num_classes=num_classes, dataset=dataset,
                    input_shape=shape, classes=names, mean=m, std=s,
                    outputs=onnx_outputs)  # type: ignore[arg-type]
    info = describe_artifact(out_dir)
    figures = {"artifact": str(out_dir), "format": info.format,
               "input_shape": list(info.input_shape), "num_classes": info.num_classes,
               "dataset": info.dataset, "normalization": info.normalization}
    if as_json:
        print_json(figures)
        return
    print(f"imported {factory or onnx} as {info.format} at {out_dir}: input "
          f"{tuple(info.input_shape)}, {info.num_classes} classes, dataset {info.dataset}")
