"""Consent checks on a registry of 30,000 events (`allowed()`), decided from verified events.

`.venv/bin/python -m pytest -m bench -s bench/test_bench_audit_consent.py` prints, for one
`allowed()` call over every subject and over 1,000 of them: the first call of a `Ledger`
(the whole log verified), a repeated call, a call after one more event was appended, and the
first call of another `Ledger` on the same file in the same process; next to the derived
`consent_state` lookup alone (what the check cost before it was decided from the chain).
FEDPACT_BENCH_CONSENT_EVENTS changes the 30,000.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from fedpact.audit import EventType, Ledger
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.ledger import forget_consent_proofs
from fedpact.audit.store import consent_state

pytestmark = pytest.mark.bench

N = int(os.environ.get("FEDPACT_BENCH_CONSENT_EVENTS", "30000"))
PURPOSE = "churn_model"


@pytest.fixture(scope="module")
def registry_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("consent-bench") / "registry.db"
    ids = [f"C-{i:06d}" for i in range(N)]
    with Ledger.open(path) as ledger:
        registry = ConsentRegistry(ledger)
        for start in range(0, N, 5000):
            registry.grant_many(ids[start:start + 5000], PURPOSE, channel="web",
                                legal_basis="consent", notice_version="v1", source="crm")
        for subject in ids[::50]:
            registry.withdraw(subject, PURPOSE, channel="web", source="crm")
    return path


def _ms(fn, repeat: int = 5) -> str:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return f"median {statistics.median(times):.1f} ms (min {min(times):.1f})"


@pytest.mark.parametrize("count", [N, 1000], ids=["all-subjects", "1000-subjects"])
def test_allowed_on_a_30k_event_registry(registry_file: Path, count: int) -> None:
    ids = [f"C-{i:06d}" for i in range(0, N, max(1, N // count))][:count]
    with Ledger.open(registry_file) as ledger:
        events = ledger.count()
        registry = ConsentRegistry(ledger)
        pseudonyms = sorted(set(registry.subjects.pseudonyms(ids)))

        def index_only() -> None:
            with ledger.store.read() as connection:
                for start in range(0, len(pseudonyms), 500):
                    list(connection.execute(select(consent_state).where(
                        consent_state.c.subject.in_(pseudonyms[start:start + 500]))))

        naive = _ms(index_only)

        def first() -> None:
            forget_consent_proofs()
            registry.allowed(ids, PURPOSE)

        full = _ms(first)
        mask = registry.allowed(ids, PURPOSE)
        repeated = _ms(lambda: registry.allowed(ids, PURPOSE))

        def after_append() -> None:
            ledger.append(EventType.JOB_FAILED, {"reason": "bench"}, actor="bench")
            registry.allowed(ids, PURPOSE)

        appended = _ms(after_append)

    def other_ledger() -> None:  # a data loader opens one per job
        with Ledger.open(registry_file) as again:
            ConsentRegistry(again).allowed(ids, PURPOSE)

    fresh = _ms(other_ledger)
    print(f"\n| allowed() for {count} subjects, {events} events | {int(mask.sum())} allowed |\n"
          f"| consent_state lookup only (no chain) | {naive} |\n"
          f"| first call of a Ledger (whole log verified) | {full} |\n"
          f"| repeated call | {repeated} |\n"
          f"| after one more event | {appended} |\n"
          f"| first call of another Ledger, same process | {fresh} |", flush=True)
