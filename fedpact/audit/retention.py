"""Retention per event type, enforced by crypto-shredding expired personal fields, never by deletion.

Each event type belongs to a retention class. Personal fields are sealed under a subject key of
that class and month (`subjects.py`), so when a month falls out of its class's retention period
its keys are destroyed: the fields become unreadable while every event, the chain and all proofs
remain. Defaults: ≥ 3 years for assessments and job records (PIPL Art. 56), ≥ 6 months for
access logs, 3 years for consent and data-subject-request records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from fedpact.audit.events import EventType, LedgerError
from fedpact.audit.ledger import Ledger, LedgerEvent
from fedpact.audit.store import subject_keys
from fedpact.audit.subjects import SubjectKeys

RETENTION_DAYS: dict[str, int] = {
    "assessment": 3 * 365 + 1,  # job lifecycle, records of processing, impact assessments
    "access": 183,  # data access and export-download logs
    "consent": 3 * 365 + 1,  # after the consent record's month
    "dsar": 3 * 365 + 1,
    "admin": 3 * 365 + 1,
}
MINIMUM_DAYS = {"assessment": 3 * 365, "access": 183}
"""Floors a deployment may not go below (PIPL Art. 56 keeps assessments ≥ 3 years)."""

_CLASS_OF: dict[str, str] = {
    EventType.DATA_ACCESSED.value: "access",
    EventType.DATA_EXCLUDED.value: "access",
    EventType.SUBJECTS_USED.value: "access",
    EventType.EXPORT_DOWNLOADED.value: "access",
    EventType.CONSENT_GRANTED.value: "consent",
    EventType.CONSENT_WITHDRAWN.value: "consent",
    EventType.CONSENT_EXPIRED.value: "consent",
    EventType.DSAR_RECEIVED.value: "dsar",
    EventType.DSAR_FULFILLED.value: "dsar",
    EventType.SUBJECT_RECTIFIED.value: "dsar",
    EventType.SUBJECT_ERASED.value: "dsar",
    EventType.KEYS_ROTATED.value: "admin",
    EventType.BUDGET_CHANGED.value: "admin",
    EventType.ROLE_GRANTED.value: "admin",
    EventType.ROLE_REVOKED.value: "admin",
}


def retention_class_of(event_type: str) -> str:
    """The retention class of an event type (job lifecycle and assessments by default)."""
    return _CLASS_OF.get(event_type, "assessment")


def check_policy(policy: dict[str, int]) -> None:
    for name, days in policy.items():
        if name not in RETENTION_DAYS:
            raise LedgerError(f"unknown retention class {name!r}: known {', '.join(RETENTION_DAYS)}")
        floor = MINIMUM_DAYS.get(name, 0)
        if days < floor:
            raise LedgerError(f"retention for {name} is {days} days; it must be at least {floor}")


@dataclass(frozen=True)
class RetentionStep:
    """One retention class: keys of months before `cutoff` (YYYY-MM) are due for destruction."""

    retention_class: str
    days: int
    cutoff: str
    keys_due: int


def plan_retention(
    ledger: Ledger, *, now: datetime | None = None, policy: dict[str, int] | None = None
) -> list[RetentionStep]:
    """What `enforce_retention` would destroy now, per class; reads only (a dry run)."""
    policy = {**RETENTION_DAYS, **(policy or {})}
    check_policy(policy)
    now = (now or datetime.now(UTC)).astimezone(UTC)
    steps = []
    with ledger.store.read() as connection:
        for name, days in sorted(policy.items()):
            cutoff = _cutoff(now, days)
            due = connection.execute(
                select(func.count()).select_from(subject_keys).where(
                    subject_keys.c.retention_class == name,
                    subject_keys.c.period < cutoff,
                    subject_keys.c.wrapped.is_not(None),
                )
            ).scalar_one()
            steps.append(RetentionStep(name, days, cutoff, int(due)))
    return steps


def _cutoff(now: datetime, days: int) -> str:
    """A month's keys go once the whole month is older than the retention period."""
    return (now - timedelta(days=days)).strftime("%Y-%m")


def enforce_retention(
    ledger: Ledger,
    *,
    now: datetime | None = None,
    policy: dict[str, int] | None = None,
    actor: str = "retention",
    progress: Callable[[RetentionStep, int], None] | None = None,
) -> LedgerEvent:
    """Destroy every subject key whose month is past its class's retention; log what was shredded.

    `progress(step, destroyed)` is called after each class (for a progress display).
    """
    policy = {**RETENTION_DAYS, **(policy or {})}
    check_policy(policy)
    now = (now or datetime.now(UTC)).astimezone(UTC)
    keys = SubjectKeys.of(ledger)
    by_class: dict[str, int] = {}
    residue: list[str] = []
    for name, days in sorted(policy.items()):
        cutoff = _cutoff(now, days)
        by_class[name] = keys.destroy_expired(name, cutoff, why=f"retention {name} {days} days")
        purge = keys.last_purge
        if by_class[name] and purge is not None and not purge.complete:
            residue.append(purge.detail)
        if progress is not None:
            progress(RetentionStep(name, days, cutoff, by_class[name]), by_class[name])
    payload: dict[str, object] = {"keys_destroyed": sum(by_class.values()), "by_class": by_class,
                                  "as_of": now.isoformat(), "key_bytes_purged": not residue}
    if residue:  # the destroyed key bytes may remain in the database files: say so, and why
        payload["purge_note"] = residue[-1]
    return ledger.append(EventType.RETENTION_ENFORCED, payload, actor=actor)
