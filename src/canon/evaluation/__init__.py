"""Evaluation: top-k metrics and the papers' test protocols."""

from canon.evaluation.metrics import TopKErrors, topk_correct
from canon.evaluation.protocols import evaluate, score_loader

__all__ = ["TopKErrors", "evaluate", "score_loader", "topk_correct"]
