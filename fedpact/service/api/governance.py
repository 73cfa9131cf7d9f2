"""Multi-party governance of joint-model jobs: request, each partner's decision, run, result.

A data scientist requests a job; every partner dataset it would touch must be approved by that
partner's admin before it runs. Any partner can reject it, or revoke its approval until the run
starts. Approved jobs run one at a time in a background worker (Flower's simulation engine for
now; `JobRunner.run` is the seam for the deployment engine). Each step is a ledger event:
`job.requested`, `job.approved` / `job.rejected` / `job.revoked`, `job.started`, then what the run
itself writes (`job.created`, `data.accessed`, `round.aggregated`, `privacy.spent`,
`job.finished` / `job.failed` / `job.refused`) and `model.delivered`.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, insert, select, update

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.records import NO_PRIVACY_GUARANTEE
from fedpact.errors import ConfigurationError, FedpactError
from fedpact.federation.coordinator import JobResult, partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.models.datasets import BUILTIN_SPECS
from fedpact.privacy.budget import PrivacyBudgets
from fedpact.service.reporting import round_status

from .auth import Principal
from .datasets import CheckedRequest, DatasetError, DatasetRegistry
from .schemas import JobRequestIn
from .store import ServiceStore, decisions, dumps, job_logs, job_requests, job_rounds

log = logging.getLogger(__name__)

PENDING, QUEUED, RUNNING = "pending_approval", "queued", "running"
FINISHED, FAILED, REFUSED, REJECTED, REVOKED = "finished", "failed", "refused", "rejected", "revoked"
OPEN = (PENDING, QUEUED)
"""States in which partners may still decide (nothing has run yet)."""


def privacy_text(config: dict) -> str:
    """What a job's settings promise, in the words every screen uses: never "ε 0" without DP."""
    if not config.get("dp", True):
        return NO_PRIVACY_GUARANTEE
    if float(config.get("noise_multiplier") or 0) > 0:
        return (f"DP-SGD with noise multiplier σ = {config['noise_multiplier']}, "
                f"δ = {config.get('target_delta')} per partner dataset (ε from the plan)")
    return (f"DP-SGD, ε ≤ {config.get('target_epsilon')}, δ = {config.get('target_delta')} per "
            "partner dataset")


def consent_text(config: dict, dataset: str | None = None) -> str:
    """Whether the job's data loaders check each subject's consent, as the settings say."""
    purpose = config.get("purpose", "")
    if not config.get("require_consent"):
        return ("consent enforcement turned off by the requester: rows are used without checking "
                "each subject's consent")
    if config.get("partners"):  # registered partner datasets: their id columns stay at home
        return (f"consent enforced where the partner's dataset has a subject id column: rows "
                f"without a valid consent for {purpose} are excluded; a dataset without one cannot "
                "be checked (the records will say so)")
    spec = BUILTIN_SPECS.get(dataset or config.get("dataset", ""))
    if spec is not None and not spec.id_column:
        return (f"consent enforced where it can be checked: {spec.name} has no subject id "
                "column, so its rows cannot be checked (the records will say so)")
    return f"consent enforced: rows without a valid consent for {purpose} are excluded"


SECURE_AGGREGATION_UNAVAILABLE = (
    "secure_aggregation: secure aggregation (SecAgg+) is not available on Flower's deployment "
    "engine, which runs this coordinator's jobs: the job bundle holds fedpact's plain apps, so the "
    "coordinator would see each partner's update. Request the job without secure_aggregation "
    "(each partner's update is then DP-protected but visible to the coordinator)")


def default_model_name(task: str, dataset: str) -> str:
    """TASK-DATASET as a registry name (lower case, letters, digits and '-', at most 48)."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{task}-{dataset}".lower()))
    return name.strip("-")[:48].rstrip("-")


class GovernanceError(FedpactError):
    """A request or decision is not allowed; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass
class JobView:
    job_id: str
    status: str
    partners: list[str]
    submitted_by: str
    model_name: str
    request: dict
    config: dict
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    reason: str | None
    model_version: int | None
    result: dict | None

    @property
    def model_ref(self) -> str | None:
        return f"{self.model_name}@{self.model_version}" if self.model_version else None

    @property
    def dp(self) -> bool:
        return bool(self.config.get("dp", True))

    def summary(self) -> dict:
        return {"job_id": self.job_id, "status": self.status, "partners": self.partners,
                "dataset": self.request.get("dataset"), "task": self.request.get("task"),
                "purpose": self.request.get("purpose"), "planned_rounds": self.request.get("rounds"),
                "dp": self.dp,
                "target_epsilon": self.config.get("target_epsilon") if self.dp else None,
                "privacy": privacy_text(self.config),
                "require_consent": bool(self.config.get("require_consent")),
                "consent": consent_text(self.config, self.request.get("dataset")),
                "secure_aggregation": bool(self.config.get("secure_aggregation")),
                "submitted_by": self.submitted_by, "created_at": self.created_at,
                "updated_at": self.updated_at, "reason": self.reason, "model": self.model_ref}


def _view(row) -> JobView:
    return JobView(row.job_id, row.status, json.loads(row.partners), row.submitted_by,
                   row.model_name, json.loads(row.request), json.loads(row.config), row.created_at,
                   row.updated_at, row.started_at, row.finished_at, row.reason, row.model_version,
                   json.loads(row.result) if row.result else None)


class JobBoard:
    """Job requests and partner decisions, kept in the service DB and written to the ledger."""

    def __init__(self, store: ServiceStore, ledger: Ledger, *,
                 supports_secure_aggregation: bool = True):
        self.store = store
        self.ledger = ledger
        self.on_queued: Callable[[str], None] = lambda job_id: None
        self.supports_secure_aggregation = supports_secure_aggregation
        """False when jobs run on an engine without SecAgg+ (the deployment engine): such
        requests are refused instead of running the plain apps."""

    # ---- reading

    def get(self, job_id: str) -> JobView:
        with self.store.engine.connect() as conn:
            row = conn.execute(select(job_requests).where(job_requests.c.job_id == job_id)).first()
        if row is None:
            raise GovernanceError(f"no job {job_id!r}", 404)
        return _view(row)

    def visible(self, principal: Principal, job: JobView) -> bool:
        if principal.has("data_scientist") or principal.has("compliance_officer"):
            return True
        mine = set(principal.scopes("partner_admin")) | set(principal.scopes("node"))
        return bool(mine & set(job.partners))

    def get_for(self, principal: Principal, job_id: str) -> JobView:
        job = self.get(job_id)
        if not self.visible(principal, job):
            # Same answer as for a job that does not exist: no probing of other partners' jobs.
            raise GovernanceError(f"no job {job_id!r}", 404)
        return job

    def list_for(self, principal: Principal, status: str | None = None) -> list[JobView]:
        query = select(job_requests).order_by(job_requests.c.created_at.desc())
        if status:
            query = query.where(job_requests.c.status == status)
        with self.store.engine.connect() as conn:
            jobs = [_view(r) for r in conn.execute(query)]
        return [j for j in jobs if self.visible(principal, j)]

    def decisions(self, job_id: str) -> dict[str, dict]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(decisions).where(decisions.c.job_id == job_id)).all()
        return {r.partner: {"decision": r.decision, "by": r.decided_by, "reason": r.reason,
                            "at": r.decided_at, "event_id": r.event_id} for r in rows}

    def rounds(self, job_id: str) -> list[dict]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(job_rounds).where(job_rounds.c.job_id == job_id)
                                .order_by(job_rounds.c.round)).all()
        return [json.loads(r.metrics) for r in rows]

    def logs(self, job_id: str, after_id: int = 0, limit: int = 1000) -> list[dict]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(job_logs).where(and_(job_logs.c.job_id == job_id,
                                                            job_logs.c.id > after_id))
                                .order_by(job_logs.c.id).limit(limit)).all()
        return [{"id": r.id, "at": r.at, "level": r.level, "message": r.message} for r in rows]

    def budget_preview(self, job: JobView) -> list[dict]:
        """Each partner dataset's remaining budget next to what the job asks (admission preview)."""
        budgets = PrivacyBudgets(self.ledger).all()
        out = []
        for name in job.partners:
            b = budgets.get(name)
            remaining = b.epsilon_remaining if b and b.epsilon_max > 0 else None
            entry = {"dataset": name, "epsilon_max": b.epsilon_max if b else None,
                     "epsilon_remaining": remaining}
            if not job.dp:
                # No ε is charged because none is bounded: not "ε 0", and nothing "fits".
                entry.update(requested_epsilon=None, requested=NO_PRIVACY_GUARANTEE, ok=None,
                             no_privacy=True)
            else:
                requested = job.config.get("target_epsilon")
                entry.update(requested_epsilon=requested, requested=privacy_text(job.config),
                             no_privacy=False,
                             ok=remaining is not None and requested <= remaining + 1e-9)
            out.append(entry)
        return out

    def log(self, job_id: str, message: str, level: str = "info") -> None:
        with self.store.write_lock, self.store.engine.begin() as conn:
            conn.execute(insert(job_logs).values(job_id=job_id, at=self.store.now(), level=level,
                                                 message=message))

    # ---- requesting

    def submit(self, principal: Principal, req: JobRequestIn, *, home: str) -> JobView:
        """Record a data team's request; partners' admins then decide on it.

        A request naming registered partner datasets (`partner_datasets`) is checked against the
        dataset registry first (`DatasetRegistry.check_request`): nobody is asked to approve a
        job whose datasets are unknown, of another group, task, label or layout, without a
        partner admin or, with DP, without a privacy budget."""
        checked: CheckedRequest | None = None
        if req.partner_datasets is not None:
            try:
                checked = DatasetRegistry(self.store, self.ledger).check_request(
                    req.dataset, list(req.partner_datasets), task=req.task, dp=req.dp)
            except DatasetError as exc:
                raise GovernanceError(str(exc), exc.status) from None
            task, dataset_name, features = checked.task, req.dataset, checked.features
            what = f"the layout registered for {', '.join(checked.names)}"
        else:
            spec = BUILTIN_SPECS[req.dataset]
            if req.task is not None and req.task != spec.task:
                raise GovernanceError(f"task = {req.task!r} does not match dataset {req.dataset!r}, "
                                      f"which is a {spec.task} data set", 422)
            task, dataset_name, features = spec.task, spec.name, list(spec.features)
            what = spec.name
        if req.features is not None and list(req.features) != features:
            unknown = [f for f in req.features if f not in features]
            left_out = [f for f in features if f not in req.features]
            detail = "; ".join(x for x in (
                f"unknown columns {unknown}" if unknown else "",
                f"columns left out {left_out}" if left_out else "",
                "same columns in another order" if not unknown and not left_out else "") if x)
            raise GovernanceError(
                f"features: {detail}. Jobs read every feature column of {what} in its declared "
                f"order (feature subsets are not supported yet); omit `features` to accept: "
                f"{', '.join(features)}", 422)
        if req.secure_aggregation and not self.supports_secure_aggregation:
            raise GovernanceError(SECURE_AGGREGATION_UNAVAILABLE, 422)
        split = ({"partners": ",".join(checked.names), "task": task} if checked is not None else
                 {"partitioning": req.partitioning, "num_partitions": req.partners})
        job = JobConfig(dataset=req.dataset, **split, rounds=req.rounds, local_epochs=req.local_epochs,
                        batch_size=req.batch_size, learning_rate=req.learning_rate, model=req.model,
                        dp=req.dp, target_epsilon=req.target_epsilon, target_delta=req.target_delta,
                        max_grad_norm=req.max_grad_norm, seed=req.seed, purpose=req.purpose,
                        require_consent=bool(req.require_consent),
                        secure_aggregation=bool(req.secure_aggregation), home=home)
        try:
            job.validate()
        except ConfigurationError as exc:
            raise GovernanceError(str(exc), 422) from None
        partners = partner_datasets(job)
        model_name = req.model_name or default_model_name(task, req.dataset)
        request = {**req.model_dump(), "task": task, "features": features}
        registered = {}
        if checked is not None:  # what the partners approve: these datasets, this layout
            registered = {"group": checked.group, "layout_sha256": checked.layout_sha256}
            request.update(partitioning=job.partitioning, partners=len(partners), **registered)
        else:
            request.pop("partner_datasets", None)  # a built-in request stays as it always was
        if not req.dp:  # no (ε, δ) is promised: don't keep the form's defaults as if it were
            request.update(target_epsilon=None, target_delta=None)
        event = self.ledger.append(
            EventType.JOB_REQUESTED,
            {"task": task, "dataset": dataset_name, "partners": partners, "purpose": req.purpose,
             "features": features, "target_epsilon": req.target_epsilon if req.dp else None,
             "target_delta": req.target_delta if req.dp else None, "dp": req.dp,
             "require_consent": job.require_consent,
             "secure_aggregation": job.secure_aggregation,
             "rounds": req.rounds, "partitioning": job.partitioning, "model": model_name,
             "requested_by": principal.username, **registered},
            actor=principal.actor, job_id=job.job_id)
        now = self.store.now()
        with self.store.write_lock, self.store.engine.begin() as conn:
            conn.execute(insert(job_requests).values(
                job_id=job.job_id, status=PENDING, config=dumps(job.as_dict()), request=dumps(request),
                partners=json.dumps(partners), submitted_by=principal.username, model_name=model_name,
                created_at=now, updated_at=now, request_event_id=event.event_id))
        self.log(job.job_id, f"requested by {principal.username}; waiting for the approval of "
                             f"{', '.join(partners)}")
        config = job.as_dict()
        self.log(job.job_id, f"privacy: {privacy_text(config)}; {consent_text(config)}"
                 + ("; secure aggregation (SecAgg+)" if job.secure_aggregation else ""),
                 "info" if req.dp and job.require_consent else "warning")
        return self.get(job.job_id)

    # ---- deciding

    def decide(self, principal: Principal, job_id: str, partner: str, decision: str,
               reason: str | None = None, *, acknowledge_no_privacy: bool = False) -> JobView:
        """`approved`, `rejected` or `revoked` for one partner dataset the caller administers.

        Approving a job without DP needs `acknowledge_no_privacy`: the admin confirms that it
        gives no formal privacy guarantee (ε = ∞) for the partner's rows."""
        if decision not in ("approved", "rejected", "revoked"):
            raise GovernanceError(f"unknown decision {decision!r}", 422)
        if not principal.has("partner_admin"):
            raise GovernanceError(f"role partner_admin required to decide on jobs; "
                                  f"{principal.username} holds {principal.describe()}", 403)
        reason = (reason or "").strip() or None
        if decision != "approved" and not reason:
            raise GovernanceError(f"reason: say why the job is {decision} (no personal data)", 422)
        kinds = {"approved": EventType.JOB_APPROVED, "rejected": EventType.JOB_REJECTED,
                 "revoked": EventType.JOB_REVOKED}
        queued = False
        with self.store.write_lock:
            job = self.get_for(principal, job_id)
            if partner not in job.partners:
                raise GovernanceError(f"partner: {partner!r} is not part of job {job_id}; its partners "
                                      f"are {', '.join(job.partners)}", 422)
            if not principal.admins(partner):
                raise GovernanceError(f"role partner_admin for {partner} required; {principal.username} "
                                      f"holds {principal.describe()}", 403)
            if job.status not in OPEN:
                raise GovernanceError(f"job {job_id} is {job.status}: decisions are only possible "
                                      "before it starts", 409)
            previous = self.decisions(job_id).get(partner, {}).get("decision")
            if decision == "approved" and previous == "approved":
                raise GovernanceError(f"{partner} has already approved job {job_id}", 409)
            if decision == "rejected" and previous == "approved":
                raise GovernanceError(f"{partner} approved job {job_id}; withdraw that with revoke", 409)
            if decision == "revoked" and previous != "approved":
                raise GovernanceError(f"{partner} has not approved job {job_id}; nothing to revoke "
                                      "(use reject to refuse it)", 409)
            if decision == "approved" and not job.dp and not acknowledge_no_privacy:
                raise GovernanceError(
                    f"job {job_id} trains without differential privacy: it gives "
                    f"{NO_PRIVACY_GUARANTEE} for the rows of {partner}. To approve it anyway, "
                    "confirm that explicitly with acknowledge_no_privacy: true (console: tick the "
                    "confirmation box; CLI: --acknowledge-no-privacy), or reject it", 422)
            payload = {"partner": partner, "dataset": partner, "decided_by": principal.username,
                       "purpose": job.request.get("purpose", "")}
            if decision == "approved" and not job.dp:
                payload["acknowledged_no_privacy"] = True
            if reason:
                payload["reason"] = reason
            try:
                event = self.ledger.append(kinds[decision], payload, actor=principal.actor,
                                           job_id=job_id)
            except LedgerError as exc:  # e.g. personal data in the reason
                raise GovernanceError(str(exc), 422) from None
            now = self.store.now()
            with self.store.engine.begin() as conn:
                values = dict(decision=decision, decided_by=principal.username, reason=reason,
                              decided_at=now, event_id=event.event_id)
                if previous is None:
                    conn.execute(insert(decisions).values(job_id=job_id, partner=partner, **values))
                else:
                    conn.execute(update(decisions).where(and_(decisions.c.job_id == job_id,
                                                              decisions.c.partner == partner))
                                 .values(**values))
                approved = {r.partner for r in conn.execute(
                    select(decisions.c.partner).where(and_(decisions.c.job_id == job_id,
                                                           decisions.c.decision == "approved")))}
                new_status = job.status
                if decision == "rejected":
                    new_status = REJECTED
                elif decision == "revoked":
                    new_status = REVOKED
                elif approved >= set(job.partners):
                    new_status, queued = QUEUED, True
                conn.execute(update(job_requests).where(job_requests.c.job_id == job_id).values(
                    status=new_status, updated_at=now,
                    reason=(f"{decision} by {partner}: {reason}" if decision != "approved" else None)))
        self.log(job_id, f"{partner}: {decision} by {principal.username}" + (f" ({reason})" if reason else "")
                 + (f", confirming {NO_PRIVACY_GUARANTEE}" if decision == "approved" and not job.dp
                    else ""))
        if queued:
            self.log(job_id, "every partner approved: queued to run")
            self.on_queued(job_id)
        return self.get(job_id)

    # ---- the worker's transitions

    def claim(self, job_id: str) -> bool:
        """queued -> running, atomically (a revocation that got there first wins)."""
        with self.store.write_lock, self.store.engine.begin() as conn:
            done = conn.execute(update(job_requests).where(and_(
                job_requests.c.job_id == job_id, job_requests.c.status == QUEUED)).values(
                status=RUNNING, started_at=self.store.now(), updated_at=self.store.now()))
        return done.rowcount == 1

    def finish(self, job_id: str, status: str, *, reason: str | None = None,
               result: JobResult | None = None, model_version: int | None = None) -> None:
        values = dict(status=status, finished_at=self.store.now(), updated_at=self.store.now(),
                      reason=reason)
        if result is not None:
            values["result"] = dumps(result.to_dict())
        if model_version is not None:
            values["model_version"] = model_version
        with self.store.write_lock, self.store.engine.begin() as conn:
            conn.execute(update(job_requests).where(job_requests.c.job_id == job_id).values(**values))

    def set_model(self, job_id: str, version: int) -> None:
        with self.store.write_lock, self.store.engine.begin() as conn:
            conn.execute(update(job_requests).where(job_requests.c.job_id == job_id)
                         .values(model_version=version, updated_at=self.store.now()))

    def record_round(self, job_id: str, rnd: int, entry: dict) -> None:
        with self.store.write_lock, self.store.engine.begin() as conn:
            conn.execute(insert(job_rounds).prefix_with("OR REPLACE").values(
                job_id=job_id, round=rnd, metrics=dumps(entry)))

    def recover(self) -> list[str]:
        """After a restart: runs that were cut off fail (ledger), queued jobs are queued again."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(job_requests.c.job_id, job_requests.c.status).where(
                job_requests.c.status.in_((QUEUED, RUNNING)))).all()
        again = []
        for job_id, status in rows:
            if status == RUNNING:
                reason = "the coordinator service stopped while this job was running"
                self.ledger.append(EventType.JOB_FAILED, {"reason": reason}, actor="coordinator",
                                   job_id=job_id)
                self.finish(job_id, FAILED, reason=reason)
                self.log(job_id, reason, "error")
            else:
                again.append(job_id)
        return again


JobRun = Callable[[JobConfig, Callable[[int, dict], None]], JobResult]


def simulated_run(job: JobConfig, on_round: Callable[[int, dict], None]) -> JobResult:
    """Flower's simulation engine: one virtual SuperNode per partner on this machine. A job
    without DP runs only after every partner's admin acknowledged that at approval
    (`acknowledge_no_privacy`); the simulated nodes' policy then allows its model release."""
    from fedpact.federation.simulation import allow_without_dp, run_simulated_job

    policy = None if job.dp else allow_without_dp(
        job, "every partner's admin approved it acknowledging no formal privacy guarantee")
    return run_simulated_job(job, on_round, node_policy=policy)


class JobRunner:
    """One background thread that runs approved jobs, one at a time, in approval order."""

    def __init__(self, board: JobBoard, on_finished: Callable[[JobConfig, JobResult, JobView], int | None],
                 run: JobRun = simulated_run):
        self.board = board
        self.on_finished = on_finished
        self.run = run
        self.queue: queue.Queue[str] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.current: str | None = None
        self.recovered = False
        self._stopping = threading.Event()
        board.on_queued = self.queue.put

    def start(self) -> None:
        self._stopping.clear()
        if self.thread is not None and self.thread.is_alive():
            return
        if not self.recovered:  # once per process: earlier runs of this process are not stale
            for job_id in self.board.recover():
                self.queue.put(job_id)
            self.recovered = True
        self.thread = threading.Thread(target=self._loop, name="fedpact-job-runner", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop after the job it is running (if any); wait up to `timeout`."""
        self._stopping.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout)

    def idle(self) -> bool:
        return self.current is None and self.queue.empty()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job_id = self.queue.get(timeout=0.25)
            except queue.Empty:
                continue
            self.current = job_id
            try:
                self.run_one(job_id)
            except Exception:  # never let one job kill the worker
                log.exception("job %s: unexpected failure in the runner", job_id)
            finally:
                self.current = None

    def run_one(self, job_id: str) -> None:
        board = self.board
        if not board.claim(job_id):
            return  # revoked (or already taken) before it started
        try:
            self._run_claimed(job_id)
        except Exception as exc:  # a fault of ours: the job must not stay "running"
            log.exception("job %s: unexpected failure in the runner", job_id)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            if board.get(job_id).status == RUNNING:
                board.ledger.append(EventType.JOB_FAILED, {"reason": reason}, actor="coordinator",
                                    job_id=job_id)
                board.finish(job_id, FAILED, reason=reason)
                board.log(job_id, reason, "error")

    def _run_claimed(self, job_id: str) -> None:
        board, ledger = self.board, self.board.ledger
        view = board.get(job_id)
        job = JobConfig(**view.config)
        engine = getattr(self.run, "engine", "flower-simulation")
        if job.secure_aggregation and not getattr(self.run, "supports_secure_aggregation", True):
            # Admission: e.g. a job queued before the service was restarted with --superlink.
            # Refused before job.started: no node is contacted, no row is read.
            from fedpact.federation.coordinator import refuse

            reason = SECURE_AGGREGATION_UNAVAILABLE
            refuse(job, ledger, FedpactError(reason))
            board.finish(job_id, REFUSED, reason=reason)
            board.log(job_id, f"refused: {reason}", "error")
            return
        approvals = [d["event_id"] for d in board.decisions(job_id).values()]
        ledger.append(EventType.JOB_STARTED,
                      {"purpose": job.purpose, "partners": view.partners, "approvals": approvals,
                       "engine": engine}, actor="coordinator", job_id=job_id)
        where = ("Flower's deployment engine (SuperLink)" if engine == "flower-deployment"
                 else "Flower's simulation engine")
        board.log(job_id, f"started on {where}: {job.num_partitions} partner nodes, "
                          f"{job.rounds} rounds")

        def on_round(rnd: int, entry: dict) -> None:
            if not job.dp:  # the run reports ε 0.0 without DP; no ε bounds it
                entry = {**entry, "epsilon": None}
            board.record_round(job_id, rnd, entry)
            board.log(job_id, round_status(rnd, job.rounds, entry, dp=job.dp))

        try:
            result = self.run(job, on_round)
        except FedpactError as exc:
            refused = bool(ledger.events(job_id=job_id, event_type=EventType.JOB_REFUSED))
            board.finish(job_id, REFUSED if refused else FAILED, reason=str(exc))
            board.log(job_id, f"{'refused' if refused else 'failed'}: {exc}", "error")
            return
        except Exception as exc:  # e.g. Flower or Ray failing outside fedpact's own checks
            reason = f"internal error: {type(exc).__name__}: {exc}"
            if not ledger.events(job_id=job_id, event_type=EventType.JOB_FAILED):
                ledger.append(EventType.JOB_FAILED, {"reason": reason}, actor="coordinator", job_id=job_id)
            board.finish(job_id, FAILED, reason=reason)
            board.log(job_id, reason, "error")
            return
        board.finish(job_id, FINISHED, result=result)
        board.log(job_id, f"finished in {result.seconds:.0f} s: ROC-AUC {result.final.get('roc_auc', float('nan')):.3f}"
                          f"{'' if result.private or not job.dp else ' (not private: ' + '; '.join(result.not_private_reasons) + ')'}, "
                          + (f"ε {result.epsilon:.3f}" if job.dp else NO_PRIVACY_GUARANTEE))
        try:
            version = self.on_finished(job, result, board.get(job_id))
        except Exception as exc:
            log.exception("job %s: model registration failed", job_id)
            board.log(job_id, f"model registration failed: {exc}", "error")
            return
        if version is not None:
            board.set_model(job_id, version)
            board.log(job_id, f"model {view.model_name}@{version} registered with its card, plots "
                              "and TorchScript export")
