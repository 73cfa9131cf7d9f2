"""Four-eyes approval for bulk exports of personal data.

An export whose filter covers more than one subject is created as a pending request; it runs only
after a second person, holding the compliance-officer role ("dpo"), approves it. The request,
the approval (or rejection) and each download are ledger events; roles are ledger events too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from fedpact.audit.events import EventType, LedgerError
from fedpact.audit.ledger import Ledger
from fedpact.audit.query import EventFilter, iter_events, to_csv, to_json_lines
from fedpact.audit.subjects import SubjectKeys

DPO_ROLE = "dpo"


@dataclass(frozen=True)
class ExportRequest:
    request_id: str
    requested_by: str
    purpose: str
    filters: dict[str, Any]
    subjects: int
    status: str  # pending | approved | rejected
    approved_by: str | None
    downloads: int


class ExportApprovals:
    """Create, approve and run personal-data exports under the four-eyes rule."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # --- roles --------------------------------------------------------------------------------

    def grant_role(self, principal: str, role: str, *, granted_by: str) -> None:
        self.ledger.append(EventType.ROLE_GRANTED,
                           {"principal": principal, "role": role, "granted_by": granted_by},
                           actor=granted_by)

    def revoke_role(self, principal: str, role: str, *, revoked_by: str) -> None:
        self.ledger.append(EventType.ROLE_REVOKED,
                           {"principal": principal, "role": role, "revoked_by": revoked_by},
                           actor=revoked_by)

    def roles(self, principal: str) -> set[str]:
        """Roles currently held, replayed from the principal's role events."""
        held: set[str] = set()
        where = EventFilter(event_types=(EventType.ROLE_GRANTED.value, EventType.ROLE_REVOKED.value))
        for event in iter_events(self.ledger, where):
            if event.payload["principal"] != principal:
                continue
            if event.event_type == EventType.ROLE_GRANTED.value:
                held.add(event.payload["role"])
            else:
                held.discard(event.payload["role"])
        return held

    # --- requests -----------------------------------------------------------------------------

    def _stored_filter(self, where: EventFilter) -> dict[str, Any]:
        data = dataclasses.asdict(where)
        if where.subject is not None:  # never store the raw id in the request
            data["subject"] = SubjectKeys.of(self.ledger).pseudonym(where.subject)
        data["event_types"] = list(where.event_types)
        return {k: v for k, v in data.items() if v not in (None, [], ())}

    def request(self, where: EventFilter, *, requested_by: str, purpose: str) -> ExportRequest:
        """Log an export request; one covering more than one subject waits for a DPO's approval."""
        stored = self._stored_filter(where)
        subjects = {e.payload["subject"] for e in iter_events(self.ledger, where)
                    if isinstance(e.payload.get("subject"), str)}
        request_id = f"export-{uuid.uuid4().hex[:12]}"
        self.ledger.append(
            EventType.EXPORT_REQUESTED,
            {"request_id": request_id, "requested_by": requested_by, "purpose": purpose,
             "filters": stored, "subjects": len(subjects)},
            actor=requested_by,
        )
        return self.status(request_id)

    def status(self, request_id: str) -> ExportRequest:
        events = list(iter_events(self.ledger, EventFilter(request_id=request_id)))
        requested = next((e for e in events if e.event_type == EventType.EXPORT_REQUESTED.value), None)
        if requested is None:
            raise LedgerError(f"no export request {request_id!r}")
        p = requested.payload
        status, approver = ("approved", "not required: one subject") if p["subjects"] <= 1 else ("pending", None)
        downloads = 0
        for event in events:
            if event.event_type == EventType.EXPORT_APPROVED.value:
                status, approver = "approved", event.payload["approved_by"]
            elif event.event_type == EventType.EXPORT_REJECTED.value:
                status, approver = "rejected", None
            elif event.event_type == EventType.EXPORT_DOWNLOADED.value:
                downloads += 1
        return ExportRequest(request_id, p["requested_by"], p["purpose"], p["filters"],
                             p["subjects"], status, approver, downloads)

    def approve(self, request_id: str, *, approver: str) -> ExportRequest:
        request = self.status(request_id)
        if request.status != "pending":
            raise LedgerError(f"export {request_id} is {request.status}, not pending approval")
        if approver == request.requested_by:
            raise LedgerError(
                f"export {request_id}: {approver} requested it and cannot also approve it "
                "(four-eyes rule: a second person must)"
            )
        if DPO_ROLE not in self.roles(approver):
            raise LedgerError(f"export {request_id}: {approver} does not hold the {DPO_ROLE} role")
        self.ledger.append(EventType.EXPORT_APPROVED,
                           {"request_id": request_id, "approved_by": approver, "role": DPO_ROLE},
                           actor=approver)
        return self.status(request_id)

    def reject(self, request_id: str, *, approver: str, reason: str) -> ExportRequest:
        request = self.status(request_id)
        if request.status != "pending":
            raise LedgerError(f"export {request_id} is {request.status}, not pending approval")
        if DPO_ROLE not in self.roles(approver):
            raise LedgerError(f"export {request_id}: {approver} does not hold the {DPO_ROLE} role")
        self.ledger.append(EventType.EXPORT_REJECTED,
                           {"request_id": request_id, "rejected_by": approver, "reason": reason},
                           actor=approver)
        return self.status(request_id)

    def download(self, request_id: str, *, downloaded_by: str, fmt: str = "csv") -> str:
        """Run an approved export and return its content; the download itself is logged."""
        request = self.status(request_id)
        if request.status != "approved":
            raise LedgerError(
                f"export {request_id} is {request.status}: it covers {request.subjects} subjects "
                f"and needs approval by a second person with the {DPO_ROLE} role first"
            )
        if downloaded_by != request.requested_by:
            raise LedgerError(f"export {request_id} may be downloaded only by {request.requested_by}")
        filters = dict(request.filters)
        filters["event_types"] = tuple(filters.get("event_types", ()))
        events = list(iter_events(self.ledger, EventFilter(**filters)))
        if fmt == "csv":
            content = to_csv(events)
        elif fmt == "json":
            content = to_json_lines(events)
        else:
            raise LedgerError(f"export format {fmt!r} is not csv or json")
        self.ledger.append(
            EventType.EXPORT_DOWNLOADED,
            {"request_id": request_id, "downloaded_by": downloaded_by, "rows": len(events),
             "sha256": hashlib.sha256(content.encode()).hexdigest()},
            actor=downloaded_by,
        )
        return content
