"""canon: the ImageNet canon of convolutional networks, as the papers describe them. The
public API (create_model, list_models, load_recipe, train, load_trained, evaluate) is imported
on first use (canon.lazy), so that `canon --help` does not wait for torch."""

from canon.lazy import lazy_attributes

__version__ = "0.1.0"

_HOMES = {
    "create_model": "canon.models.factory",
    "describe_model": "canon.models.factory",
    "list_models": "canon.models.factory",
    "load_recipe": "canon.recipes",
    "train": "canon.engine.trainer",
    "load_trained": "canon.engine.trained",
    "evaluate": "canon.evaluation.protocols",
}
__all__ = sorted(_HOMES)
__getattr__ = lazy_attributes(__name__, _HOMES)
