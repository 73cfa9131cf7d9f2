"""Per-job record of processing (GDPR Art. 30) and PIPL Art. 55/56 impact-assessment summary.

Both are generated from the job's own ledger events (what was actually read, for which purpose,
by whom, with which safeguards), not from a form someone filled in, and rendered as Markdown or
HTML for the compliance officer's file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from fedpact.audit.events import EventType, LedgerError
from fedpact.audit.ledger import Ledger
from fedpact.audit.retention import RETENTION_DAYS, retention_class_of


@dataclass
class ProcessingRecord:
    """The Art. 30(1) fields of one job, with the evidence (event seqs) they come from."""

    job_id: str
    controller: str
    purposes: list[str]
    data_categories: list[str]
    subject_categories: list[str]
    recipients: list[str]
    retention: list[str]
    safeguards: list[str]
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    excluded_without_consent: dict[str, tuple[int, int]] = field(default_factory=dict)
    transfers: list[str] = field(default_factory=list)
    first_event: str = ""
    last_event: str = ""
    evidence: list[int] = field(default_factory=list)
    outcome: str = ""

    def sections(self) -> list[tuple[str, list[str]]]:
        datasets = [
            f"{name}: {info['rows']} rows read by {', '.join(sorted(info['nodes']))}; columns "
            f"{', '.join(sorted(info['columns']))}"
            for name, info in sorted(self.datasets.items())
        ]
        excluded = [
            f"{name}: {ex} of {total} rows excluded for lack of consent for this purpose"
            for name, (ex, total) in sorted(self.excluded_without_consent.items())
        ]
        return [
            ("Controller", [self.controller]),
            ("Purposes of the processing", self.purposes),
            ("Categories of data subjects", self.subject_categories),
            ("Categories of personal data", self.data_categories),
            ("Datasets processed", datasets or ["none recorded"]),
            ("Consent enforcement", excluded or ["no exclusion count recorded"]),
            ("Recipients", self.recipients or ["none: the model stayed with the coordinator"]),
            ("Transfers to third countries", self.transfers or ["none recorded"]),
            ("Retention", self.retention),
            ("Technical and organisational security measures", self.safeguards),
            ("Outcome", [self.outcome or "not finished"]),
            ("Period", [f"{self.first_event} to {self.last_event}"]),
            ("Evidence (ledger events)", [", ".join(str(s) for s in self.evidence)]),
        ]

    def to_markdown(self) -> str:
        lines = [f"# Record of processing (GDPR Art. 30) — job {self.job_id}", ""]
        for title, items in self.sections():
            lines += [f"## {title}", "", *[f"- {item}" for item in items], ""]
        return "\n".join(lines)

    def to_html(self) -> str:
        return _html(f"Record of processing (GDPR Art. 30) — job {self.job_id}", self.sections())

    def pipl_assessment(self) -> ImpactAssessment:
        return ImpactAssessment(self)


@dataclass
class ImpactAssessment:
    """PIPL Art. 55 personal-information-protection impact assessment, content of Art. 56."""

    record: ProcessingRecord

    def sections(self) -> list[tuple[str, list[str]]]:
        r = self.record
        rows = sum(int(info["rows"]) for info in r.datasets.values())
        excluded = sum(ex for ex, _ in r.excluded_without_consent.values())
        return [
            ("Processing assessed", [
                f"job {r.job_id}: {', '.join(r.purposes)}",
                f"{len(r.datasets)} datasets, {rows} row reads, {excluded} rows excluded for "
                "lack of separate consent (PIPL Art. 14/23)",
            ]),
            ("Art. 56(1) Lawfulness, legitimacy and necessity of purpose and method", [
                f"purpose(s) declared before any data was read: {', '.join(r.purposes)}",
                "consent is checked per subject and per purpose in each partner's data loader; "
                "rows without it never reach feature computation",
                f"only these data categories were read: {', '.join(r.data_categories)}",
            ]),
            ("Art. 56(2) Impact on individuals' rights and security risks", [
                "raw rows never leave a partner: only model weights, counts and score histograms",
                "model updates are differentially private, bounding what any individual's data "
                "can reveal through the model",
                "residual risk: membership inference bounded by the ε spent; linkage through "
                "pseudonyms requires the deployment secret",
            ]),
            ("Art. 56(3) Protective measures: legal, effective, proportionate", r.safeguards),
            ("Retention of this assessment", [
                f"at least {RETENTION_DAYS['assessment'] // 365} years (PIPL Art. 56: ≥ 3 years)"
            ]),
            ("Evidence (ledger events)", [", ".join(str(s) for s in r.evidence)]),
        ]

    def to_markdown(self) -> str:
        lines = [f"# PIPL Art. 55 impact assessment — job {self.record.job_id}", ""]
        for title, items in self.sections():
            lines += [f"## {title}", "", *[f"- {item}" for item in items], ""]
        return "\n".join(lines)

    def to_html(self) -> str:
        return _html(f"PIPL Art. 55 impact assessment — job {self.record.job_id}", self.sections())


def _html(title: str, sections: list[tuple[str, list[str]]]) -> str:
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "h2{border-bottom:1px solid #ccc}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2><ul>")
        parts += [f"<li>{html.escape(str(item))}</li>" for item in items]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def processing_record(
    ledger: Ledger, job_id: str, *, controller: str = "the fedpact coordinator operator"
) -> ProcessingRecord:
    """Build the Art. 30 record of `job_id` from its ledger events."""
    events = ledger.events(job_id=job_id)
    if not events:
        raise LedgerError(f"no ledger events for job {job_id!r}: nothing to report")
    purposes: list[str] = []
    partners: set[str] = set()
    datasets: dict[str, dict[str, Any]] = {}
    excluded: dict[str, tuple[int, int]] = {}
    recipients: set[str] = set()
    safeguards = [
        "federated learning: each partner's rows stay on its own node",
        "hash-chained, Merkle-checkpointed audit ledger with Ed25519-signed tree heads",
        "subjects recorded only by keyed pseudonym; personal fields AES-256-GCM encrypted per "
        "subject (crypto-shredding on erasure and at end of retention)",
    ]
    outcome = ""
    classes: set[str] = set()
    for event in events:
        p = event.payload
        classes.add(retention_class_of(event.event_type))
        if isinstance(p.get("purpose"), str) and p["purpose"] not in purposes:
            purposes.append(p["purpose"])
        if event.event_type == EventType.JOB_CREATED.value:
            partners.update(p.get("partners", []))
            config = p.get("config") or {}
            if config.get("dp", True) and "target_epsilon" in config:
                safeguards.append(
                    f"differential privacy (DP-SGD) at ε ≤ {config['target_epsilon']}, "
                    f"δ = {config.get('target_delta')} per partner dataset"
                )
        elif event.event_type == EventType.DATA_ACCESSED.value:
            info = datasets.setdefault(p["dataset"], {"rows": 0, "columns": set(), "nodes": set()})
            info["rows"] += int(p["rows"])
            info["columns"].update(p["columns"])
            info["nodes"].add(p["node"])
        elif event.event_type == EventType.DATA_EXCLUDED.value:
            ex, total = excluded.get(p["dataset"], (0, 0))
            excluded[p["dataset"]] = (ex + p["excluded"], total + p["total"])
        elif event.event_type in (EventType.MODEL_DELIVERED.value, EventType.MODEL_EXPORTED.value):
            recipients.add(str(p.get("recipient") or p.get("to") or p.get("model") or "partners"))
        elif event.event_type == EventType.JOB_FINISHED.value:
            outcome = f"finished; ε spent {p.get('epsilon')}"
        elif event.event_type in (EventType.JOB_FAILED.value, EventType.JOB_REFUSED.value):
            outcome = f"{event.event_type}: {p.get('reason', '')}".strip()
    columns = sorted({c for info in datasets.values() for c in info["columns"]})
    retention = [
        f"{name}: {RETENTION_DAYS[name]} days, then personal fields are crypto-shredded"
        for name in sorted(classes)
    ]
    return ProcessingRecord(
        job_id=job_id,
        controller=controller,
        purposes=purposes or ["not recorded"],
        data_categories=columns or ["none recorded"],
        subject_categories=[f"customers of {p}" for p in sorted(partners or {e.payload.get('node', '') for e in events if e.payload.get('node')})] or ["not recorded"],
        recipients=sorted(recipients),
        retention=retention,
        safeguards=safeguards,
        datasets=datasets,
        excluded_without_consent=excluded,
        first_event=events[0].timestamp,
        last_event=events[-1].timestamp,
        evidence=[e.seq for e in events],
        outcome=outcome,
    )
