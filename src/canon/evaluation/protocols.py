"""The papers' test protocols: top-1/top-5 error over every image of a validation set.

Views come from canon.data.views. Each view's logits go through a softmax and the posteriors
of all views of an image (crops, reflections, scales) are averaged, as AlexNet s4.1 and
VGG s3.2 do; a protocol of two methods (VGG s4.3's multi-crop+dense) averages each method's,
then the two. For dense views the fully convolutional network's class score map is first
averaged over space (VGG s3.2: "spatially averaged (sum-pooled)"), then the softmax.
Images whose file cannot be decoded are skipped (warned about by the dataset) and counted in
the result's "skipped", with the image files a folder's listing left out (empty or missing).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from canon.data.config import DataConfig
from canon.data.datasets import Images, canon_cache_dir, open_eval_split
from canon.data.labeled import LabeledImages
from canon.data.loaders import build_loader, collate, reading_options, trained_preprocess
from canon.data.preprocess import EvalPreprocess, eval_preprocess
from canon.data.views import (
    VIEWS_PER_SCALE,
    Protocol,
    ProtocolViews,
    collate_views,
    parse_protocol,
)
from canon.devices import resolve_device
from canon.errors import ConfigError
from canon.evaluation.metrics import TopKErrors, posteriors_of


def preprocess_for(model: nn.Module, fit: str | None = None) -> EvalPreprocess:
    """A model's own test preprocessing: its run's, for a model canon.load_trained loaded
    (its crop, resize and training-set mean), else from its class's eval_config (input size,
    resize, fit, mean, std); `fit` (a recipe's DataConfig.image_fit()) replaces the model's."""
    own = getattr(model, "run_preprocess", None)
    if own is not None:
        return dataclasses.replace(own, fit=fit) if fit else own
    config = getattr(model, "eval_config", None)
    if config is None:
        raise ConfigError(
            f"{type(model).__name__} has no eval_config; pass data_config= (the recipe's "
            "data section) to say how to preprocess its inputs"
        )
    data = DataConfig(crop_size=config.input_size, resize_size=config.resize_size,
                      interpolation=config.interpolation)
    preprocess = eval_preprocess(data, mean=torch.tensor(config.mean),
                                 std=torch.tensor(config.std))
    return dataclasses.replace(preprocess, fit=fit or config.fit)


def _validation_images(
    data: str | Path, data_config: DataConfig | None, preprocess: EvalPreprocess | None,
    model: nn.Module, root_cache: Path | None, strict: bool, class_ids: list[str] | None,
) -> tuple[Images, EvalPreprocess]:
    reading = reading_options(data_config, root_cache or canon_cache_dir(), strict)
    val = open_eval_split(str(data), class_ids, **reading)
    return val, preprocess or _recipe_preprocess(data_config, root_cache, strict) or \
        preprocess_for(model)


def _recipe_preprocess(data_config: DataConfig | None, root_cache: Path | None, strict: bool
                       ) -> EvalPreprocess | None:
    """The preprocessing a recipe's data section gives, normalised as in training: by the
    statistics of the set trained on, not the one tested. None without one."""
    if data_config is None:
        return None
    cache = root_cache or canon_cache_dir()
    return trained_preprocess(data_config, data_config.dataset,
                              **reading_options(data_config, cache, strict))


def evaluate(
    model: nn.Module,
    data: str | Path | Dataset,
    protocol: str = "center",
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    workers: int = 0,
    data_config: DataConfig | None = None,
    preprocess: EvalPreprocess | None = None,
    scales: Sequence[int] = (),
    root_cache: str | Path | None = None,
    strict: bool = False,
    progress: bool = False,
    class_ids: list[str] | None = None,
    keep_probabilities: bool = False,
) -> dict:
    """Top-1/top-5 error (percent) of `model` on `data` under `protocol`.

    `data` is a dataset name or folder (its evaluation split alone is read, see
    canon.data.datasets.open_eval_split; preprocessed by `preprocess` when given, e.g. a
    trained run's; else per `data_config`, the recipe's data section, with the statistics of
    the training set it names when those are needed; else per the model's eval_config), a
    LabeledImages set with the `preprocess` to make its views with (`sets.val,
    preprocess=sets.preprocess` of build_datasets; without it, per `data_config` as for a
    folder, else, for a set without a transform, of raw images, per the model's
    eval_config), or any dataset of ready (tensor, label) items (centre protocol only; a
    ConfigError with `scales`, which it would not use).
    For a name or folder, `class_ids`, the model's classes in its output order
    (LabeledImages.class_ids of the set it was trained on), label the split by class name: it
    may hold some of those classes and no others. Without them the split's own sorted classes
    are taken to be the model's (a ConfigError where there are not as many as it has outputs).
    A LabeledImages set is labelled already: given `class_ids`, its own must equal them.
    The model is moved to `device` first. A forward pass takes at most `batch_size` views
    (ten per image under ten-crop), those of consecutive loaded batches together so that
    passes are full where views share a shape (ViewScorer), and images are loaded
    batch_size // views at a time (one at least).
    `scales` overrides the multi-scale shorter sides.
    Returns top1_error, top5_error, images, skipped, protocol,
    views_per_image, scales, seconds; with `keep_probabilities` also `probabilities`, the
    class posteriors of every image scored (N x K float64 on the CPU, the softmax averaged
    over the protocol's views; a softmax of the logits for ready tensors), and `labels` (N),
    in the dataset's order, less its skipped images.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1 (views per forward pass), got "
                          f"{batch_size}")
    parsed = parse_protocol(protocol)
    root_cache = Path(root_cache) if root_cache else None  # a str from a notebook too
    if class_ids is not None and not all(isinstance(name, str) for name in class_ids):
        raise ConfigError(
            "class_ids names the model's classes in its output order, as the folders name "
            "them (ImageNet's wnids: canon.data.imagenet_classes.imagenet_wnids()), not "
            f"output indices; got {list(class_ids)[:3]}...")
    if isinstance(data, LabeledImages) and class_ids is not None:
        check_labelled_by(data, class_ids, "the model's")
    if isinstance(data, str | Path):
        raw, preprocess = _validation_images(
            data, data_config, preprocess, model, root_cache, strict, class_ids
        )
        dataset = raw.with_transform(ProtocolViews(parsed, preprocess, tuple(scales)))
    elif isinstance(data, LabeledImages) and (preprocess is not None or data_config is not None
                                              or data.transform is None):
        preprocess = (preprocess or _recipe_preprocess(data_config, root_cache, strict)
                      or preprocess_for(model))  # raw images without either: the model's own
        dataset = data.with_transform(ProtocolViews(parsed, preprocess, tuple(scales)))
    elif scales:
        raise ConfigError(
            "scales apply to the views made of raw images: pass the data folder, or a "
            "LabeledImages set (with preprocess= or data_config= where it has a transform "
            "already), not ready tensors")
    elif parsed.name == "center":
        dataset = data
    else:
        raise ConfigError(
            f"protocol {parsed.name!r} makes its views of raw images: pass the data folder, or "
            "a LabeledImages set with preprocess= (build_datasets' sets.val and "
            "sets.preprocess), not a dataset of ready tensors"
        )
    views = isinstance(getattr(dataset, "transform", None), ProtocolViews)
    views_per_image = _views_per_image(parsed, dataset.transform) if views else 1
    device = resolve_device(str(device))  # "auto" too, as the other entry points take it
    model.to(device)
    # A loaded batch holds about batch_size views: 150 per image under VGG's multi-crop,
    # whose views of 64 images would take 5.8 GB as floats (times the batches prefetched).
    loader = build_loader(
        dataset, max(1, batch_size // views_per_image), train=False, workers=workers,
        collate_fn=collate_views if views else collate,
    )
    start = time.perf_counter()
    errors, kept, kept_labels = TopKErrors(), [], []
    split_classes = getattr(dataset, "classes", None) if class_ids is None else None
    for scores, labels in _scored_batches(model, loader, parsed if views else None, device,
                                          progress, views_per_forward=batch_size):
        if split_classes is not None and scores.shape[1] != len(split_classes):
            raise ConfigError(
                f"{getattr(dataset, 'name', data)} holds {len(split_classes)} classes where the "
                f"model gives {scores.shape[1]} scores: its labels would index the wrong ones. "
                "Pass class_ids= (the model's classes in output order) to label it by name")
        if class_ids is not None and scores.shape[1] != len(class_ids):
            raise ConfigError(
                f"class_ids names {len(class_ids)} classes where the model gives "
                f"{scores.shape[1]} scores: pass the model's classes, all of them, in the order "
                "of its outputs")
        errors.update(scores, labels)
        if keep_probabilities:  # view batches come as posteriors, ready ones as logits
            kept.append((scores if views else posteriors_of(scores)).cpu())
            kept_labels.append(labels)
    result = errors.result()
    result.update(
        protocol=parsed.name,
        skipped=len(dataset) - errors.images + getattr(dataset, "skipped_at_listing", 0),
        views_per_image=views_per_image,
        scales=list(dataset.transform.scales) if views else [],
        seconds=round(time.perf_counter() - start, 3),
    )
    if keep_probabilities:
        result.update(
            probabilities=torch.cat(kept) if kept else torch.empty(0, 0),
            labels=torch.cat(kept_labels) if kept else torch.empty(0, dtype=torch.long),
        )
    return result


def check_labelled_by(data: LabeledImages, class_ids: Sequence[str], whose: str) -> None:
    """A ConfigError unless `data`'s labels index `class_ids` (`whose` classes), in order."""
    if list(data.class_ids) != list(class_ids):
        raise ConfigError(
            f"{data!r} is labelled by other classes than {whose} "
            f"({class_difference(class_ids, data.class_ids)}): pass the dataset's name or "
            f"folder, whose labels are then matched to {whose} classes by name")


def class_difference(ours: Sequence[str], theirs: Sequence[str]) -> str:
    """Where two unequal class lists first differ, for an error message."""
    if len(ours) != len(theirs):
        return f"{len(ours)} against {len(theirs)} classes"
    index = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    return f"output {index} is {ours[index]!r} against {theirs[index]!r}"


def _views_per_image(protocol: Protocol, views: ProtocolViews) -> int:
    return sum(VIEWS_PER_SCALE[method] for method in protocol.methods) * len(views.scales)


def score_loader(
    model: nn.Module,
    loader: Iterable[tuple],
    protocol: Protocol | None,
    device: str | torch.device = "cpu",
    *,
    progress: bool = False,
    views_per_forward: int | None = None,
) -> TopKErrors:
    """Top-k counts over a loader: of ready (images, labels) batches when `protocol` is
    None, else of collate_views batches, whose views go through the model
    `views_per_forward` at a time, those of consecutive batches together (None: a batch's
    views of one shape together; see ViewScorer). Restores the model's training mode
    afterwards.

    Inputs go to `device`; the model stays where the caller put it, since a model-parallel
    one (canon.engine.model_parallel) has its pieces on several devices and takes its
    inputs on the first."""
    errors = TopKErrors()
    for scores, labels in _scored_batches(model, loader, protocol, device, progress,
                                          views_per_forward):
        errors.update(scores, labels)
    return errors


@torch.inference_mode()
def _scored_batches(
    model: nn.Module,
    loader: Iterable[tuple],
    protocol: Protocol | None,
    device: str | torch.device,
    progress: bool,
    views_per_forward: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(scores N x K, labels N) in the loader's order: logits of each non-empty ready batch;
    for view batches, the protocol's averaged posteriors of the images whose views are all
    scored (ViewScorer). The model is in eval mode while this runs (inference mode is entered
    per step, not around the consumer)."""
    was_training = model.training
    model.eval()
    scorer = None
    if protocol is not None:
        dense_network = _fully_convolutional(model) if protocol.dense else None
        scorer = ViewScorer(model, dense_network, protocol, device, views_per_forward)
    try:
        for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
            inputs, labels = batch  # images, or per-image view stacks
            if not len(labels):
                continue
            if scorer is None:
                yield model(model_inputs(model, inputs, device)), labels
            else:
                yield from scorer.add(inputs, labels)
        if scorer is not None:
            yield from scorer.finish()
    finally:
        model.train(was_training)


def model_inputs(model: nn.Module, images: torch.Tensor, device: str | torch.device
                 ) -> torch.Tensor:
    """`images` on `device`, in the floating dtype of the model's weights (a bfloat16 or
    float16 model takes inputs of its own type)."""
    weight = next(model.parameters(), None)
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
    return images.to(device, dtype) if images.is_floating_point() else images.to(device)


def _fully_convolutional(model: nn.Module) -> nn.Module:
    """The model's fully convolutional form, for dense evaluation, or a ConfigError."""
    method = getattr(model, "fully_convolutional", None)
    try:
        network = method() if method is not None else None
    except NotImplementedError:  # CanonModel's, where a model has none
        network = None
    if network is None:
        raise ConfigError(
            f"dense evaluation scores images through the model's fully convolutional form, "
            f"and {type(model).__name__} has no fully_convolutional(): choose another protocol")
    return network.eval()


class ViewScorer:
    """Per image, the mean softmax over each method's views, then the mean over the methods,
    with the views of consecutive loaded batches sharing forward passes.

    An image's stacks are its methods' in order, an equal number each (ProtocolViews). Dense
    views go through `dense_network` (the model's fully convolutional form), crops through
    `model`; views of one method and shape run together in passes of `size` views (all that
    are pending when None), carried over from one loaded batch to the next: at batch 256 an
    image's 144 crops (GoogLeNet) would otherwise run alone, a pass 56% full. When the views
    pending in all shapes together reach `size`, the shapes with the fewest are scored until
    fewer are left, which bounds memory where shapes rarely repeat (dense views of images of
    different aspect). An image's posteriors come out, in order, once all its views are
    scored."""

    def __init__(self, model: nn.Module, dense_network: nn.Module | None, protocol: Protocol,
                 device: str | torch.device, size: int | None) -> None:
        self.model, self.dense_network, self.device, self.size = model, dense_network, device, size
        self.methods = protocol.methods
        # Views waiting for a pass, by (dense, view shape): (owner, stack) in arrival order,
        # an owner being an (image, method) pair's position in the stream; and their count.
        self.pending: dict[tuple[bool, tuple[int, ...]], deque[tuple[int, torch.Tensor]]] = {}
        self.pending_views: dict[tuple[bool, tuple[int, ...]], int] = {}
        # The (image, method) pairs not yet given out, from the stream position `first` on:
        # their posterior sums (created at the first pass, when the class count is known),
        # their views and the views of theirs not yet scored; and their images' labels.
        self.first = 0
        self.totals: torch.Tensor | None = None
        self.views = torch.zeros(0, dtype=torch.long)
        self.unscored = torch.zeros(0, dtype=torch.long)
        self.labels = torch.zeros(0, dtype=torch.long)

    def add(self, per_image: list[list[torch.Tensor]], labels: torch.Tensor
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Take a loaded batch (collate_views'); return (posteriors, labels) of the images now
        complete, if any."""
        methods = len(self.methods)
        next_owner = self.first + len(self.views)
        views = torch.zeros(len(per_image) * methods, dtype=torch.long)
        for index, stacks in enumerate(per_image):
            per_method = len(stacks) // methods
            for position, stack in enumerate(stacks):
                method = position // per_method
                owner = index * methods + method
                key = (self.methods[method] == "dense", tuple(stack.shape[1:]))
                self.pending.setdefault(key, deque()).append((next_owner + owner, stack))
                self.pending_views[key] = self.pending_views.get(key, 0) + len(stack)
                views[owner] += len(stack)
        self.views = torch.cat([self.views, views])
        self.unscored = torch.cat([self.unscored, views])
        if self.totals is not None:
            self.totals = torch.cat([self.totals, self.totals.new_zeros(len(views),
                                                                         self.totals.shape[1])])
        self.labels = torch.cat([self.labels, labels])
        if self.size is None:
            self._score_all()
        else:
            for key in list(self.pending):
                while self.pending_views.get(key, 0) >= self.size:
                    self._score(key, self.size)
            for key in sorted(self.pending, key=self.pending_views.__getitem__):
                if sum(self.pending_views.values()) < self.size:
                    break
                self._score(key, self.size)
        return self._complete()

    def finish(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Score the views still pending; return the images they complete."""
        self._score_all()
        return self._complete()

    def _score_all(self) -> None:
        """Every pending view, a pass per shape."""
        for key in list(self.pending):
            self._score(key, self.pending_views[key])

    @torch.inference_mode()
    def _score(self, key: tuple[bool, tuple[int, ...]], count: int) -> None:
        """One forward pass of the first `count` views pending under `key` (fewer are all)."""
        members, taken, owners = self.pending[key], [], []
        while members and count > 0:
            owner, stack = members[0]
            if len(stack) > count:
                members[0] = (owner, stack[count:])
                stack = stack[:count]
            else:
                members.popleft()
            taken.append(stack)
            owners.append(torch.full((len(stack),), owner - self.first))
            count -= len(stack)
        views, index = torch.cat(taken), torch.cat(owners)
        self.pending_views[key] -= len(views)
        if not members:
            del self.pending[key], self.pending_views[key]
        dense = key[0]
        scores = (self.dense_network if dense else self.model)(
            model_inputs(self.model, views, self.device))
        if dense:
            scores = scores.mean((2, 3))
        probabilities = posteriors_of(scores)
        if self.totals is None:
            self.totals = probabilities.new_zeros(len(self.views), probabilities.shape[1])
        self.totals.index_add_(0, index.to(self.device), probabilities)
        self.unscored.index_add_(0, index, torch.full_like(index, -1))

    def _complete(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        incomplete = (self.unscored > 0).view(-1, len(self.methods)).any(1)
        waiting = incomplete.nonzero()
        images = int(waiting[0]) if len(waiting) else len(incomplete)
        if images == 0:
            return []
        rows = images * len(self.methods)
        divisors = self.views[:rows].to(self.device, self.totals.dtype).view(-1, 1)
        posteriors = (self.totals[:rows] / divisors).view(images, len(self.methods), -1).mean(1)
        labels = self.labels[:images]
        self.totals, self.views = self.totals[rows:], self.views[rows:]
        self.unscored, self.labels = self.unscored[rows:], self.labels[images:]
        self.first += rows
        return [(posteriors, labels)]
