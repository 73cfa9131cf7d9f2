"""Overlap reports: counts by segment with small counts suppressed and optional Laplace noise.

A report is what a partner may show beyond the two nodes. Counts below `k` (default 10) are
suppressed (and, when exactly one segment is, the next smallest as well, so that it cannot be
recovered as total minus the others). With `epsilon`, every released count gets discrete
Laplace noise of scale Δ/ε, where Δ (`report_sensitivity`) is the L1 sensitivity of everything
the report releases to one identifier more or less in either dataset, so the whole report is
ε-DP; `record_match` charges ε to the dataset's budget in the audit ledger (`privacy.spent`),
after `budget_check` has made sure the budget has room for it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedpact.errors import ConfigurationError
from fedpact.privacy.matching.protocol import MatchResult, _secure_rng

DEFAULT_MIN_COUNT = 10
MECHANISM = "discrete_laplace"


@dataclass(frozen=True)
class SegmentCount:
    segment: str
    size: int | None
    """This side's distinct identifiers in the segment (None: suppressed)."""
    overlap: int | None
    """Of those, how many the partner also holds (None: suppressed or unknown)."""


@dataclass
class OverlapReport:
    job_id: str
    mode: str
    dataset: str
    peer_dataset: str
    own_size: int | None
    peer_size: int | None
    overlap: int | None
    segments: list[SegmentCount] = field(default_factory=list)
    segments_note: str | None = None
    min_count: int = DEFAULT_MIN_COUNT
    epsilon: float | None = None
    mechanism: str | None = None
    suppressed: int = 0
    sensitivity: int | None = None
    """L1 sensitivity Δ of the released counts (with `epsilon`; see `report_sensitivity`)."""
    noise_scale: float | None = None
    """Δ/ε: the scale of the discrete Laplace noise on every released count."""
    residual_risk: str | None = None
    """For a ``hash`` job on low-entropy identifiers run with --accept-enumeration-risk: the
    risk accepted (the partner can enumerate the identifiers); None otherwise."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def discrete_laplace(scale: float, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Integer noise with P(x) ∝ exp(-|x| / scale): the difference of two geometric variables."""
    p = 1.0 - math.exp(-1.0 / scale)
    return rng.geometric(p, size=size) - rng.geometric(p, size=size)


def report_sensitivity(*, segment_sizes: bool, segment_overlaps: bool) -> int:
    """L1 sensitivity of the counts an overlap report releases.

    Released: this side's distinct identifiers, the partner's, the overlap; with segments the
    size of each own segment and (where known) the overlap of each own segment. Neighbouring
    inputs differ by one identifier (one person's row) in *either* dataset, since the report is
    computed from both and each side charges its own dataset for it:

    - one identifier more or less on this side: its size ±1, the overlap ±1 at most, its
      segment's size ±1 and that segment's overlap ±1 at most: 2 + s + o;
    - one duplicate row more or less on this side can move an identifier to another segment (an
      identifier takes the segment of its first row): two segment sizes and two segment
      overlaps change by 1, the totals not: 2·(s + o);
    - one identifier more or less at the partner: the partner's size ±1, the overlap ±1 at
      most and one own segment's overlap ±1 at most: 2 + o;

    with s, o = 1 when segment sizes, segment overlaps are released (else 0). Δ is the largest:
    2 without segments, 3 with segment sizes only, 4 with both.
    """
    s, o = int(segment_sizes), int(segment_overlaps)
    return max(2 + s + o, 2 * (s + o), 2 + o)


def build_overlap_report(result: MatchResult, *, min_count: int = DEFAULT_MIN_COUNT,
                         epsilon: float | None = None,
                         rng: np.random.Generator | None = None) -> OverlapReport:
    """The publishable overlap report of one side of a match job.

    Released counts: the set sizes, the overlap, and per own segment its size and overlap. With
    `epsilon` every released count gets discrete Laplace noise of scale Δ/ε, Δ being the L1
    sensitivity of the whole released vector (`report_sensitivity`: 2 without segments, up to 4
    with them), so the whole report is ε-differentially private for one identifier more or less
    in either dataset. Suppression, clipping at 0 and the secondary suppression only look at
    noisy counts (post-processing). The segment names are taken as public: segment by a column
    whose values are a fixed, known list (age bands, channels), not by one derived from people.
    """
    if min_count < 1:
        raise ConfigurationError(f"min_count (k) must be at least 1, not {min_count}")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigurationError(f"epsilon must be a positive number, not {epsilon}")
    rng = rng or _secure_rng()
    has_segments = result.segment_sizes is not None
    sensitivity = report_sensitivity(
        segment_sizes=has_segments,
        segment_overlaps=has_segments and result.segment_overlap is not None)
    scale = None if epsilon is None else sensitivity / epsilon

    def noisy(values: list[int]) -> list[int]:
        if scale is None:
            return values
        noise = discrete_laplace(scale, len(values), rng)
        return [max(0, int(v) + int(e)) for v, e in zip(values, noise, strict=True)]

    raw_totals = noisy([result.own_size, result.peer_size, result.overlap])
    totals: list[int | None] = [v if v >= min_count else None for v in raw_totals]
    released: list[tuple[list[int | None], list[int | None]]] = [(totals, list(raw_totals))]
    segments: list[SegmentCount] = []
    note = None
    if has_segments:
        assert result.segment_sizes is not None
        names = list(result.segment_sizes)
        sizes: list[int | None] = list(noisy([result.segment_sizes[n] for n in names]))
        if result.segment_overlap is not None:
            overlaps: list[int | None] = list(noisy([result.segment_overlap[n] for n in names]))
        else:
            overlaps = [None] * len(names)
            note = ("overlap by segment is not available on this side: in hash mode only the "
                    "receiving node, or both with --matched-out, know which rows matched")
        kept_sizes = [None if v is None or v < min_count else v for v in sizes]
        kept_overlaps = [None if v is None or v < min_count else v for v in overlaps]
        _secondary_suppression(kept_sizes, sizes)
        _secondary_suppression(kept_overlaps, overlaps)
        released += [(kept_sizes, sizes), (kept_overlaps, overlaps)]
        segments = [SegmentCount(n, s, o) for n, s, o in zip(names, kept_sizes, kept_overlaps,
                                                            strict=True)]
    suppressed = sum(k is None and r is not None
                     for kept, raw in released for k, r in zip(kept, raw, strict=True))
    return OverlapReport(
        job_id=result.job_id, mode=result.mode.value, dataset=result.dataset,
        peer_dataset=result.peer_dataset, own_size=totals[0], peer_size=totals[1],
        overlap=totals[2], segments=segments, segments_note=note, min_count=min_count,
        epsilon=epsilon, mechanism=MECHANISM if epsilon is not None else None,
        suppressed=suppressed, sensitivity=sensitivity if scale is not None else None,
        noise_scale=scale, residual_risk=result.enumeration_risk)


def _secondary_suppression(kept: list[int | None], raw: list[int | None]) -> None:
    """If exactly one known count is suppressed, also suppress the smallest other one."""
    hidden = [i for i, (k, r) in enumerate(zip(kept, raw, strict=True)) if k is None and r is not None]
    shown = [i for i, k in enumerate(kept) if k is not None]
    if len(hidden) == 1 and shown:
        smallest = min(shown, key=lambda i: kept[i])  # type: ignore[arg-type, return-value]
        kept[smallest] = None


def budget_check(ledger: Any, dataset: str, *, own_epsilon: float | None = None
                 ) -> Callable[[float], None]:
    """A `run_match(..., budget_check=...)` hook refusing a job the dataset's budget cannot pay.

    The hook gets the ε the job will charge to `dataset` (this node's report plus the report the
    partner announced, both computed from this dataset) and raises `BudgetError` (a one-line
    `FedpactError`) through `PrivacyBudgets.check` unless the budget set for the dataset has room
    for it; a dataset without a budget cannot be charged at all. Call the hook once yourself with
    `own_epsilon` before connecting, to refuse early what this node alone would overspend.
    """
    from fedpact.privacy.budget import BudgetError, PrivacyBudgets

    budgets = PrivacyBudgets(ledger)

    def check(epsilon: float) -> None:
        try:
            budgets.check({dataset: float(epsilon)}, 0.0)
        except BudgetError as exc:
            own = float(own_epsilon or 0.0)
            if abs(float(epsilon) - own) > 1e-12:
                raise BudgetError(
                    f"{exc} (this job charges ε={epsilon:g}: {own:g} for this node's report and "
                    f"{float(epsilon) - own:g} for the report the partner announced)") from None
            raise

    return check


@dataclass(frozen=True)
class MatchAttempt:
    """One node's attempt at a match job, recorded before the job id (agreed in the handshake)
    exists: `record_match_started` and, if it fails, `record_match_failed` use `attempt_id` as
    their job id; `record_match(..., attempt=...)` links the completed job back to it."""

    party: str
    dataset: str
    mode: str
    purpose: str
    role: str
    """initiator (--connect) or responder (--listen)."""
    partner: str
    """The partner's address (--connect) or the address listened on (--listen)."""
    group: str | None = None
    report_epsilon: float | None = None
    attempt_id: str = field(default_factory=lambda: "match-attempt-" + secrets.token_hex(8))

    def facts(self) -> dict[str, Any]:
        return {"mode": self.mode, "datasets": [self.dataset], "purpose": self.purpose,
                "party": self.party, "role": self.role, "partner_endpoint": self.partner,
                "group": self.group, "report_epsilon": self.report_epsilon,
                "attempt": self.attempt_id}


def record_match_started(ledger: Any, attempt: MatchAttempt, *, actor: str | None = None) -> Any:
    """`match.started`: who (party), which dataset, mode, purpose, partner — before connecting."""
    from fedpact.audit import EventType

    return ledger.append(EventType.MATCH_STARTED, attempt.facts(),
                         actor=actor or attempt.party, job_id=attempt.attempt_id)


def record_match_failed(ledger: Any, attempt: MatchAttempt, error: BaseException, *, stage: str,
                        actor: str | None = None) -> Any:
    """`job.failed` for a match attempt: the `match.started` facts plus why and at which stage
    (connect, handshake/exchange, report). No ε was charged: `privacy.spent` is written only
    with `match.completed`."""
    from fedpact.audit import EventType, LedgerError

    message = " ".join(str(error).split())[:500] or "no message"
    payload = {**attempt.facts(), "kind": "match", "stage": stage,
               "error_type": type(error).__name__,
               "reason": f"{type(error).__name__}: {message}", "epsilon_charged": 0.0}
    try:
        return ledger.append(EventType.JOB_FAILED, payload, actor=actor or attempt.party,
                             job_id=attempt.attempt_id)
    except LedgerError:  # the message looked like personal data: keep the facts, not the text
        payload["reason"] = f"{type(error).__name__} (message withheld: it may hold personal data)"
        return ledger.append(EventType.JOB_FAILED, payload, actor=actor or attempt.party,
                             job_id=attempt.attempt_id)


def record_match(ledger: Any, result: MatchResult, report: OverlapReport | None = None,
                 *, actor: str | None = None, consent: dict | None = None,
                 attempt: str | None = None) -> list[Any]:
    """Write this side's audit events: `match.completed`, and `privacy.spent` for ε released.

    `consent` (counts only: whether the registry was enforced, the purpose, rows read and rows
    excluded for lack of consent) is recorded as the event's ``consent`` field; the count excluded
    is also ``consent_excluded``; `attempt` links the event to `match.started`. Each side charges
    only its own dataset, in its own ledger: ε for its own noisy report and ε for the report the
    partner announced (that report releases this dataset's size and the overlap, so it is
    computed from this dataset too; the partner charges the same ε to its own dataset).
    Check the budget first (`budget_check`). Payloads hold counts, never identifiers.
    """
    from fedpact.audit import EventType

    actor = actor or result.party
    spent: list[tuple[float, str]] = []
    if report is not None and report.epsilon is not None:
        spent.append((float(report.epsilon), result.party))
    if result.peer_report_epsilon is not None:
        spent.append((float(result.peer_report_epsilon), result.peer_party))
    payload = {
        **result.summary(),
        "mode": result.mode.value,
        "parties": [result.party, result.peer_party],
        "datasets": [result.dataset, result.peer_dataset],
        "sizes": {result.dataset: result.own_size, result.peer_dataset: result.peer_size},
        "overlap": result.overlap,
        "purpose": result.purpose,
        "consent_excluded": result.own_normalization.get("excluded_by_consent", 0),
        "epsilon_spent": {result.dataset: sum(e for e, _ in spent)} if spent else None,
    }
    if consent is not None:
        payload["consent"] = dict(consent)
    if attempt is not None:
        payload["attempt"] = attempt
    if report is not None:
        payload["report"] = {"overlap": report.overlap, "min_count": report.min_count,
                             "epsilon": report.epsilon, "suppressed": report.suppressed}
    events = [ledger.append(EventType.MATCH_COMPLETED, payload, actor=actor,
                            job_id=result.job_id)]
    for epsilon, released_by in spent:
        events.append(ledger.append(
            EventType.PRIVACY_SPENT,
            {"dataset": result.dataset, "epsilon": epsilon, "delta": 0.0,
             "mechanism": MECHANISM, "purpose": result.purpose, "released_by": released_by,
             "query": "audience overlap report"},
            actor=actor, job_id=result.job_id))
    return events
