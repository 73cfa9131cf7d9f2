"""The coordinator's side of a job: handshake, FedAvg rounds, ledger events, the delivered model.

`run_job` takes any Flower `Grid` — the simulation engine's or a real SuperLink's — so the same
code runs the demo and a deployment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpact.audit import EventType, Ledger
from fedpact.errors import FedpactError
from fedpact.models.datasets import BUILTIN_SPECS
from fedpact.models.networks import build_model
from fedpact.privacy.accounting import epsilon_of
from fedpact.privacy.budget import PrivacyBudgets
from fedpact.privacy.crosscheck import cross_check

from .central_dp import client_level_privacy, with_central_dp
from .client_app import ERROR_CODE_NOT_IN_JOB, ERROR_CODE_REFUSED
from .job import JobConfig
from .local_round import plan_for
from .partition import partition_names
from .rounds import JobFailed, load_checkpoint, run_rounds
from .strategy import AuditedFedAvg, RoundFailed, make_strategy


@dataclass
class PartnerSummary:
    name: str
    train_rows: int
    test_rows: int
    epsilon: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    epsilon_google_rdp: float = 0.0
    epsilon_google_pld: float = 0.0
    membership_auc: float | None = None


@dataclass
class JobResult:
    """What a data team receives: final pooled metrics, per-round history, privacy spent."""

    job_id: str
    config: dict
    partners: list[PartnerSummary]
    rounds: list[dict]
    final: dict
    epsilon: float
    delta: float
    ledger_events: int
    seconds: float
    model_path: str = ""
    layout: dict = field(default_factory=dict)
    membership_auc: float | None = None
    # Client-level DP on the aggregate (JobConfig.central_dp_noise > 0); empty when off.
    central_dp: dict = field(default_factory=dict)
    # The last evaluation's summed released score histograms (pos, neg, edges, sq_error, dp,
    # noise_sd): curves for the model card — DP estimates when the job has DP.
    histograms: dict = field(default_factory=dict)
    # What the run's guarantee is, as the nodes' replies show it: False with the reasons when the
    # job had no DP or a node ran in its reproducible mode (batches and noise rebuildable).
    private: bool = True
    not_private_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> JobResult:
        doc = dict(doc)
        doc["partners"] = [PartnerSummary(**p) for p in doc["partners"]]
        return cls(**doc)


def _enlist(grid: Grid, job: JobConfig, timeout: float):
    """Ask every connected node for its feature layout and row counts until `num_partitions`
    partners answered (a dead node the SuperLink still lists is skipped after `round_timeout`).
    A node that refuses (budget, layout, bad data) fails the job with its reason; all layouts
    must be identical."""
    deadline = time.monotonic() + timeout
    content = RecordDict({"config": ConfigRecord(job.to_config())})
    answered: dict[str, Message] = {}
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= job.num_partitions:
            msgs = [Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY)
                    for nid in nodes]
            wait = max(1.0, min(job.round_timeout, deadline - time.monotonic()))
            replies = list(grid.send_and_receive(msgs, timeout=wait))
            refusals = [r for r in replies if r.has_error() and r.error.code == ERROR_CODE_REFUSED]
            if refusals:
                raise JobFailed("handshake failed: " + "; ".join(r.error.reason for r in refusals))
            others = [r for r in replies if r.has_error() and r.error.code == ERROR_CODE_NOT_IN_JOB]
            if len(nodes) - len(others) < job.num_partitions and time.monotonic() <= deadline:
                time.sleep(0.5)  # nodes of other datasets do not count: wait for this job's
                continue
            answered = {}
            for reply in sorted((r for r in replies if not r.has_error()),
                                key=lambda r: r.metadata.src_node_id):
                answered.setdefault(str(reply.content["layout"]["partner"]), reply)
            if len(answered) >= job.num_partitions:
                break
        if time.monotonic() > deadline:
            missing = [p for p in job.partner_list if p not in answered]
            raise JobFailed(f"only {len(answered)} of {job.num_partitions} partner nodes answered "
                            f"within {timeout:.0f} s ({len(nodes)} connected)"
                            + (f": {', '.join(sorted(answered))}" if answered else "")
                            + (f"; no node serving {', '.join(missing)} is connected" if missing else ""))
        time.sleep(0.5)
    chosen = [answered[name] for name in sorted(answered)[:job.num_partitions]]
    names, partners, layouts = {}, [], {}
    for reply in chosen:
        rec = reply.content["layout"]
        names[reply.metadata.src_node_id] = str(rec["partner"])
        partners.append(PartnerSummary(str(rec["partner"]), int(rec["train-rows"]), int(rec["test-rows"])))
        layouts[str(rec["partner"])] = str(rec["layout"])
    if len(set(layouts.values())) != 1:
        from fedpact.models.layout import layout_differences

        diffs = layout_differences({n: json.loads(v) for n, v in sorted(layouts.items())})
        raise JobFailed("partners announce different feature layouts, so their models cannot be "
                        "averaged: " + "; ".join(diffs or ["the layouts differ"]) + " — declare the "
                        "same columns, categories and bounds in every partner's mapping (fedpact "
                        "data compare)")
    partners.sort(key=lambda p: p.name)
    return names, partners, json.loads(next(iter(layouts.values())))


def _json_safe(config: dict) -> dict:
    return {k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else str(v))
            for k, v in config.items()}


def partner_datasets(job: JobConfig) -> list[str]:
    """The dataset names this job will touch, known before any row is read."""
    if job.own_data:
        return job.partner_list
    return partition_names(BUILTIN_SPECS[job.dataset].name, job.partitioning, job.num_partitions)


def refuse(job: JobConfig, ledger: Ledger, exc: FedpactError) -> None:
    ledger.append(EventType.JOB_REFUSED, {"reason": str(exc), "config": _json_safe(job.as_dict())},
                  actor="coordinator", job_id=job.job_id)


def admit_job(job: JobConfig, ledger: Ledger) -> list[str]:
    """Check settings and every dataset's privacy budget before any node is contacted.

    On failure the only thing written is one `job.refused` event; the error names the setting or
    the dataset, the remaining ε and the requested ε.
    """
    try:
        job.validate()
        names = partner_datasets(job)
        if job.dp:
            requested = job.target_epsilon if job.noise_multiplier <= 0 else 0.0
            PrivacyBudgets(ledger).check({n: requested for n in names}, job.target_delta)
    except FedpactError as exc:
        refuse(job, ledger, exc)
        raise
    return names


def _check_plan_against_rows(job: JobConfig, ledger: Ledger, partners: list[PartnerSummary],
                             admitted: list[str]) -> None:
    """After the handshake (row counts known): δ < 1/n, and an explicit σ's ε within budget."""
    problems = []
    for p in partners:
        if p.name not in admitted:
            problems.append(f"partner dataset {p.name!r} was not part of the admitted plan {admitted}")
        if job.dp and job.target_delta >= 1.0 / max(p.train_rows, 1):
            problems.append(f"target_delta = {job.target_delta:g} is not below 1/n = "
                            f"{1.0 / p.train_rows:.3g} for {p.name} ({p.train_rows} training rows)")
    if problems:
        raise FedpactError("; ".join(problems))
    if job.dp and job.noise_multiplier > 0:
        requests = {}
        for p in partners:
            sigma, q, steps = plan_for(job, p.train_rows)
            requests[p.name] = epsilon_of([(sigma, q, steps * job.rounds)], job.target_delta, job.accountant)
        PrivacyBudgets(ledger).check(requests, job.target_delta)


RoundsRunner = Callable[..., tuple[AuditedFedAvg, dict]]
"""(grid, job, ledger, node names, partners, initial model, on_round, timeout) -> (the strategy
holding the per-partner bookkeeping, the final global state_dict)."""


def fedavg_rounds(grid: Grid, job: JobConfig, ledger: Ledger, names: dict[int, str],
                  partners: list[PartnerSummary], model: torch.nn.Module,
                  on_round: Callable[[int, dict], None] | None,
                  timeout: float) -> tuple[AuditedFedAvg, dict]:
    """The rounds on Flower's Message API (`rounds.run_rounds`: dropouts, retries, checkpoints),
    with the job's aggregation strategy and central DP when the job asks. A job with a checkpoint
    resumes after its last completed round."""
    strategy = make_strategy(job, ledger, names, on_round)
    arrays, first_round = ArrayRecord(model.state_dict()), 1
    checkpoint = load_checkpoint(job)
    if checkpoint is not None:
        strategy.load_state_dict(checkpoint["strategy"])
        arrays, first_round = ArrayRecord(checkpoint["arrays"]), int(checkpoint["round"]) + 1
        ledger.append(EventType.JOB_STARTED, {"purpose": job.purpose,
                                              "resumed_after_round": first_round - 1},
                      actor="coordinator", job_id=job.job_id)
    final = run_rounds(grid, job, with_central_dp(strategy, job), names, arrays,
                       first_round=first_round)
    return strategy, final.to_torch_state_dict()


def resumable(job: JobConfig, ledger: Ledger) -> bool:
    """A job restarted after a coordinator crash: it has a checkpoint, was created, not ended."""
    if load_checkpoint(job) is None:
        return False
    kinds = {ev.event_type for ev in ledger.events(job_id=job.job_id)}
    if EventType.JOB_FINISHED.value in kinds:
        raise JobFailed(f"job {job.job_id} already finished; submit a new job to train again")
    return EventType.JOB_CREATED.value in kinds


def _check_resume(job: JobConfig, ledger: Ledger, partners: list[PartnerSummary]) -> None:
    """A resumed job must be the job that was created: same partners, same settings."""
    created = ledger.events(job_id=job.job_id, event_type=EventType.JOB_CREATED.value)[0].payload
    if sorted(created["partners"]) != sorted(p.name for p in partners):
        raise JobFailed(f"cannot resume {job.job_id}: it was created with partners "
                        f"{sorted(created['partners'])}, the nodes now answering are "
                        f"{sorted(p.name for p in partners)}")
    before, now = created.get("config", {}), job.as_dict()
    changed = sorted(k for k in now if k not in ("home",) and k in before and before[k] != now[k])
    if changed:
        raise JobFailed(f"cannot resume {job.job_id}: settings changed since it was created "
                        f"({', '.join(changed)}); submit a new job instead")


def run_job(grid: Grid, job: JobConfig, ledger: Ledger,
            on_round: Callable[[int, dict], None] | None = None, *, timeout: float = 600,
            rounds: RoundsRunner = fedavg_rounds) -> JobResult:
    """Run `job` on the nodes behind `grid`; write the ledger; save the model; return the result.

    `rounds` runs the training rounds (default: Message-API FedAvg; `secagg.secagg_rounds` for
    SecAgg+); admission, handshake, ledger and result are the same for both.
    """
    started = time.monotonic()
    first_seq = (ledger.head().seq if ledger.head() else 0)
    resuming = resumable(job, ledger)
    admitted = [] if resuming else admit_job(job, ledger)
    job.job_dir.mkdir(parents=True, exist_ok=True)
    try:
        names, partners, layout = _enlist(grid, job, timeout)
        if resuming:
            _check_resume(job, ledger, partners)
        else:
            try:
                _check_plan_against_rows(job, ledger, partners, admitted)
            except FedpactError as exc:
                refuse(job, ledger, exc)
                raise
            ledger.append(
                EventType.JOB_CREATED,
                {"task": job.dataset, "partners": [p.name for p in partners],
                 "purpose": job.purpose, "rows": {p.name: p.train_rows for p in partners},
                 "config": job.as_dict()},
                actor="coordinator", job_id=job.job_id,
            )
        n_features = sum(len(v) for v in layout["categorical"].values()) + len(layout["numeric"])
        model = build_model(job.model, n_features, seed=job.seed)
        strategy, final_state = rounds(grid, job, ledger, names, partners, model, on_round, timeout)
    except (RoundFailed, FedpactError) as exc:
        if ledger.events(job_id=job.job_id, event_type=EventType.JOB_REFUSED.value):
            raise
        ledger.append(EventType.JOB_FAILED, {"reason": str(exc)}, actor="coordinator", job_id=job.job_id)
        raise JobFailed(f"job {job.job_id} failed: {exc}") from None
    except Exception as exc:  # Flower, the disk, the network: still a recorded, explained failure
        reason = f"internal error: {type(exc).__name__}: {exc}"
        ledger.append(EventType.JOB_FAILED, {"reason": reason}, actor="coordinator",
                      job_id=job.job_id)
        raise JobFailed(f"job {job.job_id} failed: {reason}") from exc

    model.load_state_dict(final_state)
    model_path = job.job_dir / "model.pt"
    torch.save({"state_dict": model.state_dict(), "model": job.model, "layout": layout}, model_path)
    for p in partners:
        p.epsilon = strategy.partner_epsilon.get(p.name, 0.0)
        p.noise_multiplier = strategy.partner_sigma.get(p.name, 0.0)
        p.membership_auc = strategy.partner_membership_auc.get(p.name)
        if p.name in strategy.partner_history:
            _, q, steps = strategy.partner_history[p.name]
            p.sample_rate, p.steps = q, steps
            # Every release of the partner (DP-SGD and evaluations), recomputed by dp-accounting.
            check = cross_check(strategy.partner_full_history(p.name), job.target_delta, p.epsilon)
            p.epsilon_google_rdp, p.epsilon_google_pld = check.google_rdp, check.google_pld
    reasons = []
    if not job.dp:
        reasons.append("the job trained without differential privacy (no formal guarantee, ε = ∞)")
    reproducible = sorted(getattr(strategy, "reproducible", set()))
    if reproducible:
        reasons.append("node(s) " + ", ".join(reproducible) + " ran in reproducible mode "
                       "(FEDPACT_REPRODUCIBLE_NOISE=1): batches and noise follow from the job "
                       "seed, so the ε reported is not delivered")
    audits = [p.membership_auc for p in partners if p.membership_auc is not None]
    membership_auc = max(audits) if audits else None
    final = strategy.round_log[-1] if strategy.round_log else {}
    epsilon = max((p.epsilon for p in partners), default=0.0)
    central = client_level_privacy(job, {p.name: p.train_rows for p in partners},
                                   secure_aggregation=job.secure_aggregation)
    finished = {"metrics": {k: v for k, v in final.items() if k != "round"}, "epsilon": epsilon,
                "delta": job.target_delta if job.dp else 0.0,
                "per_partner_epsilon": {p.name: p.epsilon for p in partners},
                "epsilon_crosscheck": {p.name: {"opacus_rdp": p.epsilon,
                                                "google_rdp": p.epsilon_google_rdp,
                                                "google_pld": p.epsilon_google_pld}
                                       for p in partners},
                "membership_auc": membership_auc, "model": str(model_path),
                "private": not reasons, "not_private_reasons": reasons,
                # What ran, not what was asked: SecAgg+ rounds set this on their strategy.
                "secure_aggregation": bool(getattr(strategy, "secure_aggregation", False))}
    if central:
        finished["central_dp"] = central
    ledger.append(EventType.JOB_FINISHED, finished, actor="coordinator", job_id=job.job_id)
    head = ledger.head()
    result = JobResult(
        job_id=job.job_id, config=job.as_dict(), partners=partners, rounds=strategy.round_log,
        final=final, epsilon=epsilon, delta=job.target_delta if job.dp else 0.0,
        ledger_events=(head.seq if head else 0) - first_seq,
        seconds=time.monotonic() - started, model_path=str(model_path), layout=layout,
        membership_auc=membership_auc, central_dp=central,
        histograms=getattr(strategy, "last_histograms", {}),
        private=not reasons, not_private_reasons=reasons,
    )
    (job.job_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=1, default=float))
    return result
