"""Secure aggregation (Flower SecAgg+) as a job option, checked against the plain FedAvg path.

Two real Flower simulations of the same DP job on telco churn (3 partners, fixed seeds): one on the
Message API, one under SecAgg+. During the SecAgg+ run every reply the coordinator receives is
captured, and so is what the coordinator's strategy is handed to aggregate. Each partner's true
update is recomputed with the same `train_round` (training is deterministic given the seeds; the
recomputation is validated by its weighted mean matching the unmasked aggregate), so the tests can
look for it in everything the coordinator saw.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedpact.audit import EventType, Ledger
from fedpact.errors import FedpactError
from fedpact.federation import secagg
from fedpact.federation.coordinator import JobFailed, partner_datasets, run_job
from fedpact.federation.job import JobConfig
from fedpact.federation.local_round import pipeline_for, train_round
from fedpact.federation.node_data import load_node_data
from fedpact.federation.simulation import run_simulated_job
from fedpact.models.networks import build_model
from fedpact.privacy.accounting import AccountantState, AccountantStore
from fedpact.privacy.budget import PrivacyBudgets

pytestmark = [pytest.mark.slow]

ROUNDS = 3
JOB = dict(dataset="telco", partitioning="segment", num_partitions=3, rounds=ROUNDS, batch_size=256,
           learning_rate=0.3, target_epsilon=1.0, target_delta=1e-5, membership_audit=False, seed=0,
           require_consent=False)
# One partner's quantisation error is at most one level, 2·8/2²² ≈ 3.8e-6 per weight.
LEVEL = 2 * secagg.SECAGG_CLIPPING_RANGE / secagg.SECAGG_QUANTIZATION_RANGE


def with_budgets(job: JobConfig) -> JobConfig:
    Path(job.home).mkdir(parents=True, exist_ok=True)
    with Ledger.open(job.ledger_path) as ledger:
        for name in partner_datasets(job):
            PrivacyBudgets(ledger).set(name, 3.0, 1e-4, actor="partner_admin:test")
    return job


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


class InProcessGrid(Grid):
    """A Grid that hands each message (a deep copy, as the wire would) to a ClientApp in this process.

    One persistent Context per node, so SecAgg+'s per-node state survives its four stages. An
    exception in the ClientApp becomes an error reply, as in Flower's simulation engine.
    """

    def __init__(self, client_app, node_configs: list[dict]):
        self.client_app = client_app
        self.contexts = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config=dict(cfg),
                                           state=RecordDict(), run_config={})
                         for i, cfg in enumerate(node_configs)}
        self._run = Run.create_empty(1)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("InProcessGrid delivers with send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("InProcessGrid delivers with send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            delivered = copy.deepcopy(msg)
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - what Flower's engine does, too
                reply = Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=delivered)
            replies.append(copy.deepcopy(reply))
        return replies


@pytest.fixture
def in_process(monkeypatch):
    """Flower stamps messages with the current process' task identity; give it one (run 1)."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def in_process_secagg_job(job: JobConfig, ledger: Ledger, **kwargs):
    """`run_job` under SecAgg+ with the partners' ClientApps in this process (no Ray)."""
    grid = InProcessGrid(secagg.secagg_client_app,
                         [{"partition-id": i, "num-partitions": job.num_partitions}
                          for i in range(job.num_partitions)])
    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return run_job(grid, job, ledger, rounds=functools.partial(secagg.secagg_rounds,
                                                               context=server_context), **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same DP job on the Message API and under SecAgg+, with what the coordinator saw."""
    plain = with_budgets(JobConfig(**JOB, home=str(tmp_path_factory.mktemp("plain"))))
    secure = with_budgets(JobConfig(**JOB, secure_aggregation=True,
                                    home=str(tmp_path_factory.mktemp("secagg"))))
    timings: dict[str, list[float]] = {"plain": [], "secagg": []}

    def clock(label):
        start = time.monotonic()
        return lambda r, entry: timings[label].append(time.monotonic() - start)

    plain_result = run_simulated_job(plain, on_round=clock("plain"))

    replies: list[Message] = []  # every reply the coordinator received
    handed: dict[int, list] = {}  # round -> what the strategy's aggregate_fit was given
    original_fit = secagg.SecAggFedAvg.aggregate_fit

    def spy(self, server_round, results, failures):
        handed[server_round] = [(proxy.node_id, fitres.num_examples,
                                 [np.array(a) for a in fitres_arrays(fitres)])
                                for proxy, fitres in results]
        return original_fit(self, server_round, results, failures)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(secagg.SecAggFedAvg, "aggregate_fit", spy)
        mp.setattr(secagg, "make_secagg_server_app",
                   functools.partial(secagg.make_secagg_server_app, on_reply=replies.append))
        secure_result = run_simulated_job(secure, on_round=clock("secagg"))

    # Each partner's true update per round, from the global weights it was sent (round 1: the
    # initial model; round r+1: round r's aggregate), recomputed with the same train_round.
    nodes = [load_node_data({"partition-id": i}, secure) for i in range(secure.num_partitions)]
    keys = secagg.weight_keys(secure)
    n_features = pipeline_for(nodes[0]).n_features
    global_weights = {1: [v.numpy() for v in build_model(secure.model, n_features,
                                                         seed=secure.seed).state_dict().values()]}
    for r in range(1, ROUNDS):
        global_weights[r + 1] = handed[r][0][2]
    truth: dict[tuple[str, int], tuple[int, list[np.ndarray]]] = {}
    for r in range(1, ROUNDS + 1):
        for node in nodes:
            with tempfile.TemporaryDirectory() as state_dir:
                update = train_round(node, dict(zip(keys, global_weights[r], strict=True)), secure,
                                     Path(state_dir), r)
            truth[(node.partner, r)] = (update.rows, [update.weights[k].numpy() for k in keys])
    return dict(plain=plain, secure=secure, plain_result=plain_result,
                secure_result=secure_result, replies=replies, handed=handed, truth=truth,
                timings=timings, global_weights=global_weights)


def fitres_arrays(fitres):
    return parameters_to_ndarrays(fitres.parameters)


def weighted_mean(truth, r):
    items = [(rows, flat(w)) for (name, rr), (rows, w) in truth.items() if rr == r]
    total = sum(rows for rows, _ in items)
    return sum(rows * w for rows, w in items) / total, np.mean([w for _, w in items], axis=0)


def masked_vectors(replies):
    """(node id, masked int vector) for every SecAgg+ collect-masked-vectors reply, in order."""
    out = []
    for reply in replies:
        if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
            continue
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in record:
            vec = np.concatenate([bytes_to_ndarray(b).ravel() for b in record[Key.MASKED_PARAMETERS]])
            out.append((reply.metadata.src_node_id, vec.astype(np.int64)))
    return out


def unmasked_quantised(rows: int, weights, max_weight: float) -> np.ndarray:
    """What SecAgg+ would send for this update with no masks: [factor, quantised(weights·factor)]."""
    q_ratio = round(rows / max_weight * secagg.SECAGG_QUANTIZATION_RANGE)
    scaled = [np.asarray(w, np.float64) * (q_ratio / secagg.SECAGG_QUANTIZATION_RANGE) for w in weights]
    quantised = quantize(scaled, secagg.SECAGG_CLIPPING_RANGE, secagg.SECAGG_QUANTIZATION_RANGE)
    return np.concatenate([[q_ratio]] + [q.ravel() for q in quantised]).astype(np.int64)


def looks_like(vector: np.ndarray, candidate: np.ndarray) -> bool:
    """True if `vector` is `candidate` in the clear (up to stochastic rounding) or correlates with it."""
    diff = (vector - candidate) % secagg.SECAGG_MODULUS_RANGE
    diff = np.minimum(diff, secagg.SECAGG_MODULUS_RANGE - diff)
    same = diff.max() <= 1
    body_v, body_c = vector[1:].astype(np.float64), candidate[1:].astype(np.float64)
    corr = np.corrcoef(body_v, body_c)[0, 1] if body_v.std() > 0 and body_c.std() > 0 else 0.0
    return bool(same or abs(corr) > 0.7)


def test_coordinator_never_receives_an_individual_update(runs):
    """No reply carries a partner's weights; every masked vector is unrelated to every true update.

    The detector is shown to work: applied to the vector a partner would send without masks, it
    fires — so this test fails if the masking were bypassed.
    """
    replies, truth, secure = runs["replies"], runs["truth"], runs["secure"]
    assert replies, "the reply tap saw nothing"
    float_arrays = [a for r in replies if not r.has_error()
                    for rec in r.content.array_records.values() for a in rec.values()]
    assert float_arrays == [], "a reply carried model arrays in the clear"

    masked = masked_vectors(replies)
    assert len(masked) == secure.num_partitions * ROUNDS
    max_weight = float(sum(p.train_rows for p in runs["secure_result"].partners))
    candidates = {key: unmasked_quantised(rows, w, max_weight) for key, (rows, w) in truth.items()}
    for key, candidate in candidates.items():
        assert looks_like(candidate, candidate)  # positive control: an unmasked vector is caught
        rows, w = truth[key]
        assert looks_like(unmasked_quantised(rows, w, max_weight), candidate)  # fresh rounding too
    for node_id, vector in masked:
        assert vector.shape == next(iter(candidates.values())).shape
        for key, candidate in candidates.items():
            assert not looks_like(vector, candidate), f"masked vector of node {node_id} reveals {key}"
    # Masked entries look uniform on [0, 2^32): their mean is near 2^31, far from the ≈2^21 of
    # quantised weights.
    entries = np.concatenate([v for _, v in masked]).astype(np.float64)
    assert 0.35 < entries.mean() / secagg.SECAGG_MODULUS_RANGE < 0.65


def test_strategy_is_handed_only_the_weighted_sum(runs):
    """aggregate_fit gets one identical array set per partner: the row-weighted mean, not an update."""
    handed, truth = runs["handed"], runs["truth"]
    assert sorted(handed) == list(range(1, ROUNDS + 1))
    for r, results in handed.items():
        first = flat(results[0][2])
        for _, _, arrays in results[1:]:
            assert np.array_equal(flat(arrays), first)
        weighted, unweighted = weighted_mean(truth, r)
        tolerance = 3 * LEVEL + 1e-6
        error = np.abs(first - weighted).max()
        print(f"\nround {r}: |SecAgg+ sum - weighted mean of true updates| max {error:.2e} "
              f"(bound {tolerance:.2e}); unweighted mean is {np.abs(first - unweighted).max():.2e} away")
        assert error <= tolerance, (r, error)
        # Sensitive: the unweighted mean and each single update are far away.
        assert np.abs(first - unweighted).max() > 100 * tolerance
        for (name, rr), (_, w) in truth.items():
            if rr == r:
                assert np.abs(first - flat(w)).max() > 100 * tolerance, (name, r)


def test_secagg_model_matches_plain_fedavg(runs):
    """Same seeds, same DP: the SecAgg+ model equals the Message-API model up to quantisation."""
    plain = torch.load(runs["plain_result"].model_path, weights_only=False)["state_dict"]
    secure = torch.load(runs["secure_result"].model_path, weights_only=False)["state_dict"]
    diff = max((plain[k] - secure[k]).abs().max().item() for k in plain)
    # Per round ≤ 3 levels; three rounds of training from slightly different starts.
    assert diff < 2e-4, diff
    weighted, unweighted = weighted_mean(runs["truth"], 1)
    assert diff < 0.01 * np.abs(weighted - unweighted).max()  # far below what weighting changes
    for a, b in zip(runs["plain_result"].rounds, runs["secure_result"].rounds, strict=True):
        assert ("roc_auc" in a) == ("roc_auc" in b)  # the same evaluation rounds
        if "roc_auc" in a:
            assert a["roc_auc"] == pytest.approx(b["roc_auc"], abs=1e-3)
        assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-9)
    eps_plain = {p.name: p.epsilon for p in runs["plain_result"].partners}
    for p in runs["secure_result"].partners:
        assert p.epsilon == pytest.approx(eps_plain[p.name], rel=1e-9)
    t = runs["timings"]
    print(f"\nfinal models differ by at most {diff:.2e}; round end times (s since start): "
          f"plain {[round(x, 2) for x in t['plain']]}, secagg {[round(x, 2) for x in t['secagg']]}")


def test_secagg_ledger_and_privacy_accounting(runs):
    """Under SecAgg+ the ledger still has every node's access, each round, the ε spent per dataset."""
    job, result = runs["secure"], runs["secure_result"]
    with Ledger.open(job.ledger_path) as ledger:
        assert ledger.verify().ok
        events = ledger.events(job_id=job.job_id)
        budgets = PrivacyBudgets(ledger).all()
    kinds = [e.event_type for e in events]
    assert kinds[0] == EventType.JOB_CREATED.value and kinds[-1] == EventType.JOB_FINISHED.value
    assert events[0].payload["config"]["secure_aggregation"] is True
    assert kinds.count(EventType.ROUND_AGGREGATED.value) == ROUNDS
    # The ledger states what ran (the records read it from here), round by round and at the end.
    assert all(e.payload["secure_aggregation"] is True for e in events
               if e.event_type in (EventType.ROUND_AGGREGATED.value, EventType.JOB_FINISHED.value))
    access = [e for e in events if e.event_type == EventType.DATA_ACCESSED.value]
    # Training every round; evaluation (a DP release) only in the job's evaluation rounds.
    evals = job.evaluation_rounds()
    assert evals == [ROUNDS]
    assert len(access) == job.num_partitions * (ROUNDS + len(evals))
    assert {(e.payload["phase"], e.payload["round"]) for e in access} == {
        ("train", r) for r in range(1, ROUNDS + 1)} | {("evaluate", r) for r in evals}
    assert {e.payload["node"] for e in access} == {p.name for p in result.partners}
    for p in result.partners:
        assert 0 < p.epsilon <= job.target_epsilon
        state = AccountantStore(Path(job.home) / "nodes" / p.name.replace("/", "_") / "accountants"
                                ).load(job.job_id, p.name)
        assert state.rounds_done == list(range(1, ROUNDS + 1))
        assert state.epsilon() == pytest.approx(p.epsilon, rel=1e-9)
        assert budgets[p.name].jobs[job.job_id] == pytest.approx(p.epsilon, rel=1e-9)
        assert budgets[p.name].delta_spent == pytest.approx(job.target_delta)
        assert p.epsilon_google_rdp == pytest.approx(p.epsilon, rel=0.02)
    eps = [r["epsilon"] for r in result.rounds]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert result.final["roc_auc"] > 0.75


def test_refusing_partner_fails_the_secagg_job(tmp_path, in_process):
    """A partner that refuses a round (already trained: no double spending) stops the job with its
    reason in `job.failed`, instead of SecAgg+ silently skipping the round."""
    job = with_budgets(JobConfig(**{**JOB, "rounds": 2}, secure_aggregation=True, home=str(tmp_path)))
    node = load_node_data({"partition-id": 1}, job)
    store = AccountantStore(tmp_path / "nodes" / node.partner.replace("/", "_") / "accountants")
    store.save(AccountantState(job_id=job.job_id, dataset=node.partner, accountant="rdp",
                               target_epsilon=1.0, delta=job.target_delta, noise_multiplier=2.0,
                               sample_rate=0.1, planned_steps=20, history=[(2.0, 0.1, 10)],
                               rounds_done=[1]))
    with Ledger.open(job.ledger_path) as ledger, pytest.raises(JobFailed) as err:
        in_process_secagg_job(job, ledger)
    assert "secure aggregation halted" in str(err.value)
    assert node.partner in str(err.value) and "already trained" in str(err.value)
    with Ledger.open(job.ledger_path) as ledger:
        kinds = [e.event_type for e in ledger.events(job_id=job.job_id)]
    assert kinds[-1] == EventType.JOB_FAILED.value
    assert EventType.ROUND_AGGREGATED.value not in kinds


def test_strategy_refuses_individual_updates(tmp_path):
    """If SecAgg+ were not in effect, the strategy would get distinct updates: it refuses them."""
    job = JobConfig(**JOB, secure_aggregation=True, home=str(tmp_path))

    class Proxy:
        def __init__(self, node_id):
            self.node_id = node_id

    from flwr.common import Code, FitRes, Status

    with Ledger.open(job.ledger_path) as ledger:
        strategy = secagg.SecAggFedAvg(job, ledger, {1: "a", 2: "b"}, None, [np.zeros(3)],
                                       ["w"], 10.0)
        results = [(Proxy(i), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(3, i, float)]),
                                     5, {})) for i in (1, 2)]
        with pytest.raises(FedpactError, match="secure aggregation is not in effect"):
            strategy.aggregate_fit(1, results, [])


def test_partner_refuses_weights_outside_the_quantisation_range():
    """Weights SecAgg+ would clip are refused, not silently corrupted."""
    config = {"secagg-max-weight": 100.0, "secagg-clipping-range": 8.0}
    secagg._check_quantisation_range([np.array([20.0])], 30, config)  # 20 × 0.3 = 6 ≤ 8
    with pytest.raises(FedpactError, match="clipping range"):
        secagg._check_quantisation_range([np.array([30.0])], 30, config)  # 9 > 8


def test_job_setting_validation():
    from fedpact.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="num_partitions"):
        JobConfig(dataset="telco", num_partitions=1, secure_aggregation=True).validate()
    assert JobConfig.from_config({"secure-aggregation": "true"}).secure_aggregation is True


def test_partner_refuses_secagg_requests_that_could_unmask_it(in_process):
    """A coordinator deviating from the protocol (weaker threshold, a partner listed both active and
    dropped, padded lists) is refused; the honest requests pass."""
    from flwr.app import ConfigRecord, MessageType
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    def request(config):
        return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config)}), dst_node_id=1,
                       message_type=MessageType.TRAIN)

    def ask(config):
        return secagg.secagg_request_guard(request(config), None, lambda m, c: "answered")

    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 3}
    assert ask(setup) == "answered"
    with pytest.raises(FedpactError, match="threshold of 2 of 3"):
        ask({**setup, Key.THRESHOLD: 2})
    unmask = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: []}
    assert ask(unmask) == "answered"
    with pytest.raises(FedpactError, match="could unmask"):
        ask({**unmask, Key.ACTIVE_NODE_ID_LIST: [3, 3, 3], Key.DEAD_NODE_ID_LIST: [3]})
    with pytest.raises(FedpactError, match="could unmask"):
        ask({**unmask, Key.ACTIVE_NODE_ID_LIST: [1, 1, 2]})
    # Other stages and non-SecAgg+ messages pass untouched.
    assert ask({Key.STAGE: Stage.SHARE_KEYS}) == "answered"
