"""Foundation benchmarks: federated DP vs references on real data, and the cost of DP-SGD.

Run with `make bench`. Prints a Markdown table; copy it into docs/benchmarks.md with the date.
Ratios matter more than seconds: these machines are noisy.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedpact.federation.job import JobConfig
from fedpact.models.datasets import load_dataset
from fedpact.models.features import FeaturePipeline
from fedpact.models.networks import build_model
from fedpact.models.training import make_loader, make_optimizer, run_epochs
from fedpact.privacy.dp_sgd import PrivateTraining
from fedpact.service.comparison import run_with_baselines
from fedpact.service.demo import DEMO_DEFAULTS, ensure_budgets

pytestmark = pytest.mark.bench


@pytest.mark.parametrize("dataset,partitioning", [("bank", "segment"), ("bank", "period"),
                                                  ("telco", "segment"), ("caravan", "segment")])
def test_federated_dp_vs_references(dataset, partitioning, tmp_path, shared_data):
    """ROC-AUC of federated DP-SGD (ε=1) vs centralised, partner-alone and averaged-local models."""
    job = JobConfig(dataset=dataset, partitioning=partitioning, num_partitions=3,
                    target_epsilon=1.0, target_delta=1e-5, home=str(tmp_path), **DEMO_DEFAULTS)
    ensure_budgets(str(tmp_path), job)
    t0 = time.perf_counter()
    cmp = run_with_baselines(job)
    seconds = time.perf_counter() - t0
    b = cmp.baselines
    alone = ", ".join(f"{a['roc_auc']:.3f}" for a in b.alone)
    print(f"\n| {dataset} / {partitioning} | {cmp.result.final['roc_auc']:.3f} | "
          f"{b.centralised['roc_auc']:.3f} | {b.local_ensemble['roc_auc']:.3f} | {alone} | "
          f"{cmp.result.epsilon:.3f} | {seconds:.0f} s |")
    assert cmp.result.epsilon <= 1.0


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_dp_sgd_overhead(shared_data, kind):
    """Wall time of one local epoch with Opacus DP-SGD (each per-example mode) vs plain SGD."""
    data = load_dataset("bank")
    train, _ = data.split(0.2, 0)
    pipe = FeaturePipeline.fit(train)
    X, y = pipe.transform(train), train.labels

    def epoch(mode: str | None) -> float:
        model = build_model(kind, X.shape[1])
        opt = make_optimizer(model, 0.3)
        loader = make_loader(X, y, 512)
        loss_fn = None
        if mode:
            private = PrivateTraining(noise_multiplier=1.0, max_grad_norm=1.0,
                                      grad_sample_mode=mode).wrap(model, opt, loader)
            model, opt, loader, loss_fn = private.model, private.optimizer, private.loader, private.loss_fn
        t0 = time.perf_counter()
        run_epochs(model, opt, loader, 1, loss_fn=loss_fn)
        return time.perf_counter() - t0

    # Interleave the variants so machine noise hits them alike; report medians of 7.
    modes = [None, "ghost", "hooks", "ew"]
    times = {m: [] for m in modes}
    for _ in range(7):
        for m in modes:
            times[m].append(epoch(m))
    plain = float(np.median(times[None]))
    parts = [f"plain {plain * 1000:.0f} ms"] + [
        f"{m} {np.median(times[m]) * 1000:.0f} ms ({np.median(times[m]) / plain:.2f}x)" for m in modes[1:]]
    print(f"\n{kind} local epoch, {len(y):,} rows, batch 512: " + ", ".join(parts))
