"""Attacks on the randomness DP-SGD relies on: whoever knows the job must not know the batches.

With the batches known, subsampling no longer amplifies privacy and the ε a partner is promised
is not the ε it gets (issue 13: a rebuild from (job seed, round, n) matched every batch). These
tests play the coordinator: they rebuild the Poisson batches from everything the job reveals and
check that the node's batches are not those; they also check the batches follow Poisson
sampling at the rate the accountant records (batch sizes Binomial(n, q)).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from scipy import stats

import fedpact.federation.local_round as local_round
from fedpact.federation.job import JobConfig
from fedpact.federation.local_round import REPRODUCIBLE_NOISE_ENV, plan_for, train_round
from fedpact.federation.node_data import NodeData
from fedpact.models.datasets import DatasetSpec, validate_frame
from fedpact.models.networks import build_model
from fedpact.privacy.dp_sgd import PrivateTraining

N_ROWS = 600
SPEC = DatasetSpec(name="rows", task="churn", label="y", positive=("1",), negative=("0",),
                   numeric=("rowid", "x"), bounds={"rowid": (0, N_ROWS), "x": (-3, 3)})


def _node(n: int = N_ROWS) -> NodeData:
    """A partner whose feature `rowid` is the row's index (so a batch names its rows)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=n)
    frame = pd.DataFrame({"rowid": np.arange(n).astype(str), "x": x.astype(str),
                          "y": (x + rng.normal(size=n) > 0).astype(int).astype(str)})
    rows = validate_frame(frame, SPEC, source="test")
    return NodeData("rows", rows, rows.subset(np.arange(50)))


def _record_batches(monkeypatch) -> list[list[int]]:
    """Patch the training loop to record which rows each DP-SGD step used."""
    batches: list[list[int]] = []
    real = local_round.run_epochs

    class Recording:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for xb, yb in self.loader:
                # rowid is the first numeric column, scaled from [0, N] to [-1, 1]
                ids = np.rint((xb[:, 0].numpy() + 1.0) * N_ROWS / 2).astype(int)
                batches.append(sorted(ids.tolist()))
                yield xb, yb

        def __len__(self):
            return len(self.loader)

    def recording_epochs(model, optimizer, loader, epochs, **kw):
        return real(model, optimizer, Recording(loader), epochs, **kw)

    monkeypatch.setattr(local_round, "run_epochs", recording_epochs)
    return batches


def _job(tmp_path, name: str) -> JobConfig:
    return JobConfig(job_id=f"job-{name}", home=str(tmp_path / name), rounds=2, batch_size=60,
                     target_epsilon=1.0, target_delta=1e-4, membership_audit=False)


def _weights(job: JobConfig) -> dict:
    return {k: v.numpy() for k, v in build_model(job.model, 2, seed=0).state_dict().items()}


def _rebuilds(job: JobConfig, server_round: int, n: int) -> list[list[list[int]]]:
    """Every batch sequence a coordinator can derive from the job's settings."""
    _, q, steps = plan_for(job, n)
    seeds = [job.seed + server_round, job.seed * 1_000_003 + server_round * 101 + n,
             job.seed * 1_000_003 + server_round * 101 + n + 1, job.seed, server_round]
    out = []
    for seed in seeds:
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q,
                                                generator=torch.Generator().manual_seed(seed))
        out.append([sorted(b) for b in list(sampler)[:steps]])
    return out


def test_coordinator_cannot_rebuild_the_batches(tmp_path, monkeypatch):
    """The attack of issue 13: rebuild every Poisson batch from (job seed, round, n)."""
    monkeypatch.delenv(REPRODUCIBLE_NOISE_ENV, raising=False)
    batches = _record_batches(monkeypatch)
    job, node = _job(tmp_path, "a"), _node()
    update = train_round(node, _weights(job), job, tmp_path / "state", 1)
    assert update.metrics["reproducible"] == 0.0
    assert len(batches) == int(update.metrics["steps"])
    for rebuilt in _rebuilds(job, 1, len(node.train)):
        matched = sum(a == b for a, b in zip(batches, rebuilt, strict=False))
        assert matched == 0, f"{matched} of {len(batches)} batches rebuilt from the job settings"


def test_two_runs_of_the_same_job_draw_different_batches(tmp_path, monkeypatch):
    monkeypatch.delenv(REPRODUCIBLE_NOISE_ENV, raising=False)
    batches = _record_batches(monkeypatch)
    node = _node()
    first_job, second_job = _job(tmp_path, "a"), _job(tmp_path, "b")
    second_job.job_id = first_job.job_id  # same job, same seed, same round, same rows
    first = train_round(node, _weights(first_job), first_job, tmp_path / "s1", 1)
    k = len(batches)
    second = train_round(node, _weights(second_job), second_job, tmp_path / "s2", 1)
    assert batches[:k] != batches[k:]
    assert sum(a == b for a, b in zip(batches[:k], batches[k:], strict=True)) == 0
    # and the noise differs too: the released weights are not equal
    assert any(not torch.equal(first.weights[key], second.weights[key]) for key in first.weights)


def test_reproducible_mode_is_the_nodes_explicit_setting_and_is_reported(tmp_path, monkeypatch):
    """Only FEDPACT_REPRODUCIBLE_NOISE=1 on the node fixes the batches — and the reply says so."""
    monkeypatch.setenv(REPRODUCIBLE_NOISE_ENV, "1")
    batches = _record_batches(monkeypatch)
    node = _node()
    a = train_round(node, _weights(_job(tmp_path, "a")), _job(tmp_path, "a"), tmp_path / "s1", 1)
    k = len(batches)
    train_round(node, _weights(_job(tmp_path, "a")), _job(tmp_path, "a"), tmp_path / "s2", 1)
    assert batches[:k] == batches[k:]
    assert a.metrics["reproducible"] == 1.0


def test_batch_sizes_follow_binomial_n_q():
    """Poisson sampling: every row independently with probability q, so |batch| ~ Binomial(n, q)."""
    n, batch = 2000, 50
    dataset = torch.utils.data.TensorDataset(torch.zeros(n, 2), torch.zeros(n))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    model = build_model("logreg", 2, seed=0)
    session = PrivateTraining(noise_multiplier=1.0, max_grad_norm=1.0)
    private = session.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    q = batch / n
    sizes = np.array([len(xb) for _ in range(60) for xb, _ in private.loader])
    assert len(sizes) == 60 * (n // batch)
    # chi-square goodness of fit against Binomial(n, q), tails pooled
    k = np.arange(sizes.max() + 2)
    lo, hi = int(stats.binom.ppf(0.005, n, q)), int(stats.binom.ppf(0.995, n, q))
    edges = [-0.5, *np.arange(lo, hi + 1) + 0.5, n + 0.5]
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(stats.binom.cdf(np.array(edges), n, q)) * len(sizes)
    assert expected.min() > 1
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(stats.chi2.sf(chi2, len(observed) - 1))
    assert p_value > 1e-6, (chi2, p_value, k)
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / len(sizes))


@pytest.mark.parametrize("draw", range(2))
def test_a_fresh_wrap_never_reuses_the_loaders_generator(draw):
    """The loader handed to `wrap` may carry a seeded generator (the job's): it is not used."""
    n = 500
    dataset = torch.utils.data.TensorDataset(torch.arange(n, dtype=torch.float32)[:, None],
                                             torch.zeros(n))
    seeded = torch.utils.data.DataLoader(dataset, batch_size=25, shuffle=True,
                                         generator=torch.Generator().manual_seed(draw))
    seen = []
    for _ in range(2):
        model = build_model("logreg", 1, seed=0)
        private = PrivateTraining(noise_multiplier=1.0, max_grad_norm=1.0).wrap(
            model, torch.optim.SGD(model.parameters(), lr=0.1), seeded)
        seen.append([sorted(xb[:, 0].int().tolist()) for xb, _ in private.loader])
    assert seen[0] != seen[1]
