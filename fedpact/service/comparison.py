"""A federated job next to its non-federated references, measured on the same partner splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpact.federation.coordinator import JobResult
from fedpact.federation.job import JobConfig
from fedpact.federation.node_data import load_node_data
from fedpact.federation.simulation import run_simulated_job
from fedpact.models.baselines import BaselineReport, compare_baselines
from fedpact.models.networks import build_model
from fedpact.models.training import make_loader, make_optimizer, run_epochs
from fedpact.privacy.accounting import plan_noise_multiplier
from fedpact.privacy.dp_sgd import PrivateTraining


@dataclass
class JobComparison:
    job: JobConfig
    result: JobResult
    baselines: BaselineReport
    partner_names: list[str]
    partner_positive_rates: list[float]
    # The delivered model scored on every partner's held-out rows, as the references are: only
    # a simulation's operator, who holds every partner's rows, can compute it (the job itself
    # releases DP histograms, `result.final`). Empty if it could not be computed.
    federated_exact: dict | None = None


def exact_pooled_metrics(job: JobConfig, result: JobResult, nodes) -> dict:
    """The delivered model's metrics on the pooled held-out rows (no release: local measurement)."""
    from fedpact.federation.local_round import _scores, model_from_weights, pipeline_for
    from fedpact.models.metrics import evaluate_scores

    saved = torch.load(result.model_path, weights_only=False)
    model = model_from_weights(saved["state_dict"], pipeline_for(nodes[0]).n_features, job)
    y = np.concatenate([n.test.labels for n in nodes])
    scores = np.concatenate([_scores(model, pipeline_for(n), n.test) for n in nodes])
    return evaluate_scores(y, scores)


def private_local_fit(job: JobConfig) -> Callable[[np.ndarray, np.ndarray], nn.Module]:
    """DP-SGD on one partner alone with the job's ε, δ, batch, learning rate and number of epochs."""
    epochs = job.rounds * job.local_epochs

    def fit(X: np.ndarray, y: np.ndarray) -> nn.Module:
        torch.manual_seed(job.seed)
        model = build_model(job.model, X.shape[1], seed=job.seed)
        loader = make_loader(X, y, job.batch_size, seed=job.seed)
        sigma = plan_noise_multiplier(job.target_epsilon, job.target_delta, 1.0 / len(loader),
                                      epochs * len(loader), job.accountant)
        session = PrivateTraining(noise_multiplier=sigma, max_grad_norm=job.max_grad_norm,
                                  accountant=job.accountant, grad_sample_mode=job.grad_sample_mode)
        private = session.wrap(model, make_optimizer(model, job.learning_rate), loader)
        run_epochs(private.model, private.optimizer, private.loader, epochs, loss_fn=private.loss_fn)
        return model

    return fit


def run_with_baselines(job: JobConfig, on_round: Callable[[int, dict], None] | None = None,
                       on_baselines: Callable[[], None] | None = None, *,
                       node_policy=None) -> JobComparison:
    """Run `job` in simulation, then train the references on exactly the partners' own splits."""
    result = run_simulated_job(job, on_round, node_policy=node_policy)
    nodes = [load_node_data({"partition-id": i}, job) for i in range(job.num_partitions)]
    # Non-private references use plain-SGD defaults (tuned for it), not the DP job's settings;
    # the private partner-alone references use exactly the job's DP settings.
    baselines = compare_baselines([n.train for n in nodes], [n.test for n in nodes],
                                  kind=job.model, seed=job.seed,
                                  private_fit=private_local_fit(job) if job.dp else None)
    if on_baselines:
        on_baselines()
    return JobComparison(job, result, baselines, [n.partner for n in nodes],
                         [n.train.positive_rate for n in nodes],
                         exact_pooled_metrics(job, result, nodes))
