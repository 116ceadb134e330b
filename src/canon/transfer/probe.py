"""The linear probe: multinomial logistic regression on a frozen network's penultimate features,
its L2 strength chosen on a stratified validation part of the training set and the classifier
then refitted on the whole training set, as Kornblith et al. (2019, "Do Better ImageNet Models
Transfer Better?", s3 and A.3) evaluated ImageNet networks as fixed feature extractors.

The loss is the mean cross-entropy plus l2/2 ||W||^2, minimised by L-BFGS (150 iterations a
strength, each fit warm-started from the stronger one before it, the final refit along the same
path; the weakest strengths stop short of full convergence) over the whole (cached) feature
matrix, in float64, on features standardised with the mean and std of the features it fits
(the search's part, then the whole training set; so one grid of strengths suits every
network); the fitted weights are mapped back to the raw features, so the classifier is an
ordinary last layer.
Deviation: Kornblith et al. searched 45 strengths from 1e-6 to 1e5; canon searches 9
(10^-6 .. 10^2), each warm-started from the previous, stronger one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from canon.data.holdout import stratified_split
from canon.errors import ConfigError
from canon.evaluation.metrics import error_percent, topk_correct

L2_GRID = tuple(10.0**exponent for exponent in range(2, -7, -1))  # strongest first


@dataclass(frozen=True)
class LinearClassifier:
    """logits = features @ weight.T + bias, on raw features: an nn.Linear's parameters."""

    weight: torch.Tensor  # K x D
    bias: torch.Tensor  # K

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight.dtype) @ self.weight.T + self.bias

    def errors(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Top-1 and top-5 error, in percent."""
        hits = topk_correct(self.logits(features), labels)
        return {f"top{k}_error": error_percent(n, len(labels)) for k, n in hits.items()}


@dataclass(frozen=True)
class ProbeResult:
    classifier: LinearClassifier  # refitted on the whole training set at `l2`
    l2: float
    search: list[dict[str, float]]  # each strength's validation top-1 error


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
    start: LinearClassifier | None = None, max_iter: int = 150,
) -> LinearClassifier:
    """Minimise mean cross-entropy + l2/2 ||W||^2 over `features` (standardised inside)."""
    x = features.double()  # float64: L-BFGS on separable data needs the precision
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # dead ReLU units have std 0
    x = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    if start is not None:  # warm start: the raw-feature classifier in standardised form
        raw = start.weight.double()
        weight, bias = raw * std, start.bias.double() + raw @ mean
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach() / std, bias.detach() - (weight.detach() / std) @ mean
    return LinearClassifier(weight.float(), bias.float())


def train_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
    val_fraction: float = 0.2, seed: int = 0, grid: tuple[float, ...] = L2_GRID,
) -> ProbeResult:
    """Choose l2 on a stratified `val_fraction` of the training features, then refit on all
    of them. Ties go to the stronger regularisation (the grid's earlier value)."""
    count = round(val_fraction * len(labels))
    if not 0 < count < len(labels) or len(set(labels.tolist())) < 2:
        raise ConfigError(
            f"a linear probe needs at least two classes and enough images to hold out "
            f"{val_fraction:.0%} for choosing its L2 strength; got {len(labels)} images"
        )
    rest, held = stratified_split(labels.tolist(), count, seed)
    train_x, train_y, val_x, val_y = features[rest], labels[rest], features[held], labels[held]
    search, best = [], None
    for l2, fitted in _fits_along(grid, train_x, train_y, num_classes):
        error = fitted.errors(val_x, val_y)["top1_error"]
        search.append({"l2": l2, "val_top1_error": error})
        if best is None or error < best[1]:
            best = (l2, error)
    # Refitted along the same path: from zero, a weak strength's fit stops far short of the
    # optimum the search judged (150 iterations left gradient norms 50 times larger).
    *_, (_, classifier) = _fits_along(grid[: grid.index(best[0]) + 1], features, labels,
                                      num_classes)
    return ProbeResult(classifier, best[0], search)


def _fits_along(grid: tuple[float, ...], features: torch.Tensor, labels: torch.Tensor,
                num_classes: int) -> Iterator[tuple[float, LinearClassifier]]:
    """(l2, classifier) for each strength of `grid` in turn, each fit warm-started from the
    one before."""
    current = None
    for l2 in grid:
        current = fit_logistic_regression(features, labels, num_classes, l2, start=current)
        yield l2, current
