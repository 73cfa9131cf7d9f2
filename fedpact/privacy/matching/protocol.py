"""One audience-match job between two partners: salted-hash matching or ECDH private set intersection.

`run_match(party, transport, config)` runs this party's side; the partner runs the same call at
the other end of the transport. Modes:

- ``hash``: per-job HMAC-SHA256 key from an X25519 agreement; the initiator sends its keyed
  hashes (shuffled), the responder joins them with its own and returns the count. Fast, but the
  responder holds the key and can test guesses of low-entropy identifiers (see docs/matching.md).
- ``psi``: ECDH-PSI. Each side sends k·H(x) of its identifiers (shuffled) and returns the
  partner's values raised to its own key; values that agree after both keys are the overlap.
  With both sides' consent (``reveal_matches``) each side learns which of its own rows match.
- ``psi-cardinality``: the same, but the returned values are shuffled again, so neither side
  learns which rows match, only how many (and, with segments, how many per own segment).

Every set of values a side sends is in an order drawn from the OS CSPRNG (and what it returns,
without matched rows, is shuffled again), so that nothing it joins can be grouped by the
partner's segments. With segments (and no matched
rows), a side that counts per own segment sends its values twice, under two independent
scalars: once in one uniformly random order (``encrypted``: the partner joins against these, so
they carry no grouping) and once grouped by its own segments (``encrypted-grouped``: returned
under the partner's key, shuffled within each group). It joins what comes back against the
partner's ungrouped values, so it learns exactly the overlap of each of its own groups and
nothing about the partner's: no per-partner-segment overlap, no own × partner cross-tabulation
(the two encodings of one identifier cannot be linked without the scalars, by DDH). Both sides
refuse groups (their own, before sending; the partner's, after the hello) smaller than k
(`min_segment_size`) or more of them than `max_segments`; the stricter values of the two hellos
apply.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpact.errors import ConfigurationError, parse_choice
from fedpact.privacy.matching.groups import (
    DEFAULT_GROUP,
    ELEMENT_BYTES,
    GROUPS,
    MatchProtocolError,
    group_named,
)
from fedpact.privacy.matching.keyed_hash import TOKEN_BYTES, KeyAgreement, KeyShare
from fedpact.privacy.matching.normalize import NormalizedIds, enumeration_risk
from fedpact.privacy.matching.transport import INITIATOR, RESPONDER, Transport

PROTOCOL = "fedpact-match/4"
"""4: PSI values travel in a uniformly random order; with segments, a second encoding under a
second scalar travels grouped (``encrypted-grouped``), so no value a side joins is grouped by the
partner's segments. 3: the hello carries the segment policy (k, at most how many segments) both
sides enforce. 2: x25519 hashes with RFC 9380 Elligator 2 (1 used try-and-increment). Not interoperable."""
MATCHING_PURPOSE = "audience_matching"
MISSING_SEGMENT = "(missing)"
DEFAULT_MIN_SEGMENT_SIZE = 10
"""k: the fewest distinct identifiers a segment group sent in PSI may hold (the report's k)."""
DEFAULT_MAX_SEGMENTS = 64
"""The most segment groups one side may send in PSI."""


class MatchMode(str, enum.Enum):  # noqa: UP042 - the documented (str, Enum) form
    HASH = "hash"
    PSI = "psi"
    PSI_CARDINALITY = "psi-cardinality"

    @classmethod
    def parse(cls, value: MatchMode | str) -> MatchMode:
        return parse_choice(cls, value, "match mode")


@dataclass(frozen=True)
class MatchConfig:
    """What this node asks for; both nodes must agree on mode, group and purpose."""

    mode: MatchMode | str = MatchMode.PSI_CARDINALITY
    group: str = DEFAULT_GROUP
    reveal_matches: bool = False
    """Opt in to learning which own rows matched (as job-scoped tokens); needs both sides."""
    purpose: str = MATCHING_PURPOSE
    workers: int = 2
    max_peer_ids: int = 50_000_000
    """Refuse a partner set larger than this (bounds what a partner can probe for)."""
    report_epsilon: float | None = None
    """ε of the noisy overlap report this node will publish (told to the partner for its ledger)."""
    timeout_s: float = 3600.0
    min_segment_size: int = DEFAULT_MIN_SEGMENT_SIZE
    """k (``--min-count``): in PSI every segment group either side sends must hold at least this
    many distinct identifiers, or the job is refused; the stricter k of the two sides applies."""
    max_segments: int = DEFAULT_MAX_SEGMENTS
    """At most this many segment groups per side (``--max-segments``); the smaller of the two
    sides' values applies."""
    accept_enumeration_risk: bool = False
    """``hash`` mode with low-entropy identifiers (phone numbers, short numeric ids; see
    `normalize.enumeration_risk`) is refused unless this is set (``--accept-enumeration-risk``):
    the partner holds the job key and can hash every candidate. The result then states the
    residual risk (`MatchResult.enumeration_risk`)."""

    def __post_init__(self) -> None:
        mode = MatchMode.parse(self.mode)
        object.__setattr__(self, "mode", mode)
        if self.group not in GROUPS:
            raise ConfigurationError(
                f"group {self.group!r} is not supported; use one of: {', '.join(GROUPS)}")
        if mode is MatchMode.PSI_CARDINALITY and self.reveal_matches:
            raise ConfigurationError(
                "reveal_matches (--matched-out) cannot be used with mode psi-cardinality, which "
                "never reveals which rows match; use --mode psi on both nodes")
        if self.workers < 1:
            raise ConfigurationError(f"workers must be at least 1, not {self.workers}")
        if self.max_peer_ids < 1:
            raise ConfigurationError(f"max_peer_ids must be positive, not {self.max_peer_ids}")
        if self.report_epsilon is not None and not (
                math.isfinite(self.report_epsilon) and self.report_epsilon > 0):
            raise ConfigurationError(
                f"report_epsilon must be a positive number, not {self.report_epsilon}")
        if not self.purpose:
            raise ConfigurationError("purpose must name why the match is run")
        if not (isinstance(self.min_segment_size, int) and self.min_segment_size >= 1):
            raise ConfigurationError(
                f"min_segment_size (--min-count, k) must be at least 1, not {self.min_segment_size}")
        if not (isinstance(self.max_segments, int) and self.max_segments >= 1):
            raise ConfigurationError(
                f"max_segments (--max-segments) must be at least 1, not {self.max_segments}")


@dataclass
class MatchParty:
    """This node's side of a match: who it is, which dataset, its normalised identifiers."""

    name: str
    dataset: str
    ids: NormalizedIds
    segments: Sequence[Any] | None = None
    """Optional segment label per input row (e.g. label value, age band, channel)."""

    def __post_init__(self) -> None:
        if not self.name or not self.dataset:
            raise ConfigurationError("a match party needs a non-empty name and dataset")
        if self.segments is not None and len(self.segments) != self.ids.total:
            raise ConfigurationError(
                f"segments has {len(self.segments)} labels but dataset {self.dataset!r} has "
                f"{self.ids.total} rows; give one label per row")


@dataclass
class MatchResult:
    """What one side learned. Identifiers never appear here: only counts, rows and tokens."""

    job_id: str
    mode: MatchMode
    group: str | None
    role: str
    purpose: str
    party: str
    dataset: str
    peer_party: str
    peer_dataset: str
    own_size: int
    """Distinct normalised identifiers this side brought."""
    peer_size: int
    overlap: int
    own_normalization: dict
    peer_normalization: dict
    matched_rows: np.ndarray | None = None
    """Input row indices whose identifier matched (only when both sides opted in)."""
    tokens: list[str] | None = None
    """Job-scoped pseudonym of each matched row (same value on both sides for the same person)."""
    segment_sizes: dict[str, int] | None = None
    segment_overlap: dict[str, int] | None = None
    own_report_epsilon: float | None = None
    peer_report_epsilon: float | None = None
    enumeration_risk: str | None = None
    """The residual risk accepted for a ``hash`` job on low-entropy identifiers (else None)."""
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def revealed(self) -> bool:
        return self.matched_rows is not None

    def summary(self) -> dict:
        """JSON-safe facts for the audit ledger and reports (no identifiers, no tokens)."""
        facts = {
            "job_id": self.job_id, "mode": self.mode.value, "group": self.group,
            "role": self.role, "purpose": self.purpose,
            "parties": [self.party, self.peer_party],
            "datasets": [self.dataset, self.peer_dataset],
            "sizes": {self.dataset: self.own_size, self.peer_dataset: self.peer_size},
            "overlap": self.overlap, "rows_revealed": self.revealed,
            "normalization": {self.dataset: self.own_normalization,
                              self.peer_dataset: self.peer_normalization},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
        }
        if self.enumeration_risk is not None:
            facts["enumeration_risk"] = {"accepted": True, "statement": self.enumeration_risk}
        return facts


# --------------------------------------------------------------------------- helpers


class _Wire:
    """Counts bytes on the transport and encodes the small JSON control messages."""

    def __init__(self, transport: Transport, timeout: float):
        self.t, self.timeout = transport, timeout
        self.sent = self.received = 0

    def send(self, kind: str, payload: bytes | bytearray) -> None:
        self.sent += len(payload)
        self.t.send(kind, bytes(payload))

    def recv(self, kind: str) -> bytes:
        payload = self.t.recv(kind, self.timeout)
        self.received += len(payload)
        return payload

    def send_json(self, kind: str, obj: dict) -> bytes:
        data = json.dumps(obj, sort_keys=True, allow_nan=False).encode()
        self.send(kind, data)
        return data

    def recv_json(self, kind: str) -> tuple[dict, bytes]:
        data = self.recv(kind)
        try:
            obj = json.loads(data)
        except ValueError:
            raise MatchProtocolError(f"partner's {kind!r} message is not valid JSON") from None
        if not isinstance(obj, dict):
            raise MatchProtocolError(f"partner's {kind!r} message is not a JSON object")
        return obj, data


def _secure_rng() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG (for shuffles and noise, never reproducible)."""
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(256)))


def _records(buf: bytes | bytearray, width: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8).reshape(-1, width)


def join_records(own: bytes | bytearray, peer: bytes | bytearray, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j) with own[i] == peer[j] for width-byte records; own must hold no repeats."""
    a, b = _records(own, width), _records(peer, width)
    if len(a) == 0 or len(b) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    ka = np.ascontiguousarray(a[:, :8]).view("<u8").ravel()
    kb = np.ascontiguousarray(b[:, :8]).view("<u8").ravel()
    order = np.argsort(ka, kind="stable")
    sa = ka[order]
    if len(sa) > 1 and bool((sa[1:] == sa[:-1]).any()):
        return _join_slow(a, b)  # two own records share 64 bits (about 1 in 10**7 jobs at 1M)
    pos = np.searchsorted(sa, kb)
    pos[pos == len(sa)] = 0
    hit = sa[pos] == kb
    ia, ib = order[pos[hit]], np.nonzero(hit)[0]
    full = (a[ia] == b[ib]).all(axis=1)
    return ia[full].astype(np.int64), ib[full].astype(np.int64)


def _join_slow(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = {row.tobytes(): i for i, row in enumerate(a)}
    pairs = [(index[row.tobytes()], j) for j, row in enumerate(b) if row.tobytes() in index]
    if not pairs:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    arr = np.asarray(pairs, dtype=np.int64)
    return arr[:, 0], arr[:, 1]


class _Prepared:
    """A party's distinct identifiers, their segment codes, and (on demand) row -> identifier."""

    def __init__(self, party: MatchParty):
        self.ids = party.ids
        self.unique = party.ids.unique()
        self._inverse: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.segment_names: list[str] | None = None
        if party.segments is not None:
            inverse = self.inverse
            first = np.full(len(self.unique), -1, dtype=np.int64)
            first[inverse[::-1]] = np.arange(len(inverse), dtype=np.int64)[::-1]
            rows = party.ids.rows[first]
            names = [_segment_name(party.segments[int(r)]) for r in rows]
            self.segment_names = sorted(set(names))
            code = {name: i for i, name in enumerate(self.segment_names)}
            self.labels = np.fromiter((code[n] for n in names), dtype=np.int64,
                                      count=len(names))

    @property
    def inverse(self) -> np.ndarray:
        if self._inverse is None:
            self._inverse = self.ids.inverse(self.unique)
        return self._inverse


def _segment_name(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_SEGMENT
    return str(value)


def _random_keys(n: int) -> np.ndarray:
    """n distinct 64-bit sort keys from the OS CSPRNG (redrawn in the rare case of a tie, so that
    sorting by them gives an exactly uniform permutation)."""
    while True:
        keys = np.frombuffer(secrets.token_bytes(8 * n), dtype="<u8")
        ordered = np.sort(keys)
        if n < 2 or not bool((ordered[1:] == ordered[:-1]).any()):
            return keys


def _uniform_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation of range(n), drawn from the OS CSPRNG."""
    return np.argsort(_random_keys(n), kind="stable")


def _grouped_permutation(labels: np.ndarray) -> np.ndarray:
    """A random order of the items grouped by label (code order), uniformly random within each."""
    return np.lexsort((_random_keys(len(labels)), labels))


def _shuffle_blocks(records: np.ndarray, sizes: Sequence[int]) -> bytes:
    """The records shuffled within consecutive blocks of `sizes` (one block: a full shuffle)."""
    if len(sizes) <= 1:
        return records[_uniform_permutation(len(records))].tobytes()
    blocks = np.repeat(np.arange(len(sizes)), sizes)
    return records[np.lexsort((_random_keys(len(records)), blocks))].tobytes()


def _check_sizes(sizes: Any, total: int, who: str) -> list[int]:
    if (not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes)
            or sum(sizes) != total):
        raise MatchProtocolError(f"{who}'s segment sizes do not add up to its {total} identifiers")
    return sizes


def _check_own_segments(group_sizes: Sequence[int], k: int, most: int, *, agreed: bool) -> None:
    """Refuse, before this side's values travel, segment groups the partner's policy forbids.

    In PSI this side's values travel grouped by its segments and come back shuffled only within
    each group, so this side learns the overlap of each group: a group of one identifier would
    tell it whether that identifier matched. The message names no segment (it goes to the
    partner as the reason of the abort).
    """
    if len(group_sizes) <= 1:
        return
    why = " agreed with the partner" if agreed else ""
    if len(group_sizes) > most:
        raise ConfigurationError(
            f"--segment-column gives {len(group_sizes)} segments, more than max_segments={most}"
            f"{why} (--max-segments); in PSI the count per segment is learned exactly, so use a "
            "column with fewer distinct values")
    smallest = min(group_sizes)
    if smallest < k:
        raise ConfigurationError(
            f"--segment-column gives a segment of {smallest} distinct identifiers, fewer than "
            f"k={k}{why} (--min-count); in PSI this node would learn which of the rows of such "
            "a segment match, so use a coarser column (e.g. bands) or none")


def check_segments(party: MatchParty, config: MatchConfig) -> None:
    """Refuse now what `run_match` would refuse before sending: in PSI, a set or a segment of
    fewer than `config.min_segment_size` distinct identifiers, or more segments than
    `config.max_segments`.
    (The partner's stricter policy, known only after the hello, is checked there.)"""
    mode = MatchMode.parse(config.mode)
    if mode is MatchMode.HASH:
        return
    prep = _Prepared(party)
    _check_set_size(len(prep.unique), config.min_segment_size, "this node")
    if party.segments is None:
        return
    if prep.labels is None or len(prep.unique) == 0:
        return
    sizes = np.bincount(prep.labels).tolist()
    _check_own_segments(sizes, config.min_segment_size, config.max_segments, agreed=False)


def _reason_for_partner(exc: BaseException) -> str:
    """Why this node stopped, as told to the partner: budget figures stay on this node."""
    from fedpact.privacy.budget import BudgetError

    if isinstance(exc, BudgetError):
        return ("BudgetError: the partner's privacy budget for its dataset cannot pay for the "
                "overlap reports of this job (lower --epsilon on either side)")
    return f"{type(exc).__name__}: {exc}"


def _check_enumeration(party: MatchParty, mode: MatchMode, role: str, config: MatchConfig
                       ) -> str | None:
    """Refuse ``hash`` mode on low-entropy identifiers unless the risk is accepted; return the
    residual-risk statement of an accepted job (None: no such risk)."""
    if mode is not MatchMode.HASH:
        return None
    why = enumeration_risk(party.ids.kind, party.ids.values)
    if why is None:
        return None
    if not config.accept_enumeration_risk:
        raise ConfigurationError(enumeration_refusal(why))
    if role == INITIATOR:
        exposed = ("the partner holds the job key and can recover every identifier this node "
                   "sent, matched or not, by hashing all candidates")
    else:
        exposed = ("this node holds the job key and the partner's keyed hashes, from which "
                   "every identifier the partner sent could be recovered, matched or not")
    return (f"residual risk accepted (--accept-enumeration-risk): {why}; {exposed}; "
            "use --mode psi to avoid it")


def enumeration_refusal(why: str) -> str:
    """The one-line refusal of ``hash`` mode on low-entropy identifiers (`why`)."""
    return (f"--mode hash refused: {why}, and the partner holds the job key, so it can recover "
            "them all by hashing every candidate; use --mode psi, or --accept-enumeration-risk")


def _check_set_size(n: int, k: int, whose: str) -> None:
    """In PSI a set of fewer than k identifiers is a segment of its own: its overlap count
    would tell the other side whether those few people are among its customers."""
    if 0 < n < k:
        raise ConfigurationError(
            f"{whose} offers {n} distinct identifiers, fewer than k={k} (--min-count); refused: "
            "the overlap of so small a set would show which of those identifiers match")


def _check_peer_segments(peer_groups: Sequence[int], k: int, most: int) -> None:
    """Refuse a partner whose segment groups would show it which of its identifiers match."""
    if len(peer_groups) <= 1:
        return
    if len(peer_groups) > most:
        raise ConfigurationError(
            f"the partner sent {len(peer_groups)} segment groups, more than max_segments={most} "
            "(--max-segments); refused: per-segment counts over that many groups could show "
            "it which of its identifiers match")
    smallest = min(peer_groups)
    if smallest < k:
        raise ConfigurationError(
            f"the partner sent a segment group of {smallest} identifiers, fewer than k={k} "
            "(--min-count); refused: it would learn which of its identifiers match")


def _peer_policy(peer: dict) -> tuple[int, int]:
    policy = peer.get("segment_policy")
    if not isinstance(policy, dict):
        raise MatchProtocolError("partner's hello lacks its segment policy")
    k, most = policy.get("min_size"), policy.get("max_segments")
    if not (isinstance(k, int) and k >= 1 and isinstance(most, int) and most >= 1):
        raise MatchProtocolError("partner's segment policy is not two positive integers")
    return k, most


def _job_id(initiator_nonce: bytes, responder_nonce: bytes) -> str:
    digest = hashlib.sha256(b"fedpact/match/job-id/v1" + initiator_nonce + responder_nonce)
    return "match-" + digest.hexdigest()[:20]


# --------------------------------------------------------------------------- the job


BudgetCheck = Callable[[float], None]
"""Called with the ε this job will charge to this node's dataset (its own report's ε plus the ε
of the report the partner announced); raises to refuse the job."""


def run_match(party: MatchParty, transport: Transport, config: MatchConfig, *,
              budget_check: BudgetCheck | None = None) -> MatchResult:
    """Run this node's side of one match job over `transport`; the partner runs the same call.

    `budget_check`, if given, runs right after the handshake, before any value derived from an
    identifier is sent, with the total ε the job will charge to this node's dataset; an error it
    raises stops both sides (see `report.budget_check`).
    """
    if transport.role not in (INITIATOR, RESPONDER):
        raise ConfigurationError(f"transport role must be {INITIATOR} or {RESPONDER}")
    wire = _Wire(transport, config.timeout_s)
    try:
        return _run(party, wire, transport.role, config, budget_check)
    except BaseException as exc:
        # Tell the partner why, so it does not wait for a message that never comes.
        with contextlib.suppress(Exception):  # the channel itself may be gone
            transport.send("abort", _reason_for_partner(exc).encode("utf-8", "replace")[:500])
        raise


def _run(party: MatchParty, wire: _Wire, role: str, config: MatchConfig,
         budget_check: BudgetCheck | None) -> MatchResult:
    mode = config.mode
    assert isinstance(mode, MatchMode)
    initiator = role == INITIATOR
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    prep = _Prepared(party)
    seconds["prepare"] = time.perf_counter() - t0
    # PSI with segments: the hello announces the size of each own segment group (k and the
    # group limit are enforced on them); the values themselves never travel grouped except in
    # this side's second encoding, which only comes back to this side (see _psi_side).
    segmented_groups = mode is not MatchMode.HASH and prep.labels is not None
    n_own = len(prep.unique)
    group_sizes = ([int(c) for c in np.bincount(prep.labels)] if segmented_groups and n_own
                   else [n_own])
    risk = _check_enumeration(party, mode, role, config)  # before anything is sent
    if mode is not MatchMode.HASH:
        _check_set_size(n_own, config.min_segment_size, "this node")
    if segmented_groups:
        _check_own_segments(group_sizes, config.min_segment_size, config.max_segments,
                            agreed=False)
    agreement = KeyAgreement() if mode is MatchMode.HASH else None
    nonce = secrets.token_bytes(32)
    hello = {
        "protocol": PROTOCOL, "mode": mode.value, "purpose": config.purpose,
        "group": config.group if mode is not MatchMode.HASH else None,
        "party": party.name, "dataset": party.dataset,
        "reveal_matches": bool(config.reveal_matches),
        "unique_ids": len(prep.unique), "normalization": party.ids.summary(),
        "group_sizes": group_sizes, "report_epsilon": config.report_epsilon,
        "segment_policy": {"min_size": config.min_segment_size,
                           "max_segments": config.max_segments},
        "nonce": nonce.hex(),
    }
    if agreement is not None:
        hello["key_share"] = {"public_key": agreement.share.public_key.hex(),
                              "nonce": agreement.share.nonce.hex()}
    my_hello = wire.send_json("hello", hello)
    peer, peer_hello = wire.recv_json("hello")
    _check_hello(hello, peer, config)
    peer_n = int(peer["unique_ids"])
    peer_groups = _check_sizes(peer.get("group_sizes"), peer_n, "the partner")
    # Segment policy: the stricter of the two sides' k and group limits binds both.
    peer_k, peer_most = _peer_policy(peer)
    k, most = max(config.min_segment_size, peer_k), min(config.max_segments, peer_most)
    if mode is not MatchMode.HASH:
        _check_set_size(peer_n, k, "the partner")
        _check_set_size(len(prep.unique), k, "this node")
        _check_peer_segments(peer_groups, k, most)
        if segmented_groups:
            _check_own_segments(group_sizes, k, most, agreed=True)
    if budget_check is not None:
        charge = (config.report_epsilon or 0.0) + float(peer.get("report_epsilon") or 0.0)
        if charge > 0:
            budget_check(charge)
    job_id = (_job_id(nonce, bytes.fromhex(peer["nonce"])) if initiator
              else _job_id(bytes.fromhex(peer["nonce"]), nonce))
    transcript = hashlib.sha256((my_hello + peer_hello) if initiator
                                else (peer_hello + my_hello)).digest()
    reveal = bool(config.reveal_matches and peer["reveal_matches"]) and mode is not (
        MatchMode.PSI_CARDINALITY)
    seconds["handshake"] = time.perf_counter() - t0 - seconds["prepare"]

    if mode is MatchMode.HASH:
        assert agreement is not None
        matched_unique, tokens_unique, group_overlap = _hash_side(
            prep, wire, agreement, peer, peer_n, initiator, reveal,
            _uniform_permutation(n_own), job_id, transcript, seconds)
    else:
        matched_unique, tokens_unique, group_overlap = _psi_side(
            prep, wire, config, peer_n, peer_groups, reveal, group_sizes, job_id, seconds)

    overlap = int(matched_unique.sum()) if matched_unique is not None else int(sum(group_overlap))
    # Both sides confirm the count (and catch a protocol bug or a partner that lies by mistake).
    wire.send_json("done", {"overlap": overlap})
    peer_done, _ = wire.recv_json("done")
    if peer_done.get("overlap") != overlap:
        raise MatchProtocolError(
            f"the partner counted {peer_done.get('overlap')} shared identifiers, this side "
            f"{overlap}: the match job is inconsistent and its result is discarded")

    result = MatchResult(
        job_id=job_id, mode=mode, group=config.group if mode is not MatchMode.HASH else None,
        role=role, purpose=config.purpose, party=party.name, dataset=party.dataset,
        peer_party=str(peer["party"]), peer_dataset=str(peer["dataset"]),
        own_size=len(prep.unique), peer_size=peer_n, overlap=overlap,
        own_normalization=party.ids.summary(), peer_normalization=_counts_only(peer),
        own_report_epsilon=config.report_epsilon,
        peer_report_epsilon=peer.get("report_epsilon"), enumeration_risk=risk,
        seconds=seconds, bytes_sent=wire.sent, bytes_received=wire.received,
    )
    if prep.labels is not None and prep.segment_names is not None:
        result.segment_sizes = {name: int(c) for name, c in zip(
            prep.segment_names, np.bincount(prep.labels, minlength=len(prep.segment_names)),
            strict=True)}
        if matched_unique is not None:
            counts = np.bincount(prep.labels[matched_unique], minlength=len(prep.segment_names))
            result.segment_overlap = {n: int(c) for n, c in zip(prep.segment_names, counts,
                                                                strict=True)}
        elif group_overlap is not None and len(group_overlap) == len(prep.segment_names):
            result.segment_overlap = {n: int(c) for n, c in zip(prep.segment_names, group_overlap,
                                                                strict=True)}
    if reveal and matched_unique is not None and tokens_unique is not None:
        row_mask = matched_unique[prep.inverse]
        result.matched_rows = party.ids.rows[row_mask]
        token_of = dict(zip(np.nonzero(matched_unique)[0].tolist(), tokens_unique, strict=True))
        result.tokens = [token_of[int(u)] for u in prep.inverse[row_mask]]
    seconds["total"] = time.perf_counter() - t0
    return result


def _counts_only(peer: dict) -> dict:
    norm = peer.get("normalization")
    if not isinstance(norm, dict):
        return {}
    keep = ("kind", "rows", "valid", "invalid", "excluded_by_consent")
    out = {k: norm[k] for k in keep if isinstance(norm.get(k), (int, str))}
    reasons = norm.get("invalid_by_reason")
    if isinstance(reasons, dict):
        out["invalid_by_reason"] = {str(k): int(v) for k, v in reasons.items()
                                    if isinstance(v, int)}
    return out


def _check_hello(mine: dict, peer: dict, config: MatchConfig) -> None:
    if peer.get("protocol") != PROTOCOL:
        raise MatchProtocolError(
            f"partner speaks {peer.get('protocol')!r}, this node {PROTOCOL!r}: upgrade one side")
    for key, what in (("mode", "--mode"), ("group", "--group"), ("purpose", "purpose")):
        if peer.get(key) != mine[key]:
            raise ConfigurationError(
                f"the partner asked for {what} {peer.get(key)!r} but this node runs {what} "
                f"{mine[key]!r}; both nodes must use the same {what}")
    for key in ("party", "dataset", "nonce"):
        if not isinstance(peer.get(key), str) or not peer[key]:
            raise MatchProtocolError(f"partner's hello lacks {key!r}")
    n = peer.get("unique_ids")
    if not isinstance(n, int) or n < 0:
        raise MatchProtocolError("partner's hello lacks its identifier count")
    if n > config.max_peer_ids:
        raise ConfigurationError(
            f"the partner brings {n} identifiers, more than max_peer_ids={config.max_peer_ids} "
            "(--max-peer-ids); a very large partner set can probe for your customers")
    if len(bytes.fromhex(peer["nonce"])) != 32:
        raise MatchProtocolError("partner's job nonce has the wrong length")
    eps = peer.get("report_epsilon")
    if eps is not None and (not isinstance(eps, (int, float)) or not eps > 0):
        raise MatchProtocolError("partner's report_epsilon is not a positive number")


def _hash_side(prep: _Prepared, wire: _Wire, agreement: KeyAgreement, peer: dict, peer_n: int,
               initiator: bool, reveal: bool, order: np.ndarray, job_id: str, transcript: bytes,
               seconds: dict[str, float]):
    share = peer.get("key_share") or {}
    try:
        peer_share = KeyShare(bytes.fromhex(share["public_key"]), bytes.fromhex(share["nonce"]))
    except (KeyError, TypeError, ValueError):
        raise MatchProtocolError("partner's hello lacks a valid key share") from None
    keys = agreement.derive(peer_share, initiator=initiator, job_id=job_id)
    try:
        role, peer_role = (INITIATOR, RESPONDER) if initiator else (RESPONDER, INITIATOR)
        wire.send("confirm", keys.confirmation(role, transcript))
        keys.check_confirmation(peer_role, transcript, wire.recv("confirm"))
        t = time.perf_counter()
        own_tokens = keys.hash_ids(prep.unique)
        seconds["hash"] = time.perf_counter() - t
        width = TOKEN_BYTES
        if initiator:  # the sender: its keyed hashes go out shuffled
            shuffled = _records(own_tokens, width)[order]
            t = time.perf_counter()
            wire.send("tokens", shuffled.tobytes())
            reply, _ = wire.recv_json("overlap")
            seconds["exchange"] = time.perf_counter() - t
            matched = None
            if reveal:
                positions = np.frombuffer(wire.recv("positions"), dtype="<u4")
                if positions.size and int(positions.max()) >= len(order):
                    raise MatchProtocolError("partner returned a position outside this set")
                matched = np.zeros(len(prep.unique), dtype=bool)
                matched[order[positions.astype(np.int64)]] = True
                if int(matched.sum()) != int(reply.get("overlap", -1)):
                    raise MatchProtocolError("partner's matched positions disagree with its count")
            if matched is None:
                return None, None, [int(reply["overlap"])]
        else:  # the receiver: joins the partner's hashes with its own
            t = time.perf_counter()
            peer_tokens = wire.recv("tokens")
            if len(peer_tokens) != peer_n * width:
                raise MatchProtocolError(
                    f"partner sent {len(peer_tokens)} bytes of hashes for {peer_n} identifiers")
            seconds["exchange"] = time.perf_counter() - t
            t = time.perf_counter()
            own_idx, peer_idx = join_records(own_tokens, peer_tokens, width)
            seconds["join"] = time.perf_counter() - t
            matched = np.zeros(len(prep.unique), dtype=bool)
            matched[own_idx] = True
            wire.send_json("overlap", {"overlap": int(matched.sum())})
            if reveal:
                wire.send("positions", np.sort(peer_idx).astype("<u4").tobytes())
        tokens = None
        if reveal:
            hit = np.nonzero(matched)[0]
            recs = _records(own_tokens, width)[hit]
            tokens = keys.output_tokens(recs.tobytes())
        return matched, tokens, None
    finally:
        keys.erase()


def _psi_side(prep: _Prepared, wire: _Wire, config: MatchConfig, peer_n: int,
              peer_groups: list[int], reveal: bool, group_sizes: list[int], job_id: str,
              seconds: dict[str, float]):
    """This side of ECDH-PSI. Messages, in order (W = 32-byte group elements):

    - ``encrypted``: k·H(x) of every own identifier, in a uniformly random order (CSPRNG).
    - ``encrypted-grouped`` (only with own segments and no matched rows): j·H(x) under a second,
      independent scalar j, grouped by own segment (sizes as in the hello), random within each.
    - ``double``: the partner's values under k — its grouped encoding if it sent one, else its
      ``encrypted`` — in its order when both opted in to matched rows, else shuffled within its
      groups (one group: a uniformly random order).

    This side then joins what the partner returned (own values under the partner's key) with the
    partner's ungrouped ``encrypted`` values raised to the same own scalar (j with own segments,
    else k). The partner's segments shape only the ``double`` this side sends, never anything it
    joins: it learns the overlap (per own group), not how matches spread over the partner's
    groups.
    """
    group = group_named(config.group)
    domain = job_id.encode()
    n_own = len(prep.unique)
    grouped_own = not reveal and len(group_sizes) > 1
    grouped_peer = not reveal and len(peer_groups) > 1
    scalar = group.new_scalar()
    scalar_g = group.new_scalar() if grouped_own else None
    try:
        t = time.perf_counter()
        order = _uniform_permutation(n_own)
        hashed = group.hash_to_group([prep.unique[i].encode() for i in order.tolist()], domain,
                                     workers=config.workers)
        seconds["hash_to_group"] = time.perf_counter() - t
        t = time.perf_counter()
        mine_once = group.multiply(scalar, hashed, config.workers, "own identifiers")
        wire.send("encrypted", mine_once)
        del mine_once
        if grouped_own:
            assert scalar_g is not None and prep.labels is not None
            position = np.empty(n_own, dtype=np.int64)
            position[order] = np.arange(n_own, dtype=np.int64)
            grouped = _records(hashed, ELEMENT_BYTES)[position[_grouped_permutation(prep.labels)]]
            wire.send("encrypted-grouped", group.multiply(
                scalar_g, grouped.tobytes(), config.workers, "own identifiers"))
            del grouped
        del hashed
        seconds["encrypt_own"] = time.perf_counter() - t
        t = time.perf_counter()
        peer_once = wire.recv("encrypted")
        if len(peer_once) != peer_n * ELEMENT_BYTES:
            raise MatchProtocolError(
                f"partner sent {len(peer_once)} bytes for {peer_n} identifiers")
        peer_grouped = wire.recv("encrypted-grouped") if grouped_peer else None
        if peer_grouped is not None and len(peer_grouped) != peer_n * ELEMENT_BYTES:
            raise MatchProtocolError(
                f"partner sent {len(peer_grouped)} bytes of grouped values for {peer_n} "
                "identifiers")
        seconds["wait_peer"] = time.perf_counter() - t
        t = time.perf_counter()
        returned = group.multiply(scalar, peer_grouped if peer_grouped is not None else peer_once,
                                  config.workers, "partner's identifiers")
        if reveal:
            wire.send("double", returned)  # in the partner's order: it learns its own matches
        else:
            wire.send("double", _shuffle_blocks(_records(returned, ELEMENT_BYTES),
                                                peer_groups if grouped_peer else [peer_n]))
        del peer_grouped
        if grouped_own:
            assert scalar_g is not None
            del returned
            join_set = group.multiply(scalar_g, peer_once, config.workers, "partner's identifiers")
        elif grouped_peer:
            del returned
            join_set = group.multiply(scalar, peer_once, config.workers, "partner's identifiers")
        else:
            join_set = returned  # k·(partner's ungrouped values), before the shuffle
        del peer_once
        seconds["encrypt_peer"] = time.perf_counter() - t
        t = time.perf_counter()
        mine_twice = wire.recv("double")
        seconds["wait_peer"] += time.perf_counter() - t
        if len(mine_twice) != n_own * ELEMENT_BYTES:
            raise MatchProtocolError("partner returned the wrong number of values")
        t = time.perf_counter()
        _, own_idx = join_records(join_set, mine_twice, ELEMENT_BYTES)
        seconds["join"] = time.perf_counter() - t
        # own_idx are positions in mine_twice: in `order` (reveal), in own groups, or shuffled.
        if reveal:
            recs = _records(mine_twice, ELEMENT_BYTES)
            token_by_unique = {int(order[k]): _psi_token(job_id, recs[k].tobytes())
                               for k in own_idx.tolist()}
            matched = np.zeros(n_own, dtype=bool)
            matched[list(token_by_unique)] = True
            tokens = [token_by_unique[u] for u in np.nonzero(matched)[0].tolist()]
            return matched, tokens, None
        if not grouped_own:
            return None, None, [len(own_idx)]
        bounds = np.cumsum(group_sizes)
        per_group = np.bincount(np.searchsorted(bounds, own_idx, side="right"),
                                minlength=len(group_sizes))
        return None, None, [int(c) for c in per_group]
    finally:
        scalar.erase()
        if scalar_g is not None:
            scalar_g.erase()


def _psi_token(job_id: str, double_encrypted: bytes) -> str:
    """Printable job-scoped pseudonym: both sides hold k_a·k_b·H(x) for a matched x, nobody after."""
    import base64

    digest = hashlib.sha256(b"fedpact/match/token/v1|" + job_id.encode() + b"|"
                            + double_encrypted).digest()
    return base64.b32encode(digest[:15]).decode().lower()
