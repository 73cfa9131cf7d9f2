"""Non-federated reference models that a federated job must be compared with.

Given the partners' own train/test splits: a centralised model on pooled rows (what one would get
if privacy did not matter), each partner's model trained alone, and the one-shot ensemble that
averages the partners' local models. All are scored on the pooled test rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpact.models.datasets import PartnerData
from fedpact.models.features import FeaturePipeline
from fedpact.models.metrics import evaluate_scores
from fedpact.models.training import predict_proba, train_model


@dataclass
class BaselineReport:
    centralised: dict[str, float]
    alone: list[dict[str, float]]
    local_ensemble: dict[str, float]


def compare_baselines(
    trains: list[PartnerData],
    tests: list[PartnerData],
    *,
    kind: str = "logreg",
    epochs: int = 8,
    batch_size: int = 256,
    lr: float = 0.05,
    seed: int = 0,
) -> BaselineReport:
    """Centralised, partner-alone and averaged-local scores on the pooled test rows."""
    pooled_train = PartnerData.concat(trains)
    pooled_test = PartnerData.concat(tests)
    y_test = pooled_test.labels

    pipe = FeaturePipeline.fit(pooled_train)
    central = train_model(pipe.transform(pooled_train), pooled_train.labels, kind=kind,
                          epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    centralised = evaluate_scores(y_test, predict_proba(central, pipe.transform(pooled_test)))

    alone, local_scores = [], []
    for train in trains:
        local_pipe = FeaturePipeline.fit(train)
        model = train_model(local_pipe.transform(train), train.labels, kind=kind, epochs=epochs,
                            batch_size=batch_size, lr=lr, seed=seed)
        scores = predict_proba(model, local_pipe.transform(pooled_test))
        local_scores.append(scores)
        alone.append(evaluate_scores(y_test, scores))
    ensemble = evaluate_scores(y_test, np.mean(local_scores, axis=0))
    return BaselineReport(centralised=centralised, alone=alone, local_ensemble=ensemble)
