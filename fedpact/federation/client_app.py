"""Flower ClientApp run by each partner node: local DP-SGD training and local evaluation.

Thin glue: read the job settings and global weights from the message, load this node's rows,
call plain functions from `fedpact.models` and `fedpact.privacy`, reply with weights + metrics.
Raw rows, feature statistics and labels never leave the node; replies carry model weights, counts,
ε, and score histograms for pooled metrics.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpact.errors import FedpactError
from fedpact.models.features import FeaturePipeline
from fedpact.models.metrics import evaluate_scores, score_histogram
from fedpact.models.networks import build_model
from fedpact.models.training import make_loader, make_optimizer, predict_proba, run_epochs
from fedpact.privacy.accounting import AccountantState, AccountantStore, plan_noise_multiplier
from fedpact.privacy.dp_sgd import PrivateTraining

from .job import JobConfig
from .node_data import NodeData, load_node_data

ERROR_CODE_REFUSED = 4001  # the node refused the request (budget, layout, bad data)

app = ClientApp()
torch.set_num_threads(1)
logging.getLogger("opacus").setLevel(logging.ERROR)


def _node_state_dir(context: Context, job: JobConfig, partner: str) -> Path:
    """The partner's own disk: node-config `state-dir`, else a folder per partner under the job home."""
    configured = dict(context.node_config).get("state-dir")
    if configured:
        return Path(str(configured))
    return Path(job.home) / "nodes" / re.sub(r"[^A-Za-z0-9_.-]", "_", partner)


def _pipeline(node: NodeData) -> FeaturePipeline:
    """Feature statistics fitted on this partner's training rows only."""
    return FeaturePipeline.fit(node.train)


def _access_record(node: NodeData, job: JobConfig, phase: str, rows: int) -> ConfigRecord:
    return ConfigRecord({
        "partner": node.partner,
        "dataset": node.train.spec.name,
        "source": node.train.source,
        "rows": rows,
        "columns": json.dumps(node.columns),
        "purpose": job.purpose,
        "phase": phase,
    })


def _load_global(msg: Message, n_features: int, job: JobConfig) -> torch.nn.Module:
    model = build_model(job.model, n_features, seed=job.seed)
    arrays = msg.content["arrays"].to_torch_state_dict()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    received = {k: tuple(v.shape) for k, v in arrays.items()}
    if expected != received:
        raise FedpactError(
            f"feature layout differs: the job's model has shapes {received}, this partner's data "
            f"gives {expected}; declare the same categories in every partner's mapping"
        )
    model.load_state_dict(arrays)
    return model


def _refuse(msg: Message, exc: Exception) -> Message:
    return Message(Error(code=ERROR_CODE_REFUSED, reason=str(exc)), reply_to=msg)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Share the feature layout (column order and categories, no statistics) and row counts."""
    try:
        job = JobConfig.from_config(msg.content["config"])
        node = load_node_data(context.node_config, job)
        layout = _pipeline(node).layout()
    except FedpactError as exc:
        return _refuse(msg, exc)
    content = RecordDict({
        "layout": ConfigRecord({"layout": json.dumps(layout), "partner": node.partner,
                                "train-rows": len(node.train), "test-rows": len(node.test)}),
    })
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this partner's rows, with DP-SGD when the job asks."""
    try:
        job = JobConfig.from_config(msg.content["config"])
        server_round = int(msg.content["config"].get("server-round", 0))
        node = load_node_data(context.node_config, job)
        pipe = _pipeline(node)
        X, y = pipe.transform(node.train), node.train.labels
        model = _load_global(msg, pipe.n_features, job)
        torch.manual_seed(job.seed * 1_000_003 + server_round * 101 + len(y))
        optimizer = make_optimizer(model, job.learning_rate)
        loader = make_loader(X, y, job.batch_size, seed=job.seed + server_round)
        metrics = {"num-examples": len(y)}
        if job.dp:
            metrics.update(_train_private(model, optimizer, loader, node, job, context, server_round))
        else:
            metrics["train-loss"] = run_epochs(model, optimizer, loader, job.local_epochs)
            metrics.update({"epsilon": 0.0, "noise-multiplier": 0.0})
    except FedpactError as exc:
        return _refuse(msg, exc)
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord(metrics),
        "access": _access_record(node, job, "train", len(y)),
    })
    return Message(content=content, reply_to=msg)


def _train_private(model, optimizer, loader, node: NodeData, job: JobConfig, context: Context,
                   server_round: int) -> dict:
    """DP-SGD for this round; the accountant history is restored from and saved to the node's disk."""
    store = AccountantStore(_node_state_dir(context, job, node.partner) / "accountants")
    dataset = node.partner
    state = store.load(job.job_id, dataset)
    # Opacus's Poisson loader draws len(loader) batches per epoch at rate 1 / len(loader).
    batches = len(loader)
    sample_rate = 1.0 / batches
    steps_per_round = job.local_epochs * batches
    if state is None:
        planned = steps_per_round * job.rounds
        sigma = plan_noise_multiplier(job.target_epsilon, job.target_delta, sample_rate, planned,
                                      job.accountant)
        state = AccountantState(
            job_id=job.job_id, dataset=dataset, accountant=job.accountant,
            target_epsilon=job.target_epsilon, delta=job.target_delta, noise_multiplier=sigma,
            sample_rate=sample_rate, planned_steps=planned,
        )
    if server_round in state.rounds_done:
        # A retried round after a restart: do not spend the budget twice for the same round.
        raise FedpactError(f"round {server_round} was already trained on {dataset} for {job.job_id}")
    projected = state.projected_epsilon(steps_per_round)
    if projected > job.target_epsilon * 1.01:
        raise FedpactError(
            f"privacy budget: another round on {dataset} would bring ε to {projected:.3f}, above the "
            f"job's target ε={job.target_epsilon:g} (spent {state.epsilon():.3f})"
        )
    session = PrivateTraining(noise_multiplier=state.noise_multiplier,
                              max_grad_norm=job.max_grad_norm, accountant=job.accountant,
                              history=state.history)
    private_model, private_opt, private_loader = session.wrap(model, optimizer, loader)
    loss = run_epochs(private_model, private_opt, private_loader, job.local_epochs)
    state.history = session.history
    state.rounds_done.append(server_round)
    store.save(state)
    return {"train-loss": loss, "epsilon": state.epsilon(),
            "noise-multiplier": state.noise_multiplier, "steps": state.steps_taken}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this partner's held-out rows with the global model; share metrics and a histogram."""
    try:
        job = JobConfig.from_config(msg.content["config"])
        node = load_node_data(context.node_config, job)
        pipe = _pipeline(node)
        model = _load_global(msg, pipe.n_features, job)
        scores = predict_proba(model, pipe.transform(node.test))
    except FedpactError as exc:
        return _refuse(msg, exc)
    local = evaluate_scores(node.test.labels, scores)
    pos, neg, sq_error = score_histogram(node.test.labels, scores)
    metrics = {"num-examples": len(scores)}
    metrics.update({k.replace("_", "-"): (v if np.isfinite(v) else -1.0)
                    for k, v in local.items() if k in ("roc_auc", "pr_auc", "brier")})
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "histogram": ConfigRecord({"pos": pos.tolist(), "neg": neg.tolist(), "sq-error": sq_error}),
        "access": _access_record(node, job, "evaluate", len(scores)),
    })
    return Message(content=content, reply_to=msg)
