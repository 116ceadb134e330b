"""canon: the ImageNet canon of convolutional networks, as the papers describe them."""

from canon.registry import create_model, describe_model, list_models

__all__ = ["create_model", "describe_model", "list_models"]
__version__ = "0.1.0"
