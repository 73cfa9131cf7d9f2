"""Torch models for tabular propensity and churn scoring (Opacus-compatible: no batch norm)."""

from __future__ import annotations

import torch
from torch import nn

from fedpact.errors import ConfigurationError

MODEL_KINDS = ("logreg", "mlp")


def build_model(kind: str, n_features: int, *, hidden: int = 32, seed: int = 0) -> nn.Module:
    """A fresh model that outputs one logit per row: 'logreg' or 'mlp' (one hidden layer)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "logreg":
        model = nn.Sequential(nn.Linear(n_features, 1))
    elif kind == "mlp":
        model = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    else:
        raise ConfigurationError(f"unknown model {kind!r}: choose one of {', '.join(MODEL_KINDS)}")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
            else:
                p.zero_()
    return model
