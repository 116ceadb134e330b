"""The architectures, one module per family; importing this package registers them all."""

from canon.models import alexnet, googlenet, resnet, resnet_cifar, vgg, zfnet  # noqa: F401
from canon.models.base import CanonModel, EvalConfig

__all__ = ["CanonModel", "EvalConfig"]
