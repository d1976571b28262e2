"""Training throughput: stealguard's whole-dataset, batched-augmentation loop versus a
plain DataLoader-style loop (per-sample __getitem__, per-sample augmentation in Python,
default collate), same model, same optimizer, measured side by side in one run.

    .venv/bin/python benchmarks/bench_training.py [--arch conv3] [--images 8192] [--device cpu]
        [--profile]

Prints images/second for each (median of --rounds alternating runs) and the ratios
(ours / per-sample loop), for stealguard's loop with torch's own nn.MaxPool2d, as it runs
by default (NCHW convolutions, max-pooling through NHWC: bit-identical, see
`stealguard.models.layers.MaxPool2d`) and with
`channels_last=True` (opt-in: faster on a CPU, but it moves stored results by float
rounding; see `stealguard.training`), so the layout's share of the gain is visible.
--profile first prints where one epoch of stealguard's loop spends its time (torch.profiler,
operators by self CPU time).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

from stealguard.models import build_model
from stealguard.models.layers import with_torch_pools
from stealguard.training import TrainConfig, resolve_device, soft_cross_entropy, train


class PerSampleDataset(Dataset):
    """What a torchvision-style pipeline does: one image at a time, augmented in Python."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float() / 255.0  # (C, H, W)
        if self.augment:
            c, h, w = x.shape
            padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
            dy, dx = (int(v) for v in torch.randint(0, 9, (2,)))
            x = padded[:, dy:dy + h, dx:dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.labels[i]


def per_sample_loop(model, images, labels, *, epochs, batch_size, augment, device) -> float:
    with_torch_pools(model)  # torch's own layers, as a torchvision-style pipeline has
    loader = DataLoader(PerSampleDataset(images, labels, augment), batch_size=batch_size,
                        shuffle=True, num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.to(device).train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = soft_cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(labels) * epochs / (time.perf_counter() - t0)


def ours(model, images, labels, *, epochs, batch_size, augment, device,
         channels_last=False) -> float:
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.05, augment=augment)
    log = train(model, images, labels, config=cfg, device=device, progress=False,
                channels_last=channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return log.samples_per_second


def ours_torch_pools(model, images, labels, **kw) -> float:
    """stealguard's loop on the same model with torch's NCHW nn.MaxPool2d (the pooling
    share of the gain; bit-identical training, see stealguard.models.layers.MaxPool2d)."""
    return ours(with_torch_pools(model), images, labels, **kw)


def profile_ours(args, images, labels, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model(args.arch, in_channels=args.channels, image_size=args.size,
                        num_classes=10)
    for channels_last in (False, True):
        ours(model, images[:256], labels[:256], epochs=1, batch_size=args.batch_size,
             augment=True, device=device, channels_last=channels_last)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours(model, images, labels, epochs=1, batch_size=args.batch_size, augment=True,
                 device=device, channels_last=channels_last)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"profile, one epoch, augment=True, {'channels-last' if channels_last else 'NCHW'}"
              f": {total / 1e6:.2f} s of operator time")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
            print(f"  {e.key:45s} {100 * e.self_cpu_time_total / total:5.1f} %")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="conv3")
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate the loops this many times and report medians")
    p.add_argument("--profile", action="store_true", help="profile stealguard's loop first")
    args = p.parse_args()
    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, args.channels, args.size, args.size),
                           dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, device {device}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"arch {args.arch}, {args.images} images {args.channels}x{args.size}x{args.size}, "
          f"{args.epochs} epochs, batch {args.batch_size}")
    if args.profile:
        profile_ours(args, images, labels, device)
    contenders = (("per-sample DataLoader loop", per_sample_loop),
                  ("stealguard train, torch's max-pool", ours_torch_pools),
                  ("stealguard train", ours),
                  ("stealguard train, channels-last", partial(ours, channels_last=True)))
    for augment in (False, True):
        rates: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # alternate, so a busy neighbour slows all alike
            for name, fn in contenders:
                torch.manual_seed(0)
                model = build_model(args.arch, in_channels=args.channels, image_size=args.size,
                                    num_classes=10)
                fn(model, images[:256], labels[:256], epochs=1, batch_size=args.batch_size,
                   augment=augment, device=device)  # warm-up
                rates.setdefault(name, []).append(fn(
                    model, images, labels, epochs=args.epochs, batch_size=args.batch_size,
                    augment=augment, device=device))
        base = statistics.median(rates["per-sample DataLoader loop"])
        mine = statistics.median(rates["stealguard train"])
        tpool = statistics.median(rates["stealguard train, torch's max-pool"])
        nhwc = statistics.median(rates["stealguard train, channels-last"])
        print(f"augment={augment!s:5}  per-sample loop {base:6.0f} img/s   stealguard with "
              f"torch's max-pool {tpool:6.0f} img/s ({tpool / base:.2f}x)   stealguard "
              f"{mine:6.0f} img/s ({mine / base:.2f}x)   stealguard channels-last {nhwc:6.0f} "
              f"img/s ({nhwc / base:.2f}x)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
