"""Accounts: scrypt password hashes, RFC 6238 TOTP, sign-in lockout and replay, roles, tokens."""

from __future__ import annotations

import base64

import pytest

from fedpact.audit import EventType, Ledger
from fedpact.service.api.auth import (
    LOCKOUT_AFTER,
    AccountError,
    Accounts,
    AuthError,
    hash_password,
    hotp,
    totp,
    totp_match,
    verify_password,
)
from fedpact.service.api.store import ServiceStore, users
from fedpact.service.api.testing import Clock

RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()


@pytest.mark.parametrize("at,code", [(59, "94287082"), (1111111109, "07081804"),
                                     (1234567890, "89005924"), (2000000000, "69279037")])
def test_totp_matches_rfc_6238_sha1_vectors(at, code):
    assert hotp(RFC_SECRET, at // 30, digits=8) == code
    assert totp(RFC_SECRET, at) == code[-6:]


def test_hotp_matches_rfc_4226_vectors():
    expected = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583",
                "399871", "520489"]
    assert [hotp(RFC_SECRET, i) for i in range(10)] == expected


def test_totp_window_and_replay():
    now = 1_700_000_000.0
    code = totp(RFC_SECRET, now)
    step = int(now // 30)
    assert totp_match(RFC_SECRET, code, now, last_step=0) == step
    assert totp_match(RFC_SECRET, code, now + 30, last_step=0) == step  # one step of clock drift
    assert totp_match(RFC_SECRET, code, now + 90, last_step=0) is None
    assert totp_match(RFC_SECRET, code, now, last_step=step) is None  # used once already
    assert totp_match(RFC_SECRET, "12345", now, last_step=0) is None
    assert totp_match(RFC_SECRET, "abcdef", now, last_step=0) is None


def test_password_hash_is_salted_scrypt_and_verifies():
    a, b = hash_password("correct horse battery"), hash_password("correct horse battery")
    assert a != b and a.startswith("scrypt$32768$8$1$")
    assert verify_password("correct horse battery", a)
    assert not verify_password("correct horse batterY", a)
    assert not verify_password("x", "garbage") and not verify_password("x", None)
    with pytest.raises(AccountError, match="at least 12"):
        hash_password("short")


@pytest.fixture()
def accounts(tmp_path):
    clock = Clock()
    store = ServiceStore(tmp_path, clock=clock)
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        yield Accounts(store, ledger), clock, ledger
    store.close()


def test_sign_in_needs_password_and_a_fresh_code_and_locks_after_failures(accounts):
    acc, clock, ledger = accounts
    secret = acc.create_user("erin", password="correct horse battery", created_by="op").totp_secret
    cookie, principal = acc.login("erin", "correct horse battery", totp(secret, clock()))
    assert principal.username == "erin" and acc.session(cookie).username == "erin"
    with pytest.raises(AuthError, match="wrong user name, password or code"):
        acc.login("erin", "correct horse battery", totp(secret, clock()))  # replayed code
    with pytest.raises(AuthError):
        acc.login("erin", "wrong password!!", totp(secret, clock() + 30))
    with pytest.raises(AuthError):
        acc.login("nobody", "correct horse battery", "000000")
    for _ in range(LOCKOUT_AFTER - 1):
        with pytest.raises(AuthError):
            acc.login("erin", "wrong password!!", "000000")
    clock.advance(60)
    with pytest.raises(AuthError, match="too many failed sign-ins"):
        acc.login("erin", "correct horse battery", totp(secret, clock()))
    clock.advance(15 * 60)
    acc.login("erin", "correct horse battery", totp(secret, clock()))
    logins = ledger.events(event_type=EventType.LOGIN)
    outcomes = [e.payload["outcome"] for e in logins]
    assert outcomes.count("success") == 2 and outcomes.count("failure") == LOCKOUT_AFTER + 3
    assert all(e.payload["principal"] in ("erin", "(unknown)") for e in logins)
    assert "nobody" not in str([e.payload for e in logins])  # unknown names are not recorded


def test_sessions_end_after_15_idle_minutes_and_slide_with_activity(accounts):
    acc, clock, _ = accounts
    secret = acc.create_user("fred", password="correct horse battery", created_by="op").totp_secret
    cookie, _ = acc.login("fred", "correct horse battery", totp(secret, clock()))
    clock.advance(14 * 60)
    assert acc.session(cookie) is not None  # activity: the idle timer restarts
    clock.advance(14 * 60)
    assert acc.session(cookie) is not None
    clock.advance(15 * 60 + 1)
    assert acc.session(cookie) is None
    clock.advance(-(15 * 60 + 1))
    assert acc.session(cookie) is None  # ended sessions stay ended
    assert acc.session("not-a-session") is None


def test_totp_secrets_are_sealed_at_rest(accounts, tmp_path):
    acc, *_ = accounts
    secret = acc.create_user("gina", password="correct horse battery", created_by="op").totp_secret
    with acc.store.engine.connect() as conn:
        stored = conn.execute(users.select().where(users.c.username == "gina")).first().totp_secret
    assert secret not in stored and acc.box.open(stored, "gina") == secret
    assert (tmp_path / "service.key").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("call,message", [
    (lambda a: a.create_user("Jane.Doe@example.com", password="correct horse battery", created_by="op"), "username"),
    (lambda a: a.create_user("robot", kind="machine", password="correct horse battery", created_by="op"), "tokens only"),
    (lambda a: a.grant("hank", "superuser", granted_by="op"), "role 'superuser' is unknown"),
    (lambda a: a.grant("hank", "partner_admin", granted_by="op"), "needs a scope"),
    (lambda a: a.grant("hank", "data_scientist", "telco-churn/dsl", granted_by="op"), "takes no scope"),
    (lambda a: a.grant("hank", "node", "telco-churn/dsl", granted_by="op"), "machine identities"),
    (lambda a: a.grant("nobody", "data_scientist", granted_by="op"), "no user 'nobody'"),
    (lambda a: a.issue_token("hank", days=400, issued_by="op"), "must expire within"),
    (lambda a: a.revoke("hank", "compliance_officer", revoked_by="op"), "does not hold"),
])
def test_account_operations_name_what_is_wrong(accounts, call, message):
    acc, *_ = accounts
    acc.create_user("hank", password="correct horse battery", created_by="op")
    with pytest.raises(AccountError, match=message):
        call(acc)


def test_role_changes_are_ledger_events(accounts):
    acc, _, ledger = accounts
    acc.create_user("ivy", password="correct horse battery", created_by="op")
    acc.grant("ivy", "partner_admin", "telco-churn/dsl", granted_by="op")
    acc.revoke("ivy", "partner_admin", "telco-churn/dsl", revoked_by="op")
    created = ledger.events(event_type=EventType.USER_CREATED)[-1]
    granted = ledger.events(event_type=EventType.ROLE_GRANTED)[-1]
    revoked = ledger.events(event_type=EventType.ROLE_REVOKED)[-1]
    assert created.payload == {"principal": "ivy", "kind": "person", "created_by": "op"}
    assert granted.payload["scope"] == "telco-churn/dsl" and granted.payload["role"] == "partner_admin"
    assert revoked.payload["revoked_by"] == "op"
    assert "correct horse" not in str([e.payload for e in ledger.events()])
