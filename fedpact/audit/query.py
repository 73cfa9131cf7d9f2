"""Queries for compliance officers: by subject, partner, dataset, purpose, channel, type, time.

Filters combine with AND; results come in seq order, a page at a time (keyset pagination on seq,
so a page costs the same at event 10 and event 10 million). Subject filters take a raw id (it is
pseudonymised here, never stored) or a pseudonym. Pages export as CSV or JSON lines.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, select

from fedpact.audit.events import EventType, LedgerError, parse_timestamp
from fedpact.audit.ledger import Ledger, LedgerEvent, utc_iso
from fedpact.audit.store import event_index, ledger_events

MAX_PAGE = 10_000


@dataclass(frozen=True)
class EventFilter:
    """What to select; every field left None matches everything."""

    subject: str | None = None
    partner: str | None = None
    dataset: str | None = None
    purpose: str | None = None
    channel: str | None = None
    event_types: Sequence[str] = field(default_factory=tuple)
    job_id: str | None = None
    since: str | None = None
    until: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Page:
    events: list[LedgerEvent]
    next_after_seq: int | None
    """Pass as `after_seq` for the next page; None when this was the last page."""


def _time_bound(value: str | None, label: str) -> str | None:
    if value is None:
        return None
    parse_timestamp(value, label)
    return utc_iso(value)


def query_events(
    ledger: Ledger, where: EventFilter, *, after_seq: int = 0, limit: int = 100
) -> Page:
    """One page of events matching `where`, after `after_seq`."""
    if not 1 <= limit <= MAX_PAGE:
        raise LedgerError(f"page size must be between 1 and {MAX_PAGE}, got {limit}")
    index_filters = [
        (kind, value)
        for kind, value in (("partner", where.partner), ("dataset", where.dataset),
                            ("purpose", where.purpose), ("channel", where.channel),
                            ("request", where.request_id))
        if value is not None
    ]
    if where.subject is not None:
        from fedpact.audit.subjects import SubjectKeys

        index_filters.insert(0, ("subject", SubjectKeys.of(ledger).pseudonym(where.subject)))
    query = select(ledger_events)
    for n, (kind, value) in enumerate(index_filters):
        alias = event_index.alias(f"i{n}")
        query = query.join(
            alias,
            and_(alias.c.seq == ledger_events.c.seq, alias.c.kind == kind, alias.c.value == value),
        )
    if where.event_types:
        kinds = [EventType.parse(t).value for t in where.event_types]
        query = query.where(ledger_events.c.event_type.in_(kinds))
    if where.job_id is not None:
        query = query.where(ledger_events.c.job_id == where.job_id)
    since = _time_bound(where.since, "since")
    until = _time_bound(where.until, "until")
    if since is not None:
        query = query.where(ledger_events.c.timestamp >= since)
    if until is not None:
        query = query.where(ledger_events.c.timestamp < until)
    query = query.where(ledger_events.c.seq > after_seq).order_by(ledger_events.c.seq)
    events = ledger.select_events(query.limit(limit + 1))
    more = len(events) > limit
    events = events[:limit]
    return Page(events, events[-1].seq if more else None)


def iter_events(ledger: Ledger, where: EventFilter, *, page_size: int = 1000) -> Iterator[LedgerEvent]:
    """Every matching event, fetched page by page."""
    after = 0
    while True:
        page = query_events(ledger, where, after_seq=after, limit=page_size)
        yield from page.events
        if page.next_after_seq is None:
            return
        after = page.next_after_seq


EXPORT_COLUMNS = ["seq", "event_id", "timestamp", "event_type", "actor", "job_id", "subject",
                  "partner", "dataset", "purpose", "channel", "payload", "hash"]


def _flat(event: LedgerEvent) -> dict[str, Any]:
    p = event.payload
    partner = p.get("node") or (event.actor[5:] if event.actor.startswith("node:") else "")
    return {
        "seq": event.seq, "event_id": event.event_id, "timestamp": event.timestamp,
        "event_type": event.event_type, "actor": event.actor, "job_id": event.job_id or "",
        "subject": p.get("subject", ""), "partner": partner, "dataset": p.get("dataset", ""),
        "purpose": p.get("purpose", ""), "channel": p.get("channel", ""),
        "payload": json.dumps({k: v for k, v in p.items() if k != "personal"},
                              ensure_ascii=False, sort_keys=True),
        "hash": event.hash,
    }


def to_csv(events: Sequence[LedgerEvent]) -> str:
    """CSV with one row per event (personal envelopes left out: they are ciphertext)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()
    for event in events:
        writer.writerow(_flat(event))
    return buffer.getvalue()


def to_json_lines(events: Sequence[LedgerEvent]) -> str:
    return "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in events)
