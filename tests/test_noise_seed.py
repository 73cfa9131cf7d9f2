"""DP noise and batch sampling must not be recomputable by the coordinator: a node's round seed
comes from the OS unless the node itself opts into reproducible noise (tests, benchmarks)."""

from __future__ import annotations

import numpy as np
import torch

from fedpact.federation.job import JobConfig
from fedpact.federation.local_round import REPRODUCIBLE_NOISE_ENV, round_seed, train_round
from fedpact.federation.node_data import load_node_data
from fedpact.models.networks import build_model


def _update(tmp_path, name: str) -> dict:
    job = JobConfig(dataset="telco", partitioning="segment", rounds=2, batch_size=256,
                    job_id="job-noise", home=str(tmp_path / name), require_consent=False)
    node = load_node_data({"partition-id": 0}, job)
    from fedpact.federation.local_round import pipeline_for

    weights = build_model(job.model, pipeline_for(node).n_features, seed=0).state_dict()
    update = train_round(node, weights, job, tmp_path / name / "state", 1)
    return {k: v.numpy().copy() for k, v in update.weights.items()}


def test_noise_seed_is_fresh_randomness_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(REPRODUCIBLE_NOISE_ENV, raising=False)
    job = JobConfig(dataset="telco")
    assert round_seed(job, 1, 1000) != round_seed(job, 1, 1000)
    first, second = _update(tmp_path, "a"), _update(tmp_path, "b")
    # Same job, same data, same global model: only the noise (and sampling) differ.
    assert any(not np.allclose(first[k], second[k]) for k in first)


def test_reproducible_noise_only_when_the_node_opts_in(tmp_path, monkeypatch):
    monkeypatch.setenv(REPRODUCIBLE_NOISE_ENV, "1")
    torch.manual_seed(123)
    first = _update(tmp_path, "c")
    torch.manual_seed(456)
    second = _update(tmp_path, "d")
    assert all(np.array_equal(first[k], second[k]) for k in first)
