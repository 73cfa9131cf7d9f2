"""Optional central (client-level) DP with Flower's fixed-clipping wrappers, on both paths.

The jobs run with the partners' ClientApps in this process (`InProcessGrid` from test_secagg): the
same coordinator, strategies, Flower wrappers and mods as in a simulation, without Ray's start-up.
What the wrappers do is observed directly: the updates the averaging step is handed (clipped?),
and the difference between what it returned and what the wrapper released (noise of the stated std).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType, RecordDict
from flwr.common import parameters_to_ndarrays
from test_secagg import InProcessGrid, in_process, in_process_secagg_job  # noqa: F401

from fedpact.audit import EventType, Ledger
from fedpact.errors import ConfigurationError
from fedpact.federation import central_dp, secagg
from fedpact.federation.client_app import app as message_api_client_app
from fedpact.federation.coordinator import JobResult, run_job
from fedpact.federation.job import JobConfig
from fedpact.federation.strategy import AuditedFedAvg, RoundFailed
from fedpact.privacy.crosscheck import cross_check

pytestmark = [pytest.mark.slow]

ROUNDS = 3
NOISE, CLIP = 0.5, 0.2  # typical first-round update norms here are ≈ 1-1.5, so clipping bites
JOB = dict(dataset="telco", partitioning="segment", num_partitions=3, rounds=ROUNDS, batch_size=256,
           learning_rate=0.3, dp=False, membership_audit=False, seed=0, target_delta=1e-5,
           central_dp_noise=NOISE, central_dp_clip=CLIP, require_consent=False)


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def node_configs(job):
    """Simulated nodes whose own policy allows this job's non-private (central-DP only) updates."""
    from pathlib import Path

    from fedpact.federation.simulation import allow_without_dp

    policy = allow_without_dp(job, "test of server-side DP").write(Path(job.home) / "policy.toml")
    return [{"partition-id": i, "num-partitions": job.num_partitions, "policy": str(policy)}
            for i in range(job.num_partitions)]


def check_noise(released: list[np.ndarray], averaged: list[np.ndarray], job: JobConfig) -> float:
    """The released aggregates minus the averages: Gaussian noise of std σ·C/n (all rounds pooled)."""
    noise = np.concatenate([r - a for r, a in zip(released, averaged, strict=True)])
    expected = job.central_dp_noise * job.central_dp_clip / job.num_partitions
    assert 0.75 * expected < noise.std() < 1.25 * expected, (noise.std(), expected)
    assert abs(noise.mean()) < 4 * expected / np.sqrt(noise.size)
    return float(noise.std())


def check_result(job: JobConfig, result: JobResult, clipping: str) -> None:
    rows = {p.name: p.train_rows for p in result.partners}
    central = result.central_dp
    assert central["clipping"] == clipping
    assert central["noise_std"] == pytest.approx(NOISE * CLIP / 3)
    # Row-weighted FedAvg: the heaviest partner moves the aggregate by C·w_max/W > C/n, so the
    # effective noise multiplier is below the nominal one.
    eff = NOISE * sum(rows.values()) / (3 * max(rows.values()))
    assert central["effective_noise_multiplier"] == pytest.approx(eff) and eff < NOISE
    # Gaussian mechanism, every partner every round (q = 1), composed over the rounds; Google's
    # dp-accounting agrees.
    google = cross_check([(eff, 1.0, ROUNDS)], job.target_delta, central["client_level_epsilon"])
    assert google.google_rdp == pytest.approx(central["client_level_epsilon"], rel=0.02)
    assert central["client_level_epsilon"] > 20  # σ = 0.5 buys next to nothing at client level
    with Ledger.open(job.ledger_path) as ledger:
        assert ledger.verify().ok
        events = ledger.events(job_id=job.job_id)
    kinds = [e.event_type for e in events]
    assert kinds.count(EventType.ROUND_AGGREGATED.value) == ROUNDS
    evals = len(job.evaluation_rounds())  # evaluation (a DP release) after the last round only
    assert kinds.count(EventType.DATA_ACCESSED.value) == 3 * (ROUNDS + evals)
    assert events[-1].event_type == EventType.JOB_FINISHED.value
    assert events[-1].payload["central_dp"]["client_level_epsilon"] == pytest.approx(
        central["client_level_epsilon"])


@pytest.mark.usefixtures("in_process")
def test_server_side_clipping_and_noise_on_message_api(tmp_path, monkeypatch):
    """Message API: Flower's DifferentialPrivacyServerSideFixedClipping around AuditedFedAvg."""
    np.random.seed(20261123)  # Flower draws the noise from numpy's global generator
    job = JobConfig(**JOB, home=str(tmp_path))
    handed, averaged, released, norms = [], [], [], []
    inner = AuditedFedAvg.aggregate_train
    outer = central_dp.AuditedServerSideClipping.aggregate_train

    def spy_inner(self, server_round, replies):
        replies = list(replies)
        handed.append([flat(m.content["arrays"].to_numpy_ndarrays()) for m in replies])
        arrays, metrics = inner(self, server_round, replies)
        averaged.append(flat(arrays.to_numpy_ndarrays()))
        return arrays, metrics

    def spy_outer(self, server_round, replies):
        current = flat(self.current_arrays.to_numpy_ndarrays())
        arrays, metrics = outer(self, server_round, replies)
        released.append(flat(arrays.to_numpy_ndarrays()))
        norms.append([np.linalg.norm(update - current) for update in handed[-1]])
        return arrays, metrics

    monkeypatch.setattr(AuditedFedAvg, "aggregate_train", spy_inner)
    monkeypatch.setattr(central_dp.AuditedServerSideClipping, "aggregate_train", spy_outer)
    grid = InProcessGrid(message_api_client_app, node_configs(job))
    with Ledger.open(job.ledger_path) as ledger:
        result = run_job(grid, job, ledger)
    assert len(released) == len(norms) == ROUNDS
    # Every update the average saw was within the clip; in round 1 (where the unclipped updates
    # are > 2·CLIP, see below) each one was cut to exactly the clipping norm.
    assert max(max(n) for n in norms) <= CLIP * (1 + 1e-5)
    assert norms[0] == pytest.approx([CLIP] * 3, rel=1e-5)
    check_noise(released, averaged, job)
    check_result(job, result, "server-side")


@pytest.mark.usefixtures("in_process")
def test_client_side_clipping_and_noise_under_secagg(tmp_path, monkeypatch):
    """SecAgg+: each partner clips with Flower's fixedclipping_mod before masking; the server adds
    noise to the unmasked sum with Flower's legacy DifferentialPrivacyClientSideFixedClipping."""
    np.random.seed(20261123)  # the noise and SecAgg+'s stochastic rounding use numpy's generator
    job = JobConfig(**JOB, secure_aggregation=True, home=str(tmp_path))
    from fedpact.federation.simulation import allow_without_dp
    from fedpact.privacy.node_policy import simulated_policy_path

    allow_without_dp(job, "test of client-side clipping").write(simulated_policy_path(job.home, job.job_id))
    sums, released, globals_ = [], [], []
    inner = secagg.SecAggFedAvg.aggregate_fit

    def spy(self, server_round, results, failures):
        sums.append(flat(parameters_to_ndarrays(results[0][1].parameters)))
        return inner(self, server_round, results, failures)

    from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping as Legacy

    outer = Legacy.aggregate_fit

    def spy_outer(self, server_round, results, failures):
        params, metrics = outer(self, server_round, results, failures)
        released.append(flat(parameters_to_ndarrays(params)))
        return params, metrics

    configure = Legacy.configure_fit

    def spy_configure(self, server_round, parameters, client_manager):
        globals_.append(flat(parameters_to_ndarrays(parameters)))
        return configure(self, server_round, parameters, client_manager)

    monkeypatch.setattr(secagg.SecAggFedAvg, "aggregate_fit", spy)
    monkeypatch.setattr(Legacy, "aggregate_fit", spy_outer)
    monkeypatch.setattr(Legacy, "configure_fit", spy_configure)
    with Ledger.open(job.ledger_path) as ledger:
        result = in_process_secagg_job(job, ledger)
    assert len(sums) == len(released) == len(globals_) == ROUNDS
    for total, start in zip(sums, globals_, strict=True):
        # A row-weighted mean of updates clipped to C moves the model by at most C (+ quantisation).
        assert np.linalg.norm(total - start) <= CLIP + 1e-4
    check_noise(released, sums, job)
    check_result(job, result, "client-side (fixedclipping_mod)")


@pytest.mark.usefixtures("in_process")
def test_updates_would_exceed_the_clip_without_it(tmp_path):
    """Sanity for the two tests above: unclipped first-round updates are larger than CLIP."""
    job = JobConfig(**{**JOB, "central_dp_noise": 0.0, "rounds": 1}, home=str(tmp_path))
    norms = []
    original = AuditedFedAvg.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        norms.extend(np.linalg.norm(flat(m.content["arrays"].to_numpy_ndarrays()) - start)
                     for m in replies)
        return original(self, server_round, replies)

    from fedpact.federation.local_round import pipeline_for
    from fedpact.federation.node_data import load_node_data
    from fedpact.models.networks import build_model

    n_features = pipeline_for(load_node_data({"partition-id": 0}, job)).n_features
    start = flat(build_model(job.model, n_features, seed=job.seed).state_dict().values())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AuditedFedAvg, "aggregate_train", spy)
        with Ledger.open(job.ledger_path) as ledger:
            result = run_job(InProcessGrid(message_api_client_app, node_configs(job)), job, ledger)
    assert result.central_dp == {}
    assert min(norms) > 2 * CLIP, norms


@pytest.mark.usefixtures("in_process")
def test_refusal_still_fails_the_round_with_central_dp(tmp_path):
    """Flower's wrapper skips a round with an error reply; fedpact's fails it with the reason."""
    job = JobConfig(**JOB, home=str(tmp_path))
    with Ledger.open(job.ledger_path) as ledger:
        strategy = central_dp.with_central_dp(AuditedFedAvg(job, ledger, {7: "telco-churn/dsl"}), job)
        request = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
        refusal = Message(Error(code=4001, reason="privacy budget: another round would exceed"),
                          reply_to=request)
        with pytest.raises(RoundFailed, match="telco-churn/dsl: privacy budget"):
            strategy.aggregate_train(1, [refusal])


def test_central_dp_settings_are_validated():
    with pytest.raises(ConfigurationError, match="central_dp_noise"):
        JobConfig(dataset="telco", central_dp_noise=-1.0).validate()
    with pytest.raises(ConfigurationError, match="central_dp_clip"):
        JobConfig(dataset="telco", central_dp_noise=1.0, central_dp_clip=0.0).validate()
    off = JobConfig(dataset="telco")
    assert central_dp.with_central_dp(strategy := object(), off) is strategy
    assert central_dp.client_level_privacy(off, {"a": 1}, secure_aggregation=False) == {}
    job = JobConfig.from_config({"central-dp-noise": 1, "central-dp-clip": 2})
    assert isinstance(job.central_dp_noise, float) and job.central_dp_clip == 2.0
