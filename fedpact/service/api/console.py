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
from fedpact.models.datasets import BUILTIN_SPECS
from fedpact.models.networks import MODEL_KINDS

from .app import MAX_SEQ, over_tls, served_securely
from .auth import IDLE_TIMEOUT_S, SESSION_MAX_S, AuthError, Principal
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
        return _job_form(request, principal, {}, "")

    @app.post("/console/jobs", include_in_schema=False)
    async def submit_job(request: Request) -> Response:
        principal = await run_in_threadpool(signed_in, request)
        need(principal, "data_scientist")
        form = await read_form(request)
        check_csrf(principal, form)
        fields = {k: v for k, v in form.items()
                  if k not in ("csrf", "require_consent_shown") and v != ""}
        fields["dp"] = "dp" in form
        fields["secure_aggregation"] = "secure_aggregation" in form
        # Consent enforcement is on unless the requester unticked the box the form shows
        # (a form without the box, e.g. an older page, keeps it on).
        fields["require_consent"] = ("require_consent" in form
                                     or "require_consent_shown" not in form)
        try:
            body = JobRequestIn.model_validate(fields)
            service = _service(request)
            job = await run_in_threadpool(service.board.submit, principal, body,
                                          home=str(service.home))
        except ValidationError as exc:
            message = error_summary(clean_errors(exc.errors()), located=False)
            return _job_form(request, principal, form, message, 422)
        except FedpactError as exc:
            return _job_form(request, principal, form, str(exc), 422)
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


def _job_form(request: Request, principal: Principal, form: dict, error: str,
              status: int = 200) -> HTMLResponse:
    return page(request, "new_job.html", principal, status, form=form, error=error,
                datasets=list(BUILTIN_SPECS), schemes=list(SCHEMES), kinds=list(MODEL_KINDS),
                secure_aggregation=_service(request).board.supports_secure_aggregation)
