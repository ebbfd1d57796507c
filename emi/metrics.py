"""Evaluation metrics: per-emotion Pearson correlation (the challenge metric), MSE, and retrieval recall@k for
the Stage I embeddings. Everything is computed in float64 on the CPU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from emi import EMI_EMOTIONS


def _as_float64(name: str, x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(x, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def _checked_pair(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _as_float64("pred", pred), _as_float64("target", target)
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both be [N, K] of one shape, got {list(pred.shape)} and {list(target.shape)}"
        )
    if pred.shape[0] < 2:
        raise ValueError(f"Pearson correlation needs at least 2 samples, got {pred.shape[0]}")
    return pred, target


def pearson(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> np.ndarray:
    """Per-column Pearson correlation of [N, K] predictions and targets, float64 array [K].

    rho = cov(y, y_hat) / sqrt(var(y) var(y_hat)) with population moments, as in the paper. A column in which
    either side is constant has no defined correlation; it scores 0.0 (a constant predictor carries no
    information about the ranking of samples) so that a mean over columns never turns NaN.
    """
    pred, target = _checked_pair(pred, target)
    pred_dev = pred - pred.mean(axis=0)
    target_dev = target - target.mean(axis=0)
    cov = (pred_dev * target_dev).mean(axis=0)
    var_product = (pred_dev**2).mean(axis=0) * (target_dev**2).mean(axis=0)
    constant = (np.ptp(pred, axis=0) == 0) | (np.ptp(target, axis=0) == 0)
    rho = cov / np.sqrt(np.where(constant, 1.0, var_product))
    # rounding can push |rho| a hair past 1 for perfectly (anti-)correlated columns
    return np.where(constant, 0.0, np.clip(rho, -1.0, 1.0))


def mean_pearson(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> float:
    """The challenge score: the mean over columns of `pearson`."""
    return float(pearson(pred, target).mean())


def emi_report(
    pred: Tensor | np.ndarray, target: Tensor | np.ndarray, names: Sequence[str] = EMI_EMOTIONS
) -> dict[str, float | int]:
    """Flat dict for logging: "pearson/<name>" per column, "mean_pearson", "mse" (over all entries) and
    "num_samples"."""
    pred, target = _checked_pair(pred, target)
    if len(names) != pred.shape[1]:
        raise ValueError(f"emi_report: {len(names)} names for {pred.shape[1]} columns")
    rho = pearson(pred, target)
    report: dict[str, float | int] = {f"pearson/{name}": float(r) for name, r in zip(names, rho)}
    report["mean_pearson"] = float(rho.mean())
    report["mse"] = float(((pred - target) ** 2).mean())
    report["num_samples"] = int(pred.shape[0])
    return report


def retrieval_metrics(
    a_feats: Tensor | np.ndarray, b_feats: Tensor | np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Recall@k for paired rows (row i of a belongs with row i of b) by cosine similarity, both directions:
    {"a2b_R@1", "a2b_R@5", "b2a_R@1", "b2a_R@5"} for the default ks.

    The rank of the true partner counts every other candidate scoring at least as high, so ties count
    against the model (identical embeddings for all samples give R@1 = 0, not 1).
    """
    a, b = _as_float64("a_feats", a_feats), _as_float64("b_feats", b_feats)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(
            f"a_feats and b_feats must both be non-empty [N, D] of one shape, got {list(a.shape)} and {list(b.shape)}"
        )
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    similarity = a @ b.T
    metrics = {}
    for direction, sim in (("a2b", similarity), ("b2a", similarity.T)):
        true_score = np.diag(sim)[:, None]
        rank = (sim >= true_score).sum(axis=1) - 1  # 0 = partner strictly beats every other candidate
        for k in ks:
            metrics[f"{direction}_R@{k}"] = float((rank < k).mean())
    return metrics
