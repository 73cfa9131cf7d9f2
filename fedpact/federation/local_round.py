"""What a partner node does in one round, as plain functions (no Flower types).

Both Flower paths call these: the Message-API ClientApp (`client_app.py`) and the legacy
NumPyClient used under SecAgg+. Rows, feature statistics and labels stay inside this module's
callers on the partner's machine; only weights, counts, ε and score histograms are returned.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedpact.errors import FedpactError
from fedpact.models.features import FeaturePipeline, PreprocessingNotPublic, undeclared_settings
from fedpact.models.metrics import release_histogram
from fedpact.models.networks import build_model
from fedpact.models.streaming import StreamedRows, poisson_loader, predict_rows, shuffled_loader
from fedpact.models.training import make_loader, make_optimizer, predict_proba, run_epochs
from fedpact.privacy.accounting import (
    AccountantState,
    AccountantStore,
    epsilon_of,
    plan_noise_multiplier,
)
from fedpact.privacy.dp_sgd import PrivateTraining, private_generator
from fedpact.privacy.membership import membership_attack_auc

from .job import JobConfig
from .node_data import NodeData

torch.set_num_threads(1)


def node_state_dir(node_config: Mapping, job: JobConfig, partner: str) -> Path:
    """The partner's own disk: node-config `state-dir`, else a folder per partner under the job home."""
    configured = dict(node_config).get("state-dir")
    if configured:
        return Path(str(configured))
    return Path(job.home) / "nodes" / re.sub(r"[^A-Za-z0-9_.-]", "_", partner)


def pipeline_for(node: NodeData) -> FeaturePipeline:
    """The public encoding the mapping declares (categories, numeric bounds): no statistic of any
    row. Refuses, naming every column, a mapping that leaves the encoding to the data."""
    origin = f"dataset {node.partner!r}"  # never the file's path: this message leaves the node
    if isinstance(node.train, StreamedRows):
        if not node.train.pipeline.is_public:
            raise PreprocessingNotPublic(origin, undeclared_settings(node.train.spec))
        return node.train.pipeline
    return FeaturePipeline.public(node.train.spec, origin=origin)


def _scores(model: torch.nn.Module, pipe: FeaturePipeline, rows) -> np.ndarray:
    if isinstance(rows, StreamedRows):
        return predict_rows(model, rows)
    return predict_proba(model, pipe.transform(rows))


def model_from_weights(weights: Mapping[str, np.ndarray | torch.Tensor], n_features: int,
                       job: JobConfig) -> torch.nn.Module:
    """The job's model with the global weights, after checking they fit this partner's layout."""
    model = build_model(job.model, n_features, seed=job.seed)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    received = {k: tuple(np.shape(v)) for k, v in weights.items()}
    if expected != received:
        raise FedpactError(
            f"feature layout differs: the job's model has shapes {received}, this partner's data "
            f"gives {expected}; declare the same categories in every partner's mapping"
        )
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})
    return model


@dataclass
class RoundUpdate:
    """A partner's reply to a training round."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float]
    rows: int


def weights_digest(weights: Mapping) -> str:
    """SHA-256 over the global weights (names, shapes, float32 bytes): which model a round used."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        value = np.ascontiguousarray(np.asarray(weights[key], dtype=np.float32))
        digest.update(key.encode() + str(value.shape).encode() + value.tobytes())
    return digest.hexdigest()


def _reply_path(state_dir: Path, job: JobConfig, partner: str, server_round: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{job.job_id}-{partner}")
    return state_dir / "replies" / f"{safe}-round{server_round}.pt"


def train_round(node: NodeData, weights: Mapping, job: JobConfig, state_dir: Path,
                server_round: int) -> RoundUpdate:
    """Local epochs on this partner's training rows from the global weights (DP-SGD if the job asks).

    A round asked again after a coordinator or node restart, from the same global weights, gets
    the reply already released (saved on the partner's disk): re-sending it spends no ε. The same
    round from different weights is refused, since a second release would spend ε twice.
    """
    digest = weights_digest(weights)
    cached = _reply_path(state_dir, job, node.partner, server_round)
    if job.dp and cached.exists():
        saved = torch.load(cached, weights_only=True)
        if saved["digest"] == digest:
            return RoundUpdate(saved["weights"], dict(saved["metrics"]), int(saved["rows"]))
        raise FedpactError(f"round {server_round} was already trained on {node.partner} for "
                           f"{job.job_id} from a different global model; training it again would "
                           "spend its ε twice")
    update = _train_round(node, weights, job, state_dir, server_round)
    if job.dp:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        torch.save({"digest": digest, "weights": update.weights, "metrics": update.metrics,
                    "rows": update.rows}, tmp)
        os.replace(tmp, cached)
    return update


REPRODUCIBLE_NOISE_ENV = "FEDPACT_REPRODUCIBLE_NOISE"


def reproducible_mode() -> bool:
    """The node's own explicit setting FEDPACT_REPRODUCIBLE_NOISE=1 (tests, benchmarks): batches
    and noise derive from the job seed, so anyone knowing the job can rebuild them — such a run
    is NOT private, and its replies say so (`reproducible` = 1), so result, card and records do."""
    return os.environ.get(REPRODUCIBLE_NOISE_ENV) == "1"


def round_seed(job: JobConfig, server_round: int, rows: int) -> int:
    """The seed of this round's non-DP randomness (torch's global generator: dropout, a non-DP
    shuffle): fresh OS randomness, unless the node runs in `reproducible_mode`. DP-SGD's batches
    and noise never use it: they come from `privacy.dp_sgd.private_generator`."""
    if reproducible_mode():
        return job.seed * 1_000_003 + server_round * 101 + rows
    return secrets.randbits(63)


def _train_round(node: NodeData, weights: Mapping, job: JobConfig, state_dir: Path,
                 server_round: int) -> RoundUpdate:
    pipe = pipeline_for(node)
    rows = len(node.train)
    model = model_from_weights(weights, pipe.n_features, job)
    seed = round_seed(job, server_round, rows)
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, job.learning_rate)
    if isinstance(node.train, StreamedRows):  # a large CSV: batches encoded from the on-disk rows
        loader = shuffled_loader(node.train, job.batch_size, seed=seed)
    else:
        loader = make_loader(pipe.transform(node.train), node.train.labels, job.batch_size,
                             seed=seed)
    metrics: dict[str, float] = {"num-examples": float(rows),
                                 "reproducible": 1.0 if reproducible_mode() else 0.0}
    if job.dp:
        metrics.update(_train_private(model, optimizer, loader, node, job, state_dir, server_round,
                                      seed))
    else:
        run_epochs(model, optimizer, loader, job.local_epochs)
        metrics.update({"epsilon": 0.0, "noise-multiplier": 0.0, "steps": 0.0, "sample-rate": 0.0})
    return RoundUpdate({k: v.detach().clone() for k, v in model.state_dict().items()}, metrics, rows)


def plan_for(job: JobConfig, rows: int) -> tuple[float, float, int]:
    """(noise multiplier, sampling rate, steps per round) for a partner with `rows` training rows.

    For a loader of k = ceil(rows / batch) batches, Opacus' Poisson loader runs s = int(1 / (1 / k))
    steps an epoch — k, or k - 1 for some k (float rounding: k = 93, 99, 105, ...) — and its
    accountant records the rate 1 / s. The plan is made for what the accountant records, so the
    ε it reports stays within the target; the noise is either given (`noise_multiplier`) or
    solved for the target ε over every planned step of the job.
    """
    steps_per_epoch = opacus_steps(max(1, -(-rows // job.batch_size)))
    sample_rate = 1.0 / steps_per_epoch
    steps_per_round = job.local_epochs * steps_per_epoch
    if job.noise_multiplier > 0:
        sigma = job.noise_multiplier
    else:
        sigma = _planned_sigma(job.target_epsilon, job.target_delta, sample_rate,
                               steps_per_round * job.rounds, job.accountant, eval_releases(job))
    return sigma, sample_rate, steps_per_round


def eval_releases(job: JobConfig) -> tuple[tuple[float, float, int], ...]:
    """The job's evaluation releases as accountant history: a Gaussian mechanism (rate 1) per
    evaluation round. DP-SGD's σ is planned so that training and these compose to the target."""
    if not job.dp:
        return ()
    return ((float(job.eval_noise_multiplier), 1.0, len(job.evaluation_rounds())),)


def planned_history(job: JobConfig, rows: int) -> list[tuple[float, float, int]]:
    """Everything a DP job plans to release from a dataset of `rows` training rows, as history."""
    sigma, q, steps = plan_for(job, rows)
    return [(sigma, q, steps * job.rounds), *eval_releases(job)]


def job_limit(job: JobConfig, rows: int) -> float:
    """The ε a node will not exceed for this job: the target, or the ε of a given σ's plan."""
    if job.noise_multiplier <= 0:
        return job.target_epsilon
    return _epsilon(planned_history(job, rows), job.target_delta, job.accountant)


def opacus_steps(batches: int) -> int:
    """Steps an epoch of Opacus' Poisson loader made from a loader of `batches` batches."""
    return int(1 / (1.0 / batches))


# The accountant's arithmetic is pure but costs 0.01-0.3 s a call (RDP over ~150 orders); a
# simulation worker serving many partners of equal size, round after round, asks the same
# questions again. Memoised per process; the answers are exactly those of the functions wrapped.
_planned_sigma = lru_cache(maxsize=4096)(plan_noise_multiplier)


@lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple, delta: float, accountant: str) -> float:
    return epsilon_of(list(history), delta, accountant)


def _epsilon(history, delta: float, accountant: str) -> float:
    """ε of `history`, with consecutive steps at the same (σ, q) merged as Opacus records them."""
    merged: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(q), int(steps)))
    return _epsilon_cached(tuple(merged), float(delta), accountant)


def _train_private(model, optimizer, loader, node: NodeData, job: JobConfig, state_dir: Path,
                   server_round: int, seed: int) -> dict:
    """DP-SGD for this round; the accountant history is restored from and saved to the node's disk."""
    store = AccountantStore(state_dir / "accountants")
    dataset = node.partner
    sigma, sample_rate, steps_per_round = plan_for(job, len(node.train))
    if abs(sample_rate - 1.0 / opacus_steps(len(loader))) > 1e-12:
        raise FedpactError(f"internal: planned sampling rate {sample_rate} differs from the loader's")
    state = _account(store, job, node)
    if server_round in state.rounds_done:
        # A retried round after a restart: do not spend the budget twice for the same round.
        raise FedpactError(f"round {server_round} was already trained on {dataset} for {job.job_id}")
    projected = _epsilon(state.history + [(state.noise_multiplier, state.sample_rate, steps_per_round)],
                         state.delta, state.accountant)
    # The job's plan is the limit: the target ε, or with a given noise multiplier the ε of the plan.
    limit = job_limit(job, len(node.train))
    if projected > limit * 1.005:
        raise FedpactError(
            f"privacy budget: another round on {dataset} would bring ε to {projected:.3f}, above the "
            f"job's limit ε={limit:.3f} (spent {state.epsilon():.3f})"
        )
    session = PrivateTraining(noise_multiplier=state.noise_multiplier,
                              max_grad_norm=job.max_grad_norm, accountant=job.accountant,
                              history=state.history, grad_sample_mode=job.grad_sample_mode)
    # Batches and noise: fresh CSPRNG-seeded generators (privacy.dp_sgd.private_generator); from
    # the job seed only in the node's own reproducible mode, which the reply then reports.
    fixed = seed if reproducible_mode() else None
    private = session.wrap(model, optimizer, loader, sampling_seed=fixed,
                           noise_seed=None if fixed is None else fixed + 1)
    if isinstance(node.train, StreamedRows):
        # Opacus' sampler draws one uniform per row per step (O(rows²/batch) an epoch); this one
        # draws Poisson batches in O(batch), at exactly the rate and steps the accountant records.
        private.loader = poisson_loader(node.train, sample_rate, steps=steps_per_round // job.local_epochs,
                                        seed=secrets.randbits(63) if fixed is None else fixed)
    run_epochs(private.model, private.optimizer, private.loader, job.local_epochs,
               loss_fn=private.loss_fn)  # the training loss is not released (it is not DP)
    state.history = session.history
    state.rounds_done.append(server_round)
    store.save(state)
    return {"epsilon": _epsilon(state.history, state.delta, state.accountant),
            "noise-multiplier": state.noise_multiplier,
            "steps": float(sum(h[2] for h in state.history
                               if (h[0], h[1]) == (state.noise_multiplier, state.sample_rate))),
            "sample-rate": state.sample_rate}


def _account(store: AccountantStore, job: JobConfig, node: NodeData) -> AccountantState:
    """This dataset's accountant state for the job (created with the job's plan on first use)."""
    state = store.load(job.job_id, node.partner)
    if state is None:
        sigma, sample_rate, steps_per_round = plan_for(job, len(node.train))
        state = AccountantState(
            job_id=job.job_id, dataset=node.partner, accountant=job.accountant,
            target_epsilon=job.target_epsilon, delta=job.target_delta, noise_multiplier=sigma,
            sample_rate=sample_rate, planned_steps=steps_per_round * job.rounds,
        )
    return state


@dataclass
class RoundEvaluation:
    """A partner's held-out release: DP score histograms, its ε after them, membership audit."""

    rows: int
    metrics: dict[str, float]
    pos: np.ndarray
    neg: np.ndarray


MEMBERSHIP_DECIMALS = 2  # the membership-audit AUC is released once, rounded


def evaluate_round(node: NodeData, weights: Mapping, job: JobConfig, state_dir: Path,
                   server_round: int, *, membership_audit: bool = False) -> RoundEvaluation:
    """Score this partner's held-out rows and release score histograms on the fixed bins of
    `models.metrics.release_bin_edges`, with Gaussian noise (σ = eval_noise_multiplier, L2
    sensitivity 1: one row is one count) charged in the dataset's account — only in the job's
    evaluation rounds. A round asked again from the same weights gets the saved release."""
    if server_round not in job.evaluation_rounds():
        raise FedpactError(f"round {server_round} is not an evaluation round of job {job.job_id} "
                           f"(planned: {job.evaluation_rounds()}); no evaluation is released")
    digest = weights_digest(weights)
    cached = _reply_path(state_dir, job, node.partner, server_round).with_name(
        _reply_path(state_dir, job, node.partner, server_round).stem + "-eval.pt")
    if cached.exists():
        saved = torch.load(cached, weights_only=True)
        if saved["digest"] == digest:
            return RoundEvaluation(int(saved["rows"]), dict(saved["metrics"]),
                                   saved["pos"].numpy(), saved["neg"].numpy())
        raise FedpactError(f"round {server_round} was already evaluated on {node.partner} for "
                           f"{job.job_id} with a different model; releasing again would spend ε twice")
    pipe = pipeline_for(node)
    model = model_from_weights(weights, pipe.n_features, job)
    scores = _scores(model, pipe, node.test)
    pos, neg = release_histogram(node.test.labels, scores)
    metrics: dict[str, float] = {"epsilon": 0.0, "eval-noise-multiplier": 0.0, "eval-releases": 0.0}
    if job.dp:
        store = AccountantStore(state_dir / "accountants")
        state = _account(store, job, node)
        sigma_e = float(job.eval_noise_multiplier)
        projected = _epsilon(state.history + [(sigma_e, 1.0, 1)], state.delta, state.accountant)
        limit = job_limit(job, len(node.train))
        if projected > limit * 1.005:
            raise FedpactError(f"privacy budget: releasing this evaluation on {node.partner} would "
                               f"bring ε to {projected:.3f}, above the job's limit ε={limit:.3f}")
        fixed = round_seed(job, server_round, len(node.test)) if reproducible_mode() else None
        generator = private_generator(fixed)
        pos = pos + sigma_e * torch.randn(len(pos), generator=generator, dtype=torch.float64).numpy()
        neg = neg + sigma_e * torch.randn(len(neg), generator=generator, dtype=torch.float64).numpy()
        state.history = state.history + [(sigma_e, 1.0, 1)]
        state.evals_done.append(server_round)
        store.save(state)
        metrics.update({"epsilon": _epsilon(state.history, state.delta, state.accountant),
                        "eval-noise-multiplier": sigma_e, "eval-releases": float(len(state.evals_done))})
    metrics["membership-auc"] = -1.0
    if membership_audit:
        train_scores = _scores(model, pipe, node.train)
        auc = membership_attack_auc(node.train.labels, train_scores, node.test.labels, scores,
                                    seed=job.seed)
        metrics["membership-auc"] = round(float(auc), MEMBERSHIP_DECIMALS) if np.isfinite(auc) else -1.0
    result = RoundEvaluation(len(scores), metrics, np.asarray(pos, float), np.asarray(neg, float))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    torch.save({"digest": digest, "rows": result.rows, "metrics": result.metrics,
                "pos": torch.from_numpy(result.pos), "neg": torch.from_numpy(result.neg)}, tmp)
    os.replace(tmp, cached)
    return result
