"""Privacy–utility curve: federated AUC at ε ∈ {0.5, 1, 2, 4, 8, ∞} on bank marketing, telco
and Caravan, with the whole release (DP-SGD and the DP evaluation histograms) inside ε.

`make bench` writes docs/img/privacy_utility.png and prints the Markdown table for
docs/benchmarks.md. Two AUCs per run: the one the partners' released (noisy, 10-bin) histograms
give — what the coordinator and the card see — and the delivered model's exact AUC on the pooled
held-out rows, which only this benchmark (it holds every partner's rows) can compute. The
centralised non-private AUC (pooled rows, same encoding references) is measured in the same run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fedpact.federation.job import JobConfig  # noqa: E402
from fedpact.federation.node_data import load_node_data  # noqa: E402
from fedpact.federation.simulation import allow_without_dp, run_simulated_job  # noqa: E402
from fedpact.models.baselines import compare_baselines  # noqa: E402
from fedpact.privacy.node_policy import NodePolicy  # noqa: E402
from fedpact.service.demo import DEMO_DEFAULTS, DEMO_TUNED, ensure_budgets, ensure_consents  # noqa: E402

pytestmark = pytest.mark.bench

EPSILONS = [0.5, 1.0, 2.0, 8.0, math.inf]
CASES = [("bank", "segment", "bank marketing (propensity)"), ("telco", "segment", "telco (churn)"),
         ("caravan", "segment", "Caravan (propensity)")]


def true_pooled_auc(job, result) -> float:
    """The delivered model's exact ROC-AUC on every partner's held-out rows (measurement only)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from fedpact.federation.local_round import _scores, model_from_weights, pipeline_for

    nodes = [load_node_data({"partition-id": i}, job) for i in range(job.num_partitions)]
    saved = torch.load(result.model_path, weights_only=False)
    pipe = pipeline_for(nodes[0])
    model = model_from_weights(saved["state_dict"], pipe.n_features, job)
    y = np.concatenate([n.test.labels for n in nodes])
    scores = np.concatenate([_scores(model, pipeline_for(n), n.test) for n in nodes])
    return float(roc_auc_score(y, scores))
# FEDPACT_BENCH_CASES=telco,caravan runs a subset (the figure then shows only those).
_ONLY = [c for c in os.environ.get("FEDPACT_BENCH_CASES", "").split(",") if c]
CASES = [c for c in CASES if not _ONLY or c[0] in _ONLY]
IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "privacy_utility.png"


def test_privacy_utility_curve(tmp_path, shared_data, monkeypatch):
    monkeypatch.delenv("FEDPACT_REPRODUCIBLE_NOISE", raising=False)  # the product's CSPRNG noise
    rows = []
    print("| task | ε | ROC-AUC (exact, pooled rows) | ROC-AUC (from the released histograms) | "
          "centralised | ratio | ε spent | MIA AUC |\n|---|---|---:|---:|---:|---:|---:|---:|")
    fig, axes = plt.subplots(1, len(CASES), figsize=(15, 4))
    for ax, (dataset, partitioning, label) in zip(axes, CASES, strict=True):
        aucs = []
        central = None
        for eps in EPSILONS:
            home = tmp_path / f"{dataset}-{eps}"
            dp = math.isfinite(eps)
            settings = {**DEMO_DEFAULTS, **DEMO_TUNED.get(dataset, {})}
            job = JobConfig(dataset=dataset, partitioning=partitioning, num_partitions=3, dp=dp,
                            target_epsilon=eps if dp else 1.0, home=str(home), **settings)
            if dp:
                ensure_budgets(str(home), job)
            ensure_consents(job)  # the public sets' demo consent, enforced by every node
            # The partners' own policies for the curve: up to ε = 8 per job (the default allows 3).
            policy = (NodePolicy(max_epsilon_per_job=8.0, max_epsilon_total=100.0,
                                 source="privacy-utility bench") if dp
                      else allow_without_dp(job, "privacy-utility bench"))
            result = run_simulated_job(job, node_policy=policy)
            assert result.private == dp, result.not_private_reasons
            exact = true_pooled_auc(job, result)
            aucs.append(exact)
            if central is None:
                nodes = [load_node_data({"partition-id": i}, job) for i in range(job.num_partitions)]
                central = compare_baselines([n.train for n in nodes], [n.test for n in nodes]).centralised["roc_auc"]
            mia = result.membership_auc
            rows.append((label, eps, exact, result.final["roc_auc"], central, result.epsilon, mia))
            print(f"| {label} | {'∞' if not dp else f'{eps:g}'} | {exact:.3f} | "
                  f"{result.final['roc_auc']:.3f} | {central:.3f} | {exact / central:.3f} | "
                  f"{result.epsilon if dp else float('inf'):.3f} | {mia if mia is None else round(mia, 3)} |",
                  flush=True)
        xs = [e if math.isfinite(e) else 16.0 for e in EPSILONS]
        ax.plot(xs, aucs, "o-", label="federated, 3 partners")
        ax.axhline(central, color="grey", ls="--", label="centralised, non-private")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{e:g}" if math.isfinite(e) else "∞" for e in EPSILONS])
        ax.set_xlabel("ε per partner dataset (δ = 1e-5)")
        ax.set_ylabel("pooled held-out ROC-AUC")
        ax.set_title(label)
        ax.legend(loc="lower right")
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=110)
    assert IMG.exists()
    for label, eps, auc, *_ in rows:
        assert 0.5 < auc <= 1.0, (label, eps, auc)
