"""Compliance officers' tools: queries and exports, Art. 30 / PIPL 55 records, four-eyes, retention."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.dsar import SubjectRequests
from fedpact.audit.exports import ExportApprovals
from fedpact.audit.query import EventFilter, iter_events, query_events, to_csv, to_json_lines
from fedpact.audit.records import processing_record
from fedpact.audit.retention import RETENTION_DAYS, check_policy, enforce_retention

PURPOSE = "churn model"
T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger.open(tmp_path / "ledger.db") as opened:
        yield opened


def _job(ledger: Ledger, job_id: str = "job-1") -> None:
    ledger.append(EventType.JOB_CREATED,
                  {"task": "churn", "partners": ["bank-a", "telco-b"], "purpose": PURPOSE,
                   "config": {"dp": True, "target_epsilon": 1.0, "target_delta": 1e-5}},
                  actor="coordinator", job_id=job_id)
    registry = ConsentRegistry(ledger)
    for node, ids in (("bank-a", ["A1", "A2", "A3"]), ("telco-b", ["T1", "T2"])):
        for subject in ids[:-1]:
            registry.grant(subject, PURPOSE, channel="web" if node == "bank-a" else "store",
                           legal_basis="consent", notice_version="v2", source=node, at=T0)
        registry.enforce(job_id, f"{node}-customers", PURPOSE, ids, actor=f"node:{node}")
        ledger.append(EventType.DATA_ACCESSED,
                      {"node": node, "dataset": f"{node}-customers", "rows": len(ids) - 1,
                       "columns": ["age", "tenure"], "purpose": PURPOSE, "phase": "train"},
                      actor=f"node:{node}", job_id=job_id)
    ledger.append(EventType.JOB_FINISHED, {"metrics": {"roc_auc": 0.81}, "epsilon": 0.97},
                  actor="coordinator", job_id=job_id)
    ledger.append(EventType.MODEL_DELIVERED, {"model": f"{job_id}/model.pt", "recipient": "bank-a",
                                                  "purpose": PURPOSE},
                  actor="coordinator", job_id=job_id)


def test_queries_filter_by_each_dimension_and_paginate(ledger: Ledger) -> None:
    _job(ledger)
    by_subject = query_events(ledger, EventFilter(subject="A1")).events
    assert [e.event_type for e in by_subject] == ["consent.granted"]
    by_partner = query_events(ledger, EventFilter(partner="telco-b")).events
    assert {e.event_type for e in by_partner} == {"job.created", "data.excluded",
                                                  "data.subjects_used", "data.accessed"}
    by_dataset = query_events(ledger, EventFilter(dataset="bank-a-customers",
                                                  event_types=["data.accessed"])).events
    assert len(by_dataset) == 1 and by_dataset[0].payload["rows"] == 2
    assert len(query_events(ledger, EventFilter(channel="store")).events) == 1
    assert len(query_events(ledger, EventFilter(purpose=PURPOSE, channel="web",
                                                event_types=["consent.granted"])).events) == 2
    everything = list(iter_events(ledger, EventFilter(), page_size=3))
    assert [e.seq for e in everything] == list(range(1, ledger.count() + 1))
    page = query_events(ledger, EventFilter(), limit=4)
    assert page.next_after_seq == 4
    assert query_events(ledger, EventFilter(), after_seq=page.next_after_seq, limit=4).events[0].seq == 5
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert query_events(ledger, EventFilter(since=future)).events == []
    assert len(query_events(ledger, EventFilter(until=future)).events) == ledger.count()
    with pytest.raises(LedgerError, match="not an ISO-8601"):
        query_events(ledger, EventFilter(since="last week"))
    with pytest.raises(LedgerError, match="unknown ledger event type"):
        query_events(ledger, EventFilter(event_types=["nope"]))


def test_exports_as_csv_and_json_lines(ledger: Ledger) -> None:
    _job(ledger)
    events = query_events(ledger, EventFilter(job_id="job-1")).events
    rows = list(csv.DictReader(io.StringIO(to_csv(events))))
    assert len(rows) == len(events) and rows[0]["event_type"] == "job.created"
    assert all("personal" not in r["payload"] for r in rows)
    lines = [json.loads(line) for line in to_json_lines(events).splitlines()]
    assert [line["seq"] for line in lines] == [e.seq for e in events]


def test_record_of_processing_and_pipl_assessment(ledger: Ledger) -> None:
    _job(ledger)
    record = processing_record(ledger, "job-1", controller="Acme Data Co-op")
    assert record.purposes == [PURPOSE]
    assert record.data_categories == ["age", "tenure"]
    assert record.subject_categories == ["customers of bank-a", "customers of telco-b"]
    assert record.excluded_without_consent == {"bank-a-customers": (1, 3), "telco-b-customers": (1, 2)}
    assert record.recipients == ["bank-a"]
    assert any("ε ≤ 1.0" in s for s in record.safeguards)
    md = record.to_markdown()
    for heading in ("Purposes of the processing", "Categories of data subjects",
                    "Categories of personal data", "Recipients", "Retention",
                    "Technical and organisational security measures"):
        assert f"## {heading}" in md
    assert "bank-a-customers: 1 of 3 rows excluded" in md
    html = record.to_html()
    assert html.startswith("<!doctype html>") and "<h2>Recipients</h2>" in html
    pia = record.pipl_assessment().to_markdown()
    assert "Art. 56(1)" in pia and "Art. 56(3)" in pia and "2 rows excluded" in pia
    assert "<h1>PIPL Art. 55" in record.pipl_assessment().to_html()
    with pytest.raises(LedgerError, match="no ledger events for job 'nope'"):
        processing_record(ledger, "nope")


def test_bulk_export_needs_a_second_person_with_the_dpo_role(ledger: Ledger) -> None:
    _job(ledger)
    approvals = ExportApprovals(ledger)
    approvals.grant_role("admin", "admin", granted_by="admin", bootstrap=True)
    approvals.grant_role("carol", "dpo", granted_by="admin")
    request = approvals.request(EventFilter(event_types=["consent.granted"]),
                                requested_by="bob", purpose="regulator inquiry 42")
    assert request.status == "pending" and request.subjects == 3
    with pytest.raises(LedgerError, match="pending: it covers 3 subjects"):
        approvals.download(request.request_id, downloaded_by="bob")
    with pytest.raises(LedgerError, match="cannot also approve"):
        approvals.grant_role("bob", "dpo", granted_by="admin") or approvals.approve(
            request.request_id, approver="bob")
    with pytest.raises(LedgerError, match="does not hold the dpo role"):
        approvals.approve(request.request_id, approver="dave")
    approved = approvals.approve(request.request_id, approver="carol")
    assert approved.status == "approved" and approved.approved_by == "carol"
    content = approvals.download(request.request_id, downloaded_by="bob")
    assert len(list(csv.DictReader(io.StringIO(content)))) == 3
    assert approvals.status(request.request_id).downloads == 1
    kinds = [e.event_type for e in query_events(ledger, EventFilter(request_id=request.request_id)).events]
    assert kinds == ["export.requested", "export.approved", "export.downloaded"]
    # one subject: no second person needed, and the raw id is not stored in the request
    single = approvals.request(EventFilter(subject="A1"), requested_by="bob", purpose="DSAR")
    assert single.status == "approved" and single.filters["subject"].startswith("ps_")
    assert approvals.download(single.request_id, downloaded_by="bob", fmt="json").count("\n") == 1
    revoked = approvals.request(EventFilter(purpose=PURPOSE), requested_by="bob", purpose="x")
    approvals.revoke_role("carol", "dpo", revoked_by="admin")
    with pytest.raises(LedgerError, match="does not hold the dpo role"):
        approvals.approve(revoked.request_id, approver="carol")


def test_retention_shreds_expired_months_and_keeps_the_chain(ledger: Ledger) -> None:
    registry = ConsentRegistry(ledger)
    old = registry.grant("OLD-1", PURPOSE, channel="web", legal_basis="consent",
                         notice_version="v1", source="x", at=datetime(2020, 1, 15, tzinfo=UTC))
    new = registry.grant("NEW-1", PURPOSE, channel="web", legal_basis="consent",
                         notice_version="v1", source="x", at=datetime(2026, 1, 15, tzinfo=UTC))
    event = enforce_retention(ledger, now=datetime(2026, 6, 1, tzinfo=UTC))
    assert event.payload["by_class"]["consent"] == 1 and event.payload["keys_destroyed"] == 1
    subjects = registry.subjects
    assert subjects.open(old.payload["subject"], old.payload["personal"]).erased
    assert subjects.open(new.payload["subject"], new.payload["personal"]).fields == {"subject_id": "NEW-1"}
    assert ledger.count() == 3 and ledger.verify().ok
    report = SubjectRequests(ledger).report("OLD-1")
    assert report.events[0]["personal"] == "[erased]"
    with pytest.raises(LedgerError, match="at least 183"):
        check_policy({"access": 30})
    assert RETENTION_DAYS["assessment"] >= 3 * 365 and RETENTION_DAYS["access"] >= 183
