"""Privacy budgets, job admission and the membership-inference audit, without a federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpact.audit import EventType, Ledger
from fedpact.errors import FedpactError
from fedpact.federation.coordinator import PartnerSummary, _check_plan_against_rows, admit_job
from fedpact.federation.job import JobConfig
from fedpact.models.datasets import load_dataset
from fedpact.models.features import FeaturePipeline
from fedpact.models.networks import build_model
from fedpact.models.training import make_loader, make_optimizer, predict_proba, run_epochs
from fedpact.privacy.accounting import plan_noise_multiplier
from fedpact.privacy.budget import BudgetError, PrivacyBudgets
from fedpact.privacy.dp_sgd import PrivateTraining
from fedpact.privacy.membership import membership_attack_auc


@pytest.fixture
def ledger(tmp_path):
    with Ledger.open(tmp_path / "ledger.db") as led:
        yield led


def test_charges_add_up_and_check_names_dataset_remaining_and_requested(ledger):
    """Spend adds up across jobs; a request over what is left names dataset, remaining, requested."""
    budgets = PrivacyBudgets(ledger)
    budgets.set("acme/customers", 2.0, 1e-4, actor="admin")
    budgets.charge("acme/customers", 0.6, 1e-5, job_id="job-a", actor="node")
    budgets.charge("acme/customers", 0.4, 0.0, job_id="job-a", actor="node")
    budgets.charge("acme/customers", 0.5, 1e-5, job_id="job-b", actor="node")
    b = budgets.get("acme/customers")
    assert b.epsilon_spent == pytest.approx(1.5) and b.epsilon_remaining == pytest.approx(0.5)
    assert b.jobs == {"job-a": pytest.approx(1.0), "job-b": pytest.approx(0.5)}
    budgets.check({"acme/customers": 0.5}, 1e-5)
    with pytest.raises(BudgetError) as err:
        budgets.check({"acme/customers": 0.8}, 1e-5)
    assert "acme/customers" in str(err.value) and "0.800" in str(err.value) and "0.500" in str(err.value)


def test_missing_budget_is_refused_with_how_to_set_it(ledger):
    with pytest.raises(BudgetError, match="fedpact privacy set-budget|has no privacy budget"):
        PrivacyBudgets(ledger).check({"nobody/set-this": 1.0}, 1e-5)


@pytest.mark.parametrize("bad,needle", [
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"target_epsilon": -1.0}, "target_epsilon"),
    ({"target_delta": 1.0}, "target_delta"),
    ({"target_delta": 0.0}, "target_delta"),
    ({"noise_multiplier": -0.5}, "noise_multiplier"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
])
def test_bad_privacy_settings_write_only_a_refusal(ledger, tmp_path, bad, needle):
    """Bad ε/δ/σ: an error naming the parameter, and nothing in the ledger but job.refused."""
    job = JobConfig(dataset="telco", home=str(tmp_path), **bad)
    with pytest.raises(FedpactError, match=needle):
        admit_job(job, ledger)
    events = ledger.events()
    assert [e.event_type for e in events] == [EventType.JOB_REFUSED.value]
    assert needle in events[0].payload["reason"]


def test_job_without_budgets_is_refused(ledger, tmp_path):
    job = JobConfig(dataset="telco", home=str(tmp_path))
    with pytest.raises(BudgetError, match="telco-churn/dsl"):
        admit_job(job, ledger)
    assert ledger.count() == 1


def test_delta_must_be_below_one_over_rows(ledger, tmp_path):
    """δ ≥ 1/n for a partner is refused once row counts are known, naming the partner."""
    job = JobConfig(dataset="telco", target_delta=2e-3, home=str(tmp_path))
    partners = [PartnerSummary("telco-churn/no-internet", 976, 244)]
    with pytest.raises(FedpactError, match="target_delta.*telco-churn/no-internet"):
        _check_plan_against_rows(job, ledger, partners, ["telco-churn/no-internet"])


def _telco_small(rows: int):
    data = load_dataset("telco")
    train, test = data.split(0.5, 0)
    train = train.subset(np.arange(rows))
    pipe = FeaturePipeline.fit(train)
    return pipe.transform(train), train.labels, pipe.transform(test), test.labels


def test_membership_attack_detects_an_overfit_model_but_not_a_dp_one():
    """A deliberately overfit non-private MLP leaks membership (AUC > 0.6); ε=1 DP-SGD does not."""
    X, y, Xt, yt = _telco_small(400)
    torch.manual_seed(0)
    overfit = build_model("mlp", X.shape[1], hidden=512, seed=0)
    run_epochs(overfit, torch.optim.Adam(overfit.parameters(), lr=1e-2),
               make_loader(X, y, 32, seed=0), 300)
    leak = membership_attack_auc(y, predict_proba(overfit, X), yt, predict_proba(overfit, Xt))
    assert leak > 0.6, leak

    model = build_model("mlp", X.shape[1], hidden=512, seed=0)
    loader = make_loader(X, y, 64, seed=0)
    sigma = plan_noise_multiplier(1.0, 1e-3, 1 / len(loader), 30 * len(loader))
    session = PrivateTraining(noise_multiplier=sigma, max_grad_norm=1.0)
    private = session.wrap(model, make_optimizer(model, 0.1), loader)
    run_epochs(private.model, private.optimizer, private.loader, 30, loss_fn=private.loss_fn)
    assert session.epsilon(1e-3) <= 1.0
    private = membership_attack_auc(y, predict_proba(model, X), yt, predict_proba(model, Xt))
    assert private <= 0.55, private
