"""Event vocabulary of the audit ledger and the minimal payload each event must carry.

Compliance officers show these records to GDPR/PIPL regulators, so an event that lacks the facts
a regulator asks about (which node touched which dataset, for what purpose) is refused at write time.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any


class LedgerError(Exception):
    """Raised when the audit ledger cannot record, read or check an event; the message says why."""


class EventType(str, enum.Enum):  # noqa: UP042 - the documented (str, Enum) form
    """What happened in a federated job; the values are the stable strings stored in the ledger."""

    JOB_CREATED = "job.created"
    DATA_ACCESSED = "data.accessed"
    ROUND_AGGREGATED = "round.aggregated"
    JOB_FINISHED = "job.finished"
    JOB_FAILED = "job.failed"
    MODEL_DELIVERED = "model.delivered"
    # audience matching (privacy/matching)
    MATCH_COMPLETED = "match.completed"
    # privacy budgets per dataset (privacy/budget)
    BUDGET_SET = "privacy.budget_set"
    PRIVACY_SPENT = "privacy.spent"
    JOB_REFUSED = "job.refused"
    UPDATE_REJECTED = "update.rejected"
    # governed job workflow, accounts and sign-in (service/api)
    JOB_REQUESTED = "job.requested"
    JOB_APPROVED = "job.approved"
    JOB_REJECTED = "job.rejected"
    JOB_REVOKED = "job.revoked"
    # the consortium's dataset registry (service/api/datasets.py): a partner's public layout
    DATASET_REGISTERED = "dataset.registered"
    TOKEN_ISSUED = "admin.token_issued"
    TOKEN_REVOKED = "admin.token_revoked"
    USER_CREATED = "admin.user_created"
    LOGIN = "auth.login"
    # consent registry (audit/consent.py); subjects appear only as pseudonyms
    CONSENT_GRANTED = "consent.granted"
    CONSENT_WITHDRAWN = "consent.withdrawn"
    CONSENT_EXPIRED = "consent.expired"
    DATA_EXCLUDED = "data.excluded"
    SUBJECTS_USED = "data.subjects_used"
    MATCH_STARTED = "match.started"
    JOB_STARTED = "job.started"
    MODEL_EXPORTED = "model.exported"
    MODEL_FLAGGED = "model.flagged"
    # data-subject requests (audit/dsar.py)
    DSAR_RECEIVED = "dsar.received"
    DSAR_FULFILLED = "dsar.fulfilled"
    SUBJECT_RECTIFIED = "subject.rectified"
    SUBJECT_ERASED = "subject.erased"
    # four-eyes exports of personal data (audit/exports.py)
    EXPORT_REQUESTED = "export.requested"
    EXPORT_APPROVED = "export.approved"
    EXPORT_REJECTED = "export.rejected"
    EXPORT_DOWNLOADED = "export.downloaded"
    # administration
    KEYS_ROTATED = "admin.keys_rotated"
    BUDGET_CHANGED = "admin.budget_changed"
    ROLE_GRANTED = "admin.role_granted"
    ROLE_REVOKED = "admin.role_revoked"
    INDEXES_REBUILT = "admin.indexes_rebuilt"
    RETENTION_ENFORCED = "retention.enforced"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: EventType | str) -> EventType:
        """Return the EventType named by `value` (member or its string), or raise LedgerError."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(member.value for member in cls)
            raise LedgerError(
                f"unknown ledger event type {value!r}; known types: {known}"
            ) from None



PSEUDONYM = re.compile(r"^ps_[0-9a-f]{32}$")
"""How a data subject appears in the ledger: a keyed hash of their id (see `audit/subjects.py`)."""

# Field kinds: how each payload field of a typed event is checked.
STR, INT, COUNT, NUMBER, BOOL, TIMESTAMP, OPT_TIMESTAMP, SUBJECT, STR_LIST, OPT_STR, ANY, DICT = (
    "text", "integer", "count", "number", "boolean", "timestamp", "timestamp or null",
    "subject pseudonym", "list of text", "text or null", "any", "object",
)

FIELD_KINDS: dict[EventType, dict[str, str]] = {
    EventType.JOB_CREATED: {"task": STR, "partners": STR_LIST, "purpose": STR},
    EventType.DATA_ACCESSED: {
        "node": STR, "dataset": STR, "rows": COUNT, "columns": STR_LIST, "purpose": STR,
    },
    EventType.ROUND_AGGREGATED: {"round": INT, "nodes": STR_LIST},
    EventType.JOB_FINISHED: {"metrics": DICT, "epsilon": ANY},
    EventType.JOB_FAILED: {"reason": STR},
    EventType.MODEL_DELIVERED: {"model": STR, "recipient": STR, "purpose": STR},
    EventType.MATCH_COMPLETED: {
        "mode": STR, "parties": ANY, "datasets": ANY, "sizes": ANY, "overlap": ANY, "purpose": STR,
    },
    EventType.BUDGET_SET: {"dataset": STR, "epsilon_max": ANY, "delta": ANY},
    EventType.PRIVACY_SPENT: {"dataset": STR, "epsilon": ANY, "delta": ANY},
    EventType.JOB_REFUSED: {"reason": STR},
    EventType.UPDATE_REJECTED: {"node": STR, "round": INT, "reason": STR},
    EventType.CONSENT_GRANTED: {
        "subject": SUBJECT, "purpose": STR, "channel": STR, "legal_basis": STR,
        "notice_version": STR, "source": STR, "timestamp": TIMESTAMP, "expires_at": OPT_TIMESTAMP,
    },
    EventType.CONSENT_WITHDRAWN: {
        "subject": SUBJECT, "purpose": STR, "channel": STR, "source": STR, "timestamp": TIMESTAMP,
    },
    EventType.CONSENT_EXPIRED: {"subject": SUBJECT, "purpose": STR, "timestamp": TIMESTAMP},
    EventType.DATA_EXCLUDED: {
        "dataset": STR, "purpose": STR, "excluded": COUNT, "total": COUNT, "reason": STR,
    },
    # In a partner's own registry: the count and the manifest hash (SHA-256 over the sorted
    # pseudonyms kept in job_subjects). In the coordinator's ledger: the count only, with
    # `partner_manifest_sha256` (a commitment to the partner's manifest; its pseudonyms are under
    # the partner's key) and `consent` (enforced / off / not checkable), never the pseudonyms.
    EventType.SUBJECTS_USED: {
        "dataset": STR, "purpose": STR, "subjects": COUNT, "manifest_sha256": OPT_STR,
        "partner_manifest_sha256": OPT_STR, "consent": OPT_STR,
    },
    EventType.MATCH_STARTED: {"mode": STR, "datasets": STR_LIST, "purpose": STR},
    EventType.JOB_STARTED: {"purpose": STR},
    EventType.MODEL_EXPORTED: {"model": STR, "recipient": STR, "format": STR, "purpose": STR},
    EventType.MODEL_FLAGGED: {"model": STR, "subject": SUBJECT, "reason": STR},
    EventType.DSAR_RECEIVED: {
        "request_id": STR, "kind": STR, "subject": SUBJECT, "channel": STR, "timestamp": TIMESTAMP,
    },
    EventType.DSAR_FULFILLED: {
        "request_id": STR, "kind": STR, "subject": SUBJECT, "outcome": STR, "timestamp": TIMESTAMP,
    },
    EventType.SUBJECT_RECTIFIED: {"subject": SUBJECT, "request_id": STR, "fields": STR_LIST},
    EventType.SUBJECT_ERASED: {
        "subject": SUBJECT, "request_id": STR, "keys_destroyed": COUNT, "models_flagged": STR_LIST,
    },
    EventType.EXPORT_REQUESTED: {
        "request_id": STR, "requested_by": STR, "purpose": STR, "filters": DICT, "subjects": COUNT,
    },
    EventType.EXPORT_APPROVED: {"request_id": STR, "approved_by": STR, "role": STR},
    EventType.EXPORT_REJECTED: {"request_id": STR, "rejected_by": STR, "reason": STR},
    EventType.EXPORT_DOWNLOADED: {
        "request_id": STR, "downloaded_by": STR, "rows": COUNT, "sha256": STR,
    },
    EventType.KEYS_ROTATED: {"key": STR, "new_key_id": STR, "reason": STR},
    EventType.BUDGET_CHANGED: {"dataset": STR, "old": ANY, "new": ANY, "reason": STR},
    EventType.ROLE_GRANTED: {"principal": STR, "role": STR, "granted_by": STR},
    EventType.ROLE_REVOKED: {"principal": STR, "role": STR, "revoked_by": STR},
    EventType.INDEXES_REBUILT: {"events": COUNT, "index_rows": COUNT, "consent_rows": COUNT,
                                "differences_repaired": COUNT, "differences_left": COUNT},
    EventType.RETENTION_ENFORCED: {
        "keys_destroyed": COUNT, "by_class": DICT, "as_of": TIMESTAMP,
    },
    # governed job workflow (service/api/governance.py): who asked for what, who decided
    EventType.JOB_REQUESTED: {
        "task": STR, "dataset": STR, "partners": STR_LIST, "purpose": STR, "features": STR_LIST,
        "dp": BOOL, "target_epsilon": ANY, "target_delta": ANY, "requested_by": STR,
    },
    EventType.JOB_APPROVED: {"partner": STR, "dataset": STR, "decided_by": STR, "purpose": STR},
    EventType.JOB_REJECTED: {
        "partner": STR, "dataset": STR, "decided_by": STR, "purpose": STR, "reason": STR,
    },
    EventType.JOB_REVOKED: {
        "partner": STR, "dataset": STR, "decided_by": STR, "purpose": STR, "reason": STR,
    },
    # a partner dataset registered (or registered again) by its partner admin: names, the task,
    # the label column, and a digest of the public layout; never a path, a row or a statistic
    EventType.DATASET_REGISTERED: {
        "dataset": STR, "group": STR, "task": STR, "label": STR, "purpose": STR,
        "layout_sha256": STR, "features": COUNT, "registered_by": STR, "replaces": OPT_STR,
    },
    # accounts and sign-in (service/api/auth.py); principals are handles, never e-mail addresses
    EventType.TOKEN_ISSUED: {
        "principal": STR, "token_id": STR, "expires_at": NUMBER, "issued_by": STR,
    },
    EventType.TOKEN_REVOKED: {"principal": STR, "token_id": STR, "revoked_by": STR},
    EventType.USER_CREATED: {"principal": STR, "kind": STR, "created_by": STR},
    EventType.LOGIN: {"principal": STR, "outcome": STR, "method": STR, "detail": STR},
}

OPTIONAL_KINDS = {OPT_TIMESTAMP, OPT_STR}
REQUIRED_FIELDS: dict[EventType, set[str]] = {
    kind: {name for name, check in fields.items() if check not in OPTIONAL_KINDS}
    for kind, fields in FIELD_KINDS.items()
}
"""Fields every event of a type must carry (optional ones may be omitted or null)."""

RAW_PII_KEYS = frozenset(
    {"subject_id", "raw_id", "customer_id", "email", "phone", "name", "full_name", "address",
     "ip_address", "date_of_birth", "national_id"}
)
"""Payload keys that would hold a person's raw identity: refused; use the encrypted envelope.

Not only these exact keys: any key, at any depth, that `is_personal_key` matches (``email_address``,
``contactPhone``, ``passport_no``, ``ssn``...) is refused too."""

FREE_TEXT_KEYS = frozenset(
    {"reason", "note", "notes", "comment", "description", "justification", "error", "message"}
)
"""Free-text fields. Every string value at any depth, not only these, is screened for e-mail
addresses and phone numbers."""

_PII_KEY = re.compile(
    r"e[-_ ]?mail|phone|passport|address|birth|national[-_ ]?id|subject[-_ ]?id|customer[-_ ]?id"
    r"|raw[-_ ]?id|(?:full|first|last|given|family|sur|maiden)[-_ ]?name|(?<![a-z])ssn(?![a-z])"
    r"|^(?:name|dob|mobile|ip)$"
)
_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)
"""An e-mail address anywhere in a string (the domain needs a dot: ``model@1`` is a version).
Bounded repeats keep a search linear in the text's length."""
_PHONE = re.compile(r"(?<![\w+/=])\+[1-9](?:[ .()-]{0,2}\d){6,14}(?![\w/])")
"""An E.164-like phone number (+, country code, 7-15 digits; base64 and 1e+10 do not match)."""

NAME_KEYED: dict[EventType, frozenset[str]] = {
    EventType.JOB_CREATED: frozenset({"rows"}),
    EventType.JOB_FINISHED: frozenset({"per_partner_epsilon", "epsilon_crosscheck"}),
    EventType.ROUND_AGGREGATED: frozenset({"missing"}),
    EventType.MATCH_COMPLETED: frozenset(
        {"sizes", "epsilon_spent", "normalization", "invalid_by_reason"}
    ),
}
"""Object fields whose keys are dataset/partner names or fixed reason codes (e.g. the matcher's
``too_long_for_a_phone_number``), not field names: their keys are not screened, their values are."""

SEALED_KINDS = frozenset({SUBJECT})
"""Field kinds that are pseudonymous by construction (checked against `PSEUDONYM`): not screened."""


def is_personal_key(key: str) -> bool:
    """True if a payload key names a personal-data field (case-insensitive, substring match)."""
    verdict = _KEY_VERDICTS.get(key)
    if verdict is None:
        verdict = _PII_KEY.search(key.lower()) is not None
        if len(_KEY_VERDICTS) < 65536:
            _KEY_VERDICTS[key] = verdict
    return verdict


def looks_personal(text: str) -> bool:
    """True if `text` holds something that looks like an e-mail address or a phone number."""
    return ("@" in text and _EMAIL.search(text) is not None) or (
        "+" in text and _PHONE.search(text) is not None)


_KEY_VERDICTS: dict[str, bool] = {}


_KEY, _TEXT = "key", "text"


def _refused(what: str, path: str) -> LedgerError:
    if what == _KEY:
        return LedgerError(
            f"{path} would record raw personal data in the permanent ledger; pass a subject "
            "pseudonym and put personal fields in the encrypted 'personal' envelope"
        )
    return LedgerError(
        f"{path} looks like it holds an e-mail address or phone number; text in the ledger must "
        "not carry personal data (put it in the encrypted 'personal' envelope)"
    )


def _find(value: Any, name_keyed: frozenset[str], keys_are_names: bool = False
          ) -> tuple[str, str] | None:
    """(what, path below `value`) of the first personal-data key or text in a nested value."""
    kind_of = type(value)
    if kind_of is str:
        if ("@" in value or "+" in value) and looks_personal(value):
            return _TEXT, ""
        return None
    if kind_of is int or kind_of is float or kind_of is bool or value is None:
        return None
    if kind_of is list or kind_of is tuple:
        try:  # the common case, a list of strings: one join, one scan
            joined = "\x1f".join(value)
        except TypeError:
            pass
        else:
            if not (("@" in joined or "+" in joined) and looks_personal(joined)):
                return None
    if isinstance(value, Mapping):
        verdicts = _KEY_VERDICTS
        for key, item in value.items():
            if type(key) is not str:
                continue  # canonical JSON refuses it, naming the key
            if ("@" in key or "+" in key) and looks_personal(key):
                return _TEXT, f"[{key[:1]}…]"  # an address used as a key (not echoed back)
            if not keys_are_names:
                verdict = verdicts.get(key)
                if verdict is None:
                    verdict = is_personal_key(key)
                if verdict:
                    return _KEY, f".{key}"
            if type(item) is str:
                if ("@" in item or "+" in item) and looks_personal(item):
                    return _TEXT, f".{key}"
            elif not (type(item) in _SCALARS or item is None):
                found = _find(item, name_keyed, key in name_keyed)
                if found is not None:
                    return found[0], f".{key}{found[1]}"
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _find(item, name_keyed)
            if found is not None:
                return found[0], f"[{index}]{found[1]}"
        return None
    if isinstance(value, str) and looks_personal(value):
        return _TEXT, ""
    return None


_SCALARS = frozenset({int, float, bool})


def _plan(kind: EventType, keys: tuple[Any, ...]) -> tuple[str, ...]:
    """Top-level fields of this key set to screen; raise if a key names personal data."""
    fields = FIELD_KINDS.get(kind, {})
    screened = []
    for key in keys:
        if not isinstance(key, str):
            continue  # canonical JSON refuses it, naming the key
        check = fields.get(key)
        if ("@" in key or "+" in key) and looks_personal(key):
            raise _refused(_TEXT, f"{kind.value} payload key [{key[:1]}…]")
        if key == "personal" or check in SEALED_KINDS:
            continue  # the encrypted envelope, or a pseudonym checked by its kind
        if is_personal_key(key):
            raise _refused(_KEY, f"{kind.value} payload.{key}")
        if check in (INT, COUNT, NUMBER, BOOL, TIMESTAMP, OPT_TIMESTAMP):
            continue  # type-checked: cannot carry text
        screened.append(key)
    return tuple(screened)


_PLANS: dict[EventType, dict[tuple[Any, ...], tuple[str, ...]]] = {kind: {} for kind in EventType}
"""Per event type: a payload key set already screened -> its fields whose values need screening."""
_NO_NAMES: frozenset[str] = frozenset()


def _screen(kind: EventType, payload: Mapping[str, Any]) -> None:
    """Refuse personal-data keys at any depth, and e-mail addresses / phone numbers in any text."""
    keys = tuple(payload)
    plans = _PLANS[kind]
    plan = plans.get(keys)
    if plan is None:
        plan = _plan(kind, keys)
        if len(plans) < 4096:
            plans[keys] = plan
    for name in plan:
        value = payload[name]
        kind_of = type(value)
        if kind_of is str:
            if ("@" in value or "+" in value) and looks_personal(value):
                raise _refused(_TEXT, f"{kind.value} payload.{name}")
        elif kind_of is list:
            try:
                joined = "\x1f".join(value)
            except TypeError:
                joined = "@"
            if ("@" in joined or "+" in joined) and (
                    found := _find(value, NAME_KEYED.get(kind, _NO_NAMES))):
                raise _refused(found[0], f"{kind.value} payload.{name}{found[1]}")
        elif not (kind_of in _SCALARS or value is None):
            name_keyed = NAME_KEYED.get(kind, _NO_NAMES)
            found = _find(value, name_keyed, name in name_keyed)
            if found is not None:
                raise _refused(found[0], f"{kind.value} payload.{name}{found[1]}")


ENVELOPE_FIELDS = {"v", "key", "nonce", "ct"}
"""The `personal` payload field: personal data AES-GCM-encrypted under a subject's key."""


def parse_timestamp(value: object, label: str) -> datetime:
    """Parse an ISO-8601 timestamp that carries a UTC offset; raise LedgerError naming `label`."""
    if not isinstance(value, str):
        raise LedgerError(f"{label} must be an ISO-8601 timestamp string, not {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise LedgerError(
            f"{label} {value!r} is not an ISO-8601 timestamp (e.g. 2025-01-31T09:15:00+00:00)"
        ) from None
    if parsed.tzinfo is None:
        raise LedgerError(f"{label} {value!r} has no UTC offset (add +00:00 or Z)")
    return parsed


def _check_kind(kind: str, value: Any, label: str) -> None:
    ok = True
    if kind == ANY:
        return
    if kind == STR:
        ok = isinstance(value, str) and value.strip() != ""
    elif kind == OPT_STR:
        ok = value is None or isinstance(value, str)
    elif kind == INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == COUNT:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif kind == NUMBER:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == BOOL:
        ok = isinstance(value, bool)
    elif kind == STR_LIST:
        ok = type(value) in (list, tuple) and all(type(v) is str or isinstance(v, str) for v in value)
    elif kind == DICT:
        ok = type(value) is dict or isinstance(value, Mapping)
    elif kind == SUBJECT:
        if not (isinstance(value, str) and PSEUDONYM.match(value)):
            raise LedgerError(
                f"{label} must be a subject pseudonym (ps_ + 32 hex digits), never a raw id; "
                "derive it with SubjectKeys.pseudonym()"
            )
    elif kind in (TIMESTAMP, OPT_TIMESTAMP) and not (kind == OPT_TIMESTAMP and value is None):
        parse_timestamp(value, label)
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise LedgerError(f"{label} must be {kind}, got {shown}")


def _check_envelope(value: Any, label: str) -> None:
    if not isinstance(value, Mapping) or set(value) != ENVELOPE_FIELDS:
        raise LedgerError(
            f"{label} must be an encrypted envelope with exactly the fields "
            f"{', '.join(sorted(ENVELOPE_FIELDS))} (use SubjectKeys.seal())"
        )


def _fast_checks(kind: EventType) -> tuple[tuple[str, str], ...]:
    return tuple((name, check) for name, check in FIELD_KINDS.get(kind, {}).items() if check != ANY)


_CHECKS: dict[EventType, tuple[tuple[str, str], ...]] = {kind: _fast_checks(kind) for kind in EventType}
_REQUIRED: dict[EventType, frozenset[str]] = {
    kind: frozenset(REQUIRED_FIELDS.get(kind, ())) for kind in EventType
}


def validate_payload(event_type: EventType | str, payload: Mapping[str, Any]) -> None:
    """Raise LedgerError unless `payload` holds every field `event_type` requires, each well-typed.

    Also refuses raw personal data at any depth: keys that name a personal-data field (see
    `is_personal_key`), and text that holds an e-mail address or phone number; the error names
    the path (``job.failed payload.error.email``). Only pseudonym fields and the `personal`
    envelope (personal data encrypted per subject) are exempt.
    """
    kind = event_type if type(event_type) is EventType else EventType.parse(event_type)
    if not isinstance(payload, Mapping):
        raise LedgerError(
            f"{kind.value} event payload must be a dict, not {type(payload).__name__}"
        )
    if not payload.keys() >= _REQUIRED[kind]:
        missing = sorted(_REQUIRED[kind] - set(payload.keys()))
        raise LedgerError(
            f"{kind.value} event is missing required payload field(s): {', '.join(missing)}"
        )
    for name, check in _CHECKS[kind]:
        if name not in payload:
            continue
        value = payload[name]
        kind_of = type(value)
        # the common, valid cases inline; anything else gets the full check and its message
        if check == STR:
            if kind_of is str and value.strip():
                continue
        elif check == COUNT:
            if kind_of is int and value >= 0:
                continue
        elif check == INT:
            if kind_of is int:
                continue
        elif check == STR_LIST:
            if (kind_of is list or kind_of is tuple) and all(type(v) is str for v in value):
                continue
        elif check == DICT and kind_of is dict:
            continue
        _check_kind(check, value, f"{kind.value} payload field {name!r}")
    _screen(kind, payload)
    if "personal" in payload:
        _check_envelope(payload["personal"], f"{kind.value} payload field 'personal'")
