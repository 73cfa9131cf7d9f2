"""Tamper-evident audit ledger: what happened to whose data, in a hash chain regulators can check."""

from fedpact.audit.chain import ChainVerification
from fedpact.audit.events import EventType, LedgerError
from fedpact.audit.ledger import Ledger, LedgerEvent

__all__ = ["ChainVerification", "EventType", "Ledger", "LedgerError", "LedgerEvent"]
