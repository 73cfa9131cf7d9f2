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

NO_PRIVACY_GUARANTEE = "no formal privacy guarantee (ε = ∞)"
"""How every record and screen names a job trained without differential privacy (never ε 0)."""
SECAGG_CLAIM = ("secure aggregation (SecAgg+): the coordinator sees only the sum of the partners' "
                "updates")


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
    secure_aggregation: bool | None = None
    """Whether SecAgg+ ran, as the job's events show: True (the events say it ran), False (they
    show the plain apps ran, or say so), None (no event records it). Never the setting alone."""
    secure_aggregation_requested: bool = False
    consent_setting: bool | None = None
    """The job's `require_consent` setting (job.created, else job.requested); None: not recorded."""
    consent_turned_off_by: str | None = None
    """Who requested the job with consent enforcement explicitly off (governed requests)."""
    consent_not_checkable: list[str] = field(default_factory=list)
    """Datasets whose rows could not be checked for consent (no subject id column)."""
    not_private_reasons: list[str] = field(default_factory=list)
    """Why the run itself reports that its DP guarantee was not delivered (job.finished
    `private` = false), e.g. a node in reproducible-noise mode."""

    @property
    def consent_checked(self) -> bool:
        """True if the job's events show consent filtering for every node that read rows."""
        return bool(self.excluded_without_consent) and not self.consent_unchecked

    def dp_statement(self) -> str:
        """What the job's events say about differential privacy, plainly, either way."""
        if self.match_job:
            return match_report_statement(self.match_noise)
        statement = dp_statement(self.dp, self.dp_epsilon, self.dp_delta, self.epsilon_spent)
        if self.dp and self.not_private_reasons:
            statement += ("; but the run reports that this guarantee was not delivered: "
                          + "; ".join(self.not_private_reasons))
        return statement

    def consent_off_statement(self) -> str | None:
        """The job's own settings turned consent enforcement off: who did, when known."""
        if self.consent_setting is not False:
            return None
        who = (f" by its requester {self.consent_turned_off_by}" if self.consent_turned_off_by
               else "")
        return (f"consent enforcement was turned off for this job{who}: its settings "
                "(require_consent = false) asked for no consent check")

    def consent_statements(self) -> list[str]:
        """What the job's events say about consent checking, plainly, either way."""
        off = self.consent_off_statement()
        not_checkable = [f"{name}: consent could not be checked (the dataset has no subject id "
                         "column); its rows were used without a consent check"
                         for name in self.consent_not_checkable]
        if not self.excluded_without_consent:
            lines = ["No consent check was applied: rows were used without checking each "
                     "subject's consent for this purpose (the job ran without consent enforcement)"]
            return lines + [x for x in (off,) if x] + not_checkable
        lines = [
            f"{name}: {ex} of {total} rows excluded for lack of consent for this purpose"
            for name, (ex, total) in sorted(self.excluded_without_consent.items())
        ]
        lines += [f"{node}: no consent check was applied to its rows"
                  for node in self.consent_unchecked]
        return lines + not_checkable + [x for x in (off,) if x]

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
            consent = r.consent_statements()
        else:
            consent_count = (f"{excluded} rows excluded for lack of separate consent "
                             "(PIPL Art. 14/23)")
            consent = ["consent was checked per subject and per purpose in the data loader of "
                       f"{'every' if r.consent_checked else 'some'} partner; rows without it "
                       "never reached feature computation"]
            consent += [line for line in r.consent_statements()
                        if "no consent check" in line or "could not be checked" in line
                        or "turned off" in line]
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
        elif r.dp and not r.not_private_reasons:
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
                f"them as not differentially private ({NO_PRIVACY_GUARANTEE})")
    if not dp:
        return ("Updates were not differentially private (DP-SGD was off for this job): "
                f"{NO_PRIVACY_GUARANTEE}; nothing beyond aggregation bounds what an individual's "
                "rows can reveal through the model")
    bound = f"ε ≤ {epsilon}, δ = {delta}" if epsilon is not None else f"δ = {delta}"
    used = f"; ε spent {spent}" if spent is not None else ""
    return (f"model updates are differentially private (DP-SGD at {bound} per partner "
            f"dataset{used}), bounding what any individual's rows can reveal through the model")


def _secure_aggregation_ran(asked: bool, engines: set[str], stated: list[bool],
                            created: bool) -> bool | None:
    """SecAgg+ ran (True), did not (False), or no event says (None): explicit statements of what
    ran (`secure_aggregation` in job.finished / round.aggregated) win; else the engine recorded
    in job.started — the simulation engine runs the SecAgg+ apps when the settings ask for them,
    the deployment engine's bundle holds only the plain apps."""
    if stated:
        return stated[-1]
    if asked and engines:
        return engines == {"flower-simulation"}
    if not asked and created:
        return False
    return None


def secure_aggregation_ran(events: list, config: dict[str, Any]) -> bool | None:
    """What a job's ledger `events` show about SecAgg+ having run, given its settings `config`
    (job.created): True, False, or None when no event records it. Never the setting alone."""
    engines = {e.payload["engine"] for e in events if e.event_type == EventType.JOB_STARTED.value
               and isinstance(e.payload.get("engine"), str)}
    stated = [e.payload["secure_aggregation"] for e in events
              if e.event_type in (EventType.JOB_FINISHED.value, EventType.ROUND_AGGREGATED.value)
              and isinstance(e.payload.get("secure_aggregation"), bool)]
    return _secure_aggregation_ran(bool(config.get("secure_aggregation")), engines, stated,
                                   bool(config))


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
    engines: set[str] = set()
    secagg_ran: list[bool] = []  # explicit statements of what ran (e.g. job.finished)
    not_checkable: set[str] = set()
    finished_epsilon: Any = None
    finished_last = False
    not_private: list[str] = []
    for event in events:
        p = event.payload
        if event.event_type in (EventType.JOB_FINISHED.value, EventType.ROUND_AGGREGATED.value) \
                and isinstance(p.get("secure_aggregation"), bool):
            secagg_ran.append(p["secure_aggregation"])
        classes.add(retention_class_of(event.event_type))
        if isinstance(p.get("purpose"), str) and p["purpose"] not in purposes:
            purposes.append(p["purpose"])
        if event.event_type == EventType.JOB_CREATED.value:
            partners.update(p.get("partners", []))
            config = dict(p.get("config") or {})
        elif event.event_type == EventType.JOB_REQUESTED.value:
            requested = dict(p)
        elif event.event_type == EventType.JOB_STARTED.value:
            if isinstance(p.get("engine"), str):
                engines.add(p["engine"])
        elif event.event_type == EventType.SUBJECTS_USED.value:
            if str(p.get("consent") or "").startswith("not checkable"):
                not_checkable.add(str(p.get("dataset")))
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
            finished_last, finished_epsilon = True, p.get("epsilon")
            if p.get("private") is False:
                not_private = [str(r) for r in p.get("not_private_reasons") or []] or [
                    "job.finished records private = false"]
            else:
                not_private = []
            outcome = f"finished; ε spent {p.get('epsilon')}"
            epsilon_spent = p.get("epsilon")
        elif event.event_type in (EventType.JOB_FAILED.value, EventType.JOB_REFUSED.value):
            finished_last = False
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
    if finished_last and not match_job and not dp:
        # ε 0.0 in job.finished means "no accountant ran", not "no privacy loss"
        outcome = (f"finished; {NO_PRIVACY_GUARANTEE}" if dp is False else
                   f"finished; ε reported {finished_epsilon}, but no event records that "
                   "updates were differentially private")
    if match_job:
        safeguards[0] = ("audience matching by keyed hashes or private set intersection: no "
                         "identifier leaves a partner in clear")
        safeguards.append(match_report_statement(match_noise))
    elif dp:
        bound = f"ε ≤ {dp_epsilon}, " if dp_epsilon is not None else ""
        safeguards.append(f"differential privacy (DP-SGD) at {bound}δ = {dp_delta} per partner "
                          "dataset"
                          + ("; the run reports it was not delivered: " + "; ".join(not_private)
                             if not_private else ""))
    else:
        safeguards.append(dp_statement(dp, None, None, None))
    if float(config.get("central_dp_noise") or 0) > 0:
        safeguards.append(f"central differential privacy on the aggregate (noise multiplier "
                          f"{config['central_dp_noise']}, clip {config.get('central_dp_clip')})")
    # secure aggregation: only what the events show ran, never the setting alone
    asked = bool(config.get("secure_aggregation"))
    secure_aggregation = _secure_aggregation_ran(asked, engines, secagg_ran, bool(config))
    if secure_aggregation:
        safeguards.append(SECAGG_CLAIM)
    elif asked and secure_aggregation is False:
        safeguards.append("secure aggregation was requested but did not run ("
                          + (f"engine: {', '.join(sorted(engines))}" if engines else
                             "the job's events say so")
                          + "): the coordinator received each partner's update (each one "
                          + ("differentially private" if dp else "not differentially private")
                          + ")")
    elif asked:
        safeguards.append("secure aggregation was requested, but no ledger event records that it "
                          "ran: treat each partner's update as seen by the coordinator")
    # consent: only what the job's events show (data.excluded written by consent filtering)
    nodes = sorted({n for info in datasets.values() for n in info["nodes"]})
    unchecked = [n for n in nodes
                 if n not in excluded and not any(n in info["nodes"] and name in excluded
                                                  for name, info in datasets.items())]
    consent_settings = config if "require_consent" in config else (
        requested if "require_consent" in requested else {})
    consent_setting = (bool(consent_settings["require_consent"]) if consent_settings else None)
    turned_off_by = (str(requested.get("requested_by")) if requested.get("require_consent") is False
                     and requested.get("requested_by") else None)
    if excluded:
        safeguards.append("consent checked per subject and per purpose before feature "
                          "computation; rows without a valid consent were excluded"
                          + (f" (not for {', '.join(unchecked)})" if unchecked else ""))
    else:
        safeguards.append("No consent check was applied: rows were used without checking each "
                          "subject's consent for this purpose"
                          + (" (consent enforcement was turned off for this job)"
                             if consent_setting is False else ""))
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
        secure_aggregation=secure_aggregation,
        secure_aggregation_requested=asked,
        consent_setting=consent_setting,
        consent_turned_off_by=turned_off_by,
        consent_not_checkable=sorted(not_checkable),
        not_private_reasons=not_private if dp else [],
    )
