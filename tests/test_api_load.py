"""A small loopback load run against uvicorn: concurrent audit queries, no errors.

The full run (200 concurrent, p50/p99 reported) is bench/test_bench_api.py (`make bench`).
"""

from __future__ import annotations

from fedpact.audit import EventType
from fedpact.service.api.app import create_app
from fedpact.service.api.loadgen import audit_query_load, serve_in_thread


def fill_ledger(service, events: int) -> None:
    batch = [(EventType.DATA_ACCESSED,
              {"node": f"telco-churn/p{i % 3}", "dataset": "telco-churn", "rows": 100 + i,
               "columns": ["tenure", "Contract"], "purpose": "churn_model_training", "round": i},
              f"node:telco-churn/p{i % 3}", f"job-load{i % 7}") for i in range(events)]
    service.ledger.append_many(batch)


def test_concurrent_audit_queries_on_loopback_have_no_errors(tmp_path):
    """uvicorn in a thread of this process (the bench starts it as its own process)."""
    app = create_app(tmp_path, start_worker=False)
    service = app.state.service
    service.accounts.create_user("carl", password="correct horse battery", created_by="operator:test")
    service.accounts.grant("carl", "compliance_officer", granted_by="operator:test")
    token = service.accounts.issue_token("carl", issued_by="operator:test").token
    fill_ledger(service, 500)
    with serve_in_thread(app) as url:
        report = audit_query_load(url, token, concurrency=50, total=100, deadline_s=60,
                                  params={"limit": 50, "partner": "telco-churn/p1"})
    print(report.line())
    assert report.errors == []
    assert report.ok == report.sent == 100
    assert report.p99 < 30_000
