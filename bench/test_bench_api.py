"""Load on the coordinator API: 200 concurrent audit-query requests on loopback against uvicorn.

Bounded in count (1,000 requests in all, 200 in flight at any time) and time (120 s). Reports
p50 / p99 latency; fails on any error. Run with `make bench`.
"""

from __future__ import annotations

import pytest

from fedpact.audit import EventType
from fedpact.service.api.app import CoordinatorService
from fedpact.service.api.loadgen import audit_query_load, serve_in_subprocess

pytestmark = pytest.mark.bench

CONCURRENCY = 200
TOTAL = 1000
LEDGER_EVENTS = 5000


def test_200_concurrent_audit_queries(tmp_path):
    service = CoordinatorService(tmp_path, start_worker=False)
    service.accounts.create_user("carl", password="correct horse battery", created_by="operator:bench")
    service.accounts.grant("carl", "compliance_officer", granted_by="operator:bench")
    token = service.accounts.issue_token("carl", issued_by="operator:bench").token
    batch = [(EventType.DATA_ACCESSED,
              {"node": f"telco-churn/p{i % 3}", "dataset": "telco-churn", "rows": 100 + i,
               "columns": ["tenure", "Contract"], "purpose": "churn_model_training", "round": i},
              f"node:telco-churn/p{i % 3}", f"job-bench{i % 11}") for i in range(LEDGER_EVENTS)]
    for start in range(0, LEDGER_EVENTS, 1000):
        service.ledger.append_many(batch[start:start + 1000])
    service.close()
    with serve_in_subprocess(tmp_path) as url:  # uvicorn in its own process; the load from this one
        audit_query_load(url, token, concurrency=20, total=40)  # warm-up (connections, caches)
        plain = audit_query_load(url, token, concurrency=CONCURRENCY, total=TOTAL, deadline_s=120,
                                 params={"limit": 50})
        filtered = audit_query_load(url, token, concurrency=CONCURRENCY, total=TOTAL, deadline_s=120,
                                    params={"limit": 50, "partner": "telco-churn/p1",
                                            "type": "data.accessed"})
    for name, report in (("latest 50 events", plain), ("partner + type filter", filtered)):
        print(f"\n{name}: {report.line()}")
        assert report.errors == [], report.errors[:5]
        assert report.ok == TOTAL
