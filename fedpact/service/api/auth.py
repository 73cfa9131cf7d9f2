"""Who may do what: people and machine identities, roles with scopes, API tokens, console sign-in.

- Passwords: scrypt (memory-hard, Python's standard library), 32 MiB per hash.
- Second factor: TOTP (RFC 6238, SHA-1, 30 s, 6 digits, ±1 step), each code usable once; the
  shared secrets are sealed with AES-GCM under `HOME/service.key` (readable by the owner only).
- API tokens: `fpt_<id>_<secret>`; only SHA-256 of the 256-bit secret is stored (a slow KDF
  adds nothing for random secrets of that size); each token expires.
- Console sessions: a random cookie, stored as its SHA-256; idle for 15 minutes means ended,
  and 12 hours after sign-in a session ends however active it was.
- Sign-in reveals nothing about accounts: an unknown, disabled or machine user name is checked
  against a dummy scrypt hash and a locked account's password is still hashed, so every failure
  takes the same time and gets the same message. `LoginThrottle` holds back an address that
  keeps failing (token bucket, HTTP 429 with Retry-After).

Every account change, token and sign-in of a known account is written to the audit ledger; the
secrets never are. Failures naming no known account are counted and written as one event per
5-minute window (`attempts`), so a flood of guesses cannot fill the ledger.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import and_, delete, insert, select, update

from fedpact.audit import EventType, Ledger
from fedpact.errors import FedpactError

from .store import ServiceStore, grants, sessions, tokens, users

ROLES = ("partner_admin", "data_scientist", "compliance_officer", "node")
SCOPED_ROLES = ("partner_admin", "node")
"""Roles that hold for one partner dataset (their scope); the others hold service-wide."""

IDLE_TIMEOUT_S = 15 * 60
SESSION_MAX_S = 12 * 3600
"""A console session ends this long after sign-in, however active (besides the idle timeout)."""
MAX_TOKEN_DAYS = 366
LOCKOUT_AFTER = 5
LOCKOUT_S = 15 * 60
SIGN_IN_FAILED = ("sign-in failed: wrong user name, password or code (after too many failed "
                  f"sign-ins an account is locked for {LOCKOUT_S // 60} minutes)")
"""The one message of every failed sign-in: it does not say whether the account exists, is
disabled or is locked."""
UNKNOWN_FAILURE_WINDOW_S = 5 * 60
LOGIN_BURST = 10
"""Failed sign-ins one address may make in a row before the throttle holds it back ..."""
LOGIN_REFILL_S = 30.0
"""... after which it regains one attempt every this many seconds."""
USERNAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-")

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # 128 * r * N = 32 MiB of memory per hash


class AuthError(FedpactError):
    """Sign-in or token check failed; the message is safe to show (it never says which part)."""


class AccountError(FedpactError):
    """An account, role or token operation was refused; the message names the field at fault."""


# --------------------------------------------------------------------------- passwords


def hash_password(password: str) -> str:
    """`scrypt$N$r$p$salt$hash` (base64), with a fresh 16-byte salt."""
    if len(password) < 12:
        raise AccountError("password must be at least 12 characters long")
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=64 * 1024 * 1024, dklen=32)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


_DUMMY: list[str] = []
_DUMMY_LOCK = threading.Lock()


def dummy_hash() -> str:
    """A scrypt hash of a random password (made once per process) with the current parameters:
    what an unknown user name is checked against, so that it costs as much as a known one."""
    with _DUMMY_LOCK:
        if not _DUMMY:
            _DUMMY.append(hash_password(secrets.token_urlsafe(24)))
        return _DUMMY[0]


def verify_password(password: str, stored: str | None) -> bool:
    """Check `password` against a stored hash; with none, against `dummy_hash()` (same cost)."""
    if not stored:
        verify_password(password, dummy_hash())
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), maxmem=64 * 1024 * 1024, dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


# --------------------------------------------------------------------------- TOTP (RFC 6238)

TOTP_STEP_S = 30
TOTP_DIGITS = 6


def new_totp_secret() -> str:
    """A 160-bit shared secret in base32 (what authenticator apps take)."""
    return base64.b32encode(os.urandom(20)).decode().rstrip("=")


def hotp(secret_b32: str, counter: int, digits: int = TOTP_DIGITS) -> str:
    """RFC 4226 HOTP value for `counter` (HMAC-SHA-1, dynamic truncation)."""
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8), casefold=True)
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF) % 10**digits
    return str(code).zfill(digits)


def totp(secret_b32: str, at: float) -> str:
    """RFC 6238 TOTP value at time `at` (Unix seconds)."""
    return hotp(secret_b32, int(at // TOTP_STEP_S))


def totp_match(secret_b32: str, code: str, at: float, last_step: int) -> int | None:
    """The time step `code` is valid for (now ±1 step, newer than `last_step`), else None."""
    code = (code or "").strip().replace(" ", "")
    if len(code) != TOTP_DIGITS or not code.isdigit():
        return None
    now = int(at // TOTP_STEP_S)
    for step in (now, now - 1, now + 1):
        if step > last_step and hmac.compare_digest(hotp(secret_b32, step), code):
            return step
    return None


def provisioning_uri(username: str, secret_b32: str, issuer: str = "fedpact") -> str:
    """otpauth:// URI for authenticator apps (show as a QR code or type the secret in)."""
    return (f"otpauth://totp/{quote(issuer)}:{quote(username)}?secret={secret_b32}"
            f"&issuer={quote(issuer)}&algorithm=SHA1&digits={TOTP_DIGITS}&period={TOTP_STEP_S}")


class SecretBox:
    """AES-256-GCM sealing of TOTP secrets under a key file created once in the run folder."""

    def __init__(self, key_path: Path):
        if not key_path.exists():
            key_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n")
        self._aead = AESGCM(base64.b64decode(key_path.read_bytes().strip()))

    def seal(self, text: str, context: str) -> str:
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, text.encode(), context.encode())).decode()

    def open(self, sealed: str, context: str) -> str:
        raw = base64.b64decode(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()


# --------------------------------------------------------------------------- principals


@dataclass(frozen=True)
class Grant:
    role: str
    scope: str = ""


@dataclass
class Principal:
    """An authenticated caller: a person (console or token) or a machine identity (token)."""

    user_id: int
    username: str
    kind: str
    grants: list[Grant] = field(default_factory=list)
    via: str = "token"  # token | session
    session_csrf: str = ""

    @property
    def actor(self) -> str:
        """How this caller appears as the ledger's `actor`."""
        return f"user:{self.username}" if self.kind == "person" else f"machine:{self.username}"

    @property
    def roles(self) -> list[str]:
        return sorted({g.role for g in self.grants})

    def has(self, role: str) -> bool:
        return any(g.role == role for g in self.grants)

    def scopes(self, role: str) -> list[str]:
        return sorted(g.scope for g in self.grants if g.role == role)

    def admins(self, partner: str) -> bool:
        return Grant("partner_admin", partner) in self.grants

    def describe(self) -> str:
        held = ", ".join(f"{g.role}({g.scope})" if g.scope else g.role for g in self.grants)
        return held or "no roles"


def _check_username(username: str) -> str:
    name = (username or "").strip().lower()
    if not 2 <= len(name) <= 64 or not set(name) <= USERNAME_CHARS:
        raise AccountError(f"username {username!r}: use 2-64 characters from a-z, 0-9, '.', '_', '-' "
                           "(a handle, not an e-mail address: usernames are written to the ledger)")
    return name


def check_grant(role: str, scope: str) -> Grant:
    if role not in ROLES:
        raise AccountError(f"role {role!r} is unknown: choose one of {', '.join(ROLES)}")
    scope = (scope or "").strip()
    if role in SCOPED_ROLES and not scope:
        raise AccountError(f"role {role} needs a scope: the partner dataset it holds for, "
                           "e.g. telco-churn/dsl")
    if role not in SCOPED_ROLES and scope:
        raise AccountError(f"role {role} holds service-wide and takes no scope (got {scope!r})")
    if len(scope) > 200:
        raise AccountError("scope is longer than 200 characters")
    return Grant(role, scope)


# --------------------------------------------------------------------------- accounts


@dataclass
class IssuedToken:
    token: str  # shown once, never stored
    token_id: str
    username: str
    expires_at: float


@dataclass
class NewAccount:
    username: str
    kind: str
    totp_secret: str | None
    totp_uri: str | None
    event_id: str


class Accounts:
    """Users, role grants, tokens, sign-in and console sessions; ledger events for each change."""

    def __init__(self, store: ServiceStore, ledger: Ledger):
        self.store = store
        self.ledger = ledger
        self.box = SecretBox(store.home / "service.key")
        self._unknown_lock = threading.Lock()
        self._unknown_held = 0
        self._unknown_since: float | None = None

    # ---- users and roles

    def create_user(self, username: str, *, kind: str = "person", password: str | None = None,
                    created_by: str) -> NewAccount:
        """A person (password + TOTP) or a machine identity (tokens only, e.g. a partner node)."""
        name = _check_username(username)
        if kind not in ("person", "machine"):
            raise AccountError(f"kind {kind!r}: choose person or machine")
        secret = uri = None
        pw_hash = None
        if kind == "person":
            if not password:
                raise AccountError("a person needs a password (at least 12 characters)")
            pw_hash = hash_password(password)
            secret = new_totp_secret()
            uri = provisioning_uri(name, secret)
        elif password:
            raise AccountError("machine identities sign in with tokens only; give no password")
        with self.store.write_lock, self.store.engine.begin() as conn:
            if conn.execute(select(users.c.id).where(users.c.username == name)).first():
                raise AccountError(f"user {name!r} already exists")
            conn.execute(insert(users).values(
                username=name, kind=kind, password_hash=pw_hash,
                totp_secret=self.box.seal(secret, name) if secret else None, totp_last_step=0,
                failed_logins=0, disabled=False, created_at=self.store.now()))
        ev = self.ledger.append(EventType.USER_CREATED,
                                {"principal": name, "kind": kind, "created_by": created_by},
                                actor=created_by)
        return NewAccount(name, kind, secret, uri, ev.event_id)

    def _user(self, conn, username: str):
        row = conn.execute(select(users).where(users.c.username == _check_username(username))).first()
        if row is None:
            raise AccountError(f"no user {username!r}; create it with `fedpact admin user create`")
        return row

    def set_password(self, username: str, password: str, *, actor: str) -> None:
        pw_hash = hash_password(password)
        with self.store.write_lock, self.store.engine.begin() as conn:
            row = self._user(conn, username)
            if row.kind != "person":
                raise AccountError(f"{username} is a machine identity; it has no password")
            conn.execute(update(users).where(users.c.id == row.id).values(
                password_hash=pw_hash, failed_logins=0, locked_until=None))

    def set_disabled(self, username: str, disabled: bool) -> None:
        with self.store.write_lock, self.store.engine.begin() as conn:
            row = self._user(conn, username)
            conn.execute(update(users).where(users.c.id == row.id).values(disabled=disabled))
            if disabled:
                conn.execute(update(sessions).where(and_(sessions.c.user_id == row.id,
                                                         sessions.c.ended_at.is_(None)))
                             .values(ended_at=self.store.now()))

    def grant(self, username: str, role: str, scope: str = "", *, granted_by: str) -> str:
        g = check_grant(role, scope)
        with self.store.write_lock, self.store.engine.begin() as conn:
            row = self._user(conn, username)
            if g.role == "node" and row.kind != "machine":
                raise AccountError(f"role node is for machine identities; {row.username} is a person")
            if g.role != "node" and row.kind == "machine":
                raise AccountError(f"{row.username} is a machine identity: it can hold only role node")
            exists = conn.execute(select(grants.c.role).where(and_(
                grants.c.user_id == row.id, grants.c.role == g.role, grants.c.scope == g.scope))).first()
            if exists:
                raise AccountError(f"{row.username} already holds {g.role}"
                                   + (f" for {g.scope}" if g.scope else ""))
            conn.execute(insert(grants).values(user_id=row.id, role=g.role, scope=g.scope,
                                               granted_by=granted_by, granted_at=self.store.now()))
        payload = {"principal": row.username, "role": g.role, "granted_by": granted_by}
        if g.scope:
            payload["scope"] = g.scope
        return self.ledger.append(EventType.ROLE_GRANTED, payload, actor=granted_by).event_id

    def revoke(self, username: str, role: str, scope: str = "", *, revoked_by: str) -> str:
        g = check_grant(role, scope)
        with self.store.write_lock, self.store.engine.begin() as conn:
            row = self._user(conn, username)
            gone = conn.execute(delete(grants).where(and_(
                grants.c.user_id == row.id, grants.c.role == g.role, grants.c.scope == g.scope)))
            if gone.rowcount == 0:
                raise AccountError(f"{row.username} does not hold {g.role}"
                                   + (f" for {g.scope}" if g.scope else ""))
        payload = {"principal": row.username, "role": g.role, "revoked_by": revoked_by}
        if g.scope:
            payload["scope"] = g.scope
        return self.ledger.append(EventType.ROLE_REVOKED, payload, actor=revoked_by).event_id

    def list_users(self) -> list[dict]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(users).order_by(users.c.username)).all()
            held = conn.execute(select(grants)).all()
        out = []
        for r in rows:
            out.append({"username": r.username, "kind": r.kind, "disabled": bool(r.disabled),
                        "roles": [{"role": g.role, "scope": g.scope} for g in held if g.user_id == r.id]})
        return out

    def _grants(self, conn, user_id: int) -> list[Grant]:
        return [Grant(g.role, g.scope) for g in conn.execute(
            select(grants.c.role, grants.c.scope).where(grants.c.user_id == user_id)
            .order_by(grants.c.role, grants.c.scope))]

    # ---- tokens

    def issue_token(self, username: str, *, days: float = 30, label: str = "",
                    issued_by: str) -> IssuedToken:
        if not 0 < days <= MAX_TOKEN_DAYS:
            raise AccountError(f"days = {days}: a token must expire within (0, {MAX_TOKEN_DAYS}] days")
        if len(label) > 100:
            raise AccountError("label is longer than 100 characters")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = self.store.now()
        expires = now + days * 86400
        with self.store.write_lock, self.store.engine.begin() as conn:
            row = self._user(conn, username)
            if row.disabled:
                raise AccountError(f"{row.username} is disabled")
            conn.execute(insert(tokens).values(
                token_id=token_id, user_id=row.id, label=label, created_at=now, expires_at=expires,
                secret_sha256=hashlib.sha256(secret.encode()).hexdigest()))
        self.ledger.append(EventType.TOKEN_ISSUED,
                           {"principal": row.username, "token_id": token_id, "expires_at": expires,
                            "issued_by": issued_by}, actor=issued_by)
        return IssuedToken(f"fpt_{token_id}_{secret}", token_id, row.username, expires)

    def revoke_token(self, token_id: str, *, revoked_by: str) -> None:
        token_id = token_id.removeprefix("fpt_").split("_")[0]
        with self.store.write_lock, self.store.engine.begin() as conn:
            row = conn.execute(select(tokens).where(tokens.c.token_id == token_id)).first()
            if row is None:
                raise AccountError(f"no token {token_id!r}")
            if row.revoked_at is not None:
                raise AccountError(f"token {token_id} is already revoked")
            conn.execute(update(tokens).where(tokens.c.token_id == token_id)
                         .values(revoked_at=self.store.now()))
            owner = conn.execute(select(users.c.username).where(users.c.id == row.user_id)).scalar_one()
        self.ledger.append(EventType.TOKEN_REVOKED,
                           {"principal": owner, "token_id": token_id, "revoked_by": revoked_by},
                           actor=revoked_by)

    def list_tokens(self, username: str | None = None) -> list[dict]:
        query = select(tokens, users.c.username).join(users, users.c.id == tokens.c.user_id)
        if username:
            query = query.where(users.c.username == _check_username(username))
        with self.store.engine.connect() as conn:
            rows = conn.execute(query.order_by(tokens.c.created_at)).all()
        now = self.store.now()
        return [{"token_id": r.token_id, "username": r.username, "label": r.label,
                 "created_at": r.created_at, "expires_at": r.expires_at,
                 "state": "revoked" if r.revoked_at else "expired" if r.expires_at <= now else "active",
                 "last_used_at": r.last_used_at} for r in rows]

    def authenticate_token(self, presented: str) -> Principal:
        """The principal behind a bearer token; AuthError naming why it is not accepted."""
        if not presented.startswith("fpt_") or presented.count("_") < 2:
            raise AuthError("malformed API token: expected fpt_<id>_<secret>")
        token_id, secret = presented[4:].split("_", 1)
        with self.store.engine.connect() as conn:
            row = conn.execute(select(tokens, users.c.username, users.c.kind, users.c.disabled)
                               .join(users, users.c.id == tokens.c.user_id)
                               .where(tokens.c.token_id == token_id)).first()
            digest = hashlib.sha256(secret.encode()).hexdigest()
            if row is None or not hmac.compare_digest(row.secret_sha256, digest):
                raise AuthError("invalid API token")
            now = self.store.now()
            if row.revoked_at is not None:
                raise AuthError(f"API token {token_id} was revoked")
            if row.expires_at <= now:
                raise AuthError(f"API token {token_id} expired; ask for a new one "
                                "(`fedpact admin token issue`)")
            if row.disabled:
                raise AuthError(f"user {row.username} is disabled")
            held = self._grants(conn, row.user_id)
        if row.last_used_at is None or now - row.last_used_at > 60:  # at most one write a minute
            with self.store.write_lock, self.store.engine.begin() as conn:
                conn.execute(update(tokens).where(tokens.c.token_id == token_id).values(last_used_at=now))
        return Principal(row.user_id, row.username, row.kind, held, via="token")

    # ---- console sign-in and sessions

    def login(self, username: str, password: str, code: str) -> tuple[str, Principal]:
        """Password + TOTP; return (session cookie value, principal). Five failures lock 15 min.

        Every failure costs one scrypt (a dummy one for a name that is no person's account, the
        real one for a locked account) and raises AuthError with the one message
        `SIGN_IN_FAILED`, so neither time nor words tell whether an account exists or is locked."""
        now = self.store.now()
        try:
            name = _check_username(username)
        except AccountError:
            name = ""
        with self.store.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.username == name)).first() if name else None
        if row is None or row.kind != "person" or row.disabled:
            verify_password(password, None)  # a dummy scrypt: as slow as a known account
            self._unknown_failure(now)
            raise AuthError(SIGN_IN_FAILED)
        # The slow hash runs outside the write lock: sign-ins do not queue behind each other.
        password_ok = verify_password(password, row.password_hash)
        failure: tuple[str | None, str] | None = None  # (user, ledger detail)
        with self.store.write_lock, self.store.engine.begin() as conn:
            row = conn.execute(select(users).where(users.c.id == row.id)).first()
            if row is None or row.disabled:  # removed or disabled meanwhile
                failure = (None, "unknown or disabled user")
            elif row.locked_until and row.locked_until > now:
                failure = (row.username, "locked")
            else:
                step = None
                if password_ok:
                    step = totp_match(self.box.open(row.totp_secret, row.username), code, now,
                                      row.totp_last_step)
                if step is None:
                    failures = row.failed_logins + 1
                    conn.execute(update(users).where(users.c.id == row.id).values(
                        failed_logins=failures,
                        locked_until=now + LOCKOUT_S if failures >= LOCKOUT_AFTER else None))
                    failure = (row.username, "bad password or code")
                else:
                    conn.execute(update(users).where(users.c.id == row.id).values(
                        failed_logins=0, locked_until=None, totp_last_step=step))
                    cookie = secrets.token_urlsafe(32)
                    csrf = secrets.token_urlsafe(24)
                    conn.execute(insert(sessions).values(
                        session_sha256=hashlib.sha256(cookie.encode()).hexdigest(), user_id=row.id,
                        csrf=csrf, created_at=now, last_seen=now))
                    held = self._grants(conn, row.id)
        if failure is not None:
            who, detail = failure
            if who is None:
                self._unknown_failure(now)
            else:
                self._login_event(who, "failure", detail)
            raise AuthError(SIGN_IN_FAILED)
        self._login_event(row.username, "success", "password+totp")
        return cookie, Principal(row.id, row.username, row.kind, held, via="session", session_csrf=csrf)

    def _login_event(self, username: str | None, outcome: str, detail: str,
                     attempts: int | None = None) -> None:
        # An unknown name is not recorded: it may be a mistyped password or someone's e-mail.
        payload = {"principal": username or "(unknown)", "outcome": outcome,
                   "method": "password+totp", "detail": detail}
        if attempts is not None:
            payload["attempts"] = attempts
            payload["window_s"] = UNKNOWN_FAILURE_WINDOW_S
        self.ledger.append(EventType.LOGIN, payload,
                           actor=f"user:{username}" if username else "console")

    def _unknown_failure(self, now: float) -> None:
        """A failure naming no person's account: the first of a 5-minute window is written at
        once, with the failures held back since the previous one (`attempts`); the rest are
        counted until the next window (or `flush_unknown_failures`)."""
        with self._unknown_lock:
            self._unknown_held += 1
            if (self._unknown_since is not None
                    and now - self._unknown_since < UNKNOWN_FAILURE_WINDOW_S):
                return
            attempts, self._unknown_held, self._unknown_since = self._unknown_held, 0, now
        self._login_event(None, "failure", "unknown or disabled user", attempts)

    def flush_unknown_failures(self) -> None:
        """Write the held-back count of unknown-user failures (at shutdown)."""
        with self._unknown_lock:
            attempts, self._unknown_held = self._unknown_held, 0
        if attempts:
            self._login_event(None, "failure", "unknown or disabled user", attempts)

    def session(self, cookie: str) -> Principal | None:
        """The principal of a live session (sliding 15-minute idle timeout, and at most 12 hours
        after sign-in), else None."""
        if not cookie:
            return None
        digest = hashlib.sha256(cookie.encode()).hexdigest()
        now = self.store.now()
        with self.store.engine.connect() as conn:
            row = conn.execute(select(sessions, users.c.username, users.c.kind, users.c.disabled)
                               .join(users, users.c.id == sessions.c.user_id)
                               .where(sessions.c.session_sha256 == digest)).first()
            if row is None or row.ended_at is not None or row.disabled:
                return None
            held = self._grants(conn, row.user_id)
        with self.store.write_lock, self.store.engine.begin() as conn:
            if now - row.last_seen > IDLE_TIMEOUT_S or now - row.created_at > SESSION_MAX_S:
                conn.execute(update(sessions).where(sessions.c.session_sha256 == digest)
                             .values(ended_at=min(row.last_seen + IDLE_TIMEOUT_S,
                                                  row.created_at + SESSION_MAX_S)))
                return None
            conn.execute(update(sessions).where(sessions.c.session_sha256 == digest).values(last_seen=now))
        return Principal(row.user_id, row.username, row.kind, held, via="session", session_csrf=row.csrf)

    def logout(self, cookie: str) -> None:
        digest = hashlib.sha256((cookie or "").encode()).hexdigest()
        with self.store.write_lock, self.store.engine.begin() as conn:
            conn.execute(update(sessions).where(and_(sessions.c.session_sha256 == digest,
                                                     sessions.c.ended_at.is_(None)))
                         .values(ended_at=self.store.now()))


# --------------------------------------------------------------------------- sign-in throttle


class LoginThrottle:
    """Per-address token bucket for console sign-ins, in memory: an address may fail `burst`
    times in a row, then regains one attempt every `refill_s` seconds. An attempt takes a token
    before the password is checked (parallel guesses cannot overtake the count); a successful
    sign-in gives it back."""

    def __init__(self, clock: Callable[[], float], *, burst: int = LOGIN_BURST,
                 refill_s: float = LOGIN_REFILL_S, max_addresses: int = 10_000):
        if burst < 1 or refill_s <= 0:
            raise ValueError("LoginThrottle: burst must be at least 1 and refill_s positive")
        self.clock = clock
        self.burst = burst
        self.refill_s = refill_s
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)
        self._lock = threading.Lock()

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (float(self.burst), now))
        return min(float(self.burst), tokens + max(0.0, now - at) / self.refill_s)

    def take(self, address: str) -> int | None:
        """Take one attempt for `address`; None if it may go on, else the seconds to wait."""
        now = self.clock()
        with self._lock:
            tokens = self._tokens(address, now)
            if tokens < 1:
                self._buckets[address] = (tokens, now)
                return max(1, int((1 - tokens) * self.refill_s + 0.999))
            self._buckets[address] = (tokens - 1, now)
            if len(self._buckets) > self.max_addresses:
                self._prune(now)
        return None

    def give_back(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            self._buckets[address] = (min(float(self.burst), self._tokens(address, now) + 1), now)

    def _prune(self, now: float) -> None:
        # full buckets carry no information; then the longest-quiet addresses go first
        full = [a for a in self._buckets if self._tokens(a, now) >= self.burst]
        for a in full:
            del self._buckets[a]
        if len(self._buckets) > self.max_addresses:
            keep = sorted(self._buckets.items(), key=lambda item: item[1][1])[-self.max_addresses // 2:]
            self._buckets = dict(keep)
