"""Secure aggregation (Flower SecAgg+): the coordinator sees only the sum of the partners' updates.

Flower 1.42 offers SecAgg+ on its older API only, so this module holds a second pair of apps:

- **Server** (`make_secagg_server_app`): the same `coordinator.run_job` (admission, handshake,
  `job.created`, result, `job.finished`), whose rounds run in Flower's `DefaultWorkflow` with a
  `SecAggPlusWorkflow` fit stage and a legacy FedAvg (`SecAggFedAvg`). Every partner masks its
  quantised update with pairwise and private masks; the coordinator can only unmask the sum. The
  strategy receives that sum and nothing else; it checks this (identical parameters from every
  partner) and refuses to aggregate individual updates.
- **Client** (`secagg_client_app`): a `NumPyClient` behind Flower's `secaggplus_mod`, calling the
  same `local_round.train_round` / `evaluate_round` as the Message-API ClientApp, so DP-SGD,
  the accountant on the partner's disk and its refusals are unchanged. It also answers the
  Message-API handshake and, when a job does not ask for SecAgg+, the Message-API rounds.

**Weighting.** SecAgg+ itself weighs by the reported example count: each partner multiplies its
weights by `rows / max_weight` before quantising and the server divides the unmasked sum by the
summed factors — the same row-count weighting as the Message-API FedAvg. `max_weight` is set to
the partners' total training rows (known after the handshake), so every factor is ≤ 1.

**Quantisation.** Values are clipped to ±`SECAGG_CLIPPING_RANGE` and mapped to
`SECAGG_QUANTIZATION_RANGE` levels with stochastic rounding: the average differs from the float
one by at most about partners × 2·8/2²² ≈ 4·10⁻⁶ per weight. A partner refuses a round whose
weights would be clipped (|weight| × rows/max_weight > 8) instead of sending a corrupted sum.

**What the coordinator still sees per partner** (as Flower's SecAgg+ allows: metrics and configs
beside the masked vectors): its row count, its train loss, its ε and σ, the record of what it read
(for `data.accessed`), and in the evaluation phase its score histograms — as on the Message-API
path. The masked vectors themselves are uniformly random modulo 2³² to it.

**Threshold and dropouts.** Every partner holds a share of every other partner's secrets and all
of them are needed (`num_shares=1.0`, `reconstruction_threshold=1.0`, i.e. n of n). A partner
that drops or refuses stops the round, which fails the job (`job.failed`) as on the Message-API
path. `secagg_request_guard` makes each partner refuse set-ups with a lower threshold and unmask
requests that would reveal both secrets of one partner (Flower's mod does not check these).

**Threat model.** A coordinator that follows the protocol and reads everything it receives.
Flower's SecAgg+ does not authenticate the partners' public keys to each other (they travel via
the coordinator), so a coordinator that substitutes keys is not covered; nor, inherently, is a
coordinator colluding with all other partners (sum minus their updates).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

from fedpact.audit import Ledger
from fedpact.errors import FedpactError
from fedpact.models.networks import build_model
from fedpact.privacy.releases import MEMBERSHIP_AUDIT, check_reply

from .central_dp import clip_if_asked, with_central_dp_legacy
from .client_app import _access_record, admit_on_node
from .client_app import app as message_api_client_app
from .coordinator import JobResult, PartnerSummary, fedavg_rounds, run_job
from .job import JobConfig
from .local_round import evaluate_round, node_state_dir, train_round
from .node_data import load_node_data
from .strategy import AuditedFedAvg, RoundFailed

SECAGG_CLIPPING_RANGE = 8.0
SECAGG_QUANTIZATION_RANGE = 2**22
SECAGG_MODULUS_RANGE = 2**32

logging.getLogger("opacus").setLevel(logging.ERROR)


def weight_keys(job: JobConfig) -> list[str]:
    """The fixed order in which the model's state_dict travels as a list of numpy arrays."""
    return list(build_model(job.model, 1, seed=0).state_dict().keys())


def _error_reason(failure) -> str:
    error = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
    return str(getattr(error, "reason", error))


# ---------------------------------------------------------------------------------------------
# Partner node


class FedpactNumPyClient(NumPyClient):
    """One partner under SecAgg+: `train_round` / `evaluate_round` on its own rows."""

    def __init__(self, context: Context):
        self.context = context

    def _job_and_node(self, config):
        job = JobConfig.from_config(config)
        return job, load_node_data(self.context.node_config, job)

    @staticmethod
    def _weights(job: JobConfig, parameters: list[np.ndarray]) -> dict[str, np.ndarray]:
        keys = weight_keys(job)
        if len(parameters) != len(keys):
            raise FedpactError(f"received {len(parameters)} weight arrays, the job's {job.model} "
                               f"model has {len(keys)} ({', '.join(keys)})")
        return dict(zip(keys, parameters, strict=True))

    def get_parameters(self, config):
        raise FedpactError("the coordinator sends the initial weights; a partner never provides them")

    def fit(self, parameters, config):
        job, node = self._job_and_node(config)
        policy = admit_on_node(node, job, self.context)
        weights = self._weights(job, parameters)
        update = train_round(node, weights, job,
                             node_state_dir(self.context.node_config, job, node.partner),
                             int(config.get("server-round", 0)))
        arrays = [update.weights[k].detach().cpu().numpy() for k in weights]
        _check_quantisation_range(arrays, update.rows, config)
        metrics: dict = {k: float(v) for k, v in update.metrics.items()}
        access = _access_record(node, job, "train", update.rows)
        check_reply("train", {"arrays": list(weights), "metrics": list(metrics),
                              "access": list(access.keys())}, policy.allow, dp=job.dp)
        metrics.update({f"access.{k}": v for k, v in access.items()})
        return arrays, update.rows, metrics

    def evaluate(self, parameters, config):
        job, node = self._job_and_node(config)
        policy = admit_on_node(node, job, self.context)
        server_round = int(config.get("server-round", 0))
        audit = (job.membership_audit and server_round == job.rounds
                 and MEMBERSHIP_AUDIT in policy.allow)
        result = evaluate_round(node, self._weights(job, parameters), job,
                                node_state_dir(self.context.node_config, job, node.partner),
                                server_round, membership_audit=audit)
        metrics: dict = {k: float(v) for k, v in result.metrics.items()}
        if MEMBERSHIP_AUDIT not in policy.allow:
            metrics.pop("membership-auc", None)
        access = _access_record(node, job, "evaluate", result.rows)
        check_reply("evaluate", {"metrics": ["num-examples", *metrics], "histogram": ["pos", "neg"],
                                 "access": list(access.keys())}, policy.allow, dp=job.dp)
        metrics.update({
            "hist.pos": np.asarray(result.pos, np.float64).tobytes(),
            "hist.neg": np.asarray(result.neg, np.float64).tobytes(),
        })
        metrics.update({f"access.{k}": v for k, v in access.items()})
        return 0.0, result.rows, metrics  # the loss slot carries nothing (not released)


def _check_quantisation_range(arrays: list[np.ndarray], rows: int, config) -> None:
    """Refuse, rather than let SecAgg+ silently clip, weights outside its quantisation range."""
    max_weight = float(config.get("secagg-max-weight", 0.0))
    clipping = float(config.get("secagg-clipping-range", SECAGG_CLIPPING_RANGE))
    if max_weight <= 0:
        return  # not a SecAgg+ round (plain legacy FedAvg): nothing is quantised
    largest = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    if largest * rows / max_weight > clipping:
        raise FedpactError(
            f"secure aggregation: a weight of magnitude {largest:.3g} × this partner's share "
            f"{rows}/{max_weight:.0f} exceeds SecAgg+'s clipping range ±{clipping:g}; the sum "
            "would be corrupted (lower learning_rate or use a smaller model)")


def _client_fn(context: Context):
    return FedpactNumPyClient(context).to_client()


class FedpactSecAggClientApp(ClientApp):
    """The legacy NumPyClient behind SecAgg+, plus the Message-API handlers for other messages.

    Message-API messages (the handshake query, and train/evaluate of jobs without secure
    aggregation) carry a `config` record and go to `client_app.app`; legacy and SecAgg+ stage
    messages (`fitins.*`, `evaluateins.*`, `secaggplus`) go through the mods to the NumPyClient.
    """

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type == MessageType.QUERY or "config" in message.content:
            return message_api_client_app(message, context)
        return super().__call__(message, context)


def secagg_request_guard(msg: Message, context: Context, call_next) -> Message:
    """Refuse SecAgg+ requests by which a coordinator deviating from the protocol could unmask one
    partner's vector; Flower's `secaggplus_mod` does not check them.

    fedpact runs SecAgg+ with every partner holding a share and all of them needed
    (threshold = shares = partners). In the unmask stage a partner hands over its share of each
    listed active node's private-mask seed and of each listed dropped node's mask key; a node
    that is listed as both (or listed twice to pad the list) would have both of its secrets
    revealed. So: the setup must ask for all-of-n, and the unmask request must list every node
    once, as active, none as dropped.
    """
    if (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS in msg.content.config_records):
        config = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = config.get(SecAggKey.STAGE)
        if stage == Stage.SETUP:
            n, shares, threshold = (config.get(SecAggKey.SAMPLE_NUMBER), config.get(SecAggKey.SHARE_NUMBER),
                                    config.get(SecAggKey.THRESHOLD))
            if not threshold == shares == n:
                raise FedpactError(
                    f"secure aggregation: the coordinator asked for a threshold of {threshold} of "
                    f"{shares} key shares among {n} partners; fedpact partners require all of them")
        elif stage == Stage.UNMASK:
            active = list(config.get(SecAggKey.ACTIVE_NODE_ID_LIST, []))
            dead = list(config.get(SecAggKey.DEAD_NODE_ID_LIST, []))
            if dead or len(set(active)) != len(active):
                raise FedpactError(
                    "secure aggregation: the coordinator asked for mask-key shares of dropped "
                    f"partners {dead} or listed a partner twice ({active}); answering could "
                    "unmask a single partner's update")
    return call_next(msg, context)


# The guard first; secaggplus_mod calls the inner app only in its collect-masked-vectors stage,
# where the fit instructions are present; clip_if_asked clips the update there (central DP).
secagg_client_app = FedpactSecAggClientApp(
    client_fn=_client_fn, mods=[secagg_request_guard, secaggplus_mod, clip_if_asked])
client_app = secagg_client_app


# ---------------------------------------------------------------------------------------------
# Coordinator


def _as_message(node_id: int, content: RecordDict, message_type: str) -> Message:
    return Message(content, dst_node_id=node_id, message_type=message_type)


def _split_metrics(metrics: dict) -> tuple[dict, dict, dict]:
    access = {k[7:]: v for k, v in metrics.items() if k.startswith("access.")}
    hist = {k[5:]: v for k, v in metrics.items() if k.startswith("hist.")}
    plain = {k: v for k, v in metrics.items() if not k.startswith(("access.", "hist."))}
    return plain, access, hist


class SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg that only ever receives the SecAgg+ sum; ledger bookkeeping by AuditedFedAvg.

    `SecAggPlusWorkflow` hands `aggregate_fit` one FitRes per partner whose parameters are all the
    unmasked, already weighted average; the partner's metrics (ε, rows, what it read) come beside
    it. They are passed to `AuditedFedAvg`, which writes `data.accessed`, charges the privacy
    budgets, and after evaluation writes `round.aggregated`, exactly as on the Message-API path.
    """

    def __init__(self, job: JobConfig, ledger: Ledger, names: dict[int, str],
                 on_round: Callable[[int, dict], None] | None, initial: list[np.ndarray],
                 keys: list[str], max_weight: float):
        n = job.num_partitions
        self.job = job
        self.keys = keys
        self.names = names
        self.max_weight = max_weight
        self.audit = AuditedFedAvg(job, ledger, names, on_round)
        self.audit.secure_aggregation = True  # what ran: the ledger states it from this
        self.aggregated_rounds: set[int] = set()
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n, min_evaluate_clients=n,
            min_available_clients=n, initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=self._fit_config, on_evaluate_config_fn=self._evaluate_config,
        )

    def _fit_config(self, server_round: int) -> dict:
        return {**self.job.to_config(), "server-round": server_round,
                "secagg-max-weight": float(self.max_weight),
                "secagg-clipping-range": SECAGG_CLIPPING_RANGE}

    def _evaluate_config(self, server_round: int) -> dict:
        return {**self.job.to_config(), "server-round": server_round}

    def configure_evaluate(self, server_round, parameters, client_manager):
        """Evaluation only in the job's evaluation rounds (each one a charged DP release)."""
        if server_round not in self.job.evaluation_rounds():
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)

    def _fail_on(self, failures, phase: str, server_round: int) -> None:
        if failures:
            reasons = "; ".join(_error_reason(f) for f in failures)
            raise RoundFailed(f"round {server_round} ({phase}): {len(failures)} partners failed: "
                              f"{reasons}")

    def aggregate_fit(self, server_round, results, failures):
        self._fail_on(failures, "train", server_round)
        if not results:
            raise RoundFailed(f"round {server_round} (train): no partner replied")
        aggregate = results[0][1].parameters
        if any(fitres.parameters.tensors != aggregate.tensors for _, fitres in results[1:]):
            raise FedpactError(
                f"round {server_round}: the coordinator received individual partner updates; "
                "secure aggregation is not in effect, refusing to aggregate them")
        arrays = parameters_to_ndarrays(aggregate)
        record = ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(self.keys, arrays, strict=True)})
        messages = []
        for proxy, fitres in results:
            plain, access, _ = _split_metrics(fitres.metrics)
            content = RecordDict({"arrays": record, "metrics": MetricRecord(plain),
                                  "access": ConfigRecord(access)})
            messages.append(_as_message(proxy.node_id, content, MessageType.TRAIN))
        _, metrics = self.audit.aggregate_train(server_round, messages)
        self.aggregated_rounds.add(server_round)
        return aggregate, dict(metrics or {})

    def aggregate_evaluate(self, server_round, results, failures):
        self._fail_on(failures, "evaluate", server_round)
        messages = []
        for proxy, evalres in results:
            plain, access, hist = _split_metrics(evalres.metrics)
            plain["num-examples"] = evalres.num_examples
            histogram = ConfigRecord({
                "pos": np.frombuffer(hist["pos"], np.float64).tolist(),
                "neg": np.frombuffer(hist["neg"], np.float64).tolist(),
            })
            content = RecordDict({"metrics": MetricRecord(plain), "histogram": histogram,
                                  "access": ConfigRecord(access)})
            messages.append(_as_message(proxy.node_id, content, MessageType.EVALUATE))
        pooled = self.audit.aggregate_evaluate(server_round, messages)
        return float(pooled["brier"]), dict(pooled)


class ReplyTap(Grid):
    """A Grid that forwards everything to `grid` and shows `on_reply` each reply it receives."""

    def __init__(self, grid: Grid, on_reply: Callable[[Message], None]):
        self._grid = grid
        self._on_reply = on_reply

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def _seen(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            self._on_reply(reply)
        return replies

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._seen(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self._seen(self._grid.send_and_receive(messages, timeout=timeout))


class _GuardedFit:
    """SecAgg+'s fit stage, raising `RoundFailed` when it halts instead of skipping the round.

    Flower's workflow logs "Secure aggregation halted" and returns when a partner drops or refuses
    (its error reply never reaches the strategy); fedpact fails the job with the partner's reason.
    """

    def __init__(self, workflow: SecAggPlusWorkflow, strategy: SecAggFedAvg):
        self.workflow = workflow
        self.strategy = strategy

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        errors: list[Message] = []
        self.workflow(ReplyTap(grid, lambda m: errors.append(m) if m.has_error() else None), context)
        if server_round not in self.strategy.aggregated_rounds:
            reasons = "; ".join(
                f"{self.strategy.names.get(m.metadata.src_node_id, m.metadata.src_node_id)}: "
                f"{m.error.reason}" for m in errors)
            raise RoundFailed(f"round {server_round} (train): secure aggregation halted"
                              + (f"; {reasons}" if reasons else ""))


def secagg_rounds(grid: Grid, job: JobConfig, ledger: Ledger, names: dict[int, str],
                  partners: list[PartnerSummary], model: torch.nn.Module,
                  on_round: Callable[[int, dict], None] | None, timeout: float, *,
                  context: Context) -> tuple[AuditedFedAvg, dict]:
    """The rounds under SecAgg+ (a `coordinator.RoundsRunner`)."""
    state = model.state_dict()
    keys = list(state)
    initial = [v.detach().cpu().numpy() for v in state.values()]
    max_weight = float(sum(p.train_rows for p in partners))
    strategy = SecAggFedAvg(job, ledger, names, on_round, initial, keys, max_weight)
    workflow = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=1.0, max_weight=max_weight,
        clipping_range=SECAGG_CLIPPING_RANGE, quantization_range=SECAGG_QUANTIZATION_RANGE,
        modulus_range=SECAGG_MODULUS_RANGE, timeout=timeout,
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=job.rounds),
                           strategy=with_central_dp_legacy(strategy, job))
    DefaultWorkflow(fit_workflow=_GuardedFit(workflow, strategy))(grid, legacy)
    final = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    final_state = {k: torch.as_tensor(np.asarray(a), dtype=state[k].dtype)
                   for k, a in zip(keys, final, strict=True)}
    return strategy.audit, final_state


def make_secagg_server_app(job: JobConfig | None = None, results: list[JobResult] | None = None,
                           on_round: Callable[[int, dict], None] | None = None, *,
                           on_reply: Callable[[Message], None] | None = None) -> ServerApp:
    """A ServerApp for `job` (or the run config's job): SecAgg+ rounds when it asks for them.

    `on_reply`, if given, sees every reply the coordinator receives (handshake, every SecAgg+
    stage, evaluation) before the coordinator uses it — for audits of what leaves the partners.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        spec = job or JobConfig.from_config(context.run_config)
        if on_reply is not None:
            grid = ReplyTap(grid, on_reply)
        rounds = (functools.partial(secagg_rounds, context=context) if spec.secure_aggregation
                  else fedavg_rounds)
        with Ledger.open(spec.ledger_path) as ledger:
            result = run_job(grid, spec, ledger, on_round, rounds=rounds)
        if results is not None:
            results.append(result)

    return app


server_app = make_secagg_server_app()
