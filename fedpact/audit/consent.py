"""Consent registry: current consent per subject × purpose, derived from the ledger and enforced.

Every grant, withdrawal and expiry is a ledger event (the subject by pseudonym, the raw id and any
contact details encrypted under the subject's key). A data loader asks `allowed(ids, purpose)` once
per job and drops rows without a valid, unexpired grant for that exact purpose (PIPL Art. 14/23:
separate consent per purpose) before computing any feature.

Consent is decided from the consent events themselves, read after the whole chain was verified in
the same snapshot (links, hashes, bound ids and every event's writer tag:
`Ledger.proven_consent_events`), never from the derived `consent_state` table alone: anyone with
write access to the database could edit a withdrawn subject back to granted there. The table,
maintained in the same transaction as each event, is compared with what the chain says for the
subjects asked about; any difference is named (`index_problems`, and a logged warning).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from fedpact.audit.events import EventType, LedgerError, parse_timestamp, validate_payload
from fedpact.audit.ledger import Ledger, LedgerEvent, utc_iso
from fedpact.audit.normalise import clean_text, purpose_key
from fedpact.audit.store import consent_state, job_subjects, ledger_events
from fedpact.audit.subjects import SubjectKeys

log = logging.getLogger(__name__)

CONSENT_RETENTION_CLASS = "consent"
GRANT_WORDS = {"granted", "grant", "given", "opt-in", "optin", "opted-in", "yes", "true", "1", "accepted"}
WITHDRAW_WORDS = {"withdrawn", "withdraw", "revoked", "opt-out", "optout", "opted-out", "no",
                  "false", "0", "declined", "rejected"}

# CSV header aliases used by common consent-management exports, mapped to our field names.
CSV_ALIASES: dict[str, tuple[str, ...]] = {
    "subject_id": ("subject_id", "data_subject_id", "customer_id", "subject", "user_id", "id"),
    "purpose": ("purpose", "purpose_id", "processing_purpose"),
    "status": ("status", "consent_status", "action", "state"),
    "channel": ("channel", "collection_point", "collection_channel"),
    "legal_basis": ("legal_basis", "lawful_basis"),
    "notice_version": ("notice_version", "policy_version", "privacy_notice_version"),
    "timestamp": ("timestamp", "consent_date", "collected_at", "date", "updated_at"),
    "expires_at": ("expires_at", "expiry", "expiry_date", "expiration_date"),
    "source": ("source", "system", "source_system"),
}
PERSONAL_CSV_COLUMNS = ("email", "name", "full_name", "phone")
"""CSV columns kept only inside the subject's encrypted envelope, never in clear."""
REQUIRED_CSV = ("subject_id", "purpose", "status", "channel", "timestamp")


@dataclass(frozen=True)
class ConsentRecord:
    """The current consent of one subject (pseudonym) for one purpose."""

    subject: str
    purpose: str
    status: str
    channel: str | None
    legal_basis: str | None
    notice_version: str | None
    source: str | None
    effective_at: str
    expires_at: str | None
    seq: int

    def valid_at(self, at: datetime) -> bool:
        if self.status != "granted":
            return False
        stamp = at.astimezone(UTC).isoformat(timespec="microseconds")
        return self.effective_at <= stamp and (self.expires_at is None or stamp < self.expires_at)


@dataclass(frozen=True)
class RowError:
    """One problem in one CSV row: the line number (header is line 1), field and what is wrong."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, {self.field}: {self.message}"


@dataclass(frozen=True)
class Withdrawal(LedgerEvent):
    """A recorded withdrawal, with `warnings` when it names no consent the registry knows (a
    mistyped id or purpose would otherwise apply to nobody, silently). It is recorded anyway: a
    withdrawal is never refused."""

    warnings: tuple[str, ...] = ()


@dataclass
class ImportReport:
    """Outcome of a consent CSV import: good rows were recorded together, bad ones listed, and
    withdrawals that name no known consent listed as warnings (recorded all the same)."""

    source: str
    rows_read: int = 0
    granted: int = 0
    withdrawn: int = 0
    errors: list[RowError] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    warnings: list[RowError] = field(default_factory=list)

    @property
    def imported(self) -> int:
        return self.granted + self.withdrawn

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.rows_read} rows read, {self.imported} recorded "
            f"({self.granted} grants, {self.withdrawn} withdrawals), {len(self.errors)} rejected"
        ]
        lines += [f"  - {error}" for error in self.errors]
        if self.warnings:
            lines.append(f"{len(self.warnings)} warnings (recorded all the same):")
            lines += [f"  - {warning}" for warning in self.warnings]
        return "\n".join(lines)


class ConsentRegistry:
    """Current consent per subject × purpose, from the ledger; grants, withdrawals, enforcement."""

    def __init__(self, ledger: Ledger, *, actor: str = "consent-registry") -> None:
        self.ledger = ledger
        self.actor = actor
        self.subjects = SubjectKeys.of(ledger)
        self.index_problems: list[str] = []
        """Where `consent_state` differed from the chain at the last decision (it was not used)."""

    def pseudonym(self, subject_id: Any) -> str:
        return self.subjects.pseudonym(subject_id)

    # --- recording ----------------------------------------------------------------------------

    def _personal(self, subject: str, subject_id: Any, extra: Mapping[str, Any] | None,
                  at: datetime) -> dict[str, Any]:
        fields = {"subject_id": SubjectKeys.normalise(subject_id), **(extra or {})}
        return self.subjects.seal(subject, fields, retention_class=CONSENT_RETENTION_CLASS, at=at)

    def _grant_fields(
        self, subject_id: Any, purpose: str, *, channel: str, legal_basis: str,
        notice_version: str, source: str, expires_at: datetime | str | None,
        at: datetime | str | None,
    ) -> tuple[dict[str, Any], datetime]:
        """A grant's payload without its `personal` envelope, and its time (nothing sealed yet)."""
        when = _as_datetime(at, "timestamp") if at is not None else datetime.now(UTC)
        expiry = _as_datetime(expires_at, "expires_at") if expires_at is not None else None
        if expiry is not None and expiry <= when:
            raise LedgerError(
                f"expires_at {expiry.isoformat()} is not after the grant time {when.isoformat()}"
            )
        return {
            "subject": self.pseudonym(subject_id),
            "purpose": _purpose(purpose),
            "channel": _text(channel, "channel"),
            "legal_basis": _text(legal_basis, "legal_basis"),
            "notice_version": _text(notice_version, "notice_version"),
            "source": _text(source, "source"),
            "timestamp": when.isoformat(),
            "expires_at": expiry.isoformat() if expiry else None,
        }, when

    def _withdraw_fields(
        self, subject_id: Any, purpose: str, *, channel: str, source: str,
        at: datetime | str | None,
    ) -> tuple[dict[str, Any], datetime]:
        """A withdrawal's payload without its `personal` envelope, and its time."""
        when = _as_datetime(at, "timestamp") if at is not None else datetime.now(UTC)
        return {
            "subject": self.pseudonym(subject_id),
            "purpose": _purpose(purpose),
            "channel": _text(channel, "channel"),
            "source": _text(source, "source"),
            "timestamp": when.isoformat(),
        }, when

    def _grant_payload(
        self, subject_id: Any, purpose: str, *, channel: str, legal_basis: str,
        notice_version: str, source: str, expires_at: datetime | str | None,
        at: datetime | str | None, personal: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        payload, when = self._grant_fields(
            subject_id, purpose, channel=channel, legal_basis=legal_basis,
            notice_version=notice_version, source=source, expires_at=expires_at, at=at,
        )
        payload["personal"] = self._personal(payload["subject"], subject_id, personal, when)
        return payload

    def _withdraw_payload(
        self, subject_id: Any, purpose: str, *, channel: str, source: str,
        at: datetime | str | None, personal: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        payload, when = self._withdraw_fields(subject_id, purpose, channel=channel, source=source,
                                              at=at)
        payload["personal"] = self._personal(payload["subject"], subject_id, personal, when)
        return payload

    def grant(
        self,
        subject_id: Any,
        purpose: str,
        *,
        channel: str,
        legal_basis: str,
        notice_version: str,
        source: str,
        expires_at: datetime | str | None = None,
        at: datetime | str | None = None,
        personal: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> LedgerEvent:
        """Record that `subject_id` consented to `purpose` (one purpose per grant)."""
        payload = self._grant_payload(
            subject_id, purpose, channel=channel, legal_basis=legal_basis,
            notice_version=notice_version, source=source, expires_at=expires_at, at=at,
            personal=personal,
        )
        return self.ledger.append(EventType.CONSENT_GRANTED, payload, actor=actor or self.actor)

    def grant_many(
        self,
        subject_ids: Iterable[Any],
        purpose: str,
        *,
        channel: str,
        legal_basis: str,
        notice_version: str,
        source: str,
        expires_at: datetime | str | None = None,
        at: datetime | str | None = None,
        actor: str | None = None,
    ) -> list[LedgerEvent]:
        """Record one grant of `purpose` per subject, all in one transaction (all or none).

        What a bulk import from a consent-management system does, without a CSV in between. A
        subject who was erased is refused (nothing new is recorded for them), naming how many."""
        when = _as_datetime(at, "timestamp") if at is not None else datetime.now(UTC)
        payloads = []
        seen: set[str] = set()
        for subject_id in subject_ids:
            payload, _ = self._grant_fields(
                subject_id, purpose, channel=channel, legal_basis=legal_basis,
                notice_version=notice_version, source=source, expires_at=expires_at, at=when,
            )
            if payload["subject"] not in seen:
                seen.add(payload["subject"])
                payloads.append((payload, subject_id))
        erased = sum(1 for payload, _ in payloads if self.subjects.is_erased(payload["subject"]))
        if erased:
            raise LedgerError(f"{erased} of {len(payloads)} subjects were erased: nothing new can "
                              "be recorded for them; leave them out of the grant")
        if not payloads:
            return []
        # what the ledger checks at append time, once: every grant shares these fields
        validate_payload(EventType.CONSENT_GRANTED,
                         {**payloads[0][0], "personal": _SEALED_PLACEHOLDER})
        key_id = SubjectKeys.key_id(CONSENT_RETENTION_CLASS, when)
        self.subjects.ensure_keys((payload["subject"], key_id) for payload, _ in payloads)
        prepared = [
            (EventType.CONSENT_GRANTED,
             {**payload, "personal": self._personal(payload["subject"], subject_id, None, when)},
             actor or self.actor, None)
            for payload, subject_id in payloads
        ]
        return self.ledger.append_many(prepared)

    def withdraw(
        self,
        subject_id: Any,
        purpose: str,
        *,
        channel: str,
        source: str,
        at: datetime | str | None = None,
        actor: str | None = None,
    ) -> LedgerEvent:
        """Record that `subject_id` withdrew consent for `purpose`: one call, like granting.

        The id and purpose are normalised as for grants and checks; the withdrawal is recorded
        under the spelling of the consent it withdraws. If the registry knows no consent of this
        subject for this purpose, it is recorded all the same and the result's `warnings` say so.
        """
        payload = self._withdraw_payload(subject_id, purpose, channel=channel, source=source, at=at)
        warnings = self._resolve_withdrawals([payload])
        event = self.ledger.append(EventType.CONSENT_WITHDRAWN, payload, actor=actor or self.actor)
        return Withdrawal(**event.__dict__, warnings=tuple(warnings[0]))

    def _resolve_withdrawals(self, payloads: Sequence[dict[str, Any]]) -> list[list[str]]:
        """For each withdrawal payload: adopt the purpose spelling of the consent it withdraws,
        and the warnings when it names none the registry knows. Advisory, so read from the
        derived `consent_state` (two indexed queries, not a verification of the whole chain):
        what a withdrawal does is decided by purpose key and pseudonym, never by this."""
        subjects = sorted({p["subject"] for p in payloads})
        known: dict[str, dict[str, str]] = {}
        with self.ledger.store.read() as connection:
            seqs: dict[int, tuple[str, str]] = {}
            for start in range(0, len(subjects), 500):
                for subject, key, seq in connection.execute(
                        select(consent_state.c.subject, consent_state.c.purpose, consent_state.c.seq)
                        .where(consent_state.c.subject.in_(subjects[start:start + 500]))):
                    seqs[int(seq)] = (subject, key)
            wanted = sorted(seqs)
            for start in range(0, len(wanted), 500):
                for seq, text in connection.execute(
                        select(ledger_events.c.seq, ledger_events.c.payload)
                        .where(ledger_events.c.seq.in_(wanted[start:start + 500]))):
                    subject, key = seqs[int(seq)]
                    try:
                        spelled = json.loads(text)["purpose"]
                    except (TypeError, ValueError, KeyError):
                        spelled = key
                    known.setdefault(subject, {})[key] = spelled if isinstance(spelled, str) else key
        found: list[list[str]] = []
        for payload in payloads:
            purposes = known.get(payload["subject"], {})
            spelled = purposes.get(purpose_key(payload["purpose"]))
            if spelled is not None:
                payload["purpose"] = spelled
                found.append([])
            elif purposes:
                found.append([
                    f"withdrawal of purpose {payload['purpose']!r} for subject "
                    f"{payload['subject']}: no consent of this subject for this purpose is known "
                    f"(its purposes: {', '.join(sorted(purposes.values()))}); "
                    "recorded anyway: check the purpose"])
            else:
                found.append([
                    f"withdrawal of purpose {payload['purpose']!r} for subject "
                    f"{payload['subject']}: no consent at all is known for this subject (ids are "
                    f"compared under the rule {self.subjects.id_rule}: "
                    f"{_RULE_WORDS.get(self.subjects.id_rule, '')}); recorded anyway: check the id"])
        return found

    def expire_due(self, at: datetime | None = None, *, actor: str | None = None) -> list[LedgerEvent]:
        """Write `consent.expired` for every grant whose expiry has passed, so the ledger shows it."""
        now = (at or datetime.now(UTC)).astimezone(UTC)
        stamp = now.isoformat(timespec="microseconds")
        due = sorted(
            ((r.expires_at, r.subject, r.purpose) for r in self._proven(None).values()
             if r.status == "granted" and r.expires_at is not None and r.expires_at <= stamp),
        )
        return self.ledger.append_many(
            (EventType.CONSENT_EXPIRED,
             {"subject": s, "purpose": p, "timestamp": expires}, actor or self.actor, None)
            for expires, s, p in due
        )

    # --- reading ------------------------------------------------------------------------------

    def _proven(self, subjects: set[str] | None) -> dict[tuple[str, str], ConsentRecord]:
        """Current consent per (subject, purpose) of `subjects` (None: everyone), derived from
        consent events proven against the chain (see the module docstring); the latest effective
        time wins, so a late-imported older record does not override a newer one."""
        state: dict[tuple[str, str], ConsentRecord] = {}
        for seq, kind, payload, _, row in self.ledger.proven_consent_events(subjects, plain=False):
            if isinstance(row, str):
                raise LedgerError(f"event {seq} ({kind}) lacks a valid consent field: {row}")
            key = (row["subject"], row["purpose"])  # the purpose's key
            held = state.get(key)
            if held is None or row["effective_at"] >= held.effective_at:
                state[key] = ConsentRecord(**{**row, "purpose": payload["purpose"]})
        self._compare_with_index(state, subjects)
        return state

    def _compare_with_index(self, state: Mapping[tuple[str, str], ConsentRecord],
                            subjects: set[str] | None) -> None:
        """Name every way `consent_state` differs from the chain for these subjects."""
        columns = (consent_state.c.subject, consent_state.c.purpose, consent_state.c.status,
                   consent_state.c.effective_at, consent_state.c.expires_at, consent_state.c.seq)
        query = select(*columns)
        rows: list[Any] = []
        with self.ledger.store.read() as connection:
            if subjects is None or len(subjects) > 2000:
                rows = connection.execute(query).all()
            else:
                unique = sorted(subjects)
                for start in range(0, len(unique), 500):
                    rows += connection.execute(
                        query.where(consent_state.c.subject.in_(unique[start:start + 500]))).all()
        problems = []
        stored = {}
        for subject, purpose, status, effective_at, expires_at, seq in rows:
            if subjects is not None and subject not in subjects:
                continue
            stored[(subject, purpose)] = (status, effective_at, expires_at, seq)
        wanted = {key: (r.status, r.effective_at, r.expires_at, r.seq) for key, r in state.items()}
        if wanted == stored:
            self.index_problems = []
            return
        for key in sorted(wanted.keys() | stored.keys()):
            want, have = wanted.get(key), stored.get(key)
            subject, purpose = key
            if have is None:
                problems.append(f"consent_state lacks {subject} / {purpose} (the chain says "
                                f"{want[0]}, event {want[3]})")  # type: ignore[index]
            elif want is None:
                problems.append(f"consent_state says {subject} / {purpose} is {have[0]} "
                                f"(event {have[3]}), but the chain holds no consent event for it")
            elif have != want:
                problems.append(f"consent_state says {subject} / {purpose} is {have[0]} "
                                f"(event {have[3]}), but the chain says {want[0]} "
                                f"(event {want[3]})")
        self.index_problems = problems
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            log.warning(
                "consent decided from the chain; the derived consent_state table differs from "
                "it (altered outside fedpact?): %s%s; repair it with `fedpact audit reindex`",
                "; ".join(problems[:5]), more,
            )

    def current(self, subject_id: Any, purpose: str | None = None) -> list[ConsentRecord]:
        """The current consent records of one subject (all purposes, or one), from the chain."""
        subject = self.pseudonym(subject_id)
        wanted = None if purpose is None else purpose_key(purpose)
        records = [r for (_, p), r in self._proven({subject}).items()
                   if wanted is None or p == wanted]
        return sorted(records, key=lambda r: r.purpose)

    def allowed(
        self, subject_ids: Sequence[Any], purpose: str, at: datetime | None = None
    ) -> np.ndarray:
        """True where that subject has a current, unexpired grant for exactly `purpose` at `at`,
        according to consent events proven against the chain (never the derived table alone)."""
        when = (at or datetime.now(UTC)).astimezone(UTC)
        pseudonyms = self.subjects.pseudonyms(subject_ids)
        state = self._proven(set(pseudonyms))
        wanted = purpose_key(purpose)
        valid = {subject for (subject, p), record in state.items()
                 if p == wanted and record.valid_at(when)}
        return np.fromiter((p in valid for p in pseudonyms), dtype=bool, count=len(pseudonyms))

    # --- enforcement records ------------------------------------------------------------------

    def record_exclusion(
        self, job_id: str, dataset: str, purpose: str, excluded: int, total: int,
        *, actor: str = "data-loader",
    ) -> LedgerEvent:
        """Record how many of `total` rows of `dataset` were excluded for lack of consent."""
        if not 0 <= excluded <= total:
            raise LedgerError(f"excluded={excluded} must be between 0 and total={total}")
        return self.ledger.append(
            EventType.DATA_EXCLUDED,
            {"dataset": dataset, "purpose": purpose, "excluded": int(excluded),
             "total": int(total), "reason": "no valid consent for this purpose"},
            actor=actor, job_id=job_id,
        )

    def record_subjects_used(
        self, job_id: str, dataset: str, purpose: str, subject_ids: Iterable[Any],
        *, actor: str = "data-loader",
    ) -> LedgerEvent:
        """Remember which subjects' rows `job_id` used (for erasure), committing a manifest hash."""
        pseudonyms = sorted(set(self.subjects.pseudonyms(subject_ids)))
        manifest = hashlib.sha256("\n".join(pseudonyms).encode()).hexdigest()
        store = self.ledger.store
        with store.write() as connection:
            store.insert_ignore(
                connection, job_subjects,
                [{"subject": p, "job_id": job_id, "dataset": dataset} for p in pseudonyms],
            )
        return self.ledger.append(
            EventType.SUBJECTS_USED,
            {"dataset": dataset, "purpose": purpose, "subjects": len(pseudonyms),
             "manifest_sha256": manifest},
            actor=actor, job_id=job_id,
        )

    def record_subjects_held_by_partner(
        self, job_id: str, dataset: str, purpose: str, subjects: int, *,
        partner_manifest_sha256: str, consent: str, actor: str = "data-loader",
    ) -> LedgerEvent:
        """The coordinator's record that `job_id` used `subjects` subjects of `dataset`, whose
        pseudonyms stay in the partner's own registry (under the partner's key): a count and a
        commitment to the partner's manifest, no pseudonym. `consent` says whether consent was
        enforced, turned off, or could not be checked."""
        return self.ledger.append(
            EventType.SUBJECTS_USED,
            {"dataset": dataset, "purpose": purpose, "subjects": int(subjects),
             "partner_manifest_sha256": partner_manifest_sha256, "held_by": "partner registry",
             "consent": consent},
            actor=actor, job_id=job_id,
        )

    def record_untraceable(
        self, job_id: str, dataset: str, purpose: str, reason: str, *, actor: str = "data-loader",
        consent: str | None = None,
    ) -> LedgerEvent:
        """Record that `job_id` used `dataset` but which subjects it used cannot be known (e.g. no
        subject id column): erasure then reports the job's models as untraceable. `consent`, when
        given, says what became of consent checking (e.g. not checkable without subject ids)."""
        payload: dict[str, Any] = {
            "dataset": dataset, "purpose": purpose, "subjects": 0,
            "manifest_sha256": hashlib.sha256(b"").hexdigest(), "traceable": False,
            "reason": reason}
        if consent is not None:
            payload["consent"] = consent
        return self.ledger.append(EventType.SUBJECTS_USED, payload, actor=actor, job_id=job_id)

    def enforce(
        self, job_id: str, dataset: str, purpose: str, subject_ids: Sequence[Any],
        *, at: datetime | None = None, actor: str = "data-loader",
    ) -> np.ndarray:
        """`allowed()`, then record the exclusion count and the subjects kept; return the mask."""
        mask = self.allowed(subject_ids, purpose, at)
        self.record_exclusion(job_id, dataset, purpose, int((~mask).sum()), len(mask), actor=actor)
        kept = [s for s, keep in zip(subject_ids, mask, strict=True) if keep]
        self.record_subjects_used(job_id, dataset, purpose, kept, actor=actor)
        return mask

    # --- bulk import --------------------------------------------------------------------------

    def import_csv(
        self, path: str | os.PathLike[str], *, assume_utc: bool = False, actor: str | None = None,
    ) -> ImportReport:
        """Import a consent-management CSV export: bad rows reported, good rows recorded at once.

        Columns (common aliases accepted): subject_id, purpose, status (granted/withdrawn or
        opt-in/opt-out…), channel, timestamp, and for grants legal_basis and notice_version;
        optional expires_at, source, and personal columns (email, name, phone) which are stored
        only encrypted. All good rows are written in one transaction: all or none of them.
        """
        path = Path(path)
        report = ImportReport(source=str(path))
        try:
            handle = path.open(newline="", encoding="utf-8-sig")
        except OSError as exc:
            raise LedgerError(f"cannot read consent CSV {path}: {exc.strerror or exc}") from None
        with handle:
            reader = csv.DictReader(handle)
            columns = _resolve_columns(reader.fieldnames, path)
            rows = list(enumerate(reader, start=2))
        # 1. check every row completely (fields, times, the payload the ledger will validate)
        #    before anything is written: a bad row must not leave a data key behind
        checked: list[_CheckedRow] = []
        lines: list[int] = []
        for line, raw in rows:
            report.rows_read += 1
            row = {name: (raw.get(column) or "").strip() for name, column in columns.items()}
            try:
                checked.append(self._check_row(row, raw, path, assume_utc=assume_utc))
                lines.append(line)
            except _RowProblem as problem:
                report.errors.append(RowError(line, problem.field, problem.message))
            except LedgerError as exc:
                report.errors.append(RowError(line, "row", str(exc)))
        # withdrawals: under the spelling of the consent they withdraw (known to the registry or
        # granted earlier in this file); those naming none are listed as warnings
        withdrawals = [(line, good) for line, good in zip(lines, checked, strict=True)
                       if good.kind is EventType.CONSENT_WITHDRAWN]
        if withdrawals:
            in_file: dict[tuple[str, str], str] = {}
            for good in checked:
                if good.kind is EventType.CONSENT_GRANTED:
                    key = (good.payload["subject"], purpose_key(good.payload["purpose"]))
                    in_file.setdefault(key, good.payload["purpose"])
            unresolved = []
            for line, good in withdrawals:
                spelled = in_file.get((good.payload["subject"], purpose_key(good.payload["purpose"])))
                if spelled is not None:
                    good.payload["purpose"] = spelled
                else:
                    unresolved.append((line, good))
            notes = self._resolve_withdrawals([good.payload for _, good in unresolved])
            for (line, _good), warnings in zip(unresolved, notes, strict=True):
                report.warnings += [RowError(line, "subject_id", w) for w in warnings]
        # 2. the data keys of the good rows only, in one transaction
        self.subjects.ensure_keys(
            (good.payload["subject"], SubjectKeys.key_id(CONSENT_RETENTION_CLASS, good.when))
            for good in checked
        )
        # 3. seal each good row's personal fields and record them all in one transaction
        prepared: list[tuple[EventType, dict[str, Any], str, None]] = []
        for good in checked:
            payload = {**good.payload, "personal": self._personal(
                good.payload["subject"], good.subject_id, good.personal, good.when)}
            prepared.append((good.kind, payload, actor or self.actor, None))
            if good.kind is EventType.CONSENT_GRANTED:
                report.granted += 1
            else:
                report.withdrawn += 1
        if prepared:
            events = self.ledger.append_many(prepared)
            report.first_seq, report.last_seq = events[0].seq, events[-1].seq
        return report

    def _check_row(
        self, row: dict[str, str], raw: Mapping[str, Any], path: Path, *, assume_utc: bool,
    ) -> _CheckedRow:
        """One CSV row, fully checked but nothing sealed or written; raise naming the problem."""
        if None in raw:  # more cells than header columns
            raise _RowProblem("row", "has more cells than the header has columns")
        for name in REQUIRED_CSV:
            if not row.get(name):
                raise _RowProblem(name, "is empty")
        status = row["status"].lower()
        when = _csv_time(row["timestamp"], "timestamp", assume_utc)
        personal = {c: raw[c].strip() for c in PERSONAL_CSV_COLUMNS if raw.get(c) and raw[c].strip()}
        source = row.get("source") or f"csv import {path.name}"
        if status in GRANT_WORDS:
            for name in ("legal_basis", "notice_version"):
                if not row.get(name):
                    raise _RowProblem(name, "is empty (required for a grant)")
            expiry = _csv_time(row["expires_at"], "expires_at", assume_utc) if row.get("expires_at") else None
            if expiry is not None and expiry <= when:
                raise _RowProblem("expires_at", f"{row['expires_at']!r} is not after the timestamp")
            kind = EventType.CONSENT_GRANTED
            payload, when = self._grant_fields(
                row["subject_id"], row["purpose"], channel=row["channel"],
                legal_basis=row["legal_basis"], notice_version=row["notice_version"],
                source=source, expires_at=expiry, at=when,
            )
        elif status in WITHDRAW_WORDS:
            kind = EventType.CONSENT_WITHDRAWN
            payload, when = self._withdraw_fields(
                row["subject_id"], row["purpose"], channel=row["channel"], source=source, at=when,
            )
        else:
            raise _RowProblem("status", f"{row['status']!r} is neither a grant nor a withdrawal")
        if self.subjects.is_erased(payload["subject"]):
            raise _RowProblem("subject_id", "belongs to an erased subject: nothing new can be "
                              "recorded for them")
        # what the ledger will check at append time (e.g. no e-mail address in `source`)
        validate_payload(kind, {**payload, "personal": _SEALED_PLACEHOLDER})
        return _CheckedRow(kind, payload, row["subject_id"], personal, when)


@dataclass(frozen=True)
class _CheckedRow:
    """A consent CSV row that passed every check: its event, payload (unsealed) and personal fields."""

    kind: EventType
    payload: dict[str, Any]
    subject_id: str
    personal: dict[str, str]
    when: datetime


_RULE_WORDS = {
    "nfkc-casefold/1": "NFKC, invisible characters and extra spaces removed, case folded, "
                       "leading zeros kept",
    "nfkc/1": "NFKC, invisible characters and extra spaces removed, case kept",
    "nfc/1": "NFC, trimmed, case kept",
}

_SEALED_PLACEHOLDER = {"v": 1, "key": "consent:0000-00", "nonce": "", "ct": ""}
"""Stands in for the envelope while a row is checked, before any data key exists."""


class _RowProblem(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        self.field, self.message = field_name, message


def _resolve_columns(header: Sequence[str] | None, path: Path) -> dict[str, str]:
    if not header:
        raise LedgerError(f"consent CSV {path} is empty: it has no header row")
    lowered = {h.strip().lower(): h for h in header if h is not None}
    columns: dict[str, str] = {}
    for name, aliases in CSV_ALIASES.items():
        for alias in aliases:
            if alias in lowered:
                columns[name] = lowered[alias]
                break
    missing = [name for name in REQUIRED_CSV if name not in columns]
    if missing:
        raise LedgerError(
            f"consent CSV {path} lacks column(s) {', '.join(missing)} "
            f"(header: {', '.join(header)})"
        )
    return columns


def _csv_time(value: str, name: str, assume_utc: bool) -> datetime:
    text = value.strip().replace(" ", "T", 1) if "T" not in value else value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _RowProblem(name, f"{value!r} is not an ISO-8601 date/time") from None
    if parsed.tzinfo is None:
        if not assume_utc:
            raise _RowProblem(name, f"{value!r} has no UTC offset (add +00:00, or import with assume_utc)")
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _as_datetime(value: datetime | str, name: str) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise LedgerError(f"{name} {value.isoformat()} has no timezone; use an aware datetime")
        return value
    return parse_timestamp(value, name)


def _purpose(value: Any) -> str:
    """A purpose as it is recorded: NFKC, invisible characters removed, spaces collapsed (it is
    compared by `purpose_key`)."""
    text = clean_text(value) if isinstance(value, str) else value
    if not isinstance(text, str) or not purpose_key(text):
        raise LedgerError(f"purpose must be non-empty text, got {value!r}")
    return text


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LedgerError(f"{name} must be non-empty text, got {value!r}")
    return value.strip()


__all__ = ["ConsentRecord", "ConsentRegistry", "ImportReport", "RowError", "Withdrawal",
           "utc_iso"]
