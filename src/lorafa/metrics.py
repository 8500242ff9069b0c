"""Evaluation metrics of the paper's tasks in plain numpy: accuracy, F1 (macro, and of one class), Matthews
correlation, Pearson, Spearman.

Definitions follow scikit-learn / scipy (GLUE reports the same ones): macro-F1 averages the per-class F1 over the
classes present in labels or predictions; MCC is Gorodkin's multi-class generalisation, which equals the usual
binary formula for two classes; Spearman is Pearson on ranks, ties getting their average rank. Degenerate inputs
(a constant vector) give 0.0 for the correlations, as scikit-learn does for MCC, rather than NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence[float] | Sequence[int] | np.ndarray


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """F1 = 2·TP / (2·TP + FP + FN) of one class (GLUE's MRPC and QQP report it for class 1); 0.0 when the class
    occurs in neither."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    wrong = np.sum((p == positive) != (y == positive))  # FP + FN
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong > 0 else 0.0


def macro_f1(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Unweighted mean of the per-class F1 over the classes present in labels or predictions."""
    p, y = _pair(predictions, labels)
    return float(np.mean([f1(p, y, c) for c in np.union1d(p, y)]))


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient (multi-class, Gorodkin 2004); 0.0 when undefined."""
    p, y = _pair(predictions, labels)
    classes = np.union1d(p, y)
    index = {c: i for i, c in enumerate(classes.tolist())}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)  # (true, predicted)
    for yi, pi in zip(y.tolist(), p.tolist(), strict=True):
        confusion[index[yi], index[pi]] += 1
    t = confusion.sum(axis=1)  # times each class truly occurs
    q = confusion.sum(axis=0)  # times each class is predicted
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - q @ q) * (s * s - t @ t))
    return float((c * s - t @ q) / denominator) if denominator > 0 else 0.0


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation; 0.0 when either input is constant."""
    p, y = _pair(predictions, labels, float)
    p, y = p - p.mean(), y - y.mean()
    denominator = np.sqrt((p @ p) * (y @ y))
    return float((p @ y) / denominator) if denominator > 0 else 0.0


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation (Pearson of average ranks); 0.0 when either input is constant."""
    p, y = _pair(predictions, labels, float)
    return pearson(_average_ranks(p), _average_ranks(y))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _pair(
    predictions: ArrayLike, labels: ArrayLike, dtype: type | None = None
) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions, dtype=dtype).ravel(), np.asarray(labels, dtype=dtype).ravel()
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.size}) and labels ({y.size}) differ in length")
    if p.size == 0:
        raise ValueError("metrics need at least one prediction")
    return p, y


def classification_metrics(
    predictions: ArrayLike, labels: ArrayLike, num_classes: int | None = None
) -> dict[str, float]:
    """eval_accuracy, eval_f1 (macro) and eval_mcc; with two classes also eval_f1_class1, the F1 of class id 1
    (the "F1" GLUE reports for MRPC and QQP)."""
    metrics = {
        "eval_accuracy": accuracy(predictions, labels),
        "eval_f1": macro_f1(predictions, labels),
        "eval_mcc": matthews_corrcoef(predictions, labels),
    }
    if num_classes == 2:
        metrics["eval_f1_class1"] = f1(predictions, labels, 1)
    return metrics


def regression_metrics(predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """eval_pearson and eval_spearman."""
    return {"eval_pearson": pearson(predictions, labels), "eval_spearman": spearman(predictions, labels)}
