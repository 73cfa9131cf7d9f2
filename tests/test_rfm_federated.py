"""A federated DP churn job on CDNOW RFM features, next to the centralised model on the same rows."""

from __future__ import annotations

import pytest

from fedpact.audit import Ledger
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.privacy.budget import PrivacyBudgets
from fedpact.service.comparison import run_with_baselines

pytestmark = [pytest.mark.slow]


def test_federated_churn_on_cdnow_is_close_to_the_centralised_model(tmp_path):
    """3 partners (customers dealt by seed), 3 rounds of DP-SGD at ε ≤ 1 through the usual pipeline."""
    job = JobConfig(dataset="cdnow", partitioning="iid", num_partitions=3, rounds=3,
                    batch_size=512, learning_rate=0.3, home=str(tmp_path), require_consent=False)
    with Ledger.open(job.ledger_path) as ledger:  # each partner admin allows its dataset ε ≤ 3
        for name in partner_datasets(job):
            PrivacyBudgets(ledger).set(name, 3.0, 1e-4, actor="partner_admin:test")
    comparison = run_with_baselines(job)  # runs run_simulated_job(job), then the references
    final = comparison.result.final
    centralised = comparison.baselines.centralised["roc_auc"]
    assert comparison.partner_names == [f"cdnow-churn/share-{i}" for i in (1, 2, 3)]
    held_out = sum(p.test_rows for p in comparison.result.partners)
    assert held_out == pytest.approx(0.2 * 23_570, abs=3)  # every partner's held-out rows
    # The pooled count comes from DP histograms: within 5σ of the noise (σ_eval per bin).
    sigma = job.eval_noise_multiplier * (2 * 10 * 3) ** 0.5
    assert abs(final["n"] - held_out) < 5 * sigma, (final["n"], held_out)
    assert comparison.result.epsilon <= 1.0
    assert final["roc_auc"] > 0.70  # measured 0.768 (chance is 0.5)
    assert centralised > 0.70  # measured 0.769 (non-private, pooled rows)
    assert final["roc_auc"] > centralised - 0.03
