"""Tests of privacy accounting: noise planning, composition, persistence across restarts, DP-SGD."""

from __future__ import annotations

import json
import math
import warnings

import dp_accounting
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpact.errors import ConfigurationError
from fedpact.privacy.accounting import (
    AccountantState,
    AccountantStore,
    epsilon_of,
    plan_noise_multiplier,
)
from fedpact.privacy.dp_sgd import PrivateTraining

DELTA = 1e-5

# Known, harmless library notices (the planner's search probes tiny σ; tests need no secure RNG).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    pytest.mark.filterwarnings("ignore:GDP accounting is experimental:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]


def make_state(**overrides) -> AccountantState:
    fields = dict(
        job_id="job-42", dataset="bank-a", accountant="rdp", target_epsilon=2.0, delta=DELTA,
        noise_multiplier=1.1, sample_rate=0.01, planned_steps=1000,
    )
    return AccountantState(**{**fields, **overrides})


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant"),
    [
        (1.0, 0.01, 100, "rdp"),
        (3.0, 0.05, 500, "rdp"),
        (0.5, 0.004, 1000, "rdp"),
        (2.0, 0.02, 2000, "rdp"),
        (4.0, 1.0, 10, "rdp"),
        (1.0, 0.01, 100, "gdp"),
        (1.0, 0.01, 100, "prv"),
    ],
)
def test_planned_noise_meets_target_epsilon_tightly(target, q, steps, accountant):
    """The planned σ spends at most the target ε over the planned steps, and at least 98% of it."""
    sigma = plan_noise_multiplier(target, DELTA, q, steps, accountant)
    assert sigma > 0
    eps = epsilon_of([(sigma, q, steps)], DELTA, accountant)
    assert eps <= target
    assert eps >= 0.98 * target


def test_more_steps_need_more_noise():
    """Planning for more steps at the same ε gives a larger σ."""
    few = plan_noise_multiplier(1.0, DELTA, 0.01, 100)
    many = plan_noise_multiplier(1.0, DELTA, 0.01, 1000)
    assert many > few


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"target_epsilon": 0.0}, "target epsilon must be a positive number, got 0.0"),
        ({"target_epsilon": -1.0}, "target epsilon must be a positive number, got -1.0"),
        ({"target_epsilon": math.inf}, "target epsilon must be a positive number, got inf"),
        ({"target_epsilon": math.nan}, "target epsilon must be a positive number, got nan"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"delta": 1.5}, r"delta must be in \(0, 1\), got 1.5"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"),
        ({"sample_rate": 1.5}, r"sampling rate 1.5 is outside \(0, 1\].*lower batch-size"),
        ({"sample_rate": 0.0}, r"sampling rate 0 is outside \(0, 1\]"),
        ({"steps": 0}, "at least one training step, got 0"),
        ({"accountant": "moments"}, "unknown accountant 'moments': choose one of rdp, prv, gdp"),
    ],
)
def test_bad_planning_inputs_raise_configuration_error(overrides, expected):
    """Each out-of-range planning input is a ConfigurationError that names the parameter and value."""
    args = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.01, "steps": 100,
            "accountant": "rdp", **overrides}
    with pytest.raises(ConfigurationError, match=expected):
        plan_noise_multiplier(**args)


def test_epsilon_of_rejects_unknown_accountant():
    """epsilon_of also refuses an unknown accountant name."""
    with pytest.raises(ConfigurationError, match="unknown accountant 'renyi'"):
        epsilon_of([(1.0, 0.01, 10)], DELTA, "renyi")


def test_epsilon_of_empty_history_is_zero():
    """Nothing spent: ε is exactly 0."""
    assert epsilon_of([], DELTA) == 0.0


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_history_split_into_rounds_composes_like_one_run(accountant):
    """ε of 5 rounds of 60 steps (and an uneven split) equals ε of one 300-step history."""
    sigma, q = 1.2, 0.02
    whole = epsilon_of([(sigma, q, 300)], DELTA, accountant)
    rounds = epsilon_of([(sigma, q, 60)] * 5, DELTA, accountant)
    uneven = epsilon_of([(sigma, q, 17), (sigma, q, 200), (sigma, q, 83)], DELTA, accountant)
    assert rounds == pytest.approx(whole, rel=1e-6)
    assert uneven == pytest.approx(whole, rel=1e-6)


def test_epsilon_grows_with_every_round():
    """Each extra round increases the composed ε."""
    sigma, q = 1.0, 0.05
    eps = [epsilon_of([(sigma, q, 50)] * r, DELTA) for r in range(1, 5)]
    assert eps == sorted(eps) and len(set(eps)) == 4


def test_projected_epsilon_adds_planned_steps():
    """projected_epsilon(k) is the ε of the history plus k steps at the planned σ and rate."""
    state = make_state(history=[(1.1, 0.01, 300)])
    assert state.steps_taken == 300
    assert state.projected_epsilon(0) == pytest.approx(state.epsilon())
    assert state.projected_epsilon(200) == pytest.approx(epsilon_of([(1.1, 0.01, 500)], DELTA),
                                                         rel=1e-6)


# --------------------------------------------------------------------------- persistence


def test_store_save_load_round_trip_is_exact(tmp_path):
    """A saved state loads back equal, floats bit for bit, history entries as tuples."""
    store = AccountantStore(tmp_path / "acc")
    state = make_state(noise_multiplier=1.0815429687500002, sample_rate=1 / 13,
                       history=[(1.0815429687500002, 1 / 13, 13), (0.9, 0.1, 7)],
                       rounds_done=[1, 2])
    store.save(state)
    loaded = store.load("job-42", "bank-a")
    assert loaded == state
    assert loaded.sample_rate == 1 / 13
    assert all(isinstance(h, tuple) for h in loaded.history)
    assert loaded.epsilon() == state.epsilon()
    assert store.load("job-42", "other-dataset") is None
    assert store.load("job-43", "bank-a") is None
    assert [p.suffix for p in (tmp_path / "acc").iterdir()] == [".json"]  # no temp files left


def test_store_keeps_jobs_and_datasets_apart(tmp_path):
    """Two datasets of one job and one dataset of two jobs are stored separately."""
    store = AccountantStore(tmp_path)
    a = make_state(dataset="bank-a", history=[(1.0, 0.01, 5)])
    b = make_state(dataset="bank-b", history=[(2.0, 0.02, 9)])
    c = make_state(job_id="job-43", dataset="bank-a", history=[(3.0, 0.03, 1)])
    for s in (a, b, c):
        store.save(s)
    assert store.load("job-42", "bank-a") == a
    assert store.load("job-42", "bank-b") == b
    assert store.load("job-43", "bank-a") == c


def test_restarted_store_continues_composition(tmp_path):
    """Save, load with a NEW store (node restart), add steps: ε equals the uninterrupted history's."""
    sigma, q = 1.1, 0.01
    first = AccountantStore(tmp_path / "node")
    state = make_state(noise_multiplier=sigma, sample_rate=q)
    for rnd in (1, 2):
        state.history.append((sigma, q, 100))
        state.rounds_done.append(rnd)
    first.save(state)
    del first, state

    after_restart = AccountantStore(tmp_path / "node")
    resumed = after_restart.load("job-42", "bank-a")
    assert resumed is not None and resumed.rounds_done == [1, 2] and resumed.steps_taken == 200
    resumed.history.append((sigma, q, 100))
    resumed.rounds_done.append(3)
    after_restart.save(resumed)

    final = AccountantStore(tmp_path / "node").load("job-42", "bank-a")
    uninterrupted = epsilon_of([(sigma, q, 300)], DELTA)
    assert final.steps_taken == 300
    assert final.epsilon() == pytest.approx(uninterrupted, rel=1e-9)
    assert final.epsilon() > epsilon_of([(sigma, q, 200)], DELTA)


def test_store_file_is_plain_json(tmp_path):
    """The state on disk is readable JSON holding the whole history."""
    store = AccountantStore(tmp_path)
    store.save(make_state(history=[(1.1, 0.01, 3)]))
    (path,) = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["history"] == [[1.1, 0.01, 3]]
    assert doc["job_id"] == "job-42" and doc["dataset"] == "bank-a"


# --------------------------------------------------------------------------- DP-SGD with Opacus


def one_private_epoch(history=None, *, n=200, batch_size=50, sigma=1.3):
    """Train a 5-input logistic model for one DP-SGD epoch on random data."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.normal(size=(n, 5)).astype(np.float32))
    y = torch.from_numpy((rng.random(n) < 0.3).astype(np.float32))
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True)
    model = nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = PrivateTraining(noise_multiplier=sigma, max_grad_norm=1.0, history=history)
    before = [p.detach().clone() for p in model.parameters()]
    private = session.wrap(model, optimizer, loader)
    steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for xb, yb in private.loader:
            if len(xb) == 0:
                continue
            private.optimizer.zero_grad()
            private.loss_fn(private.model(xb).squeeze(-1), yb).backward()
            private.optimizer.step()
            steps += 1
    changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    return session, len(loader), steps, changed


def test_private_training_accounts_one_epoch():
    """One epoch: one history entry (σ, 1/len(loader), steps), and ε equals epsilon_of(history)."""
    session, batches, steps, changed = one_private_epoch()
    assert changed
    assert batches == 4 and steps == batches
    assert session.history == [(1.3, 1 / batches, steps)]
    assert session.epsilon(DELTA) == pytest.approx(epsilon_of(session.history, DELTA), rel=1e-12)
    assert session.epsilon(DELTA) > 0


def test_private_training_composes_with_earlier_rounds():
    """Carried-in history is composed: ε covers the earlier steps plus this epoch's."""
    earlier = [(1.3, 0.25, 40)]
    session, batches, steps, _ = one_private_epoch(history=earlier)
    assert sum(h[2] for h in session.history) == 40 + steps
    expected = epsilon_of([(1.3, 1 / batches, 40 + steps)], DELTA)
    assert session.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    assert session.epsilon(DELTA) > epsilon_of(earlier, DELTA)


def test_private_training_without_steps_has_zero_epsilon():
    """Before any step the session reports ε = 0."""
    session = PrivateTraining(noise_multiplier=1.0, max_grad_norm=1.0)
    assert session.history == [] and session.epsilon(DELTA) == 0.0


# --------------------------------------------------------------------------- independent check


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(1.1, 0.01, 1000), (0.8, 0.05, 200), (2.0, 0.004, 5000), (1.3, 0.25, 4)],
)
def test_opacus_rdp_epsilon_agrees_with_google_dp_accounting(sigma, q, steps):
    """Opacus' RDP ε for a history matches Google's dp_accounting RDP accountant within 5%."""
    ours = epsilon_of([(sigma, q, steps // 2), (sigma, q, steps - steps // 2)], DELTA, "rdp")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    google = dp_accounting.rdp.RdpAccountant()
    google.compose(event)
    theirs = google.get_epsilon(DELTA)
    assert ours == pytest.approx(theirs, rel=0.05)


def test_store_keeps_look_alike_job_ids_apart(tmp_path):
    """Jobs 'a/b' and 'a_b' (same sanitised name) keep separate privacy histories."""
    store = AccountantStore(tmp_path)
    common = dict(accountant="rdp", target_epsilon=1.0, delta=1e-5, noise_multiplier=1.0,
                  sample_rate=0.01, planned_steps=100)
    store.save(AccountantState(job_id="a/b", dataset="d", history=[(1.0, 0.01, 10)], **common))
    store.save(AccountantState(job_id="a_b", dataset="d", history=[(1.0, 0.01, 99)], **common))
    assert store.load("a/b", "d").steps_taken == 10
    assert store.load("a_b", "d").steps_taken == 99
    assert len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_ghost_clipping_gives_the_same_update_as_per_sample_hooks(mode):
    """Without noise, fast (ghost) clipping and per-sample gradients make the identical step."""
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.normal(scale=3.0, size=(64, 6)).astype(np.float32))
    y = torch.from_numpy((rng.random(64) < 0.4).astype(np.float32))

    def one_step(grad_mode: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
        loader = DataLoader(TensorDataset(X, y), batch_size=64)
        session = PrivateTraining(noise_multiplier=0.0, max_grad_norm=0.5, grad_sample_mode=grad_mode)
        private = session.wrap(model, torch.optim.SGD(model.parameters(), lr=1.0), loader)
        torch.manual_seed(7)  # same Poisson batch in both runs
        for xb, yb in private.loader:
            if len(xb):
                private.optimizer.zero_grad()
                private.loss_fn(private.model(xb).squeeze(-1), yb).backward()
                private.optimizer.step()
            break
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(one_step("ghost"), one_step(mode), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_unknown_grad_sample_mode_is_refused():
    with pytest.raises(ConfigurationError, match="grad_sample_mode"):
        PrivateTraining(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="magic")
