"""Data-subject requests: access (JSON and CSV, for portability), rectification and erasure.

Erasure is crypto-shredding: every data key of the subject is destroyed, so the personal fields of
all their events become unreadable everywhere (this database, its backups' copies of the events,
exports), while the events themselves, the chain and every proof stay intact. Erasure also
withdraws the subject's consents and flags every model trained on data that included them.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.events import PSEUDONYM, EventType, LedgerError
from fedpact.audit.ledger import Ledger, LedgerEvent
from fedpact.audit.store import event_index, job_subjects, ledger_events
from fedpact.audit.subjects import SubjectKeys

DSAR_KINDS = ("access", "rectification", "erasure")
DSAR_RETENTION_CLASS = "dsar"
ERASED = "[erased]"
KEY_MISSING = "[key missing]"
"""What an event's personal fields read as when their key row is gone without any record of its
destruction (deleted outside fedpact): not an erasure."""


@dataclass
class SubjectReport:
    """Everything the ledger and registry hold about one subject, decrypted where keys remain."""

    subject: str
    generated_at: str
    events: list[dict[str, Any]] = field(default_factory=list)
    consents: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, str]] = field(default_factory=list)
    personal_data: dict[str, Any] = field(default_factory=dict)
    erased: bool = False
    registries: list[dict[str, str]] = field(default_factory=list)
    """The partner registries also searched: each one's location and the subject's pseudonym
    there (each registry pseudonymises under its own key). Their events, consents and jobs are
    in the lists above, each marked with its `registry`."""
    key_problems: list[str] = field(default_factory=list)
    """Keys gone without a record of their destruction (a deleted `subject_keys` row, or a key
    marked destroyed by an erasure no `subject.erased` event records)."""

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "subject": self.subject,
            "generated_at": self.generated_at,
            "erased": self.erased,
            "personal_data": self.personal_data,
            "consents": self.consents,
            "jobs_that_used_the_data": self.jobs,
            "events": self.events,
        }
        if self.registries:
            doc["partner_registries"] = self.registries
        if self.key_problems:
            doc["key_problems"] = self.key_problems
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, sort_keys=True)

    def to_csv(self) -> str:
        """One row per event: seq, time, type, actor, job, purpose, details, personal fields."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["seq", "timestamp", "event_type", "actor", "job_id", "purpose",
                         "details", "personal_fields"])
        for event in self.events:
            payload = {k: v for k, v in event["payload"].items() if k != "personal"}
            writer.writerow([
                event["seq"], event["timestamp"], event["event_type"], event["actor"],
                event["job_id"] or "", payload.get("purpose", ""),
                json.dumps(payload, ensure_ascii=False, sort_keys=True),
                json.dumps(event.get("personal"), ensure_ascii=False, sort_keys=True),
            ])
        return buffer.getvalue()


@dataclass(frozen=True)
class ErasureReport:
    subject: str
    request_id: str
    keys_destroyed: int
    consents_withdrawn: list[str]
    models_flagged: list[str]
    event: LedgerEvent
    untraceable_models: list[str] = field(default_factory=list)
    """Models of jobs that used a dataset whose subjects were not recorded (no subject id column,
    a streamed CSV, or a job from before subjects were recorded): they may include the subject's
    rows but cannot be traced, so they are listed here instead of flagged."""
    note: str = ""
    """Says so in words when `untraceable_models` is not empty."""
    registries: list[str] = field(default_factory=list)
    """The partner registries the erasure reached (keys destroyed, consents withdrawn there)."""
    key_bytes_purged: bool = True
    """Whether the destroyed wrapped key bytes are gone from every database's files (SQLite: the
    WAL checkpointed and truncated, then the files searched for them)."""
    purge_note: str = ""
    """Why they may remain, when `key_bytes_purged` is False (e.g. another process's read
    transaction pinned the WAL past the wait); run `fedpact audit dsar purge` once it ends."""


@dataclass(frozen=True)
class _Registry:
    """A partner's own registry: its ledger, consent registry and keys, and where it is."""

    ledger: Ledger
    consent: ConsentRegistry
    label: str

    @property
    def subjects(self) -> SubjectKeys:
        return self.consent.subjects


def _label(ledger: Ledger) -> str:
    path = ledger.store.database_path
    return str(path) if path is not None else "partner registry"


class SubjectRequests:
    """Handle access, rectification and erasure requests of data subjects, each on the ledger.

    `registries`: the partners' own registries (their consent and the pseudonyms of the subjects
    each job used, under each partner's key; `federation.node_data.partner_registry_path`).
    Access searches them too; erasure withdraws consent and destroys keys in each and finds the
    jobs whose models it flags in `ledger` (the jobs' ledger). Both need the subject's id (a
    pseudonym of one ledger means nothing in another).
    """

    def __init__(self, ledger: Ledger, *, actor: str = "dpo",
                 registries: Iterable[Ledger] = ()) -> None:
        self.ledger = ledger
        self.actor = actor
        self.registry = ConsentRegistry(ledger, actor=actor)
        self.subjects = self.registry.subjects
        self.registries = [_Registry(r, ConsentRegistry(r, actor=actor), _label(r))
                           for r in registries if r is not ledger]

    def _need_raw_id(self, subject_id: Any) -> None:
        if self.registries and isinstance(subject_id, str) and PSEUDONYM.match(subject_id):
            raise LedgerError("a request across partner registries needs the subject's id, not a "
                              "pseudonym: each registry pseudonymises under its own key")

    def receive(self, subject_id: Any, kind: str, *, channel: str,
                request_id: str | None = None) -> str:
        """Log a request (`dsar.received`) and return its id."""
        if kind not in DSAR_KINDS:
            raise LedgerError(f"request kind {kind!r} is not one of {', '.join(DSAR_KINDS)}")
        subject = self.subjects.pseudonym(subject_id)
        request_id = request_id or f"dsar-{uuid.uuid4().hex[:12]}"
        now = datetime.now(UTC)
        personal = None
        # never seal new personal data for someone asking to be, or already, forgotten
        if kind != "erasure" and not self.subjects.is_erased(subject):
            personal = self.subjects.seal(
                subject, {"subject_id": self.subjects.normalise(subject_id)},
                retention_class=DSAR_RETENTION_CLASS, at=now,
            )
        payload = {"request_id": request_id, "kind": kind, "subject": subject,
                   "channel": channel, "timestamp": now.isoformat()}
        if personal:
            payload["personal"] = personal
        self.ledger.append(EventType.DSAR_RECEIVED, payload, actor=self.actor)
        return request_id

    def _fulfilled(self, request_id: str, kind: str, subject: str, outcome: str) -> LedgerEvent:
        return self.ledger.append(
            EventType.DSAR_FULFILLED,
            {"request_id": request_id, "kind": kind, "subject": subject, "outcome": outcome,
             "timestamp": datetime.now(UTC).isoformat()},
            actor=self.actor,
        )

    def subject_events(self, subject: str, ledger: Ledger | None = None) -> list[LedgerEvent]:
        """Every event indexed under this subject pseudonym, in seq order."""
        query = (
            select(ledger_events)
            .join(event_index, event_index.c.seq == ledger_events.c.seq)
            .where(event_index.c.kind == "subject", event_index.c.value == subject)
            .order_by(ledger_events.c.seq)
        )
        return (ledger or self.ledger).select_events(query)

    def report(self, subject_id: Any) -> SubjectReport:
        """Everything held about the subject, without writing anything (see `access`): in this
        ledger, and in each partner registry (entries marked with their `registry`)."""
        self._need_raw_id(subject_id)
        subject = self.subjects.pseudonym(subject_id)
        report = SubjectReport(subject, datetime.now(UTC).isoformat(timespec="seconds"))
        self._collect(report, self.ledger, self.subjects, subject, None)
        for reg in self.registries:
            pseudonym = reg.subjects.pseudonym(subject_id)
            report.registries.append({"registry": reg.label, "subject": pseudonym})
            self._collect(report, reg.ledger, reg.subjects, pseudonym, reg.label)
        return report

    def _collect(self, report: SubjectReport, ledger: Ledger, subjects: SubjectKeys,
                 subject: str, label: str | None) -> None:
        events = []
        found = self.subject_events(subject, ledger)
        erasures = {str(e.payload.get("request_id")): e.seq for e in found
                    if e.event_type == EventType.SUBJECT_ERASED.value}
        for event in found:
            item = event.to_dict()
            envelope = event.payload.get("personal")
            if envelope is not None:
                opened = subjects.open(subject, envelope)
                if opened.state == "missing":
                    item["personal"] = KEY_MISSING
                    item["personal_status"] = (
                        "key row missing without an erasure event: its subject_keys row was "
                        "deleted outside fedpact (nothing records that the key was destroyed)")
                    problem = (f"subject_keys: the key {opened.key_id} of {subject} is missing, "
                               "and no erasure or retention destroyed it (deleted outside fedpact)")
                    if problem not in report.key_problems:
                        report.key_problems.append(problem)
                elif opened.erased:
                    item["personal"] = ERASED
                    item["personal_status"] = _destruction(opened, subject, erasures, report)
                    report.erased = True
                else:
                    item["personal"] = opened.fields
                    report.personal_data.update(opened.fields or {})
                item["payload"] = {k: v for k, v in item["payload"].items() if k != "personal"}
            if label is not None:
                item["registry"] = label
            events.append(item)
        consents = ConsentRegistry(ledger).current(subject)  # proven against the chain
        with ledger.store.read() as connection:
            jobs = connection.execute(
                select(job_subjects.c.job_id, job_subjects.c.dataset)
                .where(job_subjects.c.subject == subject)
                .order_by(job_subjects.c.job_id)
            ).all()
        extra = {} if label is None else {"registry": label}
        report.events.extend(events)
        report.consents.extend({**record.__dict__, **extra} for record in consents)
        known = {(j["job_id"], j["dataset"]) for j in report.jobs}
        report.jobs.extend({"job_id": j, "dataset": d} for j, d in jobs if (j, d) not in known)
        report.jobs.sort(key=lambda j: (j["job_id"], j["dataset"]))
        if subjects.live_key_count(subject) == 0 and events:
            report.erased = report.erased or any(
                e["event_type"] == EventType.SUBJECT_ERASED.value for e in events
            )

    def access(self, subject_id: Any, *, request_id: str | None = None,
               channel: str = "dpo") -> SubjectReport:
        """Answer an access/portability request: the report, with receipt and fulfilment logged."""
        request_id = request_id or self.receive(subject_id, "access", channel=channel)
        report = self.report(subject_id)
        self._fulfilled(request_id, "access", report.subject,
                        f"exported {len(report.events)} events, {len(report.consents)} consents")
        return report

    def rectify(self, subject_id: Any, corrections: dict[str, Any], *,
                request_id: str | None = None, channel: str = "dpo") -> LedgerEvent:
        """Record corrected personal fields (encrypted); access reports show the latest values."""
        if not corrections:
            raise LedgerError("rectification needs at least one corrected field")
        if "subject_id" in corrections:
            raise LedgerError("the subject id itself cannot be rectified; erase and re-register")
        request_id = request_id or self.receive(subject_id, "rectification", channel=channel)
        subject = self.subjects.pseudonym(subject_id)
        personal = self.subjects.seal(
            subject, {"subject_id": self.subjects.normalise(subject_id), **corrections},
            retention_class=DSAR_RETENTION_CLASS,
        )
        event = self.ledger.append(
            EventType.SUBJECT_RECTIFIED,
            {"subject": subject, "request_id": request_id, "fields": sorted(corrections),
             "personal": personal},
            actor=self.actor,
        )
        self._fulfilled(request_id, "rectification", subject, f"corrected {', '.join(sorted(corrections))}")
        return event

    def _shred(self, ledger: Ledger, registry: ConsentRegistry, subject: str, request_id: str,
               channel: str, purge_timeout_s: float) -> tuple[list[str], int, set[str]]:
        """In one ledger: withdraw the subject's consents, destroy its keys; the jobs it lists."""
        withdrawn = [
            record.purpose for record in registry.current(subject) if record.status == "granted"
        ]
        now = datetime.now(UTC).isoformat()
        ledger.append_many(
            (EventType.CONSENT_WITHDRAWN,
             {"subject": subject, "purpose": purpose, "channel": channel,
              "source": f"erasure request {request_id}", "timestamp": now},
             self.actor, None)
            for purpose in withdrawn
        )
        destroyed = registry.subjects.destroy(subject, why=f"erasure request {request_id}",
                                              purge_timeout_s=purge_timeout_s)
        with ledger.store.read() as connection:
            jobs = set(connection.execute(
                select(job_subjects.c.job_id).where(job_subjects.c.subject == subject)
            ).scalars())
        return withdrawn, destroyed, jobs

    def erase(self, subject_id: Any, *, request_id: str | None = None,
              channel: str = "dpo", purge_timeout_s: float = 30.0) -> ErasureReport:
        """Crypto-shred the subject: withdraw consents, destroy keys, flag models, log it all —
        in this ledger and in every partner registry given, where the pseudonyms of the
        subjects each job used are kept.

        The report's `key_bytes_purged` says whether the wrapped key bytes left every
        database's files (waiting up to `purge_timeout_s` for other connections' read
        transactions); if not, `purge_note` says why, and the `subject.erased` events say so."""
        self._need_raw_id(subject_id)
        request_id = request_id or self.receive(subject_id, "erasure", channel=channel)
        subject = self.subjects.pseudonym(subject_id)
        withdrawn, destroyed, found = self._shred(self.ledger, self.registry, subject, request_id,
                                                  channel, purge_timeout_s)
        purges = [(_label(self.ledger), self.subjects.last_purge)]
        reached: set[tuple[str, str]] = set()
        in_registries = []
        for reg in self.registries:
            pseudonym = reg.subjects.pseudonym(subject_id)
            purposes, keys, jobs_there = self._shred(reg.ledger, reg.consent, pseudonym,
                                                     request_id, channel, purge_timeout_s)
            purges.append((reg.label, reg.subjects.last_purge))
            withdrawn += [p for p in purposes if p not in withdrawn]
            destroyed += keys
            found |= jobs_there
            reached |= _traced_pairs(reg.ledger)
            in_registries.append((reg, pseudonym, keys, sorted(jobs_there)))
        jobs = sorted(found)
        models = _models_of_jobs(self.ledger, jobs)
        self.ledger.append_many(
            (EventType.MODEL_FLAGGED,
             {"model": model, "subject": subject,
              "reason": f"trained on data that included a subject erased by {request_id}"},
             self.actor, job_id)
            for job_id, model in models
        )
        flagged = [model for _job, model in models]
        for reg, pseudonym, keys, jobs_there in in_registries:
            there = reg.subjects.last_purge
            reg.ledger.append(
                EventType.SUBJECT_ERASED,
                {"subject": pseudonym, "request_id": request_id, "keys_destroyed": keys,
                 "models_flagged": [m for j, m in models if j in jobs_there],
                 **_purge_fields(there)},
                actor=self.actor)
        unpurged = [(where, p) for where, p in purges if p is not None and not p.complete]
        purge_note = "; ".join(f"{where}: {p.detail}" for where, p in unpurged)
        untraceable = _untraceable_jobs(self.ledger, exclude=set(jobs), reached=reached)
        unknown = [model for _job, model in _models_of_jobs(self.ledger, sorted(untraceable))
                   if not model.endswith("(job not finished)")]
        note = ""
        if unknown:
            reasons = sorted({why for whys in untraceable.values() for why in whys})
            note = (f"{len(unknown)} model(s) were trained on datasets whose subjects could not "
                    f"be searched ({'; '.join(reasons)}): they cannot be traced to this subject, "
                    "so they were not flagged; review them")
        payload: dict[str, Any] = {"subject": subject, "request_id": request_id,
                                   "keys_destroyed": destroyed, "models_flagged": flagged,
                                   **_purge_fields(self.subjects.last_purge)}
        if unknown:
            payload["untraceable_models"] = unknown
            payload["note"] = note
        event = self.ledger.append(EventType.SUBJECT_ERASED, payload, actor=self.actor)
        outcome = f"{destroyed} keys destroyed, {len(flagged)} models flagged"
        if unknown:
            outcome += f", {len(unknown)} models untraceable (their subjects could not be searched)"
        if unpurged:
            outcome += "; the wrapped key bytes may remain in the database files (see subject.erased)"
        self._fulfilled(request_id, "erasure", subject, outcome)
        return ErasureReport(subject, request_id, destroyed, withdrawn, flagged, event,
                             unknown, note, [reg.label for reg in self.registries],
                             not unpurged, purge_note)


def _purge_fields(purge: Any) -> dict[str, Any]:
    """What a subject.erased event says of the key bytes: purged, or why they may remain."""
    if purge is None or purge.complete:
        return {"key_bytes_purged": True}
    return {"key_bytes_purged": False, "purge_note": purge.detail}


def _destruction(opened: Any, subject: str, erasures: dict[str, int],
                 report: SubjectReport) -> str:
    """How a destroyed key was destroyed: the erasure event that records it, or retention."""
    why = opened.why or ""
    if why.startswith("erasure request "):
        request = why[len("erasure request "):]
        if request in erasures:
            return f"erased (event seq {erasures[request]})"
        problem = (f"subject_keys: the key {opened.key_id} of {subject} is marked destroyed by "
                   f"{why}, but no subject.erased event records that request")
        if problem not in report.key_problems:
            report.key_problems.append(problem)
        return (f"key destroyed by {why}, but no subject.erased event records it (an interrupted "
                "erasure, or altered outside fedpact)")
    if why.startswith("retention"):
        return f"expired by retention ({why})"
    return f"destroyed ({why or 'no reason recorded'})"


def _models_of_jobs(ledger: Ledger, jobs: list[str]) -> list[tuple[str, str]]:
    """(job_id, model) for each job: the model named by its delivery events, else the job's own model."""
    result: list[tuple[str, str]] = []
    for job_id in jobs:
        delivered = ledger.events(job_id=job_id, event_type=EventType.MODEL_DELIVERED)
        names = sorted({str(e.payload.get("model") or f"{job_id}/model") for e in delivered})
        finished = ledger.events(job_id=job_id, event_type=EventType.JOB_FINISHED)
        if not names and finished:
            names = [f"{job_id}/model"]
        if not names and not ledger.events(job_id=job_id, event_type=EventType.JOB_CREATED):
            names = [f"{job_id}/model (the job is recorded in the coordinator's ledger)"]
        if not names:
            names = [f"{job_id}/model (job not finished)"]
        result.extend((job_id, name) for name in names)
    return result


def _traced_pairs(ledger: Ledger) -> set[tuple[str, str]]:
    """(job_id, dataset) of every job whose subjects this (partner) ledger keeps."""
    return {(str(e.job_id), str(e.payload.get("dataset")))
            for e in ledger.events(event_type=EventType.SUBJECTS_USED)
            if e.job_id is not None and e.payload.get("traceable", True)
            and e.payload.get("held_by") is None}


def _untraceable_jobs(ledger: Ledger, *, exclude: set[str],
                      reached: set[tuple[str, str]] = frozenset()) -> dict[str, list[str]]:
    """job_id -> why, for each job (not in `exclude`) that used a dataset whose subjects are unknown:
    recorded as untraceable by its data loader, a partner of `job.created` with no record, or a
    partner whose registry holds the subjects but was not among those searched (`reached`)."""
    recorded: dict[str, dict[str, str | None]] = {}
    for event in ledger.events(event_type=EventType.SUBJECTS_USED):
        if event.job_id is None:
            continue
        if not event.payload.get("traceable", True):
            why = str(event.payload.get("reason") or "subjects not recorded")
        elif (event.payload.get("held_by") is not None
              and (event.job_id, event.payload.get("dataset")) not in reached):
            why = "its subjects are kept in the partner's own registry, which was not searched"
        else:
            why = None
        datasets, name = recorded.setdefault(event.job_id, {}), event.payload.get("dataset")
        if name not in datasets or why is None:  # traced once is traced
            datasets[name] = why
    result: dict[str, list[str]] = {}
    for job_id, datasets in recorded.items():
        whys = [f"{name}: {why}" for name, why in sorted(datasets.items()) if why]
        if whys and job_id not in exclude:
            result[job_id] = whys
    for event in ledger.events(event_type=EventType.JOB_CREATED):
        job_id = event.job_id
        if job_id is None or job_id in exclude:
            continue
        known = recorded.get(job_id, {})
        missing = [str(p) for p in event.payload.get("partners", []) if p not in known]
        if missing:
            result.setdefault(job_id, []).extend(
                f"{name}: no record of the subjects used" for name in sorted(missing))
    return result


def flagged_models(ledger: Ledger) -> list[dict[str, Any]]:
    """Every model flagged because a subject whose data trained it was erased."""
    return [
        {"model": e.payload["model"], "job_id": e.job_id, "subject": e.payload["subject"],
         "seq": e.seq, "timestamp": e.timestamp}
        for e in ledger.events(event_type=EventType.MODEL_FLAGGED)
    ]
