"""Non-federated reference models that a federated job must be compared with.

Given the partners' own train/test splits: a centralised model on pooled rows (what one would get
if privacy did not matter), each partner's model trained alone, and the one-shot ensemble that
averages the partners' local models. All are scored on the pooled test rows. A caller may pass a
second training function (e.g. DP-SGD at the job's ε) to get the partner-alone references under
the same privacy guarantee as the federated model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedpact.models.datasets import PartnerData
from fedpact.models.features import FeaturePipeline
from fedpact.models.metrics import evaluate_scores
from fedpact.models.training import predict_proba, train_model

FitFunction = Callable[[np.ndarray, np.ndarray], nn.Module]


@dataclass
class LocalReport:
    """Each partner alone, and the average of their scores, on the pooled test rows."""

    alone: list[dict[str, float]]
    ensemble: dict[str, float]


@dataclass
class BaselineReport:
    centralised: dict[str, float]
    local: LocalReport
    local_private: LocalReport | None = None

    # Short names used by reports.
    @property
    def alone(self) -> list[dict[str, float]]:
        return self.local.alone

    @property
    def local_ensemble(self) -> dict[str, float]:
        return self.local.ensemble


def _local_models(trains: list[PartnerData], pooled_test: PartnerData, fit: FitFunction) -> LocalReport:
    alone, scores = [], []
    for train in trains:
        pipe = FeaturePipeline.fit(train)
        model = fit(pipe.transform(train), train.labels)
        s = predict_proba(model, pipe.transform(pooled_test))
        scores.append(s)
        alone.append(evaluate_scores(pooled_test.labels, s))
    return LocalReport(alone, evaluate_scores(pooled_test.labels, np.mean(scores, axis=0)))


def compare_baselines(
    trains: list[PartnerData],
    tests: list[PartnerData],
    *,
    kind: str = "logreg",
    epochs: int = 8,
    batch_size: int = 256,
    lr: float = 0.05,
    seed: int = 0,
    private_fit: FitFunction | None = None,
) -> BaselineReport:
    """Centralised, partner-alone and averaged-local scores on the pooled test rows."""
    pooled_train = PartnerData.concat(trains)
    pooled_test = PartnerData.concat(tests)

    def plain_fit(X: np.ndarray, y: np.ndarray) -> nn.Module:
        return train_model(X, y, kind=kind, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)

    pipe = FeaturePipeline.fit(pooled_train)
    central = plain_fit(pipe.transform(pooled_train), pooled_train.labels)
    centralised = evaluate_scores(pooled_test.labels, predict_proba(central, pipe.transform(pooled_test)))
    local = _local_models(trains, pooled_test, plain_fit)
    local_private = _local_models(trains, pooled_test, private_fit) if private_fit else None
    return BaselineReport(centralised=centralised, local=local, local_private=local_private)
