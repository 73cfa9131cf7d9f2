"""Audience matching: how many customers two partners share, without showing anyone else.

One obvious call per concern:

- `normalize_ids(values, kind, default_region)` -> `NormalizedIds` (invalid ones counted by reason)
- `run_match(party, transport, config)` -> `MatchResult` (modes ``hash``, ``psi``,
  ``psi-cardinality``; the partner runs the same call at the other end of the transport)
- `build_overlap_report(result, min_count=10, epsilon=None)` -> `OverlapReport`
- `record_match(ledger, result, report)` -> the audit events of the job

Transports: `LocalTransport.pair()` in one process; `fedpact.federation.match_channel` over gRPC.
Threat model and measurements: docs/matching.md.
"""

from fedpact.privacy.matching.groups import (
    DEFAULT_GROUP,
    GROUPS,
    CommutativeGroup,
    MatchProtocolError,
    group_named,
)
from fedpact.privacy.matching.keyed_hash import KeyAgreement, hmac_tokens
from fedpact.privacy.matching.normalize import (
    REASONS,
    ConsentFilter,
    IdKind,
    InvalidIdentifier,
    NormalizedIds,
    normalize_ids,
    normalize_one,
)
from fedpact.privacy.matching.protocol import (
    MATCHING_PURPOSE,
    MatchConfig,
    MatchMode,
    MatchParty,
    MatchResult,
    run_match,
)
from fedpact.privacy.matching.report import (
    OverlapReport,
    SegmentCount,
    build_overlap_report,
    record_match,
)
from fedpact.privacy.matching.transport import (
    INITIATOR,
    RESPONDER,
    LocalTransport,
    TranscriptRecorder,
    Transport,
)

__all__ = [
    "DEFAULT_GROUP", "GROUPS", "INITIATOR", "MATCHING_PURPOSE", "REASONS", "RESPONDER",
    "CommutativeGroup", "ConsentFilter", "IdKind", "InvalidIdentifier", "KeyAgreement",
    "LocalTransport", "MatchConfig", "MatchMode", "MatchParty", "MatchProtocolError",
    "MatchResult", "NormalizedIds", "OverlapReport", "SegmentCount", "TranscriptRecorder",
    "Transport", "build_overlap_report", "group_named", "hmac_tokens", "normalize_ids",
    "normalize_one", "record_match", "run_match",
]
