"""Four-eyes approval for bulk exports of personal data, and the audit roles it relies on.

An export whose filter covers more than one subject is created as a pending request; it runs only
after a second person, holding the compliance-officer role ("dpo"), approves it. The request,
the approval (or rejection) and each download are ledger events; roles are ledger events too.

Roles (`admin`, `dpo`) are granted and revoked by `admin.role_granted` / `admin.role_revoked`
events, and count only when whoever granted them held `admin` at that point of the log: the first
admin is created by an explicit bootstrap grant, accepted only while no admin exists. The roles are
replayed from the chain on every check, so a grant appended by other means without that authority
counts for nothing. Identities here are names asserted by the caller (on the command line, whoever
runs it with access to the ledger files): this is an accountability control, every step signed
into the log under the name given, not authentication. The API service authenticates its callers
separately (`fedpact/service/api/auth.py`); its own roles (partner_admin, compliance_officer, …)
are recorded in the same events but are not audit roles.
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
ADMIN_ROLE = "admin"
AUDIT_ROLES = (ADMIN_ROLE, DPO_ROLE)
"""Roles the audit layer checks: `admin` grants and revokes roles, `dpo` approves exports."""


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


def _check_principal(name: str, label: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise LedgerError(f"{label} must name a person or system, got {name!r}")
    if name != name.strip() or len(name) > 128 or any(c.isspace() for c in name):
        raise LedgerError(f"{label} {name!r} must be 1-128 characters without spaces")
    return name


def _check_role(role: str) -> str:
    if role not in AUDIT_ROLES:
        raise LedgerError(f"role {role!r} is unknown: choose one of {', '.join(AUDIT_ROLES)}")
    return role


class ExportApprovals:
    """Create, approve and run personal-data exports under the four-eyes rule."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # --- roles --------------------------------------------------------------------------------

    def role_holders(self) -> dict[str, set[str]]:
        """Audit roles currently held, per principal, replayed from the chain with authority.

        A grant counts only if its granter held `admin` at that point (or it is the bootstrap
        grant of `admin` made while no admin existed); likewise a revocation.
        """
        held: dict[str, set[str]] = {}
        where = EventFilter(event_types=(EventType.ROLE_GRANTED.value, EventType.ROLE_REVOKED.value))
        for event in iter_events(self.ledger, where):
            payload = event.payload
            role, principal = payload.get("role"), payload.get("principal")
            if role not in AUDIT_ROLES or not isinstance(principal, str):
                continue  # another layer's role (the API's), not an audit role
            if event.event_type == EventType.ROLE_GRANTED.value:
                if payload.get("bootstrap") is True:
                    allowed = role == ADMIN_ROLE and not any(ADMIN_ROLE in r for r in held.values())
                else:
                    allowed = ADMIN_ROLE in held.get(payload.get("granted_by"), ())
                if allowed:
                    held.setdefault(principal, set()).add(role)
            elif ADMIN_ROLE in held.get(payload.get("revoked_by"), ()):
                held.get(principal, set()).discard(role)
        return {p: roles for p, roles in held.items() if roles}

    def roles(self, principal: str) -> set[str]:
        """Audit roles `principal` currently holds."""
        return set(self.role_holders().get(principal, ()))

    def admins(self) -> list[str]:
        return sorted(p for p, roles in self.role_holders().items() if ADMIN_ROLE in roles)

    def grant_role(
        self, principal: str, role: str, *, granted_by: str, bootstrap: bool = False
    ) -> None:
        """Grant an audit role; `granted_by` must hold `admin`.

        `bootstrap=True` creates the first admin (role `admin` only), accepted only while the
        ledger has no admin at all; the event records that it was a bootstrap.
        """
        _check_principal(principal, "principal")
        _check_principal(granted_by, "granted_by")
        _check_role(role)
        holders = self.role_holders()
        admins = sorted(p for p, roles in holders.items() if ADMIN_ROLE in roles)
        payload: dict[str, Any] = {"principal": principal, "role": role, "granted_by": granted_by}
        if bootstrap:
            if role != ADMIN_ROLE:
                raise LedgerError("--bootstrap creates the first admin only: grant role admin")
            if admins:
                raise LedgerError(
                    f"an admin already exists ({', '.join(admins)}): bootstrap works only while "
                    "there is none; ask an admin to grant roles"
                )
            payload["bootstrap"] = True
        else:
            if ADMIN_ROLE not in holders.get(granted_by, ()):
                hint = (" (no admin exists yet: create the first one with `fedpact audit role "
                        "grant NAME admin --by NAME --bootstrap`)" if not admins else "")
                raise LedgerError(
                    f"{granted_by} does not hold the {ADMIN_ROLE} role: only an admin may grant "
                    f"roles{hint}"
                )
            if role in holders.get(principal, ()):
                raise LedgerError(f"{principal} already holds the {role} role")
        self.ledger.append(EventType.ROLE_GRANTED, payload, actor=granted_by)

    def revoke_role(self, principal: str, role: str, *, revoked_by: str) -> None:
        """Revoke an audit role; `revoked_by` must hold `admin`, and the last admin stays."""
        _check_principal(principal, "principal")
        _check_principal(revoked_by, "revoked_by")
        _check_role(role)
        holders = self.role_holders()
        if ADMIN_ROLE not in holders.get(revoked_by, ()):
            raise LedgerError(
                f"{revoked_by} does not hold the {ADMIN_ROLE} role: only an admin may revoke roles"
            )
        if role not in holders.get(principal, ()):
            raise LedgerError(f"{principal} does not hold the {role} role")
        if role == ADMIN_ROLE and [p for p, r in holders.items() if ADMIN_ROLE in r] == [principal]:
            raise LedgerError(
                f"{principal} is the last admin: grant admin to someone else first"
            )
        self.ledger.append(EventType.ROLE_REVOKED,
                           {"principal": principal, "role": role, "revoked_by": revoked_by},
                           actor=revoked_by)

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
        """Approve a pending export: `approver` holds `dpo` and is not the requester."""
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
