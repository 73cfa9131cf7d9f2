"""The coordinator service: governed jobs, model registry, budgets and audit over HTTP (FastAPI).

`create_app(home)` serves the JSON API under `/api/v1` (OpenAPI at `/docs`, `/openapi.json`) and the
web console under `/console`. API callers present a bearer token (`fedpact admin token issue`);
people use the console with password + TOTP. Every endpoint checks the caller's role and, for
partner admins and nodes, the partner dataset the role holds for. Errors are JSON
`{"detail": "..."}` naming the field, role or resource at fault; bad input gives 4xx, never 500.

`RequestGuard` (outermost) authenticates API requests before their body is read (401 whatever
the body), refuses bodies over `max_body_bytes` (413, counted as they arrive), and adds HSTS to
responses served securely; a 422 names fields and reasons, never the input.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from fedpact import __version__
from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.records import NO_PRIVACY_GUARANTEE
from fedpact.errors import FedpactError
from fedpact.privacy.budget import BudgetError, PrivacyBudgets

from .auth import AccountError, Accounts, AuthError, LoginThrottle, Principal
from .datasets import DatasetError, DatasetRegistry
from .governance import OPEN, GovernanceError, JobBoard, JobRun, JobRunner, JobView, simulated_run
from .registry import PLOTS, ModelRegistry, RegistryError
from .schemas import (
    GROUP,
    PARTNER_DATASET,
    SLUG,
    BudgetIn,
    DatasetIn,
    DecisionIn,
    JobRequestIn,
    clean_errors,
    error_summary,
)
from .store import ServiceStore, _finite

API = "/api/v1"
MAX_BODY_BYTES = 1024 * 1024
"""Default request body limit (`create_app(max_body_bytes=...)`): larger bodies get 413."""
MAX_SEQ = 2**62
"""The largest sequence number, log id or model version a request may name (SQLite's INTEGER
is 64-bit signed)."""
HSTS = "max-age=31536000"
_VERSION = re.compile(r"v?[0-9]+")  # fullmatch: ASCII digits, no trailing newline


class CoordinatorService:
    """Everything one coordinator holds: service DB, ledger, accounts, job board, runner, registry."""

    def __init__(self, home: str | Path, *, clock: Callable[[], float] = time.time,
                 run: JobRun = simulated_run, start_worker: bool = True):
        self.home = Path(home)
        self.store = ServiceStore(self.home, clock=clock)
        self.ledger = Ledger.open(self.home / "ledger.db")
        self.accounts = Accounts(self.store, self.ledger)
        self.board = JobBoard(self.store, self.ledger, supports_secure_aggregation=bool(
            getattr(run, "supports_secure_aggregation", True)))
        self.registry = ModelRegistry(self.store, self.ledger)
        self.datasets = DatasetRegistry(self.store, self.ledger)
        self.runner = JobRunner(self.board, self._register, run)
        self.start_worker = start_worker
        self.audit_slots = anyio.Semaphore(AUDIT_QUERY_SLOTS)
        self.login_throttle = LoginThrottle(self.store.now)
        self.checkpoint_timer_s: float | None = None
        """Seconds between timed checkpoints while serving (None: the ledger's interval)."""

    def _register(self, job, result, view: JobView) -> int:
        return self.registry.register(job, result, name=view.model_name,
                                      requested_by=view.submitted_by, partners=view.partners)

    def start(self) -> None:
        """Start of a server run: the job worker, and the ledger's checkpoint timer, so events
        written while no one else appends are signed within `checkpoint_interval_s`."""
        if self.start_worker:
            self.runner.start()
        if self.ledger.verifier_key is not None:  # a ledger without its signing key cannot sign
            self.ledger.start_checkpoint_timer(self.checkpoint_timer_s)

    def stop(self) -> None:
        """End of a server run (lifespan shutdown): stop taking jobs and the checkpoint timer,
        sign a checkpoint over the newest ledger events, release pooled connections. The service
        stays usable."""
        self.runner.stop()
        self.ledger.stop_checkpoint_timer()
        self.accounts.flush_unknown_failures()
        self.ledger.checkpoint()
        self.store.engine.dispose()

    def close(self) -> None:
        self.runner.stop()
        self.ledger.close()
        self.store.close()

    # ---- what several front ends (API, console) share

    def job_detail(self, principal: Principal, job_id: str) -> dict:
        job = self.board.get_for(principal, job_id)
        decisions = self.board.decisions(job_id)
        detail = {**job.summary(), "request": job.request, "decisions": decisions,
                  "rounds": rounds_view(job, self.board.rounds(job_id)),
                  "awaiting": [p for p in job.partners
                               if decisions.get(p, {}).get("decision") != "approved"]
                  if job.status in OPEN else [],
                  "budgets": self.board.budget_preview(job) if job.status in OPEN else None}
        if job.result:
            detail["result"] = result_summary(job.result, dp=job.dp)
        return detail

    def visible_models(self, principal: Principal) -> list[dict]:
        entries = self.registry.list()
        if principal.has("data_scientist") or principal.has("compliance_officer"):
            return entries
        mine = set(principal.scopes("partner_admin"))
        return [m for m in entries if mine & set(m["partners"])]

    def model_for(self, principal: Principal, ref: str) -> dict:
        check_model_ref(ref)
        try:
            entry = self.registry.get(ref)
        except (OverflowError, ValueError):  # a version the checks above did not foresee
            raise RegistryError(f"model reference {_quote(ref)}: the version is out of range",
                                422) from None
        if principal.has("data_scientist") or principal.has("compliance_officer"):
            return entry
        if set(principal.scopes("partner_admin")) & set(entry["partners"]):
            return entry
        raise RegistryError(f"no model {ref!r} in the registry", 404)

    def budgets_for(self, principal: Principal) -> list[dict]:
        budgets = PrivacyBudgets(self.ledger).all()
        wide = principal.has("compliance_officer") or principal.has("data_scientist")
        mine = set(principal.scopes("partner_admin"))
        out = []
        for name in sorted(set(budgets) | (mine if not wide else set())):
            if not wide and name not in mine:
                continue
            b = budgets.get(name)
            out.append({"dataset": name, "epsilon_max": b.epsilon_max if b else None,
                        "delta": b.delta if b else None,
                        "epsilon_spent": b.epsilon_spent if b else 0.0,
                        "delta_spent": b.delta_spent if b else 0.0,
                        "epsilon_remaining": b.epsilon_remaining if b and b.epsilon_max else None,
                        "jobs": b.jobs if b else {}, "you_administer": name in mine})
        return out

    def set_budget(self, principal: Principal, dataset: str, epsilon: float, delta: float) -> dict:
        if not principal.admins(dataset):
            raise GovernanceError(f"role partner_admin for {dataset} required to set its budget; "
                                  f"{principal.username} holds {principal.describe()}", 403)
        PrivacyBudgets(self.ledger).set(dataset, epsilon, delta, actor=principal.actor)
        return next(b for b in self.budgets_for(principal) if b["dataset"] == dataset)

    def register_dataset(self, principal: Principal, body: DatasetIn) -> dict:
        """A partner admin registers (or registers again) its own partner dataset's layout."""
        if not principal.admins(body.name):
            raise GovernanceError(f"role partner_admin for {body.name} required to register it; "
                                  f"{principal.username} holds {principal.describe()}", 403)
        entry = self.datasets.register(
            name=body.name, group=body.group, task=body.task, label=body.label,
            positive=body.positive, purpose=body.purpose, layout=body.layout.as_layout(),
            registered_by=principal.username, actor=principal.actor)
        return entry.to_dict()

    def dataset_for(self, name: str) -> dict:
        entry = self.datasets.get(name)
        if entry is None:
            raise DatasetError(f"no partner dataset {name!r} is registered (GET /api/v1/datasets "
                               "lists them)", 404)
        return {**entry.to_dict(), "admins": self.datasets.admins(name),
                "open_jobs": self.datasets.open_jobs(name)}

    def audit_page(self, principal: Principal, *, types: list[str], job_id: str | None,
                   partner: str | None, dataset: str | None, purpose: str | None,
                   subject: str | None, since: str | None, until: str | None, after_seq: int,
                   limit: int) -> dict:
        from fedpact.audit.events import parse_timestamp
        from fedpact.audit.query import EventFilter, query_events

        if not 0 <= after_seq <= MAX_SEQ:
            raise GovernanceError(f"after_seq must be between 0 and {MAX_SEQ}", 422)
        try:  # bad filters are the caller's mistake (422); any other ledger error is ours
            for kind in types:
                if len(kind) > 64:
                    raise LedgerError(f"type {_quote(kind)} is not an event type")
                EventType.parse(kind)
            for label, value in (("since", since), ("until", until)):
                if value:
                    parse_timestamp(value, label)
                    check_timestamp_range(value, label)
            if subject is not None and not subject.strip():
                raise LedgerError("subject: give a subject id or pseudonym, not blanks")
        except LedgerError as exc:
            raise GovernanceError(one_line(str(exc)), 422) from None
        where = EventFilter(subject=subject or None, partner=partner or None, dataset=dataset or None,
                            purpose=purpose or None, event_types=tuple(types), job_id=job_id or None,
                            since=since or None, until=until or None)
        page = query_events(self.ledger, where, after_seq=after_seq, limit=limit)
        events = [{"seq": e.seq, "event_id": e.event_id, "timestamp": e.timestamp,
                   "event_type": e.event_type, "actor": e.actor, "job_id": e.job_id,
                   "payload": {k: v for k, v in e.payload.items() if k != "personal"},
                   "prev_hash": e.prev_hash, "hash": e.hash}
                  for e in page.events]
        if subject:
            # Records about one data subject are personal data: reading them is a data access.
            from fedpact.audit.subjects import SubjectKeys

            pseudonym = SubjectKeys(self.ledger).pseudonym(subject)  # keeps a pseudonym as is
            self.ledger.append(EventType.DATA_ACCESSED,
                               {"node": "coordinator", "dataset": "audit-ledger",
                                "rows": len(events), "columns": ["subject", "payload"],
                                "purpose": "compliance_audit", "subject": pseudonym,
                                "principal": principal.username, "channel": "api"},
                               actor=principal.actor)
        return {"events": events, "next_after_seq": page.next_after_seq}


def _quote(value: str, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: an error names the input without echoing it."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def check_model_ref(ref: str) -> None:
    """A model reference the registry can look up: NAME, or NAME@VERSION with VERSION a number
    from 1 to 2^62 (larger ones overflow SQLite's INTEGER); else RegistryError 422."""
    name, _, version = (ref or "").partition("@")
    if not name or len(ref) > 200:
        raise RegistryError(f"model reference {_quote(ref or '')}: expected NAME or NAME@VERSION", 422)
    if not version:
        return
    if not _VERSION.fullmatch(version):
        raise RegistryError(f"model reference {_quote(ref)}: the version must be a number", 422)
    if len(version) > 20 or int(version.lstrip("v")) > MAX_SEQ:
        raise RegistryError(f"model reference {_quote(ref)}: the version is out of range "
                            f"(1 to {MAX_SEQ})", 422)


def check_timestamp_range(value: str, label: str) -> datetime:
    """An ISO-8601 timestamp with offset that is a time in UTC years 1-9999 (a far one such as
    9999-12-31T23:59:59-23:59 overflows when converted); else LedgerError naming `label`."""
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except (OverflowError, ValueError):
        raise LedgerError(f"{label} {_quote(value)} is out of range: give a time between years "
                          "0001 and 9999 in UTC") from None


def result_summary(result: dict, *, dp: bool = True) -> dict:
    keys = ("job_id", "final", "epsilon", "delta", "membership_auc", "seconds", "central_dp")
    out = {k: result.get(k) for k in keys}
    for k in ("private", "not_private_reasons"):  # what the run says it delivered, when it says
        if k in result:
            out[k] = result[k]
    out["partners"] = result.get("partners", [])
    out["rounds"] = len(result.get("rounds", []))
    return _finite(privacy_view(out, dp=dp))


_PARTNER_EPSILONS = ("epsilon", "epsilon_google_rdp", "epsilon_google_pld", "noise_multiplier",
                     "sample_rate", "steps")


def privacy_view(result: dict, *, dp: bool) -> dict:
    """A result as the API shows it: without DP no ε at all (the run reports 0.0, which would
    read as "no privacy loss"), and the words every screen uses instead."""
    if dp:
        return {**result, "dp": True}
    out = {**result, "dp": False, "epsilon": None, "delta": None, "privacy": NO_PRIVACY_GUARANTEE}
    if isinstance(out.get("partners"), list):
        out["partners"] = [{**p, **{k: None for k in _PARTNER_EPSILONS if k in p}}
                           if isinstance(p, dict) else p for p in out["partners"]]
    if isinstance(out.get("rounds"), list):
        out["rounds"] = [{**r, "epsilon": None} if isinstance(r, dict) else r for r in out["rounds"]]
    if isinstance(out.get("final"), dict) and "epsilon" in out["final"]:
        out["final"] = {**out["final"], "epsilon": None}
    return out


def rounds_view(job: JobView, rounds: list[dict]) -> list[dict]:
    """Per-round metrics; without DP the "ε so far" is absent (None), not 0."""
    return rounds if job.dp else [{**r, "epsilon": None} for r in rounds]


# --------------------------------------------------------------------------- authentication

bearer = HTTPBearer(auto_error=False, description="API token from `fedpact admin token issue`.")


# Dependencies are `async def`: FastAPI would run plain `def` ones in the thread pool, one thread
# hop each; these are cheap (the token check is one indexed SQLite read) so they run inline.


async def service_of(request: Request) -> CoordinatorService:
    return request.app.state.service


MISSING_TOKEN = "missing API token: send the header Authorization: Bearer fpt_…"


async def api_principal(request: Request,
                        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    found = request.scope.get(PRINCIPAL)  # RequestGuard authenticated it before the body came
    if found is not None:
        return found
    if creds is None:
        raise HTTPException(401, MISSING_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    try:
        return request.app.state.service.accounts.authenticate_token(creds.credentials)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


def require(*roles: str):
    """Dependency: the caller holds at least one of `roles` (in any scope), else 403 naming them."""

    async def check(principal: Annotated[Principal, Depends(api_principal)]) -> Principal:
        if not any(principal.has(r) for r in roles):
            raise HTTPException(403, f"role {' or '.join(roles)} required; {principal.username} holds "
                                     f"{principal.describe()}")
        return principal

    return check


AnyRole = Annotated[Principal, Depends(require("data_scientist", "compliance_officer",
                                               "partner_admin", "node"))]
People = Annotated[Principal, Depends(require("data_scientist", "compliance_officer", "partner_admin"))]
Scientist = Annotated[Principal, Depends(require("data_scientist"))]
PartnerAdmin = Annotated[Principal, Depends(require("partner_admin"))]
Compliance = Annotated[Principal, Depends(require("compliance_officer"))]
Node = Annotated[Principal, Depends(require("node"))]
Service = Annotated[CoordinatorService, Depends(service_of)]
JobId = Annotated[str, PathParam(max_length=64, description="Job id, e.g. job-0123456789ab.")]
ModelRef = Annotated[str, PathParam(max_length=120, description="NAME@VERSION, or NAME for the latest.")]

ERRORS = {401: {"description": "missing, invalid or expired token"},
          403: {"description": "the caller lacks the role or scope"},
          422: {"description": "malformed request; `detail` names the field"}}


# --------------------------------------------------------------------------- API routes

router = APIRouter(prefix=API, responses=ERRORS)


@router.get("/health", tags=["service"], responses={})
def health(service: Service) -> dict:
    """Liveness (no authentication): version and whether the job runner is busy."""
    return {"status": "ok", "version": __version__, "runner": "idle" if service.runner.idle() else "busy"}


@router.get("/me", tags=["service"])
def me(principal: Annotated[Principal, Depends(api_principal)]) -> dict:
    """Who the token belongs to and the roles it carries."""
    return {"username": principal.username, "kind": principal.kind,
            "roles": [{"role": g.role, "scope": g.scope} for g in principal.grants]}


@router.post("/jobs", status_code=201, tags=["jobs"])
def submit_job(body: JobRequestIn, principal: Scientist, service: Service) -> dict:
    """Request a joint model (data_scientist). It waits for every partner admin's approval."""
    job = service.board.submit(principal, body, home=str(service.home))
    return service.job_detail(principal, job.job_id)


@router.get("/jobs", tags=["jobs"])
def list_jobs(principal: AnyRole, service: Service,
              status: Annotated[str | None, Query(max_length=32)] = None) -> list[dict]:
    """Jobs the caller may see: all for data scientists and compliance officers, their partners'
    for partner admins and nodes."""
    return [j.summary() for j in service.board.list_for(principal, status)]


@router.get("/jobs/{job_id}", tags=["jobs"], responses={404: {"description": "no such job"}})
def get_job(job_id: JobId, principal: AnyRole, service: Service) -> dict:
    """Status, request, each partner's decision, per-round metrics and the result summary."""
    return service.job_detail(principal, job_id)


@router.get("/jobs/{job_id}/rounds", tags=["jobs"], responses={404: {"description": "no such job"}})
def job_rounds(job_id: JobId, principal: AnyRole, service: Service) -> list[dict]:
    """Pooled metrics after each round (ROC-AUC, PR-AUC, lift, Brier, ε so far)."""
    job = service.board.get_for(principal, job_id)
    return rounds_view(job, service.board.rounds(job_id))


@router.get("/jobs/{job_id}/logs", tags=["jobs"], responses={404: {"description": "no such job"}})
def job_logs(job_id: JobId, principal: AnyRole, service: Service,
             after_id: Annotated[int, Query(ge=0, le=2**62)] = 0,
             limit: Annotated[int, Query(ge=1, le=5000)] = 1000) -> list[dict]:
    """The job's log lines (decisions, queueing, rounds, outcome); page with `after_id`."""
    service.board.get_for(principal, job_id)
    return service.board.logs(job_id, after_id, limit)


@router.get("/jobs/{job_id}/result", tags=["jobs"], responses={404: {"description": "no result"}})
def job_result(job_id: JobId, principal: People, service: Service) -> dict:
    """The full job result (metrics, ε per partner with the cross-check, rounds) once finished."""
    job = service.board.get_for(principal, job_id)
    if not job.result:
        raise GovernanceError(f"job {job_id} is {job.status}: it has no result", 404)
    return {**_finite(privacy_view(job.result, dp=job.dp)), "model": job.model_ref}


def _decision(decision: str):
    def endpoint(job_id: JobId, body: DecisionIn, principal: PartnerAdmin, service: Service) -> dict:
        service.board.decide(principal, job_id, body.partner, decision, body.reason,
                             acknowledge_no_privacy=body.acknowledge_no_privacy)
        return service.job_detail(principal, job_id)

    return endpoint


router.add_api_route("/jobs/{job_id}/approve", _decision("approved"), methods=["POST"], tags=["jobs"],
                     summary="Approve a job for one partner dataset (partner_admin of it); a job "
                             "without DP needs acknowledge_no_privacy: true",
                     responses={404: {"description": "no such job"}, 409: {"description": "not open"}})
router.add_api_route("/jobs/{job_id}/reject", _decision("rejected"), methods=["POST"], tags=["jobs"],
                     summary="Reject a job for one partner dataset; the job will not run",
                     responses={404: {"description": "no such job"}, 409: {"description": "not open"}})
router.add_api_route("/jobs/{job_id}/revoke", _decision("revoked"), methods=["POST"], tags=["jobs"],
                     summary="Withdraw an approval before the job starts; the job will not run",
                     responses={404: {"description": "no such job"}, 409: {"description": "not open"}})


@router.get("/models", tags=["models"])
def list_models(principal: People, service: Service) -> list[dict]:
    """Registered model versions the caller may see."""
    return _finite(service.visible_models(principal))


@router.get("/models/{ref}", tags=["models"], responses={404: {"description": "no such model"}})
def model_card(ref: ModelRef, principal: People, service: Service) -> dict:
    """The model card of NAME@VERSION (or NAME's latest version)."""
    entry = service.model_for(principal, ref)
    return _finite({k: v for k, v in entry.items() if k != "folder"})


@router.get("/models/{ref}/plots/{kind}", tags=["models"], response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such model"}})
def model_plot(ref: ModelRef, kind: Annotated[str, PathParam(pattern="^(roc|gains|calibration)$")],
               principal: People, service: Service) -> FileResponse:
    """ROC, cumulative gains/lift or calibration plot as PNG."""
    entry = service.model_for(principal, ref)
    return FileResponse(service.registry.file(entry["model"], f"{kind}.png"), media_type="image/png")


@router.get("/models/{ref}/export", tags=["models"], response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}},
                       404: {"description": "no such model"}})
def model_export(ref: ModelRef, principal: Annotated[Principal, Depends(require("data_scientist",
                                                                                "partner_admin"))],
                 service: Service,
                 purpose: Annotated[str, Query(pattern=SLUG, description="Why the model is taken.")]
                 = "model_scoring") -> FileResponse:
    """Download the TorchScript export (data_scientist, or partner_admin of a consortium partner);
    written to the ledger as `model.exported`."""
    entry = service.model_for(principal, ref)
    path = service.registry.file(entry["model"], "model.torchscript.pt")
    service.registry.record_export(entry["model"], recipient=principal.username,
                                   actor=principal.actor, purpose=purpose)
    filename = entry["model"].replace("@", "-v") + ".torchscript.pt"
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.post("/datasets", status_code=201, tags=["datasets"],
             responses={409: {"description": "named by an open job"}})
def register_dataset(body: DatasetIn, principal: PartnerAdmin, service: Service) -> dict:
    """Register a partner dataset (partner_admin for that dataset): its group, task, label,
    purpose and the public layout its node announces; no rows, no path. Written to the ledger
    as `dataset.registered`. Registering it again replaces it, unless a job naming it is open
    and the layout, group, task or label would change (409)."""
    return _finite(service.register_dataset(principal, body))


@router.get("/datasets", tags=["datasets"])
def list_datasets(principal: AnyRole, service: Service,
                  group: Annotated[str | None, Query(pattern=GROUP, description="Only this group.")]
                  = None) -> list[dict]:
    """The registered partner datasets (optionally of one group), with their layouts."""
    return _finite([e.to_dict() for e in service.datasets.list(group)])


@router.get("/datasets/{dataset:path}", tags=["datasets"],
            responses={404: {"description": "not registered"}})
def get_dataset(dataset: Annotated[str, PathParam(pattern=PARTNER_DATASET, max_length=100)],
                principal: AnyRole, service: Service) -> dict:
    """One registered partner dataset, its partner admins and the open jobs naming it."""
    return _finite(service.dataset_for(dataset))


@router.get("/budgets", tags=["privacy"])
def list_budgets(principal: People, service: Service) -> list[dict]:
    """Privacy budget and spend per partner dataset (partner admins: their datasets)."""
    return _finite(service.budgets_for(principal))


@router.put("/budgets/{dataset:path}", tags=["privacy"])
def set_budget(dataset: Annotated[str, PathParam(max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")],
               body: BudgetIn, principal: PartnerAdmin, service: Service) -> dict:
    """Set a partner dataset's total (ε, δ) budget (partner_admin for that dataset)."""
    return _finite(service.set_budget(principal, dataset, body.epsilon, body.delta))


AUDIT_QUERY_SLOTS = 8
"""Audit queries read the ledger in at most this many threads at once; the rest wait in order.
Beyond a few threads SQLite reads only contend for the GIL and the ledger's connection pool,
which raises the tail latency under load without adding throughput."""


@router.get("/audit/events", tags=["audit"])
async def audit_events(
    principal: Compliance, service: Service,
    event_type: Annotated[list[str] | None, Query(alias="type", description="Event type(s).")] = None,
    job_id: Annotated[str | None, Query(max_length=64)] = None,
    partner: Annotated[str | None, Query(max_length=200)] = None,
    dataset: Annotated[str | None, Query(max_length=200)] = None,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    subject: Annotated[str | None, Query(max_length=200, description="Raw id or pseudonym; the "
                                        "lookup is recorded as a data access.")] = None,
    since: Annotated[str | None, Query(max_length=40, description="ISO-8601 with offset.")] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    after_seq: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """Search the audit ledger (compliance_officer); filters combine with AND; keyset pages."""
    async with service.audit_slots:
        page = await run_in_threadpool(
            service.audit_page, principal, types=event_type or [], job_id=job_id, partner=partner,
            dataset=dataset, purpose=purpose, subject=subject, since=since, until=until,
            after_seq=after_seq, limit=limit)
    # Ledger payloads are plain JSON already: skip FastAPI's generic (slow) re-encoding.
    return JSONResponse(page)


@router.get("/audit/verify", tags=["audit"])
def audit_verify(principal: Compliance, service: Service) -> dict:
    """Recompute the hash chain, Merkle tree and signed checkpoints of the ledger, then (on an
    intact chain) compare the derived tables (event_index, consent_state, job_subjects, stored
    Merkle nodes) with it, as `fedpact audit verify --indexes`. `ok` is false when either
    fails; `chain_ok` is the chain's verdict alone; `indexes` is null when the chain failed."""
    result = service.ledger.verify()
    indexes = service.ledger.check_indexes().report() if result.ok else None
    return {"ok": result.ok and indexes is not None and indexes["ok"], "chain_ok": result.ok,
            "events_checked": result.events_checked,
            "first_bad_seq": result.first_bad_seq, "reason": result.reason,
            "head_hash": result.head_hash, "notes": list(result.notes), "indexes": indexes}


@router.get("/node/jobs", tags=["nodes"])
def node_jobs(principal: Node, service: Service) -> list[dict]:
    """For a partner node: the approved (queued or running) jobs that involve its partner dataset,
    with the settings every partner approved."""
    mine = set(principal.scopes("node"))
    return [{**j.summary(), "config": j.config}
            for j in service.board.list_for(principal)
            if j.status in ("queued", "running") and mine & set(j.partners)]


# --------------------------------------------------------------------------- errors


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(_request: Request, exc: RequestValidationError):
        # Field paths, types, messages and bounds only: never the input (clean_errors).
        errors = clean_errors(jsonable_encoder(exc.errors(), custom_encoder={Exception: str}))
        return JSONResponse({"detail": error_summary(errors) or "malformed request",
                             "errors": errors}, status_code=422)

    def status_of(exc: Exception) -> int:
        if isinstance(exc, GovernanceError | RegistryError | DatasetError):
            return exc.status
        if isinstance(exc, AuthError):
            return 401
        if isinstance(exc, AccountError | BudgetError):
            return 422
        return 400

    @app.exception_handler(FedpactError)
    async def fedpact_error(_request: Request, exc: FedpactError):
        return JSONResponse({"detail": one_line(str(exc), 2000)}, status_code=status_of(exc))

    @app.exception_handler(LedgerError)
    async def ledger_error(_request: Request, exc: LedgerError):
        # Inputs are validated before they reach the ledger; what is left is a server condition.
        return JSONResponse({"detail": f"audit ledger unavailable: {exc}"}, status_code=503)


# --------------------------------------------------------------------------- the request guard

PRINCIPAL = "fedpact.principal"
"""ASGI scope key under which RequestGuard leaves the API caller it authenticated."""
_LOOPBACK_NAMES = {"localhost", "testserver"}  # testserver: Starlette's TestClient


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(host_header: str) -> str:
    """The host name of a Host header (`[::1]:8700` → `::1`, `example.org:443` → `example.org`)."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def served_securely(scope: dict, *, forced: bool = False) -> bool:
    """Whether cookies must be `Secure` (and HSTS sent) for this request: always, unless it
    came over plain HTTP to a loopback address under a loopback name (a person on the
    coordinator's own machine, or TestClient) with no sign of a TLS proxy in front
    (`X-Forwarded-Proto: https`, `Forwarded: proto=https`). `forced` (`--secure-cookies`) makes
    every request secure."""
    if forced or over_tls(scope):
        return True
    server = scope.get("server")
    if not server or not _is_loopback(str(server[0])):
        return True
    return not _is_loopback(_host_of(_headers(scope).get("host", "")))


def _headers(scope: dict) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1").lower()
            for k, v in scope.get("headers") or ()}


def over_tls(scope: dict) -> bool:
    """The request came over HTTPS, directly or through a proxy that says so."""
    if scope.get("scheme") in ("https", "wss"):
        return True
    headers = _headers(scope)
    return ("https" in headers.get("x-forwarded-proto", "")
            or "proto=https" in headers.get("forwarded", ""))


def _size(limit: int) -> str:
    mib = 1024 * 1024
    return f"{limit // mib} MiB ({limit} bytes)" if limit % mib == 0 else f"{limit} bytes"


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Pure ASGI middleware in front of everything:

    - an API request (under /api/v1, except /health) is authenticated from its headers before
      its body is read: 401 whatever the body (the principal is left in the scope);
    - a body over `max_body_bytes` is refused with 413, by its Content-Length before a byte is
      read, or by counting the bytes as they arrive (chunked uploads); at most that much is
      ever held;
    - responses to requests `served_securely` carry Strict-Transport-Security.
    """

    def __init__(self, app, *, max_body_bytes: int, secure_cookies: bool):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.secure_cookies = secure_cookies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        secure = served_securely(scope, forced=self.secure_cookies)

        async def send_secure(message):
            if secure and message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"strict-transport-security", HSTS.encode())]
            await send(message)

        path = scope.get("path", "")
        if path.startswith(API + "/") and path != API + "/health":
            refusal = self._authenticate(scope)
            if refusal is not None:
                return await refusal(scope, receive, send_secure)
        lengths = [v for k, v in scope.get("headers") or () if k.lower() == b"content-length"]
        if lengths:
            try:
                declared = int(lengths[0])
                if declared < 0 or len(set(lengths)) > 1:
                    raise ValueError
            except ValueError:
                return await _json(400, "malformed Content-Length header")(scope, receive, send_secure)
            if declared > self.max_body_bytes:
                return await self._too_large()(scope, receive, send_secure)

        received = 0
        overflow = False
        started = False

        async def counted_receive():
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    overflow = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if overflow:  # the app's answer to a body it could not finish reading
                return
            started = started or message["type"] == "http.response.start"
            await send_secure(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not started:
            await self._too_large()(scope, receive, send_secure)

    def _too_large(self):
        return _json(413, f"request body too large: the limit is {_size(self.max_body_bytes)}",
                     close=True)

    def _authenticate(self, scope):
        """None if the caller's token is good (the principal goes into the scope), else the
        401 response to send."""
        value = ""
        for k, v in scope.get("headers") or ():
            if k.lower() == b"authorization":
                value = v.decode("latin-1")
                break
        kind, _, token = value.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            return _json(401, MISSING_TOKEN, {"WWW-Authenticate": "Bearer"})
        try:
            scope[PRINCIPAL] = scope["app"].state.service.accounts.authenticate_token(token.strip())
        except AuthError as exc:
            return _json(401, str(exc), {"WWW-Authenticate": "Bearer"})
        return None


def _json(status: int, detail: str, headers: dict | None = None, *, close: bool = False):
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    if close:
        response.headers["Connection"] = "close"
    return response


# --------------------------------------------------------------------------- the app


def create_app(home: str | Path, *, clock: Callable[[], float] = time.time, run: JobRun = simulated_run,
               start_worker: bool = True, secure_cookies: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app for the run folder `home` (service.db, ledger.db, registry/ live there).

    Console cookies are `Secure` (and responses carry HSTS) unless a request came over plain
    HTTP to loopback (`served_securely`); `secure_cookies=True` makes them Secure always.
    Request bodies over `max_body_bytes` (default 1 MiB) are refused with 413."""
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes = {max_body_bytes!r}: give a positive number of bytes")
    service = CoordinatorService(home, clock=clock, run=run, start_worker=start_worker)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="fedpact coordinator",
        version=__version__,
        description=("Governed federated jobs between partners, the model registry, privacy "
                     "budgets and the audit ledger. Authenticate with `Authorization: Bearer "
                     "fpt_…` (tokens from `fedpact admin token issue`). The web console is at "
                     "/console."),
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.secure_cookies = secure_cookies
    app.state.max_body_bytes = max_body_bytes
    install_error_handlers(app)
    app.include_router(router)
    from .console import install_console

    install_console(app)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, secure_cookies=secure_cookies)
    return app


__all__ = ["API", "CoordinatorService", "create_app", "PLOTS"]
