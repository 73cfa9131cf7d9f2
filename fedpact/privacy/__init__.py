"""Differential privacy, privacy budgets and audience matching. Knows nothing of Flower.

Submodules are imported lazily, so that e.g. `fedpact.privacy.matching` does not pull in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AccountantState": "fedpact.privacy.accounting",
    "AccountantStore": "fedpact.privacy.accounting",
    "epsilon_of": "fedpact.privacy.accounting",
    "plan_noise_multiplier": "fedpact.privacy.accounting",
    "PrivateTraining": "fedpact.privacy.dp_sgd",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedpact.privacy' has no attribute {name!r}")
