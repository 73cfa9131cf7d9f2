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
    dp: bool | None = None
    """Whether the job's model updates were differentially private (None: no event says)."""
    dp_epsilon: Any = None
    dp_delta: Any = None
    epsilon_spent: Any = None
    consent_unchecked: list[str] = field(default_factory=list)
    """Nodes that read rows with no consent-filtering record (`data.excluded`) for this job."""
    match_job: bool = False
    """An audience-matching job (no model trained): `dp` is None; `match_noise` says what its
    overlap report released."""
    match_noise: dict[str, float] = field(default_factory=dict)
    """ε of the Laplace noise on the overlap report, per dataset charged (empty: exact report)."""
    match_mode: str | None = None
    """hash, psi or psi-cardinality, as the match job's events record it."""

    @property
    def consent_checked(self) -> bool:
        """True if the job's events show consent filtering for every node that read rows."""
        return bool(self.excluded_without_consent) and not self.consent_unchecked

    def dp_statement(self) -> str:
        """What the job's events say about differential privacy, plainly, either way."""
        if self.match_job:
            return match_report_statement(self.match_noise)
        return dp_statement(self.dp, self.dp_epsilon, self.dp_delta, self.epsilon_spent)

    def consent_statements(self) -> list[str]:
        """What the job's events say about consent checking, plainly, either way."""
        if not self.excluded_without_consent:
            return ["No consent check was applied: rows were used without checking each "
                    "subject's consent for this purpose (the job ran without consent enforcement)"]
        lines = [
            f"{name}: {ex} of {total} rows excluded for lack of consent for this purpose"
            for name, (ex, total) in sorted(self.excluded_without_consent.items())
        ]
        lines += [f"{node}: no consent check was applied to its rows"
                  for node in self.consent_unchecked]
        return lines

    def sections(self) -> list[tuple[str, list[str]]]:
        datasets = [
            f"{name}: {info['rows']} rows read by {', '.join(sorted(info['nodes']))}; columns "
            f"{', '.join(sorted(info['columns']))}"
            for name, info in sorted(self.datasets.items())
        ]
        return [
            ("Controller", [self.controller]),
            ("Purposes of the processing", self.purposes),
            ("Categories of data subjects", self.subject_categories),
            ("Categories of personal data", self.data_categories),
            ("Datasets processed", datasets or ["none recorded"]),
            ("Consent enforcement", self.consent_statements()),
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
        if not r.excluded_without_consent:
            consent_count = ("no consent check was applied, so separate consent (PIPL Art. 14/23) "
                             "was not verified for any row")
            consent = [r.consent_statements()[0]]
        else:
            consent_count = (f"{excluded} rows excluded for lack of separate consent "
                             "(PIPL Art. 14/23)")
            consent = ["consent was checked per subject and per purpose in the data loader of "
                       f"{'every' if r.consent_checked else 'some'} partner; rows without it "
                       "never reached feature computation"]
            consent += [line for line in r.consent_statements() if "no consent check" in line]
        if r.match_job and r.match_mode == "hash":
            residual = ("residual risk: keyed-hash matching — the responding partner learns "
                        "which of its own rows match and, holding the job key, could test "
                        "guessed identifiers against the initiator's hashes (low-entropy IDs "
                        "such as phone numbers are enumerable; use PSI for them)")
        elif r.match_job:
            residual = ("residual risk: private set intersection — each partner learns how many "
                        "of its identifiers the other holds (and per-segment counts over at "
                        "least k identifiers); no identifier is revealed unless both partners "
                        "asked for matched rows")
        elif r.dp:
            residual = ("residual risk: membership inference bounded by the ε spent; linkage "
                        "through pseudonyms requires the deployment secret")
        else:
            residual = ("residual risk: membership inference is not bounded by differential "
                        "privacy; linkage through pseudonyms requires the deployment secret")
        return [
            ("Processing assessed", [
                f"job {r.job_id}: {', '.join(r.purposes)}",
                f"{len(r.datasets)} datasets, {rows} row reads, {consent_count}",
            ]),
            ("Art. 56(1) Lawfulness, legitimacy and necessity of purpose and method", [
                f"purpose(s) declared before any data was read: {', '.join(r.purposes)}",
                *consent,
                f"only these data categories were read: {', '.join(r.data_categories)}",
            ]),
            ("Art. 56(2) Impact on individuals' rights and security risks", [
                "raw rows never leave a partner: only model weights, counts and score histograms",
                r.dp_statement(),
                residual,
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


def match_report_statement(noise: dict[str, float]) -> str:
    """One plain sentence on what a match job's overlap report released (ε per dataset charged)."""
    if not noise:
        return ("Audience-matching job, no model trained: the overlap counts were released "
                "exactly (no noise); small counts are suppressed")
    charged = ", ".join(f"{name}: ε {eps:g}" for name, eps in sorted(noise.items()))
    return ("Audience-matching job, no model trained: the overlap report was released with "
            f"Laplace noise ({charged}, charged to each dataset's budget)")


def dp_statement(dp: bool | None, epsilon: Any, delta: Any, spent: Any) -> str:
    """One plain sentence on whether a job's updates were differentially private, and how."""
    if dp is None:
        return ("No ledger event records whether updates were differentially private: treat "
                "them as not differentially private")
    if not dp:
        return ("Updates were not differentially private (DP-SGD was off for this job): nothing "
                "beyond aggregation bounds what an individual's rows can reveal through the model")
    bound = f"ε ≤ {epsilon}, δ = {delta}" if epsilon is not None else f"δ = {delta}"
    used = f"; ε spent {spent}" if spent is not None else ""
    return (f"model updates are differentially private (DP-SGD at {bound} per partner "
            f"dataset{used}), bounding what any individual's rows can reveal through the model")


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
    config: dict[str, Any] = {}
    requested: dict[str, Any] = {}
    spent_events = 0
    epsilon_spent = None
    match_job = False
    match_mode: str | None = None
    match_noise: dict[str, float] = {}
    for event in events:
        p = event.payload
        classes.add(retention_class_of(event.event_type))
        if isinstance(p.get("purpose"), str) and p["purpose"] not in purposes:
            purposes.append(p["purpose"])
        if event.event_type == EventType.JOB_CREATED.value:
            partners.update(p.get("partners", []))
            config = dict(p.get("config") or {})
        elif event.event_type == EventType.JOB_REQUESTED.value:
            requested = dict(p)
        elif event.event_type in (EventType.MATCH_STARTED.value, EventType.MATCH_COMPLETED.value):
            match_job = True
            match_mode = str(p.get("mode") or match_mode or "") or None
        elif event.event_type == EventType.PRIVACY_SPENT.value:
            spent_events += 1
            if p.get("query") == "audience overlap report":  # a noisy report, not DP-SGD
                match_noise[p["dataset"]] = match_noise.get(p["dataset"], 0.0) + float(p["epsilon"])
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
            epsilon_spent = p.get("epsilon")
        elif event.event_type in (EventType.JOB_FAILED.value, EventType.JOB_REFUSED.value):
            outcome = f"{event.event_type}: {p.get('reason', '')}".strip()
    # differential privacy: the job's own settings (job.created, else the governed request),
    # else the budget charges it made; never assumed
    dp: bool | None = None
    settings = config if "dp" in config else requested if "dp" in requested else {}
    if "dp" in settings:
        dp = bool(settings["dp"])
    elif spent_events and not match_job:
        dp = True
    dp_epsilon = settings.get("target_epsilon") if dp else None
    if dp and float(settings.get("noise_multiplier") or 0) > 0:
        dp_epsilon = None  # an explicit noise multiplier: the bound is the ε spent, not a target
    dp_delta = settings.get("target_delta") if dp else None
    if match_job:
        safeguards[0] = ("audience matching by keyed hashes or private set intersection: no "
                         "identifier leaves a partner in clear")
        safeguards.append(match_report_statement(match_noise))
    elif dp:
        bound = f"ε ≤ {dp_epsilon}, " if dp_epsilon is not None else ""
        safeguards.append(f"differential privacy (DP-SGD) at {bound}δ = {dp_delta} per partner "
                          "dataset")
    else:
        safeguards.append(dp_statement(dp, None, None, None))
    if float(config.get("central_dp_noise") or 0) > 0:
        safeguards.append(f"central differential privacy on the aggregate (noise multiplier "
                          f"{config['central_dp_noise']}, clip {config.get('central_dp_clip')})")
    if config.get("secure_aggregation"):
        safeguards.append("secure aggregation (SecAgg+): the coordinator sees only the sum of "
                          "the partners' updates")
    # consent: only what the job's events show (data.excluded written by consent filtering)
    nodes = sorted({n for info in datasets.values() for n in info["nodes"]})
    unchecked = [n for n in nodes
                 if n not in excluded and not any(n in info["nodes"] and name in excluded
                                                  for name, info in datasets.items())]
    if excluded:
        safeguards.append("consent checked per subject and per purpose before feature "
                          "computation; rows without a valid consent were excluded"
                          + (f" (not for {', '.join(unchecked)})" if unchecked else ""))
    else:
        safeguards.append("No consent check was applied: rows were used without checking each "
                          "subject's consent for this purpose")
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
        dp=dp,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        epsilon_spent=epsilon_spent if dp else None,
        consent_unchecked=unchecked if excluded else [],
        match_job=match_job,
        match_noise=match_noise,
        match_mode=match_mode,
    )
