"""Deployment-engine benchmarks (`make bench`): round wall time on loopback vs the simulation.

1. Bank-marketing propensity job (segment split, DP ε=1), 3 partner nodes, 5 rounds:
   fedpact nodes (warm executor, 50 ms polls) vs the same job in Flower's simulation engine vs
   stock Flower nodes (subprocess isolation, 3 s polls) for 3 rounds — all in one run.
   Target: ≤ 2 s per round with 3 nodes on loopback.
2. 10 partner nodes (iid split), 4 rounds: the deployment's round overhead beyond local compute
   (round wall time − Σ over the two phases of the slowest node's ClientApp time). Target ≤ 100 ms.

Round wall time = the median gap between consecutive `round.aggregated` ledger events (round 1,
which includes start-up and the handshake, is left out).
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime
from pathlib import Path

import pytest

from fedpact.audit import EventType, Ledger
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.deployment import submit_job, wait_for_result
from fedpact.federation.job import JobConfig
from fedpact.federation.loopback import LoopbackDeployment
from fedpact.federation.simulation import run_simulated_job
from fedpact.privacy.budget import PrivacyBudgets

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]
RESULTS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    print("\n\n| measure | value | same-run baseline | ratio | target |\n|---|---|---|---|---|")
    print("\n".join(RESULTS))


def _report(name: str, value: str, baseline: str, ratio: str, target: str) -> None:
    line = f"| {name} | {value} | {baseline} | {ratio} | {target} |"
    RESULTS.append(line)
    print("\n" + line, flush=True)


def _round_times(home: Path, job_id: str) -> list[float]:
    with Ledger.open(home / "ledger.db") as ledger:
        events = ledger.events(job_id=job_id, event_type=EventType.ROUND_AGGREGATED.value)
    stamps = [datetime.fromisoformat(ev.timestamp.replace("Z", "+00:00")).timestamp()
              for ev in events]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _budgets(home: Path, job: JobConfig) -> None:
    home.mkdir(parents=True, exist_ok=True)
    with Ledger.open(home / "ledger.db") as ledger:
        for name in partner_datasets(job):
            PrivacyBudgets(ledger).set(name, 100.0, 1e-4, actor=f"admin:{name}")


def _deployment_job(root: Path, job: JobConfig, n: int, data_dir, *, stock: bool = False):
    d = LoopbackDeployment(root, home=Path(job.home)).start()
    try:
        for i in range(n):
            d.register(f"p{i}")
            d.start_node(i, data_dir=data_dir, stock=stock)
        d.wait_connected(n, timeout=600)
        started = time.perf_counter()
        result = wait_for_result(d.connection, job, submit_job(d.connection, job), timeout=3000)
        wall = time.perf_counter() - started
        return result, wall, d, [d.task_log(i) for i in range(n)]
    finally:
        d.stop()


def _job(home: Path, **kw) -> JobConfig:
    settings = dict(dataset="bank", partitioning="segment", num_partitions=3, rounds=5,
                    batch_size=512, learning_rate=0.3, membership_audit=False, home=str(home))
    settings.update(kw)
    job = JobConfig(**settings).validate()
    _budgets(home, job)
    return job


def test_three_node_round_time_vs_simulation_and_stock_flower(tmp_path, shared_data):
    data_dir = Path(shared_data)
    fed = _job(tmp_path / "deploy-home")
    result, wall, _d, _ = _deployment_job(tmp_path / "deploy", fed, 3, data_dir)
    deploy_rounds = _round_times(Path(fed.home), fed.job_id)

    sim = _job(tmp_path / "sim-home")
    started = time.perf_counter()
    sim_result = run_simulated_job(sim)
    sim_wall = time.perf_counter() - started
    sim_rounds = _round_times(Path(sim.home), sim.job_id)

    stock = _job(tmp_path / "stock-home", rounds=3)
    _stock_result, stock_wall, _d, _ = _deployment_job(tmp_path / "stock", stock, 3, data_dir,
                                                       stock=True)
    stock_rounds = _round_times(Path(stock.home), stock.job_id)

    per_round = statistics.median(deploy_rounds)
    sim_round = statistics.median(sim_rounds)
    stock_round = statistics.median(stock_rounds)
    print(f"\ndeployment rounds {[f'{r:.2f}' for r in deploy_rounds]} (job {wall:.1f} s, "
          f"AUC {result.final['roc_auc']:.4f}); simulation {[f'{r:.2f}' for r in sim_rounds]} "
          f"(job {sim_wall:.1f} s, AUC {sim_result.final['roc_auc']:.4f}); stock Flower "
          f"{[f'{r:.2f}' for r in stock_rounds]} (job {stock_wall:.1f} s)")
    _report("bank, 3 nodes: s per round, fedpact nodes on loopback (TLS, node auth)",
            f"{per_round:.2f}", f"simulation {sim_round:.2f}", f"{per_round / sim_round:.2f}×",
            "≤ 2 s")
    _report("bank, 3 nodes: s per round, stock Flower nodes (subprocess isolation)",
            f"{stock_round:.2f}", f"fedpact nodes {per_round:.2f}",
            f"{stock_round / per_round:.1f}× slower", "—")
    # Same job, same seed: the deployment computes what the simulation computes.
    assert result.final["roc_auc"] == pytest.approx(sim_result.final["roc_auc"], abs=1e-6)
    assert result.epsilon == pytest.approx(sim_result.epsilon, rel=1e-9)


def test_ten_node_round_overhead(tmp_path, shared_data):
    job = _job(tmp_path / "home10", partitioning="iid", num_partitions=10, rounds=4,
               batch_size=256)
    _result, wall, _d, logs = _deployment_job(tmp_path / "deploy10", job, 10, Path(shared_data))
    rounds = _round_times(Path(job.home), job.job_id)
    overheads = []
    for number in range(2, job.rounds + 1):  # round k: the k-th train and evaluate of each node
        phases = []
        for kind in ("train", "evaluate"):
            per_node = [[t for t in log if t["message_type"] == kind][number - 1]["compute_seconds"]
                        for log in logs]
            phases.append(max(per_node))
        overheads.append(rounds[number - 2] - sum(phases))
    sim = _job(tmp_path / "sim10", partitioning="iid", num_partitions=10, rounds=4,
               batch_size=256)
    run_simulated_job(sim)
    sim_rounds = _round_times(Path(sim.home), sim.job_id)
    per_round, sim_round = statistics.median(rounds), statistics.median(sim_rounds)
    overhead = statistics.median(overheads)
    print(f"\n10 nodes: rounds {[f'{r:.2f}' for r in rounds]}, overhead "
          f"{[f'{o:.3f}' for o in overheads]} (job {wall:.1f} s); simulation "
          f"{[f'{r:.2f}' for r in sim_rounds]}")
    _report("bank iid, 10 nodes: round overhead beyond local compute (s)", f"{overhead:.3f}",
            f"round {per_round:.2f} s, simulation round {sim_round:.2f} s",
            f"{per_round / sim_round:.2f}× simulation", "≤ 0.100")
