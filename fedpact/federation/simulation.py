"""Run a federated job in Flower's simulation engine: N virtual partner nodes on this machine."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from fedpact.errors import FedpactError
from fedpact.models.datasets import BUILTIN_SPECS, load_dataset
from fedpact.privacy.node_policy import NodePolicy, simulated_policy_path
from fedpact.privacy.releases import NON_PRIVATE_MODEL

from .coordinator import JobFailed, JobResult
from .job import JobConfig

FLOWER_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


def prepare_flower_env(home: str | Path) -> None:
    """Offline-safe Flower settings, with FLWR_HOME inside fedpact's own run folder."""
    for key, value in FLOWER_OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    flwr_home = Path(home).resolve() / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(flwr_home)


def allow_without_dp(job: JobConfig, who: str) -> NodePolicy:
    """The simulated nodes' policy for a job without DP: the default limits, plus the
    non-private model release, allowed by `who` (recorded in the file it is written to)."""
    return NodePolicy().allowing(NON_PRIVATE_MODEL, source=f"written for job {job.job_id}: {who}")


def run_simulated_job(job: JobConfig, on_round: Callable[[int, dict], None] | None = None,
                      *, quiet: bool = True, node_policy: NodePolicy | None = None) -> JobResult:
    """Run `job` with one simulated SuperNode per partition; return the coordinator's result.

    The operator of a simulation runs every simulated node: `node_policy`, when given, is the
    policy those nodes apply to this job (written to `simulated_policy_path`); a job without
    DP needs one that allows the non-private model release (`allow_without_dp`)."""
    from fedpact.audit import Ledger

    from .coordinator import admit_job, resumable

    # Pre-flight on this machine (it hosts every simulated node): fail before starting Ray.
    if job.dataset in BUILTIN_SPECS:
        load_dataset(job.dataset)
    # Admission (settings + privacy budgets) before anything starts; a refusal is written to the ledger.
    Path(job.home).mkdir(parents=True, exist_ok=True)
    with Ledger.open(job.ledger_path) as ledger:
        if not resumable(job, ledger):  # a resumed job was admitted when it was created
            admit_job(job, ledger)
    if node_policy is not None:
        node_policy.write(simulated_policy_path(job.home, job.job_id))
    prepare_flower_env(job.home)
    from flwr.simulation import run_simulation

    results: list[JobResult] = []
    if job.secure_aggregation:  # Flower SecAgg+ (older API): fedpact.federation.secagg
        from .secagg import make_secagg_server_app, secagg_client_app

        server_app = make_secagg_server_app(job, results=results, on_round=on_round)
        client_app = secagg_client_app
    else:
        from .client_app import app as client_app
        from .server_app import make_server_app

        server_app = make_server_app(job, results=results, on_round=on_round)
    cpus = max(1, os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": min(cpus, job.num_partitions), "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": not quiet},
    }
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    if quiet:
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=job.num_partitions,
                backend_config=backend_config,
            )
    except FedpactError:
        raise
    except Exception as exc:  # the simulation engine re-raises the ServerApp's failure
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, FedpactError):
            cause = cause.__cause__
        if isinstance(cause, FedpactError):
            raise cause from None
        raise JobFailed(f"simulation of job {job.job_id} failed: {exc}") from exc
    finally:
        flwr_logger.setLevel(previous)
    if not results:
        raise JobFailed(f"job {job.job_id} ended without a result; see {job.ledger_path} for its events")
    return results[0]
