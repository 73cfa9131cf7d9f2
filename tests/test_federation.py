"""A real 3-node Flower simulation with DP-SGD on bank marketing, checked end to end."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedpact.audit import EventType, Ledger
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.federation.simulation import run_simulated_job
from fedpact.privacy.accounting import AccountantStore
from fedpact.privacy.budget import PrivacyBudgets

pytestmark = [pytest.mark.slow]

ROUNDS = 5


@pytest.fixture(scope="module")
def bank_job(tmp_path_factory, shared_data):
    """One federated DP job (3 partners by job segment, ε=1, a DP evaluation after every round,
    charged in the same account) shared by the tests below."""
    home = tmp_path_factory.mktemp("fedpact-home")
    job = JobConfig(dataset="bank", partitioning="segment", num_partitions=3, rounds=ROUNDS,
                    eval_every=1, batch_size=512, learning_rate=0.3, target_epsilon=1.0, target_delta=1e-5,
                    home=str(home))
    with Ledger.open(job.ledger_path) as ledger:
        for name in partner_datasets(job):
            PrivacyBudgets(ledger).set(name, 3.0, 1e-4, actor="partner_admin:test")
    seen = []
    result = run_simulated_job(job, on_round=lambda r, entry: seen.append((r, entry)))
    return job, result, seen


@pytest.mark.shared_data
def test_federated_auc_improves_over_rounds(bank_job):
    """The pooled held-out ROC-AUC after the last round beats the first round's."""
    _, result, seen = bank_job
    assert [r for r, _ in seen] == list(range(1, ROUNDS + 1))
    first, last = result.rounds[0]["roc_auc"], result.rounds[-1]["roc_auc"]
    assert last > first + 0.005, (first, last)
    assert last > 0.70, "a DP logistic model on bank marketing should reach well above chance"


@pytest.mark.shared_data
def test_epsilon_is_positive_and_within_target(bank_job):
    """ε reported for every partner is the composition over all rounds: > 0 and ≤ the target."""
    job, result, _ = bank_job
    assert 0 < result.epsilon <= job.target_epsilon
    for partner in result.partners:
        assert 0 < partner.epsilon <= job.target_epsilon
        assert partner.noise_multiplier > 0.5
    # ε grows round by round (composition), it is not a per-round figure.
    eps = [r["epsilon"] for r in result.rounds]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False)), eps
    assert eps[-1] > 1.5 * eps[0]


@pytest.mark.shared_data
def test_accountant_state_persisted_on_partner_disk(bank_job):
    """Each partner's accountant history is on its own disk and reproduces the reported ε."""
    job, result, _ = bank_job
    for partner in result.partners:
        folder = Path(job.home) / "nodes" / partner.name.replace("/", "_") / "accountants"
        state = AccountantStore(folder).load(job.job_id, partner.name)
        assert state is not None, f"no accountant state for {partner.name} in {folder}"
        assert state.rounds_done == list(range(1, ROUNDS + 1))
        assert state.epsilon() == pytest.approx(partner.epsilon, rel=1e-9)


@pytest.mark.shared_data
def test_ledger_records_the_job_and_verifies(bank_job):
    """Job created, every node's data access, each aggregation, job finished — in a valid chain."""
    job, result, _ = bank_job
    with Ledger.open(job.ledger_path) as ledger:
        events = ledger.events(job_id=job.job_id)
        assert ledger.verify().ok
    kinds = [e.event_type for e in events]
    assert kinds[0] == EventType.JOB_CREATED.value and kinds[-1] == EventType.JOB_FINISHED.value
    assert kinds.count(EventType.ROUND_AGGREGATED.value) == ROUNDS
    access = [e for e in events if e.event_type == EventType.DATA_ACCESSED.value]
    assert len(access) == 3 * ROUNDS * 2  # 3 nodes × rounds × (train + evaluate)
    nodes = {e.payload["node"] for e in access}
    assert nodes == {p.name for p in result.partners}
    for e in access:
        assert e.payload["purpose"] == job.purpose
        assert "duration" not in e.payload["columns"]
        assert e.payload["rows"] > 0
    finished = events[-1].payload
    assert finished["epsilon"] == pytest.approx(result.epsilon)
    assert finished["secure_aggregation"] is False and finished["private"] is False  # test mode
    assert result.ledger_events == len(events)


@pytest.mark.shared_data
def test_altered_ledger_row_fails_verification(bank_job, tmp_path):
    """Changing one recorded row (rows read by a node) breaks the chain, and the CLI says so."""
    job, _, _ = bank_job
    copy = tmp_path / "ledger.db"
    with sqlite3.connect(job.ledger_path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    for kept in Path(job.ledger_path).parent.glob("ledger.db.*"):  # its public and writer keys
        if kept.is_file() and not kept.name.endswith(("-wal", "-shm", "-journal")):
            shutil.copy2(kept, tmp_path / kept.name)
    with sqlite3.connect(copy) as con:
        con.execute("DROP TRIGGER IF EXISTS ledger_events_no_update")
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            con.execute(f"DROP TRIGGER {name}")
        seq, payload = con.execute(
            "SELECT seq, payload FROM ledger_events WHERE event_type='data.accessed' ORDER BY seq LIMIT 1"
        ).fetchone()
        con.execute("UPDATE ledger_events SET payload=? WHERE seq=?",
                    (payload.replace('"rows":', '"rows":1'), seq))
    with Ledger.open(copy) as ledger:
        verdict = ledger.verify()
    assert not verdict.ok and verdict.first_bad_seq == seq
    cli = Path(sys.executable).parent / "fedpact"
    proc = subprocess.run([str(cli), "audit", "verify", "--home", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1
    assert f"event {seq}" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.shared_data
def test_model_saved_with_layout(bank_job):
    """The delivered model file carries its weights and the shared feature layout."""
    import torch

    _, result, _ = bank_job
    saved = torch.load(result.model_path, weights_only=False)
    n_features = sum(len(v) for v in saved["layout"]["categorical"].values()) + len(saved["layout"]["numeric"])
    assert saved["state_dict"]["0.weight"].shape == (1, n_features)
    assert "duration" not in saved["layout"]["numeric"]


@pytest.mark.shared_data
def test_job_spend_is_charged_to_each_dataset_budget(bank_job):
    """Per-round charges in the ledger add up to each partner's composed ε; δ is charged once."""
    job, result, _ = bank_job
    with Ledger.open(job.ledger_path) as ledger:
        budgets = PrivacyBudgets(ledger).all()
    for p in result.partners:
        b = budgets[p.name]
        assert b.jobs[job.job_id] == pytest.approx(p.epsilon, rel=1e-9)
        assert b.delta_spent == pytest.approx(job.target_delta)
        assert b.epsilon_remaining == pytest.approx(3.0 - p.epsilon, rel=1e-9)


@pytest.mark.shared_data
def test_epsilon_cross_checked_with_dp_accounting(bank_job):
    """Google's dp-accounting RDP reproduces Opacus' ε; its PLD bound is tighter, never looser."""
    _, result, _ = bank_job
    for p in result.partners:
        assert p.epsilon_google_rdp == pytest.approx(p.epsilon, rel=0.02)
        assert 0 < p.epsilon_google_pld <= p.epsilon_google_rdp * 1.001
        assert p.steps > 0 and 0 < p.sample_rate < 1


@pytest.mark.shared_data
def test_membership_attack_finds_nothing_at_epsilon_one(bank_job):
    """The loss-threshold attack on the ε ≤ 1 model is no better than chance (AUC ≤ 0.55)."""
    _, result, _ = bank_job
    assert result.membership_auc is not None
    for p in result.partners:
        assert p.membership_auc is not None and p.membership_auc <= 0.55


@pytest.mark.shared_data
def test_budget_exhausted_job_is_refused_before_any_node_runs(bank_job):
    """A job asking more ε than a dataset has left is refused up front: one job.refused event."""
    job, _, _ = bank_job
    greedy = JobConfig(dataset="bank", partitioning="segment", rounds=2, target_epsilon=2.5,
                       home=job.home)
    with Ledger.open(job.ledger_path) as ledger:
        before = ledger.count()
    from fedpact.privacy.budget import BudgetError

    with pytest.raises(BudgetError) as err:
        run_simulated_job(greedy)
    message = str(err.value)
    assert "bank-marketing/white-collar" in message and "requested ε=2.500" in message
    assert "remains" in message
    with Ledger.open(job.ledger_path) as ledger:
        new = ledger.events(since_seq=before)
    assert [e.event_type for e in new] == [EventType.JOB_REFUSED.value]
    assert not (Path(job.home) / "jobs" / greedy.job_id).exists()
