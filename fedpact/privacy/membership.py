"""Empirical privacy audit: a loss-threshold membership-inference attack (Yeom et al., 2018).

The attacker guesses "this row was in the training set" when the model's loss on it is low. Its
ROC-AUC over the partner's training rows (members) and held-out rows (non-members) measures how
much the model reveals about who was in the data: 0.5 means nothing beyond chance. It runs on the
partner's node (it needs the rows); only the AUC leaves.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def per_example_loss(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of each row."""
    p = np.clip(np.asarray(probabilities, dtype=float), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=float)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def membership_attack_auc(member_labels: np.ndarray, member_scores: np.ndarray,
                          nonmember_labels: np.ndarray, nonmember_scores: np.ndarray,
                          *, seed: int = 0) -> float:
    """ROC-AUC of the loss-threshold attack on equal numbers of members and non-members."""
    n = min(len(member_labels), len(nonmember_labels))
    if n == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    m = rng.choice(len(member_labels), n, replace=False)
    o = rng.choice(len(nonmember_labels), n, replace=False)
    losses = np.concatenate([
        per_example_loss(np.asarray(member_labels)[m], np.asarray(member_scores)[m]),
        per_example_loss(np.asarray(nonmember_labels)[o], np.asarray(nonmember_scores)[o]),
    ])
    truth = np.concatenate([np.ones(n), np.zeros(n)])
    return float(roc_auc_score(truth, -losses))
