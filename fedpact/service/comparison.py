"""A federated job next to its non-federated references, measured on the same partner splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedpact.federation.coordinator import JobResult
from fedpact.federation.job import JobConfig
from fedpact.federation.node_data import load_node_data
from fedpact.federation.simulation import run_simulated_job
from fedpact.models.baselines import BaselineReport, compare_baselines


@dataclass
class JobComparison:
    job: JobConfig
    result: JobResult
    baselines: BaselineReport
    partner_names: list[str]
    partner_positive_rates: list[float]


def run_with_baselines(job: JobConfig, on_round: Callable[[int, dict], None] | None = None,
                       on_baselines: Callable[[], None] | None = None) -> JobComparison:
    """Run `job` in simulation, then train the references on exactly the partners' own splits."""
    result = run_simulated_job(job, on_round)
    nodes = [load_node_data({"partition-id": i}, job) for i in range(job.num_partitions)]
    # References use the non-private training defaults (tuned for plain SGD), not the DP job's.
    baselines = compare_baselines([n.train for n in nodes], [n.test for n in nodes],
                                  kind=job.model, seed=job.seed)
    if on_baselines:
        on_baselines()
    return JobComparison(job, result, baselines, [n.partner for n in nodes],
                         [n.train.positive_rate for n in nodes])
