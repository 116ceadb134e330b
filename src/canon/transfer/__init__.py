"""Transfer learning and weight import: a trained network's penultimate features
(`extract_features`, `canon features`), a linear probe on them or fine-tuning on a new dataset
(`transfer`, `linear_probe`, `finetune`; `canon transfer`), and torchvision's ImageNet weights
in canon's models (`from_torchvision`). Imported on first use (canon.lazy)."""

from canon.lazy import lazy_attributes

_HOMES = {
    "extract_features": "canon.transfer.features",
    "finetune": "canon.transfer.runs",
    "from_torchvision": "canon.transfer.torchvision",
    "linear_probe": "canon.transfer.runs",
    "transfer": "canon.transfer.runs",
}
__all__ = sorted(_HOMES)
__getattr__ = lazy_attributes(__name__, _HOMES)
