"""Top-k accuracy counting. Errors are percentages over every counted image.

With fewer than k classes, top-k is taken over all classes (so it is always correct), as a
classifier over 3 classes cannot name 5. Equal scores rank by class index, lowest first, in
every count and in the confusion matrix alike; non-finite scores (a diverged model) are
refused rather than ranked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from canon.errors import NonFiniteError


def topk_correct(
    scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, int]:
    """For each k, how many rows of `scores` (N x K logits or probabilities) rank their target
    among the k highest."""
    if scores.dim() != 2 or len(scores) != len(targets):
        raise ValueError(f"scores must be N x K for N targets, got {tuple(scores.shape)}")
    top = ranked(scores, max(ks))
    hits = top == targets.view(-1, 1).to(top.device)
    return {k: int(hits[:, :k].sum().item()) for k in ks}


def ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's k highest scores (all, with fewer classes), best first, equal
    scores in class order (topk leaves their order to the device)."""
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteError("the model's scores are NaN or infinite (its weights have diverged"
                             "?): nothing to rank")
    return scores.argsort(dim=1, descending=True, stable=True)[:, :k]


def posteriors_of(logits: torch.Tensor) -> torch.Tensor:
    """The softmax of `logits`, in float64: float32's underflows to 0 where a class's logit is
    about 100 below the highest, and those zeros would rank by class index, not by logit."""
    return logits.double().softmax(1)


def error_percent(hits: float, images: float) -> float:
    """The error rate in percent: (images - hits) / images gives 45.0 for 11 hits of 20,
    where 1 - hits / images gives 44.99999999999999."""
    return 100.0 * (images - hits) / images


class TopKErrors:
    """Accumulates top-k hits over batches; `counts` is one tensor [images, hits_k...] so a
    distributed evaluation can all-reduce it before calling `result`."""

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        self.ks = tuple(ks)
        self.counts = torch.zeros(1 + len(self.ks), dtype=torch.long)

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        if len(targets) == 0:
            return
        correct = topk_correct(scores, targets, self.ks)
        self.counts += torch.tensor([len(targets), *(correct[k] for k in self.ks)])

    @property
    def images(self) -> int:
        return int(self.counts[0])

    def result(self) -> dict[str, float | int]:
        """{"top{k}_error": percent for each k, "images": n}."""
        images = self.images
        out: dict[str, float | int] = {}
        for k, hits in zip(self.ks, self.counts[1:].tolist(), strict=True):
            out[f"top{k}_error"] = error_percent(hits, images) if images else float("nan")
        out["images"] = images
        return out
