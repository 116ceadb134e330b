"""`canon bench loop`: canon's whole training loop on the CIFAR quickstart (`canon train`'s
default: ResNet-20 on the bundled sample) against the plain PyTorch loop a user would write for
the same training, measured in the same process: the torchvision CIFAR-10 way (a PIL image per
sample through RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor and Normalize, in a
DataLoader), the same model (model.options included), memory format, optimizer, loss and
batch. Both time the training steps of one epoch after a few warm-up steps; validation is not
timed.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from canon.bench.train import synchronize
from canon.data.datasets import load_sample
from canon.devices import cudnn_autotuning, resolve_device
from canon.engine.optimization import make_optimizer
from canon.engine.setup import build_model
from canon.engine.trainer import train
from canon.errors import ConfigError
from canon.recipes import Recipe, apply_overrides, load_recipe
from canon.recipes.schema import SPEED_ONLY_KEYS

WARMUP_STEPS = 3  # untimed: allocator and kernel-choice warm-up, loader workers starting


@dataclass(frozen=True)
class LoopTiming:
    name: str
    images_per_second: float
    steps: int  # timed steps


def canon_loop(recipe: Recipe, device: str, steps: int | None = None) -> LoopTiming:
    """canon's trainer (canon.engine.trainer.train) for one epoch of `recipe` (or `steps`
    steps; the recipe's own iteration limit does not apply, as in the plain loops), timed from
    the end of the warm-up steps to the end of the last step."""
    recipe = apply_overrides(recipe, [("train.epochs", 1), ("train.iterations", None),
                                      *_step_limit(recipe, steps)])
    last = steps or len(load_sample("train")) // recipe.train.batch_size
    marks: list[float] = []
    target = torch.device(resolve_device(device))

    def mark(step: int) -> None:
        if step in (WARMUP_STEPS, last):  # waiting for the device only where timing starts
            synchronize(target)           # and ends keeps its work overlapping the host's
        marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as run_dir:
        train(recipe, run_dir, device=device, progress=False, on_step=mark)
    return _timing("canon", marks, recipe.train.batch_size)


def _timing(name: str, marks: list[float], batch_size: int) -> LoopTiming:
    """Images per second from the end of the warm-up steps to the end of the last."""
    timed = len(marks) - WARMUP_STEPS
    if timed < 1:
        raise ConfigError(f"time at least {WARMUP_STEPS + 1} steps (got {len(marks)})")
    return LoopTiming(name, timed * batch_size / (marks[-1] - marks[WARMUP_STEPS - 1]), timed)


def _step_limit(recipe: Recipe, steps: int | None) -> list[tuple[str, Any]]:
    """Overrides that stop after `steps` steps: the iteration limit counted at the run's own
    batch, the base lr restated at it so that the peak lr stays the recipe's."""
    if steps is None:
        return []
    optimizer, batch = recipe.optimizer, recipe.train.batch_size * recipe.train.accum_steps
    lr = optimizer.lr * batch / optimizer.base_batch_size if optimizer.scale_lr else optimizer.lr
    return [("optimizer.lr", lr), ("optimizer.base_batch_size", batch),
            ("train.iterations", steps)]


class _PILImages(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: an H x W x 3 uint8 array made a PIL
    image, then the transform."""

    def __init__(self, images: np.ndarray, labels: list[int], transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def plain_loop(recipe: Recipe, device: str, workers: int, steps: int | None = None
               ) -> LoopTiming:
    """The plain PyTorch loop for the same training: torchvision transforms on PIL images in
    a DataLoader with `workers` processes, the same model, optimizer, batch size and autocast
    precision (fp16 with a GradScaler)."""
    from torchvision import transforms as T

    target = torch.device(resolve_device(device))
    sample = load_sample("train")
    images = sample.images.permute(0, 2, 3, 1).numpy()
    mean = (images.reshape(-1, 3) / 255).mean(0).tolist()
    std = (images.reshape(-1, 3) / 255).std(0).tolist()
    flip = [T.RandomHorizontalFlip()] if recipe.data.flip else []
    transform = T.Compose([T.RandomCrop(32, padding=recipe.data.padding), *flip, T.ToTensor(),
                           T.Normalize(mean, std)])
    loader = DataLoader(_PILImages(images, sample.labels, transform),
                        batch_size=recipe.train.batch_size, shuffle=True, num_workers=workers,
                        drop_last=True, pin_memory=target.type == "cuda")
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe, len(sample.classes)).to(target)  # options as canon's loop
    memory_format = torch.channels_last if recipe.train.channels_last else torch.preserve_format
    model = model.to(memory_format=memory_format).train()
    optimizer, _ = make_optimizer(model, recipe.optimizer, recipe.train.batch_size)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.amp)
    scaler = torch.amp.GradScaler(target.type, enabled=half is torch.float16)
    limit = steps or len(loader)  # bench_loop keeps steps within an epoch
    marks = []
    for step, (batch, labels) in enumerate(loader):
        if step == limit:
            break
        batch = batch.to(target, non_blocking=True).contiguous(memory_format=memory_format)
        with torch.autocast(target.type, dtype=half, enabled=half is not None):
            loss = criterion(model(batch), labels.to(target, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step + 1 in (WARMUP_STEPS, limit):
            synchronize(target)
        marks.append(time.perf_counter())
    return _timing(f"plain, {workers} workers", marks, recipe.train.batch_size)


def bench_loop(recipe_name: str = "quickstart", device: str = "cpu", repeats: int = 3,
               workers: tuple[int, ...] = (0, 2), steps: int | None = None,
               overrides: Sequence[str] = ()) -> dict[str, Any]:
    """canon's loop and the plain ones, in turn, `repeats` times each; medians, and the
    ratio of canon's to the fastest plain loop. `overrides` ("section.key=value") apply to
    the recipe both loops train."""
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    if steps is not None and steps <= WARMUP_STEPS:  # before any loop trains
        raise ConfigError(f"--steps {steps}: time at least {WARMUP_STEPS + 1} steps (the first "
                          f"{WARMUP_STEPS} of each loop are untimed)")
    recipe = load_recipe(recipe_name, list(overrides))
    if recipe.data.dataset != "sample":  # the plain loop reads the sample
        raise ConfigError(f"canon bench loop times recipes on the bundled sample; "
                          f"{recipe_name} trains on {recipe.data.dataset}")
    if recipe.train.accum_steps != 1 or recipe.data.val_split:  # the plain loop has neither
        raise ConfigError("canon bench loop compares steps of one batch on the whole training "
                          "sample: drop train.accum_steps and data.val_split")
    unmatched = [key for key, differs in (
        ("model.frozen_stages", recipe.model.frozen_stages != 0),
        ("model.init_from", recipe.model.init_from is not None),
        ("data.augmentation", recipe.data.augmentation != "cifar"),
        ("data.crop_size", recipe.data.crop_size != 32),
        ("data.resize_size", recipe.data.resize_size != 32),
        ("data.scale_range", recipe.data.scale_range is not None),
        ("data.pca_std", recipe.data.pca_std != 0),
        ("train.ema_decay", recipe.train.ema_decay != 0),
        ("train.polyak_after_epochs", recipe.train.polyak_after_epochs is not None),
        ("train.filter_rms_radius", recipe.train.filter_rms_radius is not None)) if differs]
    if unmatched:  # the two loops would train differently
        raise ConfigError(f"canon bench loop's plain loop (torchvision's CIFAR crop and flip, "
                          f"every layer trained from scratch, a plain SGD step) has no "
                          f"counterpart of "
                          f"{', '.join(unmatched)}: leave them as quickstart has them")
    # Within one epoch: canon's loop would validate at its end (inside the timed span) and
    # the plain loop's DataLoader would stop there.
    per_epoch = len(load_sample("train")) // recipe.train.batch_size
    if per_epoch <= WARMUP_STEPS:
        raise ConfigError(f"an epoch of the sample is {per_epoch} steps at train.batch_size "
                          f"{recipe.train.batch_size}, too few to time after the first "
                          f"{WARMUP_STEPS}: lower train.batch_size")
    if steps is not None and steps > per_epoch:
        raise ConfigError(f"--steps {steps}: an epoch of the sample is {per_epoch} steps at "
                          f"batch {recipe.train.batch_size}, and the timed steps must lie "
                          "within it")
    loops = [partial(canon_loop, recipe, device, steps),
             *(partial(plain_loop, recipe, device, count, steps) for count in workers)]
    rates: dict[str, list[float]] = {}
    # canon's trainer turns autotuning on for a CUDA run: on for every loop from the start.
    with cudnn_autotuning(torch.device(resolve_device(device))):
        for repeat in range(repeats):
            # Each repeat starts with the next loop, so that no loop always runs first in a
            # fresh process, or always right after the same other one.
            shift = repeat % len(loops)
            for loop in loops[shift:] + loops[:shift]:
                timing = loop()
                rates.setdefault(timing.name, []).append(timing.images_per_second)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    baseline = max((name for name in medians if name != "canon"), key=medians.__getitem__)
    return {"recipe": recipe_name, "overrides": list(overrides), "device": resolve_device(device),
            "threads": torch.get_num_threads(), "repeats": repeats, "images_per_second": medians,
            "runs": rates, "baseline": baseline, "canon_only": speed_settings_on(recipe),
            "ratio": medians["canon"] / medians[baseline]}


def speed_settings_on(recipe: Recipe) -> list[str]:
    """The recipe's speed-only settings that are on (SPEED_ONLY_KEYS): canon's loop takes
    them, the plain loops run eagerly."""
    sections = recipe.to_dict()
    return [key for key in sorted(SPEED_ONLY_KEYS)
            if sections[key.split(".")[0]][key.split(".")[1]]]


def format_loop(figures: dict[str, Any]) -> str:
    """The table `canon bench loop` prints."""
    recipe = " ".join([figures["recipe"], *(f"--set {o}" for o in figures["overrides"])])
    lines = [f"{recipe} on {figures['device']} ({figures['threads']} threads), "
             f"median of {figures['repeats']} runs; training images/s, validation not timed"]
    lines += [f"{name:<20} {rate:8.1f}" for name, rate in figures["images_per_second"].items()]
    lines.append(f"canon / {figures['baseline']}: {figures['ratio']:.3f}")
    if figures["canon_only"]:
        lines.append(f"({', '.join(figures['canon_only'])}: canon's loop alone; the plain loops "
                     "run eagerly)")
    return "\n".join(lines)
