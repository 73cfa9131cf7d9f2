"""Data subjects in the ledger: pseudonyms, and personal fields encrypted per subject (crypto-shredding).

A subject's raw id never reaches the ledger. Events name the subject by a pseudonym, a keyed hash
(HMAC-SHA-256) of the id under the deployment secret kept beside the ledger, taken after the id is
normalised by the rule the registry declares (`normalise.py`: by default NFKC, invisible
characters removed, spaces trimmed, case folded), so spellings of one id give one pseudonym. Personal fields an
event must keep (the raw id itself, contact details) travel in its `personal` envelope, AES-256-GCM
encrypted under a data key of that subject. Each subject has one data key per retention class and
month, so retention can shred old months and erasure shreds them all; the chain, which hashes only
the ciphertext, and every proof keep verifying after the keys are gone.

Data keys are stored wrapped (AES-GCM under a key derived from the deployment secret) in the
`subject_keys` table; destroying one overwrites the row (SQLite secure_delete + WAL truncation,
retried while another connection's read transaction pins the WAL; `last_purge` says whether the
bytes are gone from the files, and why not). A key row that is missing, rather than destroyed,
is reported as such (`Opened.state`): nothing recorded its destruction.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select, update

from fedpact.audit.chain import canonical_json
from fedpact.audit.events import PSEUDONYM, LedgerError
from fedpact.audit.normalise import DEFAULT_ID_RULE, id_rule
from fedpact.audit.store import SUBJECT_ID_RULE, Purge, ledger_meta, subject_keys

if TYPE_CHECKING:
    from fedpact.audit.ledger import Ledger

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
REFRESH_S = 1.0
"""How stale a process's view of keys destroyed by *other* processes may be, at most."""


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Opened:
    """The decrypted personal fields of one envelope, or `erased=True` if its key was destroyed.

    `state`: "open", "destroyed" (erased: `why` says by what) or "missing" (no key row at all:
    nothing recorded a destruction, so the row was deleted outside fedpact; `erased` is False)."""

    fields: dict[str, Any] | None
    key_id: str
    erased: bool
    state: str = "open"
    why: str | None = None


class SubjectKeys:
    """Pseudonymise subject ids and seal/open their personal fields for one ledger.

    `SubjectKeys.of(ledger)` returns the instance shared by everything using that ledger object.
    """

    @classmethod
    def of(cls, ledger: Ledger) -> SubjectKeys:
        shared = getattr(ledger, "_subject_keys", None)
        if shared is None:
            shared = cls(ledger)
            ledger._subject_keys = shared
        return shared

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        secret = ledger.deployment_secret()
        self._pseudonym_key = _derive(secret, b"fedpact/audit/pseudonym/v1")
        self._wrapping = AESGCM(_derive(secret, b"fedpact/audit/key-wrap/v1"))
        with ledger.store.read() as connection:
            declared = connection.execute(
                select(ledger_meta.c.value).where(ledger_meta.c.key == SUBJECT_ID_RULE)
            ).scalar()
        self.id_rule: str = declared or DEFAULT_ID_RULE
        """How ids are normalised before they are pseudonymised (see `normalise.py`)."""
        self._match = id_rule(self.id_rule)
        self.last_purge: Purge | None = None
        """Whether the last destruction's key bytes left the database files (None: none yet)."""
        self._cache: dict[tuple[str, str], bytes] = {}
        self._epoch: str | None = None
        self._local_epoch = -1
        self._checked_at = 0.0
        self._erased: set[str] | None = None

    def _refresh(self) -> None:
        """Drop cached keys if any key was destroyed since: at once for destructions through this
        ledger object, within REFRESH_S seconds for those made by other processes."""
        local = getattr(self.ledger, "_key_epoch_local", 0)
        now = time.monotonic()
        if local == self._local_epoch and now - self._checked_at < REFRESH_S:
            return
        with self.ledger.store.read() as connection:
            epoch = connection.execute(
                select(ledger_meta.c.value).where(ledger_meta.c.key == "key_epoch")
            ).scalar()
            if epoch != self._epoch or self._erased is None:
                self._erased = set(
                    connection.execute(
                        select(subject_keys.c.subject)
                        .where(subject_keys.c.destroyed_why.like("erasure%"))
                        .distinct()
                    ).scalars()
                )
        if epoch != self._epoch or local != self._local_epoch:
            self._cache.clear()
        self._epoch, self._local_epoch, self._checked_at = epoch, local, now

    # --- pseudonyms ---------------------------------------------------------------------------

    @staticmethod
    def normalise(subject_id: Any) -> str:
        """The id as the subject gave it, for their sealed personal fields: NFC, surrounding
        spaces removed; refuses empty ids. (Pseudonyms are taken of `match_key`.)"""
        if subject_id is None or isinstance(subject_id, bool | float):
            raise LedgerError(f"subject id {subject_id!r} must be text or an integer")
        text = unicodedata.normalize("NFC", str(subject_id)).strip()
        if not text:
            raise LedgerError("subject id is empty")
        return text

    def match_key(self, subject_id: Any) -> str:
        """The text a subject id is pseudonymised as, under this registry's `id_rule`."""
        if subject_id is None or isinstance(subject_id, bool | float):
            raise LedgerError(f"subject id {subject_id!r} must be text or an integer")
        text = self._match(str(subject_id))
        if not text:
            raise LedgerError("subject id is empty")
        return text

    def declare_id_rule(self, rule: str) -> None:
        """Declare how this registry normalises subject ids (`normalise.ID_RULES`), before any
        subject is recorded: changing it later would orphan every pseudonym already made."""
        match = id_rule(rule)
        store = self.ledger.store
        with store.write() as connection:
            used = connection.execute(select(subject_keys.c.subject).limit(1)).first() or (
                connection.exec_driver_sql(
                    "SELECT 1 FROM ledger_events WHERE payload LIKE '%\"subject\":\"ps\\_%' "
                    "ESCAPE '\\' LIMIT 1").first())
            if used and rule != self.id_rule:
                raise LedgerError(
                    f"subjects were already pseudonymised under the id rule {self.id_rule}: it "
                    "cannot change (their pseudonyms are in the chain)"
                )
            connection.execute(ledger_meta.delete().where(ledger_meta.c.key == SUBJECT_ID_RULE))
            connection.execute(ledger_meta.insert().values(key=SUBJECT_ID_RULE, value=rule))
        self.id_rule, self._match = rule, match

    def pseudonym(self, subject_id: Any) -> str:
        """`ps_` + the first 128 bits of HMAC-SHA-256(deployment secret, normalised id): stable,
        not reversible."""
        if isinstance(subject_id, str) and PSEUDONYM.match(subject_id):
            return subject_id  # already a pseudonym
        digest = hmac.new(
            self._pseudonym_key, self.match_key(subject_id).encode("utf-8"), sha256
        ).hexdigest()
        return f"ps_{digest[:32]}"

    def pseudonyms(self, subject_ids: Iterable[Any]) -> list[str]:
        key = self._pseudonym_key
        match_key = self.match_key
        out = []
        for subject_id in subject_ids:
            if isinstance(subject_id, str) and PSEUDONYM.match(subject_id):
                out.append(subject_id)
                continue
            text = match_key(subject_id)
            out.append("ps_" + hmac.digest(key, text.encode("utf-8"), "sha256").hex()[:32])
        return out

    # --- data keys ----------------------------------------------------------------------------

    @staticmethod
    def key_id(retention_class: str, at: datetime) -> str:
        return f"{retention_class}:{at.astimezone(UTC):%Y-%m}"

    def _wrap_aad(self, subject: str, key_id: str) -> bytes:
        return f"fedpact-subject-key|{subject}|{key_id}".encode()

    def _data_key(self, subject: str, key_id: str, *, create: bool) -> bytes | None:
        cached = self._cache.get((subject, key_id))
        if cached is not None:
            return cached
        store = self.ledger.store
        if create:
            nonce, key = os.urandom(12), AESGCM.generate_key(bit_length=256)
            wrapped = nonce + self._wrapping.encrypt(nonce, key, self._wrap_aad(subject, key_id))
            retention_class, period = key_id.split(":", 1)
            with store.write() as connection:
                store.insert_ignore(
                    connection,
                    subject_keys,
                    [{"subject": subject, "key_id": key_id, "retention_class": retention_class,
                      "period": period, "wrapped": wrapped,
                      "created": datetime.now(UTC).isoformat(timespec="seconds")}],
                )
        with store.read() as connection:
            row = connection.execute(
                select(subject_keys.c.wrapped, subject_keys.c.destroyed_at).where(
                    subject_keys.c.subject == subject, subject_keys.c.key_id == key_id
                )
            ).first()
        if row is None or row.wrapped is None:
            if create:
                raise LedgerError(
                    f"the data key {key_id} of subject {subject} was destroyed "
                    f"({row.destroyed_at if row else 'never created'}): nothing new can be sealed "
                    "for an erased subject"
                )
            return None
        wrapped = bytes(row.wrapped)
        try:
            key = self._wrapping.decrypt(wrapped[:12], wrapped[12:], self._wrap_aad(subject, key_id))
        except InvalidTag:
            raise LedgerError(
                f"the data key {key_id} of subject {subject} does not unwrap: wrong deployment "
                "secret, or the key row was altered"
            ) from None
        self._cache[(subject, key_id)] = key
        return key

    def ensure_keys(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Create (in one transaction) and cache the data keys for many (subject, key_id) pairs."""
        self._refresh()
        wanted = sorted({p for p in pairs if p not in self._cache})
        if not wanted:
            return
        store = self.ledger.store
        now = datetime.now(UTC).isoformat(timespec="seconds")
        rows = []
        for subject, key_id in wanted:
            nonce, key = os.urandom(12), AESGCM.generate_key(bit_length=256)
            retention_class, period = key_id.split(":", 1)
            rows.append({
                "subject": subject, "key_id": key_id, "retention_class": retention_class,
                "period": period, "created": now,
                "wrapped": nonce + self._wrapping.encrypt(nonce, key, self._wrap_aad(subject, key_id)),
            })
        with store.write() as connection:
            store.insert_ignore(connection, subject_keys, rows)
        subjects = sorted({subject for subject, _ in wanted})
        wanted_set = set(wanted)
        with store.read() as connection:
            for start in range(0, len(subjects), 500):
                for subject, key_id, wrapped in connection.execute(
                    select(subject_keys.c.subject, subject_keys.c.key_id, subject_keys.c.wrapped)
                    .where(subject_keys.c.subject.in_(subjects[start:start + 500]))
                ):
                    if wrapped is not None and (subject, key_id) in wanted_set:
                        wrapped = bytes(wrapped)
                        self._cache[(subject, key_id)] = self._wrapping.decrypt(
                            wrapped[:12], wrapped[12:], self._wrap_aad(subject, key_id)
                        )

    def seal(
        self,
        subject: str,
        fields: Mapping[str, Any],
        *,
        retention_class: str,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """Encrypt `fields` for `subject` (a pseudonym) into an envelope for an event's `personal`."""
        if not PSEUDONYM.match(subject):
            raise LedgerError(f"seal() needs a subject pseudonym, got {subject[:8]!r}…")
        self._refresh()
        if self.is_erased(subject):
            raise LedgerError(
                f"subject {subject} was erased (its keys were destroyed): nothing new can be "
                "recorded for them"
            )
        key_id = self.key_id(retention_class, at or datetime.now(UTC))
        key = self._data_key(subject, key_id, create=True)
        assert key is not None
        nonce = os.urandom(12)
        plaintext = canonical_json(dict(fields), label="personal fields")
        ciphertext = AESGCM(key).encrypt(nonce, plaintext, f"{subject}|{key_id}".encode())
        return {"v": ENVELOPE_VERSION, "key": key_id, "nonce": _b64(nonce), "ct": _b64(ciphertext)}

    def open(self, subject: str, envelope: Mapping[str, Any]) -> Opened:
        """Decrypt an envelope; `erased=True` (fields None) when the subject's key was destroyed."""
        key_id = str(envelope.get("key"))
        self._refresh()
        key = self._data_key(subject, key_id, create=False)
        if key is None:
            with self.ledger.store.read() as connection:
                row = connection.execute(
                    select(subject_keys.c.destroyed_why).where(
                        subject_keys.c.subject == subject, subject_keys.c.key_id == key_id)
                ).first()
            if row is None:
                return Opened(None, key_id, False, "missing")
            return Opened(None, key_id, True, "destroyed", row.destroyed_why)
        try:
            nonce = base64.b64decode(envelope["nonce"], validate=True)
            ciphertext = base64.b64decode(envelope["ct"], validate=True)
            plaintext = AESGCM(key).decrypt(nonce, ciphertext, f"{subject}|{key_id}".encode())
        except (KeyError, binascii.Error, InvalidTag):
            raise LedgerError(
                f"personal fields of subject {subject} under key {key_id} do not decrypt "
                "(envelope altered, or sealed for another subject)"
            ) from None
        import json

        return Opened(json.loads(plaintext), key_id, False)

    def destroy(self, subject: str, *, why: str, purge_timeout_s: float = 30.0) -> int:
        """Destroy every data key of `subject`; return how many were live. Irreversible.

        `last_purge` then says whether the wrapped key bytes left the database files (waiting up
        to `purge_timeout_s` for other connections' read transactions to end)."""
        return self._destroy(subject_keys.c.subject == subject, why, purge_timeout_s)

    def destroy_expired(self, retention_class: str, before_period: str, *, why: str,
                        purge_timeout_s: float = 30.0) -> int:
        """Destroy every key of `retention_class` for months before `before_period` (YYYY-MM)."""
        return self._destroy(
            (subject_keys.c.retention_class == retention_class)
            & (subject_keys.c.period < before_period),
            why, purge_timeout_s,
        )

    def purge(self, *, timeout_s: float = 30.0) -> Purge:
        """Retry removing destroyed key bytes from the database files (after a destruction whose
        `last_purge` was incomplete, once the readers that blocked it have ended)."""
        self.last_purge = self.ledger.store.after_erasure((), timeout_s=timeout_s)
        return self.last_purge

    def _destroy(self, condition: Any, why: str, purge_timeout_s: float) -> int:
        store = self.ledger.store
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with store.write() as connection:
            residue = [bytes(w) for (w,) in connection.execute(
                select(subject_keys.c.wrapped).where(condition, subject_keys.c.wrapped.is_not(None))
            )]
            destroyed = connection.execute(
                update(subject_keys)
                .where(condition, subject_keys.c.wrapped.is_not(None))
                .values(wrapped=None, destroyed_at=now, destroyed_why=why)
            ).rowcount
            connection.execute(ledger_meta.delete().where(ledger_meta.c.key == "key_epoch"))
            connection.execute(ledger_meta.insert().values(key="key_epoch", value=os.urandom(8).hex()))
        self._cache.clear()
        self.ledger._key_epoch_local = getattr(self.ledger, "_key_epoch_local", 0) + 1
        self.last_purge = store.after_erasure(residue, timeout_s=purge_timeout_s)
        if not self.last_purge.complete:
            log.error("ledger %s: %d keys destroyed (%s), but %s", store.display_url,
                      int(destroyed or 0), why, self.last_purge.detail)
        return int(destroyed or 0)

    def is_erased(self, subject: str) -> bool:
        """True if any key of `subject` was destroyed by an erasure request."""
        self._refresh()
        return subject in (self._erased or set())

    def live_key_count(self, subject: str) -> int:
        with self.ledger.store.read() as connection:
            return len(
                connection.execute(
                    select(subject_keys.c.key_id).where(
                        subject_keys.c.subject == subject, subject_keys.c.wrapped.is_not(None)
                    )
                ).all()
            )
