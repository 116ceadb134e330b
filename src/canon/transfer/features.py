"""Penultimate features of a trained network (`canon features`, and the linear probe's input):
each image of a split under the network's own deterministic test-time preprocessing (its
centre crop, no augmentation), through `forward_features` and `forward_head(pre_logits=True)`,
in the split's order, with its labels and class names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from canon.data.labeled import LabeledImages
from canon.data.loaders import build_loader
from canon.data.preprocess import center_transform
from canon.engine.checkpoint import unreadable_file
from canon.engine.trained import TrainedModel
from canon.errors import DataError
from canon.files import atomic_write


@dataclass(frozen=True)
class Features:
    """One split's penultimate features: N x D float32, N labels indexing `classes`."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    class_ids: list[str]
    source: str  # the network they came from
    data: str  # the dataset and split

    def save(self, path: Path) -> None:
        """A safetensors file of `features` and `labels`, the rest as its metadata."""
        tensors = {"features": self.features.contiguous(), "labels": self.labels.contiguous()}
        metadata = {"classes": json.dumps(self.classes), "class_ids": json.dumps(self.class_ids),
                    "source": self.source, "data": self.data}
        content = safetensors.torch.save(tensors, metadata=metadata)
        atomic_write(path, lambda target: target.write_bytes(content))

    @classmethod
    def load(cls, path: Path) -> Features:
        try:
            with safetensors.safe_open(path, framework="pt") as stored:
                metadata = stored.metadata() or {}
                features, labels = stored.get_tensor("features"), stored.get_tensor("labels")
            classes, class_ids = json.loads(metadata["classes"]), json.loads(metadata["class_ids"])
            return cls(features, labels, classes, class_ids, metadata["source"], metadata["data"])
        except (KeyError, ValueError) as error:
            raise DataError(f"{path} is not a features file canon wrote (no {error})") from None
        except Exception as error:  # SafetensorError, OSError: truncated or foreign
            raise unreadable_file(path, error) from None


@torch.no_grad()  # not inference_mode: the probe fits on these tensors with autograd
def extract_features(
    trained: TrainedModel, images: LabeledImages, data: str, *, batch_size: int = 64,
    workers: int = 0, progress: bool = False,
) -> Features:
    """The penultimate features of every decodable image of `images` (undecodable files are
    skipped with a warning by the loader, as in evaluation); `data` names them."""
    model = trained.model.eval()
    device = next(model.parameters()).device
    loader = build_loader(
        images.with_transform(center_transform(trained.preprocess)), batch_size,
        train=False, workers=workers,
    )
    features, labels = [], []
    for batch, targets in loader:
        if not len(targets):
            continue
        pooled = model.forward_head(model.forward_features(batch.to(device)), pre_logits=True)
        features.append(pooled.float().flatten(1).cpu())
        labels.append(targets)
        if progress:
            print(f"\rfeatures of {data}: {sum(map(len, labels))}/{len(images)} images", end="")
    if progress:
        print()
    if not features:
        raise DataError(f"{images!r} holds no decodable image")
    return Features(
        torch.cat(features), torch.cat(labels), list(images.classes),
        list(images.class_ids), str(trained.source), data,
    )
