"""Service hardening (issue #15 findings 7, 8, 9 and 12), through FastAPI's TestClient.

7. Out-of-range input (huge ints, far timestamps, long strings) is a 4xx with a one-line message on
   every API and console parameter, never a 500; a schemathesis run with range-extreme values.
8. A request body limit (413 before the body is read), 422s that never echo the input, and
   authentication before the body is parsed (401 whatever the body).
9. No user enumeration: unknown, disabled, locked and known accounts take the same time and get
   the same message; a per-address throttle (429 + Retry-After); no ledger event per unknown-user
   failure (aggregated).
12. Console: CSRF token on the sign-in form, Secure cookies unless served on loopback over plain
   HTTP, HSTS when secure, an absolute session lifetime besides the idle timeout.
"""

from __future__ import annotations

import re
import statistics
import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from fedpact.audit import EventType
from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.service.api.app import create_app, router
from fedpact.service.api.auth import LOCKOUT_AFTER, totp
from fedpact.service.api.testing import PASSWORD, Clock, seed_consortium

TELCO = partner_datasets(JobConfig(dataset="telco", partitioning="segment", num_partitions=3))
MiB = 1024 * 1024
HUGE = "99999999999999999999999999"
FAR_FUTURE = "9999-12-31T23:59:59-23:59"  # after UTC year 9999
FAR_PAST = "0001-01-01T00:00:00+23:59"  # before UTC year 1
LONG = "L" * 5000


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("hardening-home")
    clock = Clock()
    app = create_app(home, clock=clock, start_worker=False)
    people = seed_consortium(app.state.service, TELCO)
    with TestClient(app):
        yield app, people, app.state.service, clock


_addresses = iter(range(1, 60000))


def client_at(app, base_url: str = "http://testserver", **kwargs) -> TestClient:
    """A fresh client (own cookie jar) from its own address, so the sign-in throttle of one test
    does not reach another."""
    n = next(_addresses)
    return TestClient(app, base_url=base_url, follow_redirects=False, raise_server_exceptions=False,
                      client=(f"198.18.{n // 250}.{n % 250 + 1}", 40000), **kwargs)


def login_form(client: TestClient) -> dict[str, str]:
    """What a browser sends: the sign-in page's hidden fields (its CSRF token included)."""
    page = client.get("/console/login")
    assert page.status_code == 200
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))


def sign_in(client: TestClient, clock: Clock, member, **headers) -> object:
    clock.advance(31)  # a TOTP code works once: move to the next 30-second step
    return client.post("/console/login", headers=headers, data={
        **login_form(client), "username": member.username, "password": PASSWORD,
        "code": totp(member.totp_secret, clock()), "next": "/console/jobs"})


def signed_in(app, clock, member) -> TestClient:
    client = client_at(app)
    r = sign_in(client, clock, member)
    assert r.status_code == 303, r.text
    return client


# --------------------------------------------------------------------------- 7: no 500 on bad input


@pytest.mark.parametrize("path", [
    f"/api/v1/models/churn-telco@{HUGE}",
    f"/api/v1/models/churn-telco@v{HUGE}",
    f"/api/v1/models/churn-telco@{2**63}",
    f"/api/v1/models/churn-telco@{HUGE}/plots/roc",
    f"/api/v1/models/churn-telco@{HUGE}/export",
    f"/api/v1/audit/events?since={FAR_FUTURE}",
    f"/api/v1/audit/events?until={FAR_PAST.replace('+', '%2B')}",
    f"/api/v1/audit/events?since=9999-12-31T23:59:59.999999-00:01&until={FAR_FUTURE}",
    f"/api/v1/audit/events?after_seq={HUGE}",
    f"/api/v1/jobs/job-x/logs?after_id={HUGE}&limit={HUGE}",
    "/api/v1/jobs/" + "j" * 5000,
])
def test_out_of_range_api_input_is_a_4xx_with_a_one_line_message(env, path):
    app, people, *_ = env
    r = client_at(app).get(path, headers=people.everyone.headers)
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) < 500
    if "churn-telco@" in path or "since=" in path or "until=" in path:
        assert "out of range" in detail, detail


@pytest.mark.parametrize("path", [
    f"/console/models/churn-telco@{HUGE}",
    f"/console/models/churn-telco@{HUGE}/plots/roc.png",
    f"/console/models/churn-telco@{HUGE}/export",
    f"/console/audit?since={FAR_FUTURE}",
    f"/console/audit?until={FAR_PAST.replace('+', '%2B')}",
    f"/console/audit?after_seq={HUGE}",
    f"/console/audit?after_seq=-{HUGE}",
    f"/console/audit?verify={HUGE}&after_seq={2**63}",
    f"/console/login?ended={HUGE}",
    "/console/jobs/" + "j" * 5000,
    "/console/jobs?status=" + "s" * 5000,
    "/console/audit?type=" + "t" * 5000,
])
def test_out_of_range_console_input_is_a_4xx_not_a_server_error(env, path):
    app, people, _service, clock = env
    r = signed_in(app, clock, people.everyone).get(path)
    assert r.status_code < 500, (path, r.status_code, r.text[:300])


def test_the_audit_page_names_the_out_of_range_timestamp(env):
    app, people, _service, clock = env
    r = signed_in(app, clock, people.compliance).get(f"/console/audit?since={FAR_FUTURE}")
    assert r.status_code == 422 and "since" in r.text and "range" in r.text


# schemathesis with range-extreme values: every parameter and body field in turn

EXTREME_INTS = [10**26, -(10**26), 2**63, 2**62 + 1, -1, 0]
EXTREME_STRINGS = [HUGE, f"churn-telco@{HUGE}", f"x@v{HUGE}", FAR_FUTURE, FAR_PAST, LONG,
                   "9" * 400, "\u0000", "🦀" * 300, "-1e400"]
EXTREME_FLOATS = [1e308, -1e308, 5e-324, 10**26]


def _extremes(value) -> list:
    if isinstance(value, bool):
        return [HUGE, LONG]
    if isinstance(value, int):
        return EXTREME_INTS + [HUGE]
    if isinstance(value, float):
        return EXTREME_FLOATS
    if isinstance(value, list):
        return [[v] for v in EXTREME_STRINGS[:6]] + [[10**26], [LONG] * 50]
    if isinstance(value, dict):
        return [{LONG: 1}, {HUGE: [10**26, 1e308]}]
    return EXTREME_STRINGS + EXTREME_INTS[:2]


def _body_variants(body) -> list:
    if not isinstance(body, dict):
        return []
    out = [{**body, LONG: 1}]
    for key, value in body.items():
        out += [{**body, key: v} for v in _extremes(value)]
        if isinstance(value, dict):  # one level down (e.g. a dataset's layout)
            out += [{**body, key: {**value, k: v}} for k, sub in value.items()
                    for v in _extremes(sub)[:4]]
    return out


OPERATIONS = sorted((method, route.path_format) for route in router.routes for method in route.methods)
ONE = settings(max_examples=1, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))
SOME = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz(env):
    app, people, *_ = env
    return schemathesis.openapi.from_asgi("/openapi.json", app), people


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis_with_range_extreme_values_finds_no_server_error(fuzz, method, path):
    schema, people = fuzz
    operation = schema[path][method]
    headers = people.everyone.headers
    bases = []

    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    @ONE
    def first(case):
        bases.append(case)

    first()
    base = bases[0]
    statuses = []

    def send(case) -> None:
        response = case.call_and_validate(headers=headers, checks=[not_a_server_error])
        statuses.append(response.status_code)
        assert LONG not in response.text, f"{case.method} {case.formatted_path}: echoes the input"

    # every parameter, one at a time, at each extreme of its kind
    for location in ("path_parameters", "query"):
        for name, value in dict(getattr(base, location) or {}).items():
            for extreme in _extremes(value):
                send(operation.Case(**{**_parts(base), location: {**getattr(base, location),
                                                                   name: extreme}}))
    for body in _body_variants(base.body if base.body is not None else None):
        send(operation.Case(**{**_parts(base), "body": body}))

    # and random combinations
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE), data=st.data())
    @SOME
    def mixed(case, data):
        for location in ("path_parameters", "query"):
            params = dict(getattr(case, location) or {})
            for name in params:
                if data.draw(st.booleans()):
                    params[name] = data.draw(st.sampled_from(_extremes(params[name])))
            if params:
                setattr(case, location, params)
        if isinstance(case.body, dict) and data.draw(st.booleans()):
            case.body = data.draw(st.sampled_from(_body_variants(case.body)))
        send(case)

    mixed()
    assert statuses and max(statuses) < 500


def _parts(case) -> dict:
    parts = {"path_parameters": case.path_parameters, "query": case.query}
    if case.body is not None and not _is_unset(case.body):
        parts["body"] = case.body
        parts["media_type"] = case.media_type
    return parts


def _is_unset(value) -> bool:
    return type(value).__name__ == "NotSet"


# --------------------------------------------------------------------------- 8: body limit, no echo, 401 first


def test_a_body_over_the_limit_is_refused_with_413_without_reading_it(env):
    app, people, *_ = env
    client = client_at(app)
    headers = {**people.scientist.headers, "content-type": "application/json"}
    body = b'{"dataset": "' + b"a" * (2 * MiB) + b'"}'
    r = client.post("/api/v1/jobs", content=body, headers=headers)
    assert r.status_code == 413 and "1 MiB" in r.json()["detail"], r.text[:300]
    assert len(r.content) < 1000

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        for _ in range(40):
            yield b"a" * 65536

    r = client.post("/api/v1/jobs", content=chunks(), headers=headers)
    assert r.status_code == 413 and len(r.content) < 1000, r.text[:300]
    r = client.post("/console/login", content=chunks(),
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and len(r.content) < 1000
    r = client.post("/api/v1/jobs", content=b"{}", headers={**headers, "content-length": "x"})
    assert r.status_code == 400


def test_the_body_limit_is_configurable(tmp_path):
    app = create_app(tmp_path, start_worker=False, max_body_bytes=2000)
    people = seed_consortium(app.state.service, TELCO[:1])
    with TestClient(app) as client:
        big = {"name": TELCO[0], "group": "g", "task": "churn", "label": "y", "purpose": "abc",
               "layout": {"numeric": ["n" * 100] * 30}}
        r = client.post("/api/v1/datasets", json=big, headers=people.admins[TELCO[0]].headers)
        assert r.status_code == 413 and "2000 bytes" in r.json()["detail"]
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(tmp_path, start_worker=False, max_body_bytes=0)


def test_a_422_never_echoes_the_input(env):
    app, people, *_ = env
    client = client_at(app)
    key = "k" * 200_000
    r = client.post("/api/v1/jobs", json={key: 1, "dataset": "telco", "purpose": "churn_model_training"},
                    headers=people.scientist.headers)
    assert r.status_code == 422 and len(r.content) < 4000, len(r.content)
    assert "k" * 100 not in r.text and "extra" in r.json()["detail"].lower()
    r = client.post("/api/v1/jobs", json={"dataset": "telco", "purpose": "x" * 100_000},
                    headers=people.scientist.headers)
    assert r.status_code == 422 and len(r.content) < 4000 and "x" * 100 not in r.text
    r = client.post("/api/v1/jobs", json=[LONG] * 100, headers=people.scientist.headers)
    assert r.status_code == 422 and LONG not in r.text
    for error in r.json()["errors"]:
        assert set(error) <= {"type", "loc", "msg", "ctx"}, error


@pytest.mark.parametrize("method,path", [
    ("post", "/api/v1/jobs"), ("post", "/api/v1/jobs/job-x/approve"), ("post", "/api/v1/datasets"),
    ("put", "/api/v1/budgets/telco-churn/x"), ("get", "/api/v1/jobs"),
])
@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[" * 10000, b'{"a": ' + b"1" * 100000 + b"}"])
@pytest.mark.parametrize("auth", [None, "Bearer fpt_nope_nope", "Basic dXNlcjpwdw=="])
def test_an_unauthenticated_request_gets_401_whatever_its_body(env, method, path, body, auth):
    app, *_ = env
    headers = {"content-type": "application/json"}
    if auth:
        headers["authorization"] = auth
    r = client_at(app).request(method.upper(), path, content=body, headers=headers)
    assert r.status_code == 401, (r.status_code, r.text[:200])
    assert r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]


def test_an_unauthenticated_oversized_body_gets_401_unread(env):
    app, *_ = env
    r = client_at(app).post("/api/v1/jobs", content=b"x" * (3 * MiB),
                            headers={"content-type": "application/json"})
    assert r.status_code == 401 and len(r.content) < 500


# --------------------------------------------------------------------------- 9: no user enumeration


def _error_of(html: str) -> str:
    match = re.search(r'<p class="error" role="alert">(.*?)</p>', html, re.S)
    return match.group(1) if match else ""


def test_unknown_disabled_locked_and_known_accounts_get_one_message(env):
    app, _people, service, clock = env
    acc = service.accounts
    acc.create_user("enum-known", password=PASSWORD, created_by="operator:test")
    acc.create_user("enum-off", password=PASSWORD, created_by="operator:test")
    acc.set_disabled("enum-off", True)
    acc.create_user("enum-node", kind="machine", created_by="operator:test")
    acc.create_user("enum-locked", password=PASSWORD, created_by="operator:test")
    client = client_at(app)
    for _ in range(LOCKOUT_AFTER):
        client.post("/console/login", data={**login_form(client), "username": "enum-locked",
                                            "password": "wrong password!", "code": "000000"})
    messages = {}
    for name in ("enum-known", "enum-off", "enum-node", "enum-locked", "nobody-at-all", "x" * 300):
        client = client_at(app)
        r = client.post("/console/login", data={**login_form(client), "username": name,
                                                "password": "wrong password!", "code": "000000"})
        assert r.status_code == 401
        messages[name] = _error_of(r.text)
    assert len(set(messages.values())) == 1 and messages["enum-known"], messages


def _attempt(app, username: str) -> float:
    client = client_at(app)
    form = {**login_form(client), "username": username, "password": "not the password!",
            "code": "000000"}
    start = time.perf_counter()
    r = client.post("/console/login", data=form)
    elapsed = time.perf_counter() - start
    assert r.status_code == 401
    return elapsed


def test_sign_in_takes_as_long_for_unknown_and_locked_users_as_for_known_ones(env):
    app, _people, service, clock = env
    service.accounts.create_user("timing-known", password=PASSWORD, created_by="operator:test")
    service.accounts.create_user("timing-locked", password=PASSWORD, created_by="operator:test")
    for _ in range(LOCKOUT_AFTER):
        _attempt(app, "timing-locked")
    unknown, known, locked = [], [], []
    for i in range(20):  # interleaved, so that load on the machine hits all three alike
        unknown.append(_attempt(app, f"timing-nobody-{i}"))
        clock.advance(15 * 60 + 1)  # the known account's lock (after 5 failures) has expired
        known.append(_attempt(app, "timing-known"))
        _relock(service, clock)
        locked.append(_attempt(app, "timing-locked"))
    k, u, lk = (statistics.median(x) for x in (known, unknown, locked))
    assert 0.5 <= u / k <= 2, f"median unknown {u * 1000:.1f} ms vs known {k * 1000:.1f} ms"
    assert 0.5 <= lk / k <= 2, f"median locked {lk * 1000:.1f} ms vs known {k * 1000:.1f} ms"


def _relock(service, clock) -> None:
    """Keep timing-locked locked (the clock moved past its lock for timing-known's sake)."""
    from sqlalchemy import update

    from fedpact.service.api.store import users

    with service.store.write_lock, service.store.engine.begin() as conn:
        conn.execute(update(users).where(users.c.username == "timing-locked")
                     .values(failed_logins=LOCKOUT_AFTER, locked_until=clock() + 15 * 60))


def test_a_per_address_throttle_answers_429_with_retry_after(env):
    app, people, _service, clock = env
    client = client_at(app)
    statuses = []
    for i in range(12):
        r = client.post("/console/login", data={**login_form(client), "username": f"throttle-{i}",
                                                "password": "wrong password!", "code": "000000"})
        statuses.append(r.status_code)
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429], statuses
    retry = int(r.headers["retry-after"])
    assert 0 < retry <= 60 and "try again" in r.text.lower()
    member = people.scientist  # right credentials are refused too: they are not even checked
    r = client.post("/console/login", data={**login_form(client), "username": member.username,
                                            "password": PASSWORD,
                                            "code": totp(member.totp_secret, clock())})
    assert r.status_code == 429
    other = client_at(app)  # another address is not held back
    assert sign_in(other, clock, people.scientist).status_code == 303
    clock.advance(retry)
    r = client.post("/console/login", data={**login_form(client), "username": "throttle-x",
                                            "password": "wrong password!", "code": "000000"})
    assert r.status_code == 401


def test_the_throttle_counts_an_ipv6_host_by_its_64_prefix():
    from fedpact.service.api.console import throttle_key

    assert throttle_key("2001:db8:1:2:aaaa::1") == throttle_key("2001:db8:1:2:ffff::9")
    assert throttle_key("2001:db8:1:3::1") != throttle_key("2001:db8:1:2::1")
    assert throttle_key("::ffff:192.0.2.7") == throttle_key("192.0.2.7") == "192.0.2.7"
    assert throttle_key("testclient") == "testclient"


def test_unknown_user_failures_are_aggregated_not_one_ledger_event_each(tmp_path):
    clock = Clock()
    app = create_app(tmp_path, clock=clock, start_worker=False)
    service = app.state.service
    service.accounts.create_user("events-known", password=PASSWORD, created_by="operator:test")
    before = len(service.ledger.events(event_type=EventType.LOGIN))
    for i in range(25):
        client = client_at(app)
        client.post("/console/login", data={**login_form(client), "username": f"ghost-{i}",
                                            "password": "wrong password!", "code": "000000"})
    client = client_at(app)
    client.post("/console/login", data={**login_form(client), "username": "events-known",
                                        "password": "wrong password!", "code": "000000"})
    logins = service.ledger.events(event_type=EventType.LOGIN)[before:]
    unknown = [e for e in logins if e.payload["principal"] == "(unknown)"]
    assert len(unknown) <= 1, [e.payload for e in unknown]
    known = [e for e in logins if e.payload["principal"] == "events-known"]
    assert [e.payload["outcome"] for e in known] == ["failure"]
    assert "ghost" not in str([e.payload for e in logins])
    clock.advance(10 * 60)  # the next window's first failure reports the ones held back
    client = client_at(app)
    client.post("/console/login", data={**login_form(client), "username": "ghost-last",
                                        "password": "wrong password!", "code": "000000"})
    unknown = [e for e in service.ledger.events(event_type=EventType.LOGIN)[before:]
               if e.payload["principal"] == "(unknown)"]
    assert sum(e.payload.get("attempts", 1) for e in unknown) == 26
    service.close()


# --------------------------------------------------------------------------- 12: console sign-in and cookies


def test_the_sign_in_form_carries_a_csrf_token_bound_to_the_browser(env):
    app, people, _service, clock = env
    client = client_at(app)
    form = login_form(client)
    assert form.get("csrf"), "the sign-in form has no CSRF token"
    assert any("SameSite=strict" in c and "HttpOnly" in c
               for c in client.get("/console/login").headers.get_list("set-cookie"))
    browser = {"origin": "http://testserver", "sec-fetch-site": "same-origin"}
    member = people.scientist
    clock.advance(31)
    good = {"username": member.username, "password": PASSWORD, "next": "/console/jobs"}
    # a browser post without the token, with another browser's token, or from another site
    r = client.post("/console/login", headers=browser,
                    data={**good, "code": totp(member.totp_secret, clock())})
    assert r.status_code == 403 and "security token" in r.text
    stranger = client_at(app)
    r = stranger.post("/console/login", headers=browser,
                      data={**good, "csrf": form["csrf"], "code": totp(member.totp_secret, clock())})
    assert r.status_code == 403
    r = client.post("/console/login", headers={"origin": "https://evil.example",
                                               "sec-fetch-site": "cross-site"},
                    data={**good, **login_form(client), "code": totp(member.totp_secret, clock())})
    assert r.status_code == 403
    for foreign in ({"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"},
                    {"origin": "https://evil.example"}, {"origin": "null"}):
        r = client.post("/console/login", headers=foreign,
                        data={**good, **login_form(client), "code": totp(member.totp_secret, clock())})
        assert r.status_code == 403 and "another site" in r.text, foreign
    # the form as the sign-in page served it
    r = client.post("/console/login", headers=browser,
                    data={**login_form(client), **good, "code": totp(member.totp_secret, clock())})
    assert r.status_code == 303, r.text[:300]


def _session_cookie(response) -> str:
    return next(c for c in response.headers.get_list("set-cookie") if c.startswith("fedpact_session="))


@pytest.mark.parametrize("base_url,headers,secure", [
    ("http://testserver", {}, False),
    ("http://127.0.0.1:8700", {}, False),
    ("http://localhost:8700", {}, False),
    ("https://coordinator.example", {}, True),
    ("https://127.0.0.1:8700", {}, True),
    ("http://testserver", {"x-forwarded-proto": "https"}, True),  # a TLS proxy in front
    ("http://testserver", {"forwarded": "for=192.0.2.1;proto=https"}, True),
])
def test_cookies_are_secure_unless_served_on_loopback_over_http(env, base_url, headers, secure):
    app, people, _service, clock = env
    client = client_at(app, base_url=base_url, headers=headers)
    page = client.get("/console/login")
    for response in (page, client.get("/api/v1/health")):
        hsts = response.headers.get("strict-transport-security")
        if secure:
            assert hsts and int(hsts.split("max-age=")[1].split(";")[0]) >= 86400 * 180
        else:
            assert hsts is None
    assert ("; secure" in page.headers["set-cookie"].lower()) is secure
    if secure and not base_url.startswith("https"):
        return  # the test client, on http://, keeps a Secure cookie to itself (as browsers do)
    r = sign_in(client, clock, people.compliance)
    assert r.status_code == 303, r.text[:300]
    assert ("; secure" in _session_cookie(r).lower()) is secure


@pytest.mark.parametrize("server,host,secure", [
    (("127.0.0.1", 8700), "127.0.0.1:8700", False), (("::1", 8700), "[::1]:8700", False),
    (("127.0.0.1", 8700), "localhost:8700", False), (("127.0.0.2", 80), "localhost", False),
    (("127.0.0.1", 8700), "coordinator.example", True),  # a proxy on the machine, public name
    (("10.0.0.5", 8700), "127.0.0.1:8700", True), (("0.0.0.0", 8700), "10.0.0.5:8700", True),
    (None, "localhost", True), (("/run/fedpact.sock", None), "localhost", True),
])
def test_which_requests_count_as_loopback_over_plain_http(server, host, secure):
    from fedpact.service.api.app import served_securely

    scope = {"type": "http", "scheme": "http", "server": server,
             "headers": [(b"host", host.encode())]}
    assert served_securely(scope) is secure
    assert served_securely(scope, forced=True) is True


def test_plain_http_off_loopback_gets_secure_cookies_and_is_told_to_use_https(env):
    app, people, _service, clock = env
    client = client_at(app, base_url="http://coordinator.example")
    page = client.get("/console/login")
    assert all("; secure" in c.lower() for c in page.headers.get_list("set-cookie"))
    assert "strict-transport-security" in page.headers and "HTTPS" in page.text
    r = sign_in(client, clock, people.compliance)  # the browser keeps a Secure cookie to itself
    assert r.status_code == 403 and "HTTPS" in r.text


def test_secure_cookies_can_be_forced_on_loopback(tmp_path):
    clock = Clock()
    app = create_app(tmp_path, clock=clock, start_worker=False, secure_cookies=True)
    people = seed_consortium(app.state.service, TELCO[:1])
    with TestClient(app):
        page = client_at(app).get("/console/login")
        assert "; secure" in page.headers["set-cookie"].lower()
        assert "strict-transport-security" in page.headers
        r = sign_in(client_at(app, base_url="https://testserver"), clock, people.scientist)
        assert "; secure" in _session_cookie(r).lower()


def test_a_session_ends_12_hours_after_sign_in_however_active(env):
    app, people, service, clock = env
    client = signed_in(app, clock, people.compliance)
    for _ in range(12 * 6 - 1):  # a request every 10 minutes: never idle
        clock.advance(10 * 60)
        assert client.get("/console/datasets").status_code == 200
    clock.advance(10 * 60 + 1)
    r = client.get("/console/datasets")
    assert r.status_code == 303 and "ended=1" in r.headers["location"]
    assert "12 hours" in client.get(r.headers["location"]).text
