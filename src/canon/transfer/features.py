"""Penultimate features of a trained network (`canon features`, and the linear probe's input):
each image of a split under the network's own deterministic test-time preprocessing (its
centre crop, no augmentation), through `forward_features` and `forward_head(pre_logits=True)`,
in the split's order, with its labels and class names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from canon.data.datasets import dataset_fingerprint
from canon.data.labeled import LabeledImages
from canon.data.loaders import build_loader
from canon.data.preprocess import center_transform
from canon.engine.checkpoint import unreadable_file
from canon.engine.trained import TrainedModel
from canon.errors import DataError
from canon.evaluation.protocols import model_inputs
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
    fingerprint: str = ""  # features_fingerprint's; "" in files from before it was kept

    def save(self, path: Path) -> None:
        """A safetensors file of `features` and `labels`, the rest as its metadata."""
        tensors = {"features": self.features.contiguous(), "labels": self.labels.contiguous()}
        metadata = {"classes": json.dumps(self.classes), "class_ids": json.dumps(self.class_ids),
                    "source": self.source, "data": self.data, "fingerprint": self.fingerprint}
        content = safetensors.torch.save(tensors, metadata=metadata)
        atomic_write(path, lambda target: target.write_bytes(content))

    @classmethod
    def load(cls, path: Path) -> Features:
        try:
            with safetensors.safe_open(path, framework="pt") as stored:
                metadata = stored.metadata() or {}
                features, labels = stored.get_tensor("features"), stored.get_tensor("labels")
            classes, class_ids = json.loads(metadata["classes"]), json.loads(metadata["class_ids"])
            return cls(features, labels, classes, class_ids, metadata["source"], metadata["data"],
                       metadata.get("fingerprint", ""))
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
    skipped with a warning by the loader, as in evaluation); `data` names them. The model is
    left in the mode it was in."""
    model = trained.model
    device = next(model.parameters()).device
    loader = build_loader(
        images.with_transform(center_transform(trained.preprocess)), batch_size,
        train=False, workers=workers,
    )
    features, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for batch, targets in loader:
            if not len(targets):
                continue
            inputs = model_inputs(model, batch, device)
            pooled = model.forward_head(model.forward_features(inputs), pre_logits=True)
            features.append(pooled.float().flatten(1).cpu())
            labels.append(targets)
            if progress:
                print(f"\rfeatures of {data}: {sum(map(len, labels))}/{len(images)} images",
                      end="")
    finally:
        model.train(was_training)
    if progress:
        print()
    if not features:
        raise DataError(f"{images!r} holds no decodable image")
    return Features(
        torch.cat(features), torch.cat(labels), list(images.classes),
        list(images.class_ids), str(trained.source), data, features_fingerprint(trained, images),
    )


def features_fingerprint(trained: TrainedModel, images: LabeledImages) -> str:
    """A short key that changes when the features would: the network (its name and build
    options, which some layers' behaviour depends on, and its weights), its test-time
    preprocessing, the images' content and the classes their labels index."""
    digest = hashlib.sha256(json.dumps([trained.name, trained.model.build_options()],
                                       sort_keys=True, default=str).encode())
    for name, tensor in trained.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    preprocess = trained.preprocess
    digest.update(repr((preprocess.crop_size, preprocess.resize_size, preprocess.interpolation,
                        preprocess.fit)).encode())
    for statistic in (preprocess.normalize.mean, preprocess.normalize.std):
        if statistic is not None:
            digest.update(statistic.float().contiguous().numpy().tobytes())
    digest.update(dataset_fingerprint(images).encode())
    digest.update(json.dumps(list(images.class_ids)).encode())
    return digest.hexdigest()[:16]
