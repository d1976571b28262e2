"""Victims of the papers' experiments, trained once and cached as artifacts.

A victim is described by a `VictimConfig` (dataset, architecture, how it is trained, its
training hyper-parameters). Each training kind is registered in VICTIMS with typed params:

    standard            one model, cross-entropy (both papers' undefended victim)
    edm                 EDM (EDM paper eq. 3): N members with the diversity loss, a secret
                        DNN-hash routing queries (stealguard.ensemble.train_edm)
    ensemble            the EDM paper's "regular ensemble" (Table 4, Fig. 5): the same
                        routed ensemble trained with lambda_D = 0
    dp_sgd              MAD paper's `dp-sgd` baseline: the victim trained with DP-SGD (Opacus)
    outlier_exposure    Adaptive Misinformation's victim (trained with Outlier Exposure) and
                        its misinformation model, handed to the `adaptive_misinformation`
                        defense as a component
    artifact            no training: an existing artifact of any format (`params.path`; one
                        made by `stealguard import`, say); its dataset must be `dataset`, and
                        `arch` is only the registered architecture the cell validates clone
                        options against (the key holds the path, not the artifact's bytes:
                        replacing the artifact in place needs a new results/artifacts folder)
    surrogate_init      MAD Fig. A3: the standard victim, and MAD's surrogate trained part way
                        (to a test accuracy), handed to the `mad` defense as its `surrogate`

`VictimCache.get(cfg)` trains a victim on first use and saves it under
`<artifacts>/victims/<key>/` (safetensors + manifest, written to a temporary folder and
renamed, so an interrupted training leaves nothing behind); every later cell, run or Ray
worker with the same config loads it instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stealguard.data import DATASETS, load_dataset
from stealguard.errors import ConfigError
from stealguard.formats import load_victim, save_victim
from stealguard.models import MODELS, Classifier, build_model
from stealguard.pipeline import train_victim
from stealguard.registry import Registry
from stealguard.training import TrainConfig, accuracy, train
from stealguard.victim import Victim

VICTIMS: Registry[VictimKind] = Registry("victim training")


def known_dataset(name: str) -> str:
    """A registered dataset name or `imagefolder:<path>` (UnknownNameError lists the names)."""
    if not name.startswith("imagefolder:"):
        DATASETS.get(name)
    return name


# A cell field naming a dataset: checked when the spec is loaded, before anything runs.
DatasetName = Annotated[str, AfterValidator(known_dataset)]


class VictimConfig(BaseModel):
    """How a victim is trained. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    arch: str
    training: str = "standard"
    subset: int | None = Field(None, ge=1, description="train on a seeded subset of this size")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        epochs=20, batch_size=128, optimizer="sgd", lr=0.05))
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the training kind's own parameters")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        MODELS.get(v)
        return v

    @field_validator("training")
    @classmethod
    def _known_training(cls, v: str) -> str:
        VICTIMS.get(v)
        return v

    @model_validator(mode="after")
    def _own_params(self) -> VictimConfig:
        """Keep the params of this training kind. A param of another kind (a spec may set
        `ood` for every victim of a dataset) is dropped; one of no kind is an error."""
        known = {f for name in VICTIMS for f in VICTIMS.get(name).params.model_fields}
        unknown = sorted(set(self.params) - known)
        if unknown:
            raise ValueError(f"unknown victim params {unknown}; valid: {sorted(known)}")
        own = VICTIMS.get(self.training).params.model_fields
        self.params = {k: v for k, v in self.params.items() if k in own}
        self.typed_params()
        return self

    def typed_params(self) -> BaseModel:
        kind = VICTIMS.get(self.training)
        try:
            return kind.params(**self.params)
        except ValidationError as e:  # name the field
            raise ConfigError(f"victim training {self.training!r}: bad params: {e}") from None

    def key(self) -> str:
        """A stable digest of everything that changes the trained victim."""
        blob = json.dumps({**self.model_dump(mode="json"),
                           "params": self.typed_params().model_dump(mode="json")},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def datasets(self) -> list[str]:
        """Every dataset this victim's training reads (to report missing data up front)."""
        p = self.typed_params()
        return [self.dataset, *[getattr(p, f) for f in ("ood", "hash_task", "outliers")
                                if isinstance(getattr(p, f, None), str)]]


@dataclass
class TrainedVictim:
    """A victim and the models a defense needs besides it (e.g. the misinformation model)."""

    victim: Victim
    components: dict[str, Classifier] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VictimKind:
    params: type[BaseModel]
    train: Callable[[VictimConfig, Any, torch.device, str | Path | None, bool], TrainedVictim]


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EDMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    members: int = Field(5, ge=1)
    lambda_d: float = Field(0.5, ge=0)
    ood: str = "kmnist"
    hash_task: str = "kmnist"
    subclasses: int = Field(2, ge=1)
    ood_batch_size: int | None = Field(None, ge=1)
    hash_epochs: int = Field(5, ge=1)


class RegularEnsembleParams(EDMParams):
    lambda_d: float = Field(0.0, ge=0, le=0, description="a regular ensemble has lambda_D = 0")


class DPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    noise_multiplier: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class OEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outliers: str = Field("kmnist", description="the outlier set, dataset[@split] (default "
                          "split train; kmnist: test, the only one here)")
    weight: float = Field(1.0, ge=0)  # lambda of OE; 1 as the AM authors' code

    @field_validator("outliers")
    @classmethod
    def _known_outliers(cls, v: str) -> str:
        name, _, split = v.partition("@")
        known_dataset(name)
        if split not in ("", "train", "test"):
            raise ValueError(f"outliers {v!r}: unknown split {split!r}; valid: train, test")
        return v


def _standard(cfg: VictimConfig, p: Any, device: torch.device, data_root: str | Path | None,
              progress: bool) -> TrainedVictim:
    v = train_victim(cfg.dataset, cfg.arch, cfg.train, data_root=data_root,
                     train_subset=cfg.subset, device=device, progress=progress)
    return TrainedVictim(v)


def _edm(cfg: VictimConfig, p: Any, device: torch.device, data_root: str | Path | None,
         progress: bool) -> TrainedVictim:
    from stealguard.ensemble import train_edm

    hash_cfg = cfg.train.model_copy(update={"epochs": p.hash_epochs, "batch_size": 128})
    v = train_edm(cfg.dataset, cfg.arch, cfg.train, members=p.members, lambda_d=p.lambda_d,
                  ood=p.ood, hash_task=p.hash_task, subclasses=p.subclasses,
                  hash_config=hash_cfg, ood_batch_size=p.ood_batch_size, data_root=data_root,
                  train_subset=cfg.subset, device=device, progress=progress)
    return TrainedVictim(v, info={"hash_accuracy": v.hash_accuracy, **v.log})


def _train_set(cfg: VictimConfig, data_root: str | Path | None):  # type: ignore[no-untyped-def]
    ds = load_dataset(cfg.dataset, "train", data_root=data_root)
    return ds.subset(cfg.subset, seed=cfg.train.seed) if cfg.subset else ds


def _fresh(cfg: VictimConfig, ds: Any) -> Classifier:
    c, h, _ = ds.image_shape
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.arch, in_channels=c, image_size=h, num_classes=ds.num_classes,
                       mean=ds.mean, std=ds.std)


def _finish(cfg: VictimConfig, model: Classifier, ds: Any, device: torch.device,
            data_root: str | Path | None) -> Victim:
    test = load_dataset(cfg.dataset, "test", data_root=data_root)
    acc = accuracy(model, test.images, test.labels, device=device)
    return Victim(model.cpu().eval(), cfg.dataset, ds.classes, acc, cfg.train.model_dump())


def _dp_sgd(cfg: VictimConfig, p: Any, device: torch.device, data_root: str | Path | None,
            progress: bool) -> TrainedVictim:
    from stealguard.defenses.dp_sgd import train_dp

    ds = _train_set(cfg, data_root)
    model, log = train_dp(_fresh(cfg, ds), ds.images, ds.labels, config=cfg.train,
                          noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
                          delta=p.delta, device=device)
    assert isinstance(model, Classifier)  # a copy of ours, BatchNorm -> GroupNorm
    return TrainedVictim(_finish(cfg, model, ds, device, data_root),
                         info={"dp_epsilon": log.epsilon, "dp_delta": p.delta})


def _outlier_exposure(cfg: VictimConfig, p: Any, device: torch.device,
                      data_root: str | Path | None, progress: bool) -> TrainedVictim:
    from stealguard.data.augment import to_shape
    from stealguard.defenses import train_misinformation, train_outlier_exposure

    ds = _train_set(cfg, data_root)
    name, _, split = p.outliers.partition("@")  # `name@split`, e.g. cifar100@test
    out = load_dataset(name, split or ("train" if name != "kmnist" else "test"),
                       data_root=data_root)
    c, h, _ = ds.image_shape
    outliers = to_shape(out.images, c, h)
    model = _fresh(cfg, ds)
    train_outlier_exposure(model, ds.images, ds.labels, outliers, config=cfg.train,
                           weight=p.weight, device=device)
    misinfo = _fresh(cfg, ds)
    train_misinformation(misinfo, ds.images, ds.labels, config=cfg.train, outliers=outliers,
                         victim=model, device=device)
    return TrainedVictim(_finish(cfg, model, ds, device, data_root),
                         components={"misinformation_model": misinfo.cpu().eval()})


class ArtifactParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="an artifact directory of any registered format")


def _artifact(cfg: VictimConfig, p: Any, device: torch.device, data_root: str | Path | None,
              progress: bool) -> TrainedVictim:
    victim = load_victim(Path(p.path).expanduser())
    if victim.dataset != cfg.dataset:
        raise ConfigError(f"victim artifact {p.path} was trained on {victim.dataset!r}, the "
                          f"spec says dataset {cfg.dataset!r}; make them the same")
    return TrainedVictim(victim, info={"artifact": str(p.path)})


class SurrogateInitParams(BaseModel):
    """MAD Fig. A3: MAD's surrogate trained part way, to about this test accuracy."""

    model_config = ConfigDict(extra="forbid")
    surrogate_accuracy: float | None = Field(None, gt=0, lt=1, description=(
        "train MAD's surrogate until its test accuracy reaches this (the paper's early / mid / "
        "late: ~0.25 / 0.5 / 0.75); None: a randomly initialised one ('rand', the default)"))
    surrogate_seed: int = Field(1, description="the surrogate's initialisation and data order")
    surrogate_chunk: int = Field(256, ge=1, description="training images between two checks "
                                 "of its accuracy")


def _surrogate_init(cfg: VictimConfig, p: Any, device: torch.device,
                    data_root: str | Path | None, progress: bool) -> TrainedVictim:
    """The standard victim, and (unless 'rand') MAD's surrogate of the victim's architecture
    trained on the victim's training data, one chunk at a time, until its accuracy on 1,000
    test images reaches `surrogate_accuracy` (the `surrogate` component of the mad defense)."""
    tv = _standard(cfg, p, device, data_root, progress)
    if p.surrogate_accuracy is None:
        return TrainedVictim(tv.victim, info={"surrogate_accuracy": float("nan")})
    ds = _train_set(cfg, data_root).subset(seed=p.surrogate_seed)  # shuffled
    test = load_dataset(cfg.dataset, "test", data_root=data_root).subset(1000, seed=0)
    surrogate = _fresh(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"seed": p.surrogate_seed})}), ds)
    step = cfg.train.model_copy(update={"epochs": 1, "schedule": "constant",
                                        "seed": p.surrogate_seed})
    acc, seen = accuracy(surrogate, test.images, test.labels, device=device), 0
    while acc < p.surrogate_accuracy:
        lo = seen % len(ds)
        chunk = slice(lo, lo + p.surrogate_chunk)
        train(surrogate, ds.images[chunk], ds.labels[chunk], config=step, device=device,
              progress=False)
        seen += p.surrogate_chunk
        acc = accuracy(surrogate, test.images, test.labels, device=device)
        if seen > 50 * len(ds):
            raise ConfigError(f"MAD's surrogate did not reach test accuracy "
                              f"{p.surrogate_accuracy} in 50 epochs (at {acc:.3f})")
    return TrainedVictim(tv.victim, components={"surrogate": surrogate.cpu().eval()},
                         info={"surrogate_accuracy": acc, "surrogate_images": seen})


VICTIMS.register("standard")(VictimKind(_NoParams, _standard))
VICTIMS.register("surrogate_init")(VictimKind(SurrogateInitParams, _surrogate_init))
VICTIMS.register("edm")(VictimKind(EDMParams, _edm))
VICTIMS.register("ensemble")(VictimKind(RegularEnsembleParams, _edm))
VICTIMS.register("dp_sgd")(VictimKind(DPParams, _dp_sgd))
VICTIMS.register("outlier_exposure")(VictimKind(OEParams, _outlier_exposure))
VICTIMS.register("artifact")(VictimKind(ArtifactParams, _artifact))


class VictimCache:
    """Victims by config key: in memory for this process, on disk for every process."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "victims"
        self._mem: dict[str, TrainedVictim] = {}
        self._lock = threading.Lock()

    def path(self, cfg: VictimConfig) -> Path:
        return self.root / f"{cfg.dataset}-{cfg.arch}-{cfg.training}-{cfg.key()}"

    def get(self, cfg: VictimConfig, *, device: torch.device,
            data_root: str | Path | None = None, progress: bool = False) -> TrainedVictim:
        key = cfg.key()
        with self._lock:
            if key in self._mem:
                return self._mem[key]
            path = self.path(cfg)
            if not (path / "done.json").exists():
                kind = VICTIMS.get(cfg.training)
                t0 = time.perf_counter()
                tv = kind.train(cfg, cfg.typed_params(), device, data_root, progress)
                tv.info["train_seconds"] = round(time.perf_counter() - t0, 2)  # to the store
                tv.info["train_device"] = str(device)
                self._save(tv, path, cfg)
            # Always the saved weights, also right after training: every process (local or a
            # Ray worker) then computes with bit-identical tensors in the same layout.
            tv = self._load(path)
            self._mem[key] = tv
            return tv

    def put(self, cfg: VictimConfig, tv: TrainedVictim) -> None:
        """Use `tv` as the victim of `cfg` in this process (nothing is written to disk):
        for tests and notebooks that build a victim by hand instead of training it."""
        with self._lock:
            self._mem[cfg.key()] = tv

    def _save(self, tv: TrainedVictim, path: Path, cfg: VictimConfig) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_victim(tv.victim, tmp / "victim")  # the format that handles the model
            for name, model in tv.components.items():
                save_victim(Victim(model, tv.victim.dataset, tv.victim.classes, float("nan")),
                            tmp / name)
            (tmp / "done.json").write_text(json.dumps(
                {"config": cfg.model_dump(mode="json"), "components": sorted(tv.components),
                 "info": tv.info}, indent=2, default=str))
            if path.exists():  # another worker finished first: keep theirs
                shutil.rmtree(tmp)
                return
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _load(path: Path) -> TrainedVictim:
        done = json.loads((path / "done.json").read_text())
        victim = load_victim(path / "victim")
        comps = {name: load_victim(path / name).model for name in done["components"]}
        return TrainedVictim(victim, comps, done.get("info", {}))
