"""Differential privacy: DP-SGD training, privacy accounting and budgets. Knows nothing of Flower."""

from fedpact.privacy.accounting import (
    AccountantState,
    AccountantStore,
    epsilon_of,
    plan_noise_multiplier,
)
from fedpact.privacy.dp_sgd import PrivateTraining

__all__ = [
    "AccountantState",
    "AccountantStore",
    "PrivateTraining",
    "epsilon_of",
    "plan_noise_multiplier",
]
