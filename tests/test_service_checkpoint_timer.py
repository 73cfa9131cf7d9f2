"""The coordinator service signs the ledger's newest events on a timer, not only on the next append."""

from __future__ import annotations

import time
from pathlib import Path

from fedpact.audit import EventType
from fedpact.service.api.app import CoordinatorService


def test_running_service_signs_idle_events(tmp_path: Path) -> None:
    service = CoordinatorService(tmp_path, start_worker=False)
    try:
        service.ledger.checkpoint_interval_s = 3600  # appends alone would not sign for an hour
        service.ledger.checkpoint_every = 10_000
        service.checkpoint_timer_s = 0.05
        service.start()
        event = service.ledger.append(
            EventType.JOB_FAILED, {"reason": "node unreachable"}, actor="coordinator")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            latest = service.ledger.latest_checkpoint()
            if latest is not None and latest.tree_size >= event.seq:
                break
            time.sleep(0.02)
        latest = service.ledger.latest_checkpoint()
        assert latest is not None and latest.tree_size >= event.seq  # signed with no further append
        service.stop()
        assert service.ledger._timer is None
    finally:
        service.close()
