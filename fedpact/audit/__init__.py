"""Tamper-evident audit ledger: what happened to whose data, in a hash chain regulators can check.

Core: `Ledger` (append, query, checkpoint, prove, verify). Pure proof code a third party can run:
`merkle`, `checkpoint`, `verifier`. Personal data: `consent.ConsentRegistry`, `dsar.SubjectRequests`,
`subjects.SubjectKeys`. Compliance: `query`, `records`, `exports`, `retention`.
"""

from fedpact.audit.chain import ChainVerification
from fedpact.audit.events import EventType, LedgerError
from fedpact.audit.ledger import Ledger, LedgerEvent

__all__ = ["ChainVerification", "EventType", "Ledger", "LedgerError", "LedgerEvent"]
