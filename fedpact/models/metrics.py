"""Scores for propensity and churn models: ROC-AUC, PR-AUC, top-decile lift, Brier score.

`score_histogram` / `metrics_from_histograms` compute the same figures from per-partner counts of
scores by label, so a federation can report pooled metrics without any row leaving a node.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

HISTOGRAM_BINS = 1000


def lift_at(y_true: np.ndarray, scores: np.ndarray, fraction: float = 0.1) -> float:
    """Positive rate among the top `fraction` of scores divided by the overall positive rate."""
    y_true = np.asarray(y_true, dtype=float)
    base = y_true.mean()
    if len(y_true) == 0 or base == 0:
        return float("nan")
    k = max(1, int(math.ceil(fraction * len(y_true))))
    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return float(y_true[top].mean() / base)


def evaluate_scores(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """All headline metrics for predicted probabilities `scores` against 0/1 labels."""
    y_true = np.asarray(y_true, dtype=float)
    scores = np.asarray(scores, dtype=float)
    both_classes = 0 < y_true.sum() < len(y_true)
    return {
        "roc_auc": float(roc_auc_score(y_true, scores)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(y_true, scores)) if both_classes else float("nan"),
        "lift_at_10": lift_at(y_true, scores, 0.1),
        "brier": float(brier_score_loss(y_true, np.clip(scores, 0, 1))) if len(y_true) else float("nan"),
        "n": float(len(y_true)),
        "positive_rate": float(y_true.mean()) if len(y_true) else float("nan"),
    }


def score_histogram(y_true: np.ndarray, scores: np.ndarray, bins: int = HISTOGRAM_BINS):
    """Counts of positives and negatives per score bin on [0, 1], plus the summed squared error."""
    y_true = np.asarray(y_true, dtype=float)
    scores = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    idx = np.minimum((scores * bins).astype(int), bins - 1)
    pos = np.bincount(idx[y_true == 1], minlength=bins)
    neg = np.bincount(idx[y_true == 0], minlength=bins)
    sq_error = float(((scores - y_true) ** 2).sum())
    return pos.astype(np.int64), neg.astype(np.int64), sq_error


def metrics_from_histograms(pos: np.ndarray, neg: np.ndarray, sq_error: float) -> dict[str, float]:
    """ROC-AUC, PR-AUC, lift@10% and Brier from summed score histograms (ties within a bin)."""
    pos = np.asarray(pos, dtype=float)
    neg = np.asarray(neg, dtype=float)
    n_pos, n_neg = pos.sum(), neg.sum()
    n = n_pos + n_neg
    out = {"n": float(n), "positive_rate": float(n_pos / n) if n else float("nan"),
           "brier": float(sq_error / n) if n else float("nan")}
    if n_pos == 0 or n_neg == 0:
        return {**out, "roc_auc": float("nan"), "pr_auc": float("nan"), "lift_at_10": float("nan")}
    # Walk bins from the highest score down.
    p, q = pos[::-1], neg[::-1]
    neg_below = n_neg - np.cumsum(q)
    auc = float((p * (neg_below + 0.5 * q)).sum() / (n_pos * n_neg))
    tp, fp = np.cumsum(p), np.cumsum(q)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    pr_auc = float((precision * p).sum() / n_pos)
    k = math.ceil(0.1 * n)
    taken = np.cumsum(p + q)
    first = int(np.searchsorted(taken, k))
    prev = taken[first - 1] if first > 0 else 0.0
    share = (k - prev) / (p[first] + q[first]) if (p[first] + q[first]) else 0.0
    top_pos = (p[:first].sum() if first > 0 else 0.0) + share * p[first]
    lift = float((top_pos / k) / (n_pos / n))
    return {**out, "roc_auc": auc, "pr_auc": pr_auc, "lift_at_10": lift}


# --------------------------------------------------------------------------- released histograms
# What partners release for evaluation: counts of held-out positives and negatives per score bin,
# with DP noise added on the node. Few bins (noise is added to each), spaced in logit so that the
# narrow score ranges of propensity models are still resolved; the end bins take the tails.
RELEASE_LOGIT_EDGES = np.linspace(-5.0, 3.0, 11)


def release_bin_edges() -> np.ndarray:
    """Probability edges of the released histograms' bins (0 and 1 at the ends)."""
    inner = 1.0 / (1.0 + np.exp(-RELEASE_LOGIT_EDGES[1:-1]))
    return np.concatenate([[0.0], inner, [1.0]])


def release_histogram(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact counts of positives and negatives per released bin (noise is added by the caller)."""
    edges = release_bin_edges()
    idx = np.clip(np.searchsorted(edges, np.asarray(scores, float), side="right") - 1, 0, len(edges) - 2)
    y = np.asarray(y_true, float)
    bins = len(edges) - 1
    return (np.bincount(idx[y == 1], minlength=bins).astype(float),
            np.bincount(idx[y == 0], minlength=bins).astype(float))


def metrics_from_released(pos, neg) -> dict[str, float]:
    """Pooled metrics from released (possibly noisy) histograms: negative counts are clipped to 0
    and the Brier score is computed at each bin's centre (post-processing: no extra ε)."""
    pos = np.clip(np.asarray(pos, float), 0, None)
    neg = np.clip(np.asarray(neg, float), 0, None)
    edges = release_bin_edges()
    centre = (edges[:-1] + edges[1:]) / 2
    sq_error = float((pos * (1 - centre) ** 2 + neg * centre ** 2).sum())
    return {**metrics_from_histograms(pos, neg, sq_error), "sq_error": sq_error}
