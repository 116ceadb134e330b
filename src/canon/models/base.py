"""The one small interface every canon model has (`CanonModel`), the test-time preprocessing
that travels with a model (`EvalConfig`), and the registry of model builders (`MODELS`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn

from canon.errors import ConfigError, InputSizeError
from canon.registry import Registry

# Every architecture by name: each family module registers its builders when imported
# (canon.models imports them all; canon.models.factory builds from here).
MODELS = Registry("model")


def register_model(
    name: str | None = None, *, description: str | None = None
) -> Callable[[Callable[..., CanonModel]], Callable[..., CanonModel]]:
    """Decorator: register a model builder in MODELS. The built model remembers the options
    its builder was called with beyond the class count (`build_options`), so that an export
    rebuilds the same network: ResNet-34 with option A shortcuts, GoogLeNet without LRN."""

    def decorate(builder: Callable[..., CanonModel]) -> Callable[..., CanonModel]:
        @functools.wraps(builder)
        def build(*args: Any, **options: Any) -> CanonModel:
            model = builder(*args, **options)
            model.called_with = {k: v for k, v in options.items() if k != "num_classes"}
            return model

        return MODELS.register(name, description=description)(build)

    return decorate


def check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalConfig:
    """Test-time preprocessing: rescale to resize_size as `fit` says (canon.data.geometry.
    fit_image: the shorter side, or the central square of AlexNet s2 and ZFNet s3), centre-crop,
    normalise."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    fit: str = "shorter"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CanonModel(nn.Module):
    """Base class: subclasses define `stages`, `forward_head`, `reset_classifier`.

    Transfer learning, visualisation, evaluation and model parallelism use only this interface:

    - `stages`: the feature extractor as named, ordered stages; running them in order is
      `forward_features`. Visualisation hooks them, pipeline parallelism places them on devices.
    - `forward_features(x)`: image batch to the last feature map (before any pooling or FC
      layer).
    - `forward_head(x, pre_logits=False)`: feature map to logits, or to the penultimate features.
    - `classifier`: the last layer, mapping the penultimate features to logits (a linear probe
      fits it; fine-tuning gives it its own learning rate).
    - `reset_classifier(num_classes)`: a fresh `classifier` for transfer learning.
    - `class_layers()`: every layer whose outputs are the classes, the `classifier` and
      GoogLeNet's auxiliary heads' last layers: transfer starts them all afresh for other
      classes and trains them at the classifier's learning rate.
    - `forward_with_aux(x)`: the explicit training path, `(logits, [auxiliary logits...])`; only
      GoogLeNet has auxiliary heads, everything else returns an empty list. `forward` never
      changes its return type with `.training`.
    - `fully_convolutional()`: a module mapping images to class-score maps N x K x h x w whose
      spatial mean equals `forward`'s logits at the training size (where an FC head gives h = w
      = 1); used for dense evaluation.
    - `eval_config`: the test-time preprocessing the model expects; it travels with checkpoints.
    - `build_options()`: the options, beyond the class count, that its registered builder was
      called with (they travel with exports, so that the same builder rebuilds its layers).
    """

    eval_config: EvalConfig = EvalConfig()
    # Smallest square input the network accepts; models with fixed-size FC heads also set
    # `fixed_input_size` (the only size the FC head accepts outside fully convolutional form).
    min_input_size: int = 32
    fixed_input_size: int | None = None
    # Set by register_model; a model built from its class directly was built with none.
    called_with: Mapping[str, Any] = MappingProxyType({})

    @property
    def stages(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    @property
    def classifier(self) -> nn.Linear:
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

    def class_layers(self) -> list[nn.Module]:
        return [self.classifier]

    def fully_convolutional(self) -> nn.Module:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputSizeError(
                f"{type(self).__name__} expects images as N x 3 x H x W, got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if min(height, width) < self.min_input_size:
            raise InputSizeError(
                f"{type(self).__name__} needs inputs of at least "
                f"{self.min_input_size}x{self.min_input_size}, got {height}x{width}"
            )
        fixed = self.fixed_input_size
        if fixed is not None and (height, width) != (fixed, fixed):
            raise InputSizeError(
                f"{type(self).__name__}'s fully connected head takes {fixed}x{fixed} inputs, "
                f"got {height}x{width}; use model.fully_convolutional() for other sizes"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self(x), []

    def build_options(self) -> dict[str, Any]:
        return dict(self.called_with)


def class_layers_of(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are the classes: a canon model's class_layers(), another
    module's `classifier` if it has one, else none."""
    if isinstance(model, CanonModel):
        return model.class_layers()
    classifier = getattr(model, "classifier", None)
    return [classifier] if isinstance(classifier, nn.Module) else []
