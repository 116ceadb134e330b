"""torchvision's ImageNet weights in canon's models: every tensor (parameters and buffers, BN
running statistics included) copied by an explicit name mapping, and the converted model gives
torchvision's outputs in eval mode.

torchvision -> canon, and how the layers map:

- resnet18, resnet34 -> the same names; resnet50, resnet101, resnet152 -> resnet50_v1_5,
  resnet101_v1_5, resnet152_v1_5 (the stride in the bottleneck's 3x3). conv1, bn1, maxpool ->
  conv1.0, conv1.1, conv1.3; layerK -> conv{K+1}_x; downsample -> shortcut; fc -> fc.
- vgg11, vgg13, vgg16, vgg19 and their _bn variants -> the same names; alexnet -> alexnet_owt.
  features.i -> the i-th layer of canon's stages conv1..conv5 (same layer sequence); the
  classifier's three linear layers -> head.fc6, fc7, fc8.
- googlenet -> googlenet_bn. conv1 -> conv1; conv2, conv3 -> conv2.0, conv2.1; maxpool1 ->
  pool1.0, maxpoolN -> poolN; in each inception block branch1..branch4 -> branch1x1,
  branch3x3, branch5x5, branch_pool; aux1, aux2, fc -> the same.

Every canon tensor must be filled and every torchvision tensor used, with equal shapes, and the
settings that change outputs (convolution stride, padding, dilation, groups; BN eps; max pool
windows) must agree; anything else is a ConfigError naming the layers.

Refused, because the outputs would differ:

- torchvision's bottleneck ResNets into canon's resnet50/101/152, the paper's networks, which
  stride the first 1x1 convolution where torchvision strides the 3x3.
- torchvision's googlenet with `transform_input=True` (its pretrained default), which turns
  ImageNet-normalised input into (x - 0.5) / 0.5 inside `forward`: the affine change cannot be
  folded into conv1 exactly (its zero padding), so `load_torchvision` builds the model with
  `transform_input=False` and `preprocess_of` normalises with mean = std = 0.5 instead, which
  gives the same numbers.
- googlenet while canon's googlenet_bn closes stage 4 with the paper's 3x3/2 max pool where
  torchvision's uses 2x2/2 (the settings check names it).

GoogLeNet's auxiliary heads are copied when torchvision's model has them (its pretrained ones
do not: torchvision drops the untrained heads). They are training-only, and their logits agree
only at input sizes where canon pools adaptively to 4x4 as torchvision always does: a 14x14 map
(224-pixel input) canon pools with the paper's 5x5/3 average pool.

`load_torchvision` downloads through torchvision's own cache; everything else works offline.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models import WeightsEnum
from torchvision.models.resnet import Bottleneck

from canon.data.config import DataConfig
from canon.data.imagenet_classes import imagenet_wnids
from canon.data.normalize import PUBLISHED
from canon.data.preprocess import EvalPreprocess, eval_preprocess
from canon.errors import ConfigError, DataError, first_line
from canon.files import download
from canon.models.base import CanonModel
from canon.models.factory import create_model, list_models

CANON_NAMES = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50_v1_5",
    "resnet101": "resnet101_v1_5",
    "resnet152": "resnet152_v1_5",
    **{f"vgg{depth}{bn}": f"vgg{depth}{bn}" for depth in (11, 13, 16, 19) for bn in ("", "_bn")},
    "alexnet": "alexnet_owt",
    "googlenet": "googlenet_bn",
}
# Module settings that change a layer's output for equal weights.
SETTINGS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv2d: ("stride", "padding", "dilation", "groups", "padding_mode"),
    nn.BatchNorm2d: ("eps",),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
}
MAPPED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
# How far the converted model's outputs may stray from torchvision's, relative to their size:
# the two sum in other orders (float32 rounding), not in other ways.
CONVERSION_TOLERANCE = 1e-4
# Renames by the first part of a torchvision name, then by any later part.
RESNET_RENAMES = (
    {"conv1": "conv1.0", "bn1": "conv1.1", "maxpool": "conv1.3", "fc": "fc",
     **{f"layer{k}": f"conv{k + 1}_x" for k in range(1, 5)}},
    {"downsample": "shortcut"},
)
GOOGLENET_RENAMES = (
    {"conv2": "conv2.0", "conv3": "conv2.1", "maxpool1": "pool1.0",
     **{f"maxpool{k}": f"pool{k}" for k in range(2, 5)}},
    {"branch1": "branch1x1", "branch2": "branch3x3", "branch3": "branch5x5",
     "branch4": "branch_pool"},
)


def default_canon_name(tv_name: str) -> str:
    """The canon model that reproduces torchvision's `tv_name` (resnet50 -> resnet50_v1_5)."""
    if tv_name not in CANON_NAMES:
        raise ConfigError(
            f"no canon model for torchvision's {tv_name!r}; supported: {', '.join(CANON_NAMES)}"
        )
    return CANON_NAMES[tv_name]


def from_torchvision(tv_model: nn.Module, canon_name: str) -> CanonModel:
    """canon's `canon_name` holding a copy of every tensor of the torchvision model `tv_model`.

    The classifier keeps torchvision's number of classes; the result is a float32 CPU model in
    `tv_model`'s train/eval mode, giving its outputs in eval mode.
    """
    what = f"torchvision's {type(tv_model).__name__} -> {canon_name}"
    options = {}
    if isinstance(tv_model, tvm.ResNet):
        if isinstance(tv_model.layer1[0], Bottleneck) and (
            f"{canon_name}_v1_5" in list_models()
        ):
            raise ConfigError(
                f"torchvision's bottleneck ResNets stride the 3x3 convolution (ResNet v1.5); "
                f"canon's {canon_name} is the paper's, strided in the first 1x1, and would give "
                f"different outputs: convert to {canon_name}_v1_5"
            )
        classifier = tv_model.fc
    elif isinstance(tv_model, tvm.VGG | tvm.AlexNet):
        classifier = tv_model.classifier[-1]
    elif isinstance(tv_model, tvm.GoogLeNet):
        if tv_model.transform_input:
            raise ConfigError(
                "torchvision's googlenet with transform_input=True renormalises its input to "
                "(x - 0.5) / 0.5 inside forward, which canon's models do not; build it with "
                "transform_input=False and normalise inputs with mean = std = 0.5 "
                "(load_torchvision and preprocess_of do)"
            )
        classifier = tv_model.fc
        options["aux_logits"] = tv_model.aux1 is not None
    else:
        raise ConfigError(
            f"cannot convert a torchvision {type(tv_model).__name__}; supported: ResNet, VGG, "
            "AlexNet, GoogLeNet"
        )
    if not isinstance(classifier, nn.Linear):
        raise ConfigError(f"cannot convert {what}: its classifier is a "
                          f"{type(classifier).__name__}, canon's a Linear layer; convert the "
                          "model as torchvision builds it, then replace canon's classifier "
                          "(reset_classifier, or canon transfer)")
    try:
        model = create_model(canon_name, num_classes=classifier.out_features, **options)
    except ConfigError as error:  # aux_logits given to a family without auxiliary heads
        raise ConfigError(f"cannot convert {what}: {error}") from None
    if isinstance(tv_model, tvm.ResNet | tvm.GoogLeNet):
        renames = RESNET_RENAMES if isinstance(tv_model, tvm.ResNet) else GOOGLENET_RENAMES
        pairs = renamed_modules(tv_model, *renames)
    else:
        pairs = sequential_modules(tv_model, model, what)
    copy_tensors(tv_model, model, pairs, what)
    check_same_outputs(tv_model, model, what)
    return model.train(tv_model.training)


def check_same_outputs(tv_model: nn.Module, model: nn.Module, what: str) -> None:
    """One random image through both models in eval mode: a module of torchvision's model
    replaced by one without tensors (its max pool by an Identity, its average pool by a max
    pool) escapes the checks of copy_tensors, and changes the outputs."""
    reference = copy.deepcopy(tv_model).float().cpu().eval()  # the caller's, as it was
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # `model` is left in eval mode: from_torchvision sets its mode after
        expected, actual = reference(image), model.eval()(image)
    difference = float((actual - expected).abs().max())
    if difference > CONVERSION_TOLERANCE * max(1.0, float(expected.abs().max())):
        raise ConfigError(f"cannot convert {what}: the outputs differ by up to {difference:.3g} "
                          "for the same input, though every tensor was copied; a module without "
                          "tensors (a pool, an activation) was changed in torchvision's model")


def renamed_modules(
    tv_model: nn.Module, first: dict[str, str], later: dict[str, str]
) -> dict[str, str]:
    """torchvision module name -> canon module name for every layer with tensors, and for the
    top-level max pools (the inception branches' stride-1 pools keep any size either way)."""
    pairs = {}
    for name, module in tv_model.named_modules():
        top_pool = isinstance(module, nn.MaxPool2d) and "." not in name
        if isinstance(module, MAPPED) or top_pool:
            head, *rest = name.split(".")
            pairs[name] = ".".join([first.get(head, head), *(later.get(p, p) for p in rest)])
    return pairs


def sequential_modules(tv_model: nn.Module, model: nn.Module, what: str) -> dict[str, str]:
    """VGG and AlexNet: torchvision's flat `features` layer by layer onto canon's conv1..conv5
    stages, and the classifier's three linear layers onto head.fc6, fc7, fc8."""
    layers = [name for name, m in model.features.named_modules() if not list(m.children())]
    if len(layers) != len(tv_model.features):
        raise ConfigError(
            f"cannot convert {what}: torchvision's features have {len(tv_model.features)} "
            f"layers, canon's {len(layers)}"
        )
    pairs = {f"features.{i}": f"features.{name}" for i, name in enumerate(layers)}
    linears = [f"classifier.{i}" for i, m in enumerate(tv_model.classifier)
               if isinstance(m, nn.Linear)]
    return {**pairs, **dict(zip(linears, ("head.fc6", "head.fc7", "head.fc8"), strict=True))}


def copy_tensors(tv_model: nn.Module, model: nn.Module, pairs: dict[str, str], what: str) -> None:
    """Check that `pairs` (torchvision module -> canon module) are alike and cover every tensor of
    both models with equal shapes, then copy them; a ConfigError lists every problem."""
    tv_state, canon_state = tv_model.state_dict(), model.state_dict()
    problems, settings = [], []
    sources = {}  # canon tensor name -> torchvision tensor name
    modules = dict(model.named_modules())
    owned: dict[str, list[str]] = {}  # torchvision module name -> its tensors' names
    for key in tv_state:
        owned.setdefault(key.rpartition(".")[0], []).append(key)
    for tv_name, canon_name in pairs.items():
        tv_module, module = tv_model.get_submodule(tv_name), modules.get(canon_name)
        if module is not None:  # a missing one shows as its tensors' absence below
            if type(module) is not type(tv_module):
                settings.append(f"torchvision's {tv_name} is a {type(tv_module).__name__}, "
                                f"canon's {canon_name} a {type(module).__name__}")
                continue
            settings += [
                f"torchvision's {tv_name} has {setting}={getattr(tv_module, setting)}, canon's "
                f"{canon_name} {setting}={getattr(module, setting)}"
                for setting in SETTINGS.get(type(module), ())
                if as_pair(getattr(module, setting)) != as_pair(getattr(tv_module, setting))
            ]
        for key in owned.get(tv_name, ()):
            sources[f"{canon_name}.{key.rpartition('.')[2]}"] = key
    used = set(sources.values())
    problems += [f"torchvision's {key} {tuple(tv_state[key].shape)} has no canon counterpart"
                 for key in tv_state if key not in used]
    for key, tv_key in sources.items():
        shape = tuple(tv_state[tv_key].shape)
        if key not in canon_state:
            problems.append(f"torchvision's {tv_key} {shape} has no canon counterpart {key}")
        elif tuple(canon_state[key].shape) != shape:
            problems.append(f"canon's {key} is {tuple(canon_state[key].shape)}, torchvision's "
                            f"{tv_key} {shape}")
    problems += [f"canon's {key} {tuple(tensor.shape)} has no torchvision counterpart"
                 for key, tensor in canon_state.items() if key not in sources]
    problems += settings  # after the tensors, which say more when the architectures differ
    if problems:
        shown = "; ".join(problems[:8])
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ConfigError(f"cannot convert {what}: {shown}{more}")
    model.load_state_dict({key: tv_state[tv_key] for key, tv_key in sources.items()})


def as_pair(value: object) -> object:
    """3 and (3, 3) are the same kernel size."""
    return (value, value) if isinstance(value, int) and not isinstance(value, bool) else value


def preprocess_of(weights: WeightsEnum) -> EvalPreprocess:
    """The evaluation preprocessing of a converted model: resize, crop, interpolation, mean and
    std from `weights.transforms()`; GoogLeNet's mean and std are 0.5, as its converted model
    takes the input torchvision's transform_input would make (see the module docstring)."""
    transforms = weights.transforms()
    mean, std = torch.tensor(transforms.mean), torch.tensor(transforms.std)
    if isinstance(weights, tvm.GoogLeNet_Weights):
        mean, std = PUBLISHED["inception"]()
    data = DataConfig(crop_size=transforms.crop_size[0], resize_size=transforms.resize_size[0],
                      interpolation=transforms.interpolation.value)
    return eval_preprocess(data, mean=mean, std=std)  # VGG's test scales for multi-scale


@dataclass(frozen=True)
class TorchvisionWeights:
    """A torchvision model converted to canon, with what its inputs and outputs mean."""

    model: CanonModel  # in eval mode
    model_name: str  # canon's name, e.g. resnet50_v1_5
    weights: str  # torchvision's, e.g. ResNet50_Weights.IMAGENET1K_V2
    classes: list[str]  # torchvision's category names, in output order
    class_ids: list[str]  # their ImageNet wnids, the class folder names of an ImageNet copy
    preprocess: EvalPreprocess


def weights_of(name: str, weights: str) -> WeightsEnum:
    """torchvision's weights enum for model `name`: "DEFAULT", "IMAGENET1K_V2", or the full
    "ResNet50_Weights.IMAGENET1K_V2"; no download."""
    available = tvm.get_model_weights(name)
    prefix, _, member = weights.rpartition(".")
    if prefix in ("", available.__name__) and member in available.__members__:
        return available[member]
    raise ConfigError(
        f"torchvision has no weights {weights!r} for {name}; it has DEFAULT, "
        f"{', '.join(w.name for w in available)}"
    )


def load_torchvision(name: str, weights: str = "DEFAULT") -> TorchvisionWeights:
    """torchvision's `name` with ImageNet `weights` (downloaded to torchvision's cache on first
    use), as canon's `default_canon_name(name)` in eval mode."""
    canon_name = default_canon_name(name)
    enum = weights_of(name, weights)
    categories = enum.meta["categories"]
    if categories is None:
        raise ConfigError(f"{enum} are feature weights without a trained classifier; "
                          f"use {name}'s IMAGENET1K_V1")
    options = {"transform_input": False} if name == "googlenet" else {}
    cached = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[-1]
    if not cached.is_file():  # canon's download, which has a timeout; torch.hub's has none
        published = torch.hub.HASH_REGEX.search(cached.name)
        download(enum.url, cached, algorithm="sha256", name=str(enum),
                 published=published.group(1) if published else "",
                 advice=f": go online once, or put that file at {cached}",
                 write_advice="set TORCH_HOME to a writable folder with room for it")
    try:
        tv_model = tvm.get_model(name, weights=enum, **options)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise DataError(f"{cached}, the cached file of {enum}, is unreadable "
                        f"({first_line(error)}): delete it, and the next use downloads it "
                        "again") from None
    return TorchvisionWeights(
        model=from_torchvision(tv_model, canon_name).eval(),
        model_name=canon_name,
        weights=str(enum),
        classes=list(categories),
        class_ids=list(imagenet_wnids()),
        preprocess=preprocess_of(enum),
    )
