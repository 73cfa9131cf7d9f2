"""The web console: server-rendered pages (Jinja2) on the same app, for the three kinds of users.

Sign-in with password + TOTP gives an HttpOnly, SameSite=Strict session cookie, `Secure` unless
the console is served over plain HTTP on loopback (`served_securely`); a session idle for 15
minutes, or 12 hours after sign-in, ends (checked on the server at every request). Every form
carries a CSRF token: the session's, and on the sign-in form one bound to the browser by a
cookie (a browser's sign-in post without it, or from another site, is refused). Failed sign-ins
are throttled per address (429 with Retry-After).

Pages: job list and detail (decisions, budgets, rounds, logs, model and plots) with
approve / reject / revoke buttons for partner admins, a job request form for data scientists,
model cards, audit search and chain verification for compliance officers, the privacy budget
per dataset (partner admins set their own datasets' budgets there), and the registered partner
datasets (read-only).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Undefined
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from fedpact.audit import EventType, LedgerError
from fedpact.audit.records import NO_PRIVACY_GUARANTEE
from fedpact.errors import FedpactError
from fedpact.federation.partition import SCHEMES
from fedpact.models.datasets import BUILTIN_SPECS, TASKS
from fedpact.models.networks import MODEL_KINDS
from fedpact.privacy.budget import PrivacyBudgets

from .app import MAX_SEQ, over_tls, served_securely
from .auth import IDLE_TIMEOUT_S, SESSION_MAX_S, AuthError, Principal
from .datasets import DatasetError, RequestProblem
from .governance import OPEN
from .registry import PLOTS
from .schemas import BudgetIn, JobRequestIn, clean_errors, error_summary

HERE = Path(__file__).parent
COOKIE = "fedpact_session"
LOGIN_COOKIE = "fedpact_login"
"""Binds the sign-in form's CSRF token to the browser that loaded it (double submit)."""
MAX_FORM_BYTES = 64 * 1024
MAX_ID = 64  # job ids are job-<12 hex>; longer ones name nothing
ENDED_NOTE = (f"Your session ended ({IDLE_TIMEOUT_S // 60} minutes without activity, or "
              f"{SESSION_MAX_S // 3600} hours after sign-in); sign in again.")
templates = Jinja2Templates(directory=str(HERE / "templates"))


def _ts(value: Any) -> str:
    if isinstance(value, Undefined) or value in (None, ""):
        return "–"
    try:
        return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError):
        return str(value)[:19].replace("T", " ")


def _num(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, Undefined):  # e.g. a round that reports no loss
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if v != v else f"{v:.{digits}f}"


templates.env.filters["ts"] = _ts
templates.env.filters["num"] = _num
templates.env.globals["idle_timeout_s"] = IDLE_TIMEOUT_S
templates.env.globals["session_max_s"] = SESSION_MAX_S
templates.env.globals["NO_PRIVACY"] = NO_PRIVACY_GUARANTEE


class LoginRequired(Exception):
    def __init__(self, next_url: str, ended: bool):
        self.next_url = next_url
        self.ended = ended


class ConsoleForbidden(Exception):
    def __init__(self, message: str):
        self.message = message


def _service(request: Request):
    return request.app.state.service


def signed_in(request: Request) -> Principal:
    """The session's principal, or a redirect to the sign-in page (session missing or idle)."""
    cookie = request.cookies.get(COOKIE, "")
    principal = _service(request).accounts.session(cookie) if cookie else None
    if principal is None:
        raise LoginRequired(request.url.path, ended=bool(cookie))
    return principal


def need(principal: Principal, *roles: str) -> None:
    if not any(principal.has(r) for r in roles):
        raise ConsoleForbidden(f"This page needs the role {' or '.join(roles)}; "
                               f"{principal.username} holds {principal.describe()}.")


async def read_form(request: Request) -> dict[str, str]:
    """URL-encoded form fields (first value of each), size-limited."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("application/x-www-form-urlencoded"):
        raise HTTPException(415, "forms must be sent as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    parsed = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


def secure(request: Request) -> bool:
    return served_securely(request.scope, forced=bool(request.app.state.secure_cookies))


class ConsoleBadInput(Exception):
    def __init__(self, message: str):
        self.message = message


def _count(value: str, label: str, default: int = 0) -> int:
    """A whole-number query parameter of a console page, 0 to 2^62; else ConsoleBadInput."""
    value = (value or "").strip()
    if not value:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_SEQ:
        raise ConsoleBadInput(f"{label} must be a whole number from 0 to {MAX_SEQ}")
    return int(value)


def throttle_key(host: str) -> str:
    """Whom the sign-in throttle counts: an IPv4 address, or an IPv6 address's /64 (one host
    usually holds a whole /64 and could otherwise take a fresh address per guess)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:100]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


_BROWSER_HEADERS = ("origin", "referer", "sec-fetch-site", "sec-fetch-mode", "sec-fetch-dest")


def check_login_csrf(request: Request, form: dict[str, str]) -> str | None:
    """None if a sign-in post may go on, else why not.

    A post from another site is refused outright: `Sec-Fetch-Site` other than same-origin, or
    (from a browser that does not send it) an Origin other than this host. A browser must send back the token of the sign-in form it loaded,
    equal to the `fedpact_login` cookie (SameSite=Strict: another site's page cannot send it).
    A client that sends none of a browser's headers (Origin, Referer, Sec-Fetch-*) cannot be
    driven by another site's page (browsers send Origin with every cross-origin POST); it may
    post without a token, but a token it sends must match."""
    headers = request.headers
    site = headers.get("sec-fetch-site", "")
    if site and site not in ("same-origin", "none"):
        return "the sign-in form was sent from another site"
    origin = headers.get("origin")
    if not site and origin is not None:  # a proxy may rewrite Host: X-Forwarded-Host counts too
        own = {headers.get("host", "").lower(), headers.get("x-forwarded-host", "").lower()}
        if origin.lower() == "null" or origin.split("://", 1)[-1].rstrip("/").lower() not in own:
            return "the sign-in form was sent from another site"
    sent, cookie = form.get("csrf", ""), request.cookies.get(LOGIN_COOKIE, "")
    from_browser = any(h in headers for h in _BROWSER_HEADERS)
    if (from_browser or sent) and not (
            sent and cookie and hmac.compare_digest(sent.encode(), cookie.encode())):
        return "the sign-in form's security token is missing or does not match this browser"
    return None


def _login_token(request: Request) -> str:
    token = request.cookies.get(LOGIN_COOKIE, "")
    ok = 20 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum()
    return token if ok and token.isascii() else secrets.token_urlsafe(24)


def login_page(request: Request, status: int = 200, **context: Any) -> HTMLResponse:
    """The sign-in page with a CSRF token, set (again) as the `fedpact_login` cookie."""
    token = _login_token(request)
    context.setdefault("note", "")
    context.setdefault("error", "")
    context.setdefault("next", "/console/jobs")
    plain_http = (secure(request) and not over_tls(request.scope)
                  and not request.app.state.secure_cookies)
    response = page(request, "login.html", None, status, csrf=token, plain_http=plain_http,
                    **context)
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict",
                        path="/console/login", secure=secure(request))
    return response


def check_csrf(principal: Principal, form: dict[str, str]) -> None:
    if not hmac.compare_digest(form.get("csrf", ""), principal.session_csrf):
        raise ConsoleForbidden("The form's security token does not match this session; reload the "
                               "page and try again.")


def page(request: Request, name: str, principal: Principal | None, status_code: int = 200,
         **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"me": principal, **context},
                                      status_code=status_code)


def install_console(app: FastAPI) -> None:
    app.mount("/console/static", StaticFiles(directory=str(HERE / "static")), name="console-static")

    @app.exception_handler(LoginRequired)
    async def login_required(_request: Request, exc: LoginRequired):
        target = f"/console/login?next={quote(exc.next_url)}" + ("&ended=1" if exc.ended else "")
        response = RedirectResponse(target, status_code=303)
        if exc.ended:
            response.delete_cookie(COOKIE, path="/console")
        return response

    @app.exception_handler(ConsoleForbidden)
    async def forbidden(request: Request, exc: ConsoleForbidden):
        return page(request, "error.html", None, 403, title="Not allowed", message=exc.message)

    @app.exception_handler(ConsoleBadInput)
    async def bad_input(request: Request, exc: ConsoleBadInput):
        return page(request, "error.html", None, 422, title="Bad request", message=exc.message)

    @app.middleware("http")
    async def console_headers(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/console"):
            response.headers.setdefault("Content-Security-Policy",
                                        "default-src 'self'; img-src 'self'; style-src 'self'; "
                                        "script-src 'none'; form-action 'self'; frame-ancestors 'none'")
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("Referrer-Policy", "same-origin")
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    # ---- sign-in

    @app.get("/", include_in_schema=False)
    @app.get("/console", include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse("/console/jobs", status_code=303)

    @app.get("/console/login", include_in_schema=False)
    def login_form(request: Request, next: str = "/console/jobs", ended: str = "") -> HTMLResponse:
        return login_page(request, next=_safe_next(next), note=ENDED_NOTE if ended else "")

    @app.post("/console/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await read_form(request)
        service = _service(request)
        back = {"next": _safe_next(form.get("next", "")), "username": form.get("username", "")[:64]}
        refused = check_login_csrf(request, form)
        if refused:
            return login_page(request, 403, error=f"Not signed in: {refused}. The page has been "
                              "reloaded with a new security token; try again.", **back)
        address = throttle_key(request.client.host if request.client else "unknown")
        wait = service.login_throttle.take(address)
        if wait is not None:
            response = login_page(request, 429, error=f"Too many failed sign-ins from your "
                                  f"address: try again in {wait} seconds.", **back)
            response.headers["Retry-After"] = str(wait)
            return response
        try:
            cookie, _principal = await run_in_threadpool(
                service.accounts.login, form.get("username", ""), form.get("password", ""),
                form.get("code", ""))
        except AuthError as exc:
            return login_page(request, 401, error=str(exc), **back)
        service.login_throttle.give_back(address)
        response = RedirectResponse(back["next"], status_code=303)
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", path="/console",
                            secure=secure(request))
        response.delete_cookie(LOGIN_COOKIE, path="/console/login", secure=secure(request),
                               httponly=True, samesite="strict")
        return response

    @app.post("/console/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        principal = await run_in_threadpool(signed_in, request)  # who, before reading the body
        form = await read_form(request)
        check_csrf(principal, form)
        await run_in_threadpool(_service(request).accounts.logout, request.cookies.get(COOKIE, ""))
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(COOKIE, path="/console")
        return response

    # ---- jobs

    @app.get("/console/jobs", include_in_schema=False)
    def jobs_page(request: Request, status: str = "") -> HTMLResponse:
        principal = signed_in(request)
        need(principal, "data_scientist", "compliance_officer", "partner_admin")
        jobs = [j.summary() for j in _service(request).board.list_for(principal, status or None)]
        return page(request, "jobs.html", principal, jobs=jobs, status=status)

    @app.get("/console/jobs/new", include_in_schema=False)
    def new_job_page(request: Request) -> HTMLResponse:
        principal = signed_in(request)
        need(principal, "data_scientist")
        return _job_form(request, principal)

    @app.post("/console/jobs", include_in_schema=False)
    async def submit_job(request: Request) -> Response:
        """A request from the form: the schema's checks, then the dataset registry's admission
        check (`DatasetRegistry.check_request`, as for the API) before anything is recorded; a
        refused request comes back as the form with the choices kept and each reason next to
        its field."""
        principal = await run_in_threadpool(signed_in, request)
        need(principal, "data_scientist")
        form = await read_form(request)
        check_csrf(principal, form)
        lists = parse_qs((await request.body()).decode("utf-8", errors="replace"),
                         keep_blank_values=True)
        service = _service(request)
        chosen = _chosen_datasets(lists.get("partner_datasets", []))
        fields = await run_in_threadpool(_request_fields, form, chosen, service.datasets)
        again = {"form": form, "chosen": chosen}
        try:
            body = JobRequestIn.model_validate(fields)
        except ValidationError as exc:
            groups = await run_in_threadpool(lambda: {e.group for e in service.datasets.list()})
            errors = _field_errors(exc.errors(), form, fields, chosen, groups)
            return await run_in_threadpool(_job_form, request, principal, **again,
                                           errors=errors, status=422)
        if body.partner_datasets is not None:
            try:  # the admission check the API's submission runs, worded per dataset
                await run_in_threadpool(service.datasets.check_request, body.dataset,
                                        list(body.partner_datasets), task=body.task, dp=body.dp)
            except DatasetError as exc:
                errors, flagged = _admission_errors(exc, body)
                return await run_in_threadpool(_job_form, request, principal, **again,
                                               errors=errors, flagged=flagged, status=422)
        try:
            job = await run_in_threadpool(service.board.submit, principal, body,
                                          home=str(service.home))
        except FedpactError as exc:
            return await run_in_threadpool(_job_form, request, principal, **again,
                                           errors=_refusal_errors(str(exc)),
                                           status=getattr(exc, "status", 422))
        return RedirectResponse(f"/console/jobs/{job.job_id}", status_code=303)

    @app.get("/console/jobs/{job_id}", include_in_schema=False)
    def job_page(request: Request, job_id: str) -> HTMLResponse:
        principal = signed_in(request)
        need(principal, "data_scientist", "compliance_officer", "partner_admin")
        service = _service(request)
        try:
            if len(job_id) > MAX_ID:
                raise FedpactError(f"no job {job_id[:MAX_ID]!r}…: job ids are job-<12 hex digits>")
            detail = service.job_detail(principal, job_id)
        except FedpactError as exc:
            return page(request, "error.html", principal, 404, title="No such job", message=str(exc))
        view = service.board.get(job_id)
        model = None
        if view.model_ref:
            model = service.registry.get(view.model_ref)
        return page(request, "job.html", principal, job=detail, logs=service.board.logs(job_id),
                    model=model, open=view.status in OPEN, plots=PLOTS,
                    mine=[p for p in view.partners if principal.admins(p)])

    @app.post("/console/jobs/{job_id}/decide", include_in_schema=False)
    async def decide(request: Request, job_id: str) -> Response:
        principal = await run_in_threadpool(signed_in, request)
        need(principal, "partner_admin")
        form = await read_form(request)
        check_csrf(principal, form)
        decision = {"approve": "approved", "reject": "rejected", "revoke": "revoked"}.get(
            form.get("decision", ""))
        service = _service(request)
        try:
            if decision is None:
                raise FedpactError("decision must be approve, reject or revoke")
            await run_in_threadpool(
                service.board.decide, principal, job_id, form.get("partner", ""), decision,
                form.get("reason") or None,
                acknowledge_no_privacy=form.get("acknowledge_no_privacy", "").lower()
                in ("on", "true", "1", "yes"))
        except FedpactError as exc:
            status = getattr(exc, "status", 400)
            return page(request, "error.html", principal, status, title="Decision not recorded",
                        message=str(exc), back=f"/console/jobs/{quote(job_id)}")
        return RedirectResponse(f"/console/jobs/{quote(job_id)}", status_code=303)

    # ---- models

    @app.get("/console/models", include_in_schema=False)
    def models_page(request: Request) -> HTMLResponse:
        principal = signed_in(request)
        need(principal, "data_scientist", "compliance_officer", "partner_admin")
        return page(request, "models.html", principal, models=_service(request).visible_models(principal))

    @app.get("/console/models/{ref}", include_in_schema=False)
    def model_page(request: Request, ref: str) -> HTMLResponse:
        principal = signed_in(request)
        need(principal, "data_scientist", "compliance_officer", "partner_admin")
        try:
            entry = _service(request).model_for(principal, ref)
        except FedpactError as exc:
            return page(request, "error.html", principal, 404, title="No such model", message=str(exc))
        return page(request, "model.html", principal, model=entry, card=entry["card"], plots=PLOTS,
                    can_export=principal.has("data_scientist") or principal.has("partner_admin"))

    @app.get("/console/models/{ref}/plots/{kind}.png", include_in_schema=False)
    def model_plot(request: Request, ref: str, kind: str) -> Response:
        principal = signed_in(request)
        need(principal, "data_scientist", "compliance_officer", "partner_admin")
        if kind not in PLOTS:
            return Response("no such plot", status_code=404, media_type="text/plain")
        try:
            entry = _service(request).model_for(principal, ref)
            path = _service(request).registry.file(entry["model"], f"{kind}.png")
        except FedpactError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png")

    @app.get("/console/models/{ref}/export", include_in_schema=False)
    def model_export(request: Request, ref: str) -> Response:
        principal = signed_in(request)
        need(principal, "data_scientist", "partner_admin")
        service = _service(request)
        try:
            entry = service.model_for(principal, ref)
            path = service.registry.file(entry["model"], "model.torchscript.pt")
        except FedpactError as exc:
            return page(request, "error.html", principal, 404, title="No such model", message=str(exc))
        service.registry.record_export(entry["model"], recipient=principal.username,
                                       actor=principal.actor, purpose="model_scoring")
        return FileResponse(path, media_type="application/octet-stream",
                            filename=entry["model"].replace("@", "-v") + ".torchscript.pt")

    # ---- audit

    @app.get("/console/audit", include_in_schema=False)
    def audit_page(request: Request, type: str = "", job_id: str = "", partner: str = "",
                   dataset: str = "", purpose: str = "", since: str = "", until: str = "",
                   after_seq: str = "", verify: str = "") -> HTMLResponse:
        principal = signed_in(request)
        need(principal, "compliance_officer")
        service = _service(request)
        query = {"type": type, "job_id": job_id, "partner": partner, "dataset": dataset,
                 "purpose": purpose, "since": since, "until": until}
        error, result, verification = "", {"events": [], "next_after_seq": None}, None
        try:
            for label, value, limit in (("type", type, 64), ("job_id", job_id, MAX_ID),
                                        ("partner", partner, 200), ("dataset", dataset, 200),
                                        ("purpose", purpose, 64), ("since", since, 40),
                                        ("until", until, 40)):
                if len(value) > limit:
                    raise FedpactError(f"{label} is longer than {limit} characters")
            after = after_seq.strip()
            if after.startswith("-") and after[1:].isascii() and after[1:].isdigit():
                after = "0"  # before the first event: from the start, as before
            result = service.audit_page(principal, types=[type] if type else [], job_id=job_id,
                                        partner=partner, dataset=dataset, purpose=purpose,
                                        subject=None, since=since, until=until,
                                        after_seq=_count(after, "after_seq"), limit=100)
        except ConsoleBadInput as exc:
            error = exc.message
        except (LedgerError, FedpactError) as exc:
            error = str(exc)
        indexes = None
        if verify.strip() not in ("", "0"):
            verification = service.ledger.verify()
            if verification.ok:  # as `fedpact audit verify --indexes`
                indexes = service.ledger.check_indexes().report()
        next_link = None
        if result["next_after_seq"] is not None:
            params = "&".join(f"{k}={quote(v)}" for k, v in query.items() if v)
            next_link = f"/console/audit?{params}&after_seq={result['next_after_seq']}"
        return page(request, "audit.html", principal, q=query, events=result["events"],
                    next_link=next_link, error=error, verification=verification, indexes=indexes,
                    event_types=[t.value for t in EventType], status_code=422 if error else 200)

    # ---- registered partner datasets (read-only)

    @app.get("/console/datasets", include_in_schema=False)
    def datasets_page(request: Request) -> HTMLResponse:
        principal = signed_in(request)
        need(principal, "data_scientist", "compliance_officer", "partner_admin")
        return page(request, "datasets.html", principal,
                    datasets=[e.to_dict() for e in _service(request).datasets.list()])

    # ---- privacy budgets

    @app.get("/console/budgets", include_in_schema=False)
    def budgets_page(request: Request, error: str = "") -> HTMLResponse:
        principal = signed_in(request)
        need(principal, "data_scientist", "compliance_officer", "partner_admin")
        return page(request, "budgets.html", principal,
                    budgets=_service(request).budgets_for(principal), error="")

    @app.post("/console/budgets", include_in_schema=False)
    async def set_budget(request: Request) -> Response:
        principal = await run_in_threadpool(signed_in, request)
        need(principal, "partner_admin")
        form = await read_form(request)
        check_csrf(principal, form)
        service = _service(request)
        try:
            body = BudgetIn.model_validate({"epsilon": form.get("epsilon"), "delta": form.get("delta")})
            await run_in_threadpool(service.set_budget, principal, form.get("dataset", ""),
                                    body.epsilon, body.delta)
        except ValidationError as exc:
            message = error_summary(clean_errors(exc.errors()), located=False)
            return page(request, "budgets.html", principal, 422,
                        budgets=service.budgets_for(principal), error=message)
        except FedpactError as exc:
            return page(request, "budgets.html", principal, getattr(exc, "status", 422),
                        budgets=service.budgets_for(principal), error=str(exc))
        return RedirectResponse("/console/budgets", status_code=303)


def _safe_next(target: str) -> str:
    """Only same-site console paths (no open redirect)."""
    return target if target.startswith("/console/") and not target.startswith("//") else "/console/jobs"


# --------------------------------------------------------------------------- the job request form

_LABELS = {"dataset": "Data set", "partner_datasets": "Partner datasets", "task": "Task",
           "partitioning": "Partitioning", "partners": "Partners", "purpose": "Purpose",
           "features": "Features", "target_epsilon": "Target ε", "target_delta": "Target δ",
           "rounds": "Rounds", "dp": "Differential privacy", "require_consent": "Consent enforcement",
           "secure_aggregation": "Secure aggregation", "model": "Model",
           "local_epochs": "Local epochs", "batch_size": "Batch size",
           "learning_rate": "Learning rate", "max_grad_norm": "Clipping bound", "seed": "Seed",
           "model_name": "Model name"}
_PATTERNS = {
    "purpose": "use 3 to 64 lower-case letters, digits or underscores, starting with a letter "
               "(e.g. churn_model_training)",
    "model_name": "use 3 to 48 lower-case letters, digits or hyphens, starting with a letter "
                  "(e.g. churn-acme), or leave it empty",
    "dataset": "choose a built-in data set, or the group of the partner datasets",
    "partner_datasets": "a partner dataset's name is letters, digits and . _ / - (at most 100 "
                        "characters)"}
_BOOLS = ("dp", "require_consent", "secure_aggregation")


def _schema_fields() -> dict[str, dict]:
    """Each field of the API's job request (`JobRequestIn`): its label here, its default and its
    bounds, as the schema declares them (the form restates no number)."""
    out = {}
    for name, info in JobRequestIn.model_fields.items():
        spec: dict[str, Any] = {"label": _LABELS.get(name, name.replace("_", " ")),
                                "required": info.is_required(),
                                "default": None if info.is_required() else info.get_default()}
        for meta in info.metadata:
            for key in ("ge", "gt", "le", "lt", "min_length", "max_length"):
                if getattr(meta, key, None) is not None:
                    spec[key] = getattr(meta, key)
        spec["kind"] = {int: "int", float: "float", bool: "bool"}.get(info.annotation, "text")
        low = (f"{spec['ge']}" if "ge" in spec else f"more than {spec['gt']}" if "gt" in spec
               else "")
        high = (f"{spec['le']}" if "le" in spec else f"less than {spec['lt']}" if "lt" in spec
                else "")
        if low and high:
            spec["range"] = (f"{low} to {high}" if "ge" in spec and "le" in spec
                             else f"{low}, {'at most ' if 'le' in spec else ''}{high}")
        out[name] = spec
    return out


JOB_FIELDS = _schema_fields()


def _bound(value: Any) -> str:
    """A bound as a person writes it: 0, not 0.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def _short_value(value: Any, limit: int = 40) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _chosen_datasets(values: list[str]) -> list[str]:
    """The partner datasets a form names: the ticked boxes, then the names typed in the text
    field (separated by commas or spaces), each once, in that order."""
    names: list[str] = []
    for value in values:
        for name in value.replace(",", " ").split():
            if name not in names:
                names.append(name)
    return names


def _request_fields(form: dict[str, str], chosen: list[str], registry) -> dict[str, Any]:
    """The job request the form describes, as the API would receive it. Partitioning and the
    number of partners split a built-in data set: left out when partner datasets are named; the
    data set left empty means the group of the (registered) named datasets."""
    fields: dict[str, Any] = {k: v.strip() for k, v in form.items()
                              if k in JOB_FIELDS and k not in (*_BOOLS, "partner_datasets")
                              and v.strip() != ""}
    if "features" in fields:
        fields["features"] = [c.strip() for c in fields["features"].split(",") if c.strip()]
    fields["dp"] = "dp" in form
    fields["secure_aggregation"] = "secure_aggregation" in form
    # Consent enforcement is on unless the requester unticked the box the form shows
    # (a form without the box, e.g. an older page, keeps it on).
    fields["require_consent"] = "require_consent" in form or "require_consent_shown" not in form
    if chosen:
        fields["partner_datasets"] = list(chosen)
        fields.pop("partitioning", None)
        fields.pop("partners", None)
        if "dataset" not in fields:
            groups = [e.group for e in (registry.get(n) for n in chosen) if e is not None]
            if groups:
                fields["dataset"] = max(dict.fromkeys(groups), key=groups.count)
    return fields


def _field_errors(errors: list[dict], form: dict[str, str], fields: dict, chosen: list[str],
                  groups: set[str]) -> dict[str, list[str]]:
    """The schema's refusals in plain words, by form field (never the schema's regex)."""
    out: dict[str, list[str]] = {}
    for e in errors:
        loc = list(e.get("loc") or ())
        kind, ctx = e.get("type", ""), e.get("ctx") or {}
        if not loc:  # a rule over several fields (the schema's model check)
            field, message = _combination_error(str(e.get("msg", "")), fields, chosen, groups)
            out.setdefault(field, []).append(message)
            continue
        name = str(loc[0])
        label = JOB_FIELDS.get(name, {}).get("label", name)
        typed = form.get(name, "")
        if name == "partner_datasets" and len(loc) > 1:
            typed = e.get("input", "")
        you = f" (you typed {_short_value(typed)})" if str(typed).strip() else ""
        if kind == "missing" and name == "dataset" and chosen:
            message = ("choose the group of the partner datasets (none of the named datasets is "
                       "registered)")
        elif kind == "missing":
            message = ({"dataset": "choose a built-in data set, or tick the partner datasets the "
                                   "job trains on",
                        "purpose": "give the purpose of processing, e.g. churn_model_training"}
                       .get(name, f"{label} is required"))
        elif kind == "greater_than_equal":
            message = f"{label} must be at least {_bound(ctx.get('ge'))}{you}"
        elif kind == "greater_than":
            message = f"{label} must be more than {_bound(ctx.get('gt'))}{you}"
        elif kind == "less_than_equal":
            message = f"{label} must be at most {_bound(ctx.get('le'))}{you}"
        elif kind == "less_than":
            message = f"{label} must be less than {_bound(ctx.get('lt'))}{you}"
        elif kind in ("int_parsing", "int_from_float", "int_type"):
            message = f"{label} must be a whole number{you}"
        elif kind in ("float_parsing", "float_type", "finite_number"):
            message = f"{label} must be a number, e.g. 0.5 or 1e-5{you}"
        elif kind == "string_pattern_mismatch":
            message = f"{label}: {_PATTERNS.get(name, 'not a valid value')}{you}"
        elif kind in ("literal_error", "enum"):
            message = f"{label}: choose one of the listed values{you}"
        elif kind == "too_long":
            message = f"{label}: name at most {ctx.get('max_length')}"
        else:
            message = f"{label}: {str(e.get('msg', '')).removeprefix('Value error, ')}"
        out.setdefault(name, []).append(message)
    return out


def _combination_error(message: str, fields: dict, chosen: list[str],
                       groups: set[str]) -> tuple[str, str]:
    """A schema rule over several fields, worded for the form (which field, what to do)."""
    dataset = str(fields.get("dataset", ""))
    if chosen and dataset in BUILTIN_SPECS:
        return "dataset", (f"{dataset} is a built-in data set, but partner datasets are ticked: "
                           "choose their group as the data set, or untick them")
    if not chosen and dataset not in BUILTIN_SPECS:
        if dataset in groups:
            return "partner_datasets", f"tick the partner datasets of {dataset} the job trains on"
        return "dataset", (f"{_short_value(dataset)} is neither a built-in data set nor the group "
                           "of registered partner datasets")
    return "request", message.removeprefix("Value error, ")


def _admission_errors(exc: DatasetError, body: JobRequestIn) -> tuple[dict[str, list[str]], set[str]]:
    """The registry's reasons for refusing the request, in plain words next to the field they
    concern, and the partner datasets they name (marked in the form's list)."""
    out: dict[str, list[str]] = {}
    flagged: set[str] = set()
    for p in exc.problems:
        field, message = _admission_words(p, body)
        out.setdefault(field, []).append(message)
        if p.dataset:
            flagged.add(p.dataset)
    if not out:  # a refusal without reasons (not expected): its own words
        out["partner_datasets"] = [str(exc)]
    return out, flagged


def _admission_words(p: RequestProblem, body: JobRequestIn) -> tuple[str, str]:
    n, listed = p.dataset or "", "; ".join(p.details)
    if p.kind == "unregistered":
        return "partner_datasets", (f"{n} is not a registered dataset: its partner admin "
                                    "registers it (fedpact dataset register); the Datasets page "
                                    "lists the registered ones")
    if p.kind == "group":
        return "partner_datasets", (f"{n} belongs to the group {p.found}, not {body.dataset}: a "
                                    "job trains on datasets of one group")
    if p.kind == "task":
        return "task", (f"{n} is a {p.found} dataset, not {body.task}: choose {p.found} or leave "
                        "the task empty")
    if p.kind == "tasks":
        return "partner_datasets", (f"the chosen datasets have different tasks ({listed}): "
                                    "choose datasets of one task")
    if p.kind == "label":
        return "partner_datasets", (f"the chosen datasets have different label columns "
                                    f"({listed}): a job needs one label")
    if p.kind == "positive":
        return "partner_datasets", ("the chosen datasets mark positive rows with different label "
                                    f"values ({listed})")
    if p.kind == "layout":
        return "partner_datasets", (f"the chosen datasets' layouts differ, so their models could "
                                    f"not be averaged: {listed}. Each partner declares the same "
                                    "columns, categories and bounds in its mapping and registers "
                                    "again")
    if p.kind == "admin":
        return "partner_datasets", (f"{n} has no partner admin to approve the job — an operator "
                                    f"grants someone the partner admin role for {n}")
    if p.kind == "budget":
        return "partner_datasets", (f"{n} has no budget — a partner admin of {n} can set one on "
                                    "the Privacy budgets page")
    return "partner_datasets", p.message


def _refusal_errors(message: str) -> dict[str, list[str]]:
    """A refusal of the job board (e.g. features, secure aggregation, a job setting) by field
    where its message names one ("features: ..."), else for the whole request."""
    head, _, rest = message.partition(":")
    rest = rest.replace("omit `features` to accept", "leave Features empty to use")
    if head in JOB_FIELDS and rest.strip():
        return {head: [f"{JOB_FIELDS[head]['label']}: {rest.strip()}"]}
    return {"request": [message]}


def _dataset_choices(service) -> dict[str, list[dict]]:
    """The registered partner datasets by group: task, label, purpose, who registered it, its
    partner admins and its privacy budget (None without one)."""
    budgets = PrivacyBudgets(service.ledger).all()
    groups: dict[str, list[dict]] = {}
    for e in service.datasets.list():
        b = budgets.get(e.name)
        groups.setdefault(e.group, []).append({
            "name": e.name, "task": e.task, "label": e.label, "purpose": e.purpose,
            "registered_by": e.registered_by, "features": e.features,
            "admins": service.datasets.admins(e.name),
            "budget": None if b is None or b.epsilon_max <= 0 else
            {"epsilon_max": b.epsilon_max, "epsilon_remaining": b.epsilon_remaining}})
    return groups


def _form_values(form: dict[str, str] | None) -> dict[str, Any]:
    """What each field shows: the schema's defaults on a fresh form, the user's entries on a
    form shown again."""
    values = {n: ("" if s["default"] is None else s["default"]) for n, s in JOB_FIELDS.items()}
    if form is None:
        return values
    for name in JOB_FIELDS:
        if name in form and name not in _BOOLS and name != "partner_datasets":
            values[name] = form[name]
    values["dp"] = "dp" in form
    values["secure_aggregation"] = "secure_aggregation" in form
    values["require_consent"] = "require_consent" in form or "require_consent_shown" not in form
    return values


def _job_form(request: Request, principal: Principal, form: dict[str, str] | None = None,
              chosen: list[str] | None = None, errors: dict[str, list[str]] | None = None,
              flagged: set[str] | None = None, status: int = 200) -> HTMLResponse:
    service = _service(request)
    groups = _dataset_choices(service)
    listed = {d["name"] for ds in groups.values() for d in ds}
    chosen = list(chosen or [])
    return page(request, "new_job.html", principal, status, v=_form_values(form),
                fields=JOB_FIELDS, errors=errors or {}, flagged=flagged or set(),
                chosen=chosen, typed=", ".join(n for n in chosen if n not in listed),
                groups=groups, builtins={n: s.task for n, s in BUILTIN_SPECS.items()},
                schemes=list(SCHEMES), kinds=list(MODEL_KINDS), tasks=list(TASKS),
                secure_aggregation=service.board.supports_secure_aggregation)
