"""Privacy–utility curve: federated AUC at ε ∈ {0.5, 1, 2, 4, 8, ∞} on bank marketing and telco.

`make bench` writes docs/img/privacy_utility.png and prints the Markdown table for
docs/benchmarks.md. The centralised non-private AUC (pooled rows) is measured in the same run.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fedpact.federation.job import JobConfig  # noqa: E402
from fedpact.federation.node_data import load_node_data  # noqa: E402
from fedpact.federation.simulation import run_simulated_job  # noqa: E402
from fedpact.models.baselines import compare_baselines  # noqa: E402
from fedpact.service.demo import DEMO_DEFAULTS, ensure_budgets  # noqa: E402

pytestmark = pytest.mark.bench

EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0, math.inf]
CASES = [("bank", "segment", "bank marketing (propensity)"), ("telco", "segment", "telco (churn)")]
IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "privacy_utility.png"


def test_privacy_utility_curve(tmp_path, shared_data):
    rows = []
    fig, axes = plt.subplots(1, len(CASES), figsize=(10, 4))
    for ax, (dataset, partitioning, label) in zip(axes, CASES, strict=True):
        aucs = []
        central = None
        for eps in EPSILONS:
            home = tmp_path / f"{dataset}-{eps}"
            dp = math.isfinite(eps)
            job = JobConfig(dataset=dataset, partitioning=partitioning, num_partitions=3, dp=dp,
                            target_epsilon=eps if dp else 1.0, home=str(home), **DEMO_DEFAULTS)
            if dp:
                ensure_budgets(str(home), job)
            result = run_simulated_job(job)
            aucs.append(result.final["roc_auc"])
            if central is None:
                nodes = [load_node_data({"partition-id": i}, job) for i in range(job.num_partitions)]
                central = compare_baselines([n.train for n in nodes], [n.test for n in nodes]).centralised["roc_auc"]
            mia = result.membership_auc
            rows.append((label, eps, result.final["roc_auc"], result.final["pr_auc"], central,
                         result.epsilon, mia))
            print(f"| {label} | {'∞' if not dp else f'{eps:g}'} | {result.final['roc_auc']:.3f} | "
                  f"{result.final['pr_auc']:.3f} | {central:.3f} | {result.final['roc_auc'] / central:.3f} | "
                  f"{result.epsilon:.3f} | {mia if mia is None else round(mia, 3)} |", flush=True)
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
