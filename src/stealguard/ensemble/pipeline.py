"""Train, save and load an EDM victim: the hash network, then the N members on eq. 3.

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, section 5.1: MNIST / FashionMNIST victims use KMNIST both as the auxiliary OOD
set D_out and as the secret classification task of the hash network f_H (M = 10, m = 2).

Our choice for that pairing here: this KMNIST copy has only its 10,000 test images, so when
the OOD set and the hash task are the same dataset it is split once, by a seeded permutation
(`split_seed`), into two disjoint halves: the first half trains f_H, the second half is D_out.
Neither role sees the other's images. Auxiliary sets (OOD, hash task) use their train split
when it is present and their test split otherwise (see `load_aux`). They must have the
victim's image shape: no silent resizing.

    victim = train_edm("mnist", "conv3", TrainConfig(epochs=3, lr=0.05), members=5,
                       lambda_d=0.5, ood="kmnist", hash_task="kmnist")
    steal_knockoff(victim, surrogate="fashionmnist", ...)   # EDM behind the black box
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stealguard.data import ImageDataset, load_dataset
from stealguard.ensemble.bundle import load_edm, read_hash_spec, save_edm
from stealguard.ensemble.diversity import coherence
from stealguard.ensemble.hashing import DNNHash
from stealguard.ensemble.joint import train_ensemble
from stealguard.ensemble.predictor import EDMPredictor
from stealguard.errors import ConfigError, DatasetNotFoundError
from stealguard.models import Classifier, build_model
from stealguard.training import TrainConfig, accuracy, to_float_images, train
from stealguard.victim import Victim


@dataclass
class EDMVictim(Victim):
    """A `Victim` whose model is an `EDMPredictor`; the extra fields are the owner's."""

    lambda_d: float = 0.0
    ood: str = ""
    hash_task: str = field(default="", repr=False)  # secret: never in public info
    hash_accuracy: float = field(default=float("nan"), repr=False)  # secret: f_H, held out
    log: dict[str, Any] = field(default_factory=dict)


def load_aux(name: str, *, data_root: str | Path | None = None) -> ImageDataset:
    """An auxiliary dataset: its train split, or its test split when only that exists;
    `name@split` picks the split (e.g. `cifar100@test`, disjoint from an attacker's
    CIFAR-100 train queries)."""
    name, _, split = name.partition("@")
    if split:
        return load_dataset(name, split, data_root=data_root)
    try:
        return load_dataset(name, "train", data_root=data_root)
    except DatasetNotFoundError:
        return load_dataset(name, "test", data_root=data_root)


def split_halves(ds: ImageDataset, *, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Two disjoint halves of `ds` by a seeded permutation: (first, second), of sizes n // 2
    and n - n // 2."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    half = len(ds) // 2

    def take(idx: torch.Tensor, part: str) -> ImageDataset:
        return ImageDataset(ds.name, f"{ds.split}[{part}]", ds.images[idx], ds.labels[idx],
                            ds.classes, ds.mean, ds.std)

    return take(perm[:half], "half0"), take(perm[half:], "half1")


def aux_sets(
    ood: str, hash_task: str, *, input_shape: tuple[int, int, int], split_seed: int = 0,
    data_root: str | Path | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """(hash-task set, OOD set), disjoint halves when both name the same dataset."""
    ood_set = load_aux(ood, data_root=data_root)
    hash_set = ood_set if hash_task == ood else load_aux(hash_task, data_root=data_root)
    for role, name, ds in (("OOD set", ood, ood_set), ("hash task", hash_task, hash_set)):
        if ds.image_shape != tuple(input_shape):
            raise ConfigError(f"the {role} {name!r} has images {ds.image_shape}, the victim "
                              f"takes {tuple(input_shape)}; choose one of the victim's shape")
    if hash_task == ood:
        hash_set, ood_set = split_halves(ood_set, seed=split_seed)
    return hash_set, ood_set


def train_hash_net(
    hash_set: ImageDataset, *, config: TrainConfig, arch: str = "hash_cnn3", holdout: float = 0.1,
    device: str | torch.device | None = "cpu", progress: bool = True,
) -> tuple[Classifier, float]:
    """f_H: `arch` trained on the secret task; returns it and its accuracy on a held-out
    `holdout` fraction of `hash_set` (the rest trains it)."""
    data = hash_set.subset(None, seed=config.seed)  # shuffled
    n_test = int(len(data) * holdout)
    c, h, _ = data.image_shape
    torch.manual_seed(config.seed)
    net = build_model(arch, in_channels=c, image_size=h, num_classes=data.num_classes,
                      mean=data.mean, std=data.std)
    train(net, data.images[n_test:], data.labels[n_test:], config=config, device=device,
          progress=progress, desc=f"hash net {data.name}")
    acc = (accuracy(net, data.images[:n_test], data.labels[:n_test], device=device)
           if n_test else float("nan"))
    return net.cpu().eval(), acc


def _check_options(members: int, lambda_d: float, subclasses: int) -> None:
    if members < 2:
        raise ConfigError(f"an EDM ensemble needs N >= 2 members, got {members}")
    if lambda_d < 0:
        raise ConfigError(f"lambda_D must be >= 0, got {lambda_d}")
    if subclasses < 1:
        raise ConfigError(f"hash parameter m (sub-classes) must be >= 1, got {subclasses}")


def _edm_data(
    dataset: str, *, ood: str, hash_task: str, hash_classes: int | None, split_seed: int,
    train_subset: int | None, seed: int, data_root: str | Path | None,
) -> tuple[ImageDataset, ImageDataset, ImageDataset, ImageDataset]:
    """(train, test, hash task, OOD) sets, checked against each other."""
    train_set = load_dataset(dataset, "train", data_root=data_root)
    test_set = load_dataset(dataset, "test", data_root=data_root)
    if train_subset is not None:
        train_set = train_set.subset(train_subset, seed=seed)
    hash_set, ood_set = aux_sets(ood, hash_task, input_shape=train_set.image_shape,
                                 split_seed=split_seed, data_root=data_root)
    if hash_classes is not None and hash_classes != hash_set.num_classes:
        raise ConfigError(f"hash parameter M = {hash_classes} does not match the hash task "
                          f"{hash_task!r}, which has {hash_set.num_classes} classes")
    return train_set, test_set, hash_set, ood_set


def train_edm(
    dataset: str, arch: str, config: TrainConfig, *, members: int = 5, lambda_d: float = 0.5,
    ood: str = "kmnist", hash_task: str = "kmnist", subclasses: int = 2,
    hash_classes: int | None = None, hash_arch: str = "hash_cnn3",
    hash_config: TrainConfig | None = None, ood_batch_size: int | None = None,
    split_seed: int = 0, data_root: str | Path | None = None, train_subset: int | None = None,
    device: str | torch.device | None = "cpu", progress: bool = True,
) -> EDMVictim:
    """Train an EDM victim on `dataset`: f_H on `hash_task`, then N `arch` members on eq. 3
    with `ood` as D_out. lambda_d = 0 trains the paper's regular ensemble (no OOD data).
    hash_classes (M), when given, must equal the hash task's class count; subclasses is m.
    Every option is checked before anything is trained."""
    _check_options(members, lambda_d, subclasses)
    train_set, test_set, hash_set, ood_set = _edm_data(
        dataset, ood=ood, hash_task=hash_task, hash_classes=hash_classes, split_seed=split_seed,
        train_subset=train_subset, seed=config.seed, data_root=data_root)
    shape = train_set.image_shape
    hcfg = hash_config or TrainConfig(epochs=5, batch_size=128, lr=0.05, seed=config.seed)
    hash_net, hash_acc = train_hash_net(hash_set, config=hcfg, arch=hash_arch, device=device,
                                        progress=progress)
    torch.manual_seed(config.seed)  # members differ by their (seeded) initialisation
    nets = [build_model(arch, in_channels=shape[0], image_size=shape[1],
                        num_classes=train_set.num_classes, mean=train_set.mean,
                        std=train_set.std) for _ in range(members)]
    log = train_ensemble(nets, train_set.images, train_set.labels, ood_set.images,
                         lambda_d=lambda_d, config=config, ood_batch_size=ood_batch_size,
                         device=device, progress=progress, desc=f"edm {dataset}/{arch} x{members}")
    edm = EDMPredictor([n.cpu() for n in nets],
                       hash_fn=DNNHash(hash_net, num_classes=hash_classes, subclasses=subclasses))
    acc = accuracy(edm, test_set.images, test_set.labels, device=device)
    return EDMVictim(
        model=edm, dataset=dataset, classes=train_set.classes,  # type: ignore[arg-type]
        test_accuracy=acc,
        train_config={**config.model_dump(), "members": members, "lambda_d": lambda_d,
                      "ood_batch_size": ood_batch_size or config.batch_size},
        lambda_d=lambda_d, ood=ood, hash_task=f"{hash_set.name}/{hash_set.split}",
        hash_accuracy=hash_acc,
        log={"epochs": log.epochs, "seconds": log.seconds, "ood_images": len(ood_set),
             "hash_images": len(hash_set)},
    )


@torch.no_grad()
def coherence_on(edm: EDMPredictor, images: torch.Tensor, *, batch_size: int = 1024,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Eq. 1 of every image over the members' outputs: (Q, C, H, W) -> (Q,) (for Fig. 5)."""
    edm.to(device).eval()
    outs = [coherence(edm.member_probs(to_float_images(xb.to(device)))).cpu()
            for xb in images.split(batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def save_edm_victim(victim: EDMVictim, out: str | Path, **extra_metrics: Any) -> Path:
    return save_edm(out, victim.model, dataset=victim.dataset,  # type: ignore[arg-type]
                    classes=victim.classes, lambda_d=victim.lambda_d, ood=victim.ood,
                    hash_task=victim.hash_task, train_config=victim.train_config,
                    metrics={"test_accuracy": victim.test_accuracy, **extra_metrics},
                    hash_metrics={"accuracy": victim.hash_accuracy})


def load_edm_victim(path: str | Path) -> EDMVictim:
    edm, m = load_edm(path)
    h = read_hash_spec(path, m)
    return EDMVictim(model=edm, dataset=m.dataset, classes=m.classes,  # type: ignore[arg-type]
                     test_accuracy=float(m.metrics.get("test_accuracy", float("nan"))),
                     train_config=m.train_config, lambda_d=m.lambda_d, ood=m.ood,
                     hash_task=h.task, hash_accuracy=float(h.metrics.get("accuracy", "nan")))
