"""Overlap reports: counts by segment with small counts suppressed and optional Laplace noise.

A report is what a partner may show beyond the two nodes. Counts below `k` (default 10) are
suppressed (and, when exactly one segment is, the next smallest as well, so that it cannot be
recovered as total minus the others). With `epsilon`, every released count gets discrete
Laplace noise (the integer-valued Laplace mechanism, ε-DP for counts of sensitivity 1), and
`record_match` charges ε to the dataset's budget in the audit ledger (`privacy.spent`).
"""

from __future__ import annotations

import math
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def discrete_laplace(scale: float, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Integer noise with P(x) ∝ exp(-|x| / scale): the difference of two geometric variables."""
    p = 1.0 - math.exp(-1.0 / scale)
    return rng.geometric(p, size=size) - rng.geometric(p, size=size)


def build_overlap_report(result: MatchResult, *, min_count: int = DEFAULT_MIN_COUNT,
                         epsilon: float | None = None,
                         rng: np.random.Generator | None = None) -> OverlapReport:
    """The publishable overlap report of one side of a match job.

    Released counts: the set sizes, the overlap, and per own segment its size and overlap. With
    `epsilon` the budget is split evenly over the released groups of counts (total sizes and
    overlap; segment sizes; segment overlaps), each a sensitivity-1 count or a vector of counts
    over disjoint segments, so the whole report is ε-differentially private.
    """
    if min_count < 1:
        raise ConfigurationError(f"min_count (k) must be at least 1, not {min_count}")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigurationError(f"epsilon must be a positive number, not {epsilon}")
    rng = rng or _secure_rng()
    has_segments = result.segment_sizes is not None
    parts = 3 if has_segments else 1
    scale = None if epsilon is None else parts / epsilon

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
        suppressed=suppressed)


def _secondary_suppression(kept: list[int | None], raw: list[int | None]) -> None:
    """If exactly one known count is suppressed, also suppress the smallest other one."""
    hidden = [i for i, (k, r) in enumerate(zip(kept, raw, strict=True)) if k is None and r is not None]
    shown = [i for i, k in enumerate(kept) if k is not None]
    if len(hidden) == 1 and shown:
        smallest = min(shown, key=lambda i: kept[i])  # type: ignore[arg-type, return-value]
        kept[smallest] = None


def record_match(ledger: Any, result: MatchResult, report: OverlapReport | None = None,
                 *, actor: str | None = None, consent: dict | None = None) -> list[Any]:
    """Write this side's audit events: `match.completed`, and `privacy.spent` for ε released.

    `consent` (counts only: whether the registry was enforced, the purpose, rows read and rows
    excluded for lack of consent) is recorded as the event's ``consent`` field; the count excluded
    is also ``consent_excluded``. ε is charged to this side's dataset for its own noisy report and
    for the report the partner announced (both are computed from this dataset). Payloads hold counts, never identifiers.
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
