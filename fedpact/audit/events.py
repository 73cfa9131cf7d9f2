"""Event vocabulary of the audit ledger and the minimal payload each event must carry.

Compliance officers show these records to GDPR/PIPL regulators, so an event that lacks the facts
a regulator asks about (which node touched which dataset, for what purpose) is refused at write time.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class LedgerError(Exception):
    """Raised when the audit ledger cannot record, read or check an event; the message says why."""


class EventType(str, enum.Enum):  # noqa: UP042 - the documented (str, Enum) form
    """What happened in a federated job; the values are the stable strings stored in the ledger."""

    JOB_CREATED = "job.created"
    DATA_ACCESSED = "data.accessed"
    ROUND_AGGREGATED = "round.aggregated"
    JOB_FINISHED = "job.finished"
    JOB_FAILED = "job.failed"
    MODEL_DELIVERED = "model.delivered"
    # audience matching (privacy/matching)
    MATCH_COMPLETED = "match.completed"
    # privacy budgets per dataset (privacy/budget)
    BUDGET_SET = "privacy.budget_set"
    PRIVACY_SPENT = "privacy.spent"
    JOB_REFUSED = "job.refused"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: EventType | str) -> EventType:
        """Return the EventType named by `value` (member or its string), or raise LedgerError."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(member.value for member in cls)
            raise LedgerError(
                f"unknown ledger event type {value!r}; known types: {known}"
            ) from None


REQUIRED_FIELDS: dict[EventType, set[str]] = {
    EventType.JOB_CREATED: {"task", "partners", "purpose"},
    EventType.DATA_ACCESSED: {"node", "dataset", "rows", "columns", "purpose"},
    EventType.ROUND_AGGREGATED: {"round", "nodes"},
    EventType.JOB_FINISHED: {"metrics", "epsilon"},
    EventType.JOB_FAILED: set(),
    EventType.MODEL_DELIVERED: set(),
    EventType.MATCH_COMPLETED: {"mode", "parties", "datasets", "sizes", "overlap", "purpose"},
    EventType.BUDGET_SET: {"dataset", "epsilon_max", "delta"},
    EventType.PRIVACY_SPENT: {"dataset", "epsilon", "delta"},
    EventType.JOB_REFUSED: {"reason"},
}


def validate_payload(event_type: EventType | str, payload: Mapping[str, Any]) -> None:
    """Raise LedgerError unless `payload` is a mapping holding every field `event_type` requires."""
    kind = EventType.parse(event_type)
    if not isinstance(payload, Mapping):
        raise LedgerError(
            f"{kind.value} event payload must be a dict, not {type(payload).__name__}"
        )
    missing = sorted(REQUIRED_FIELDS.get(kind, set()) - set(payload.keys()))
    if missing:
        raise LedgerError(
            f"{kind.value} event is missing required payload field(s): {', '.join(missing)}"
        )
