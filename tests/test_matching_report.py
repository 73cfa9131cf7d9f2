"""Overlap reports (k-suppression, discrete Laplace noise) and the audit events of a match job."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_matching_protocol import run_pair, synthetic_sets

from fedpact.audit import EventType, Ledger
from fedpact.errors import ConfigurationError
from fedpact.privacy.matching import (
    MatchMode,
    MatchResult,
    build_overlap_report,
    normalize_ids,
    record_match,
)
from fedpact.privacy.matching.report import discrete_laplace


def _result(**over) -> MatchResult:
    base = dict(job_id="match-test", mode=MatchMode.PSI_CARDINALITY, group="x25519",
                role="initiator", purpose="audience_matching", party="alpha", dataset="crm_a",
                peer_party="beta", peer_dataset="crm_b", own_size=500, peer_size=800, overlap=120,
                own_normalization={"excluded_by_consent": 4}, peer_normalization={},
                segment_sizes={"18-25": 200, "26-40": 250, "65+": 50},
                segment_overlap={"18-25": 60, "26-40": 55, "65+": 5})
    base.update(over)
    return MatchResult(**base)


def test_small_counts_are_suppressed_with_a_complementary_cell():
    report = build_overlap_report(_result(), min_count=10)
    by = {s.segment: s for s in report.segments}
    assert by["65+"].overlap is None  # 5 < k
    # total 120 - 60 - 55 would give the hidden 5 back: the next smallest is hidden too
    assert by["26-40"].overlap is None and by["18-25"].overlap == 60
    assert report.overlap == 120 and report.suppressed == 2
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["overlap"] == 120


def test_overlap_below_k_is_not_shown():
    report = build_overlap_report(_result(overlap=7, segment_sizes=None, segment_overlap=None))
    assert report.overlap is None and report.suppressed == 1


def test_discrete_laplace_has_the_promised_scale():
    rng = np.random.default_rng(1)
    eps = 0.5
    x = discrete_laplace(1 / eps, 200_000, rng)
    assert x.dtype.kind == "i"
    assert abs(x.mean()) < 0.05
    # Var of the discrete Laplace with parameter a = exp(-eps): 2a / (1 - a)^2
    a = np.exp(-eps)
    assert x.var() == pytest.approx(2 * a / (1 - a) ** 2, rel=0.03)


def test_noisy_report_is_integer_non_negative_and_close():
    rng = np.random.default_rng(7)
    reports = [build_overlap_report(_result(), epsilon=3.0, rng=rng) for _ in range(300)]
    overlaps = np.array([r.overlap for r in reports if r.overlap is not None])
    assert len(overlaps) == 300 and not np.all(overlaps == 120)  # noise was added
    assert abs(overlaps.mean() - 120) < 1.0
    assert all(r.mechanism == "discrete_laplace" and r.epsilon == 3.0 for r in reports)
    with pytest.raises(ConfigurationError, match="epsilon"):
        build_overlap_report(_result(), epsilon=0)
    with pytest.raises(ConfigurationError, match="min_count"):
        build_overlap_report(_result(), min_count=0)


def test_match_job_writes_audit_events_without_identifiers(tmp_path):
    raw_a, raw_b = synthetic_sets(400, 300, 120, seed=11)
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    ra, rb, _, _ = run_pair(a, b, "psi", reveal=(True, True))
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        report = build_overlap_report(ra, epsilon=1.0)
        events = record_match(ledger, ra, report)
        events += record_match(ledger, rb, build_overlap_report(rb))
        assert ledger.verify().ok
        stored = ledger.events(job_id=ra.job_id)
    kinds = [e.event_type for e in stored]
    assert kinds == [EventType.MATCH_COMPLETED.value, EventType.PRIVACY_SPENT.value,
                     EventType.MATCH_COMPLETED.value]
    done = stored[0].payload
    assert done["mode"] == "psi" and done["overlap"] == 120 and done["purpose"] == "audience_matching"
    assert done["parties"] == ["alpha", "beta"] and done["datasets"] == ["crm_a", "crm_b"]
    assert done["sizes"] == {"crm_a": 400, "crm_b": 300} and done["epsilon_spent"] == {"crm_a": 1.0}
    spent = stored[1].payload
    assert spent["dataset"] == "crm_a" and spent["epsilon"] == 1.0 and spent["delta"] == 0.0
    text = json.dumps([e.payload for e in stored])
    assert not any(v in text for v in a.values + b.values)
    assert not any(t in text for t in ra.tokens)


def test_partner_report_epsilon_is_charged_to_this_dataset(tmp_path):
    from fedpact.privacy.matching import MatchConfig

    raw_a, raw_b = synthetic_sets(50, 50, 20, seed=2)
    a, b = normalize_ids(raw_a, "email"), normalize_ids(raw_b, "email")
    ra, rb, _, _ = run_pair(a, b, "psi-cardinality",
                            config_b=MatchConfig("psi-cardinality", report_epsilon=0.5))
    assert ra.peer_report_epsilon == 0.5 and rb.own_report_epsilon == 0.5
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        record_match(ledger, ra, build_overlap_report(ra))
        spent = ledger.events(event_type=EventType.PRIVACY_SPENT)
    assert [(e.payload["dataset"], e.payload["epsilon"], e.payload["released_by"])
            for e in spent] == [("crm_a", 0.5, "beta")]
