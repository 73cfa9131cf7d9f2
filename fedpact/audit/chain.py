"""Hash-chain primitives of the audit ledger: canonical JSON, event hashes and chain verification.

Pure functions with no database, so an auditor can re-check an exported ledger with this module alone.
Each event's hash covers its predecessor's hash, so altering, removing or reordering any stored
event breaks the chain at that point. Truncating the newest events, or rewriting every hash after
an edit, is caught by the signed checkpoints over the Merkle tree of event hashes (`merkle.py`,
`checkpoint.py`); the chain alone would need `head_hash` compared with a copy kept elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from json.encoder import encode_basestring as _quote
from typing import Any

from fedpact.audit.events import LedgerError

_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_DECODER = json.JSONDecoder()

GENESIS_HASH = "0" * 64
"""The prev_hash of event 1: the chain starts from this fixed value."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


@functools.lru_cache(maxsize=4096)
def id_prefix(timestamp: str) -> str:
    """12 hex digits: the milliseconds since 1970 of an event's timestamp ('' if it has none)."""
    try:
        moment = datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        return ""
    if moment.tzinfo is None:
        return ""
    return f"{(moment - _EPOCH) // _MILLISECOND:012x}"


def id_prefix_of(moment: datetime) -> str:
    """`id_prefix` of an aware datetime (the writer's side: no parsing)."""
    return f"{(moment - _EPOCH) // _MILLISECOND:012x}"


def event_id_for(timestamp: str, digest: str) -> str:
    """The id of an event recorded with `timestamp` whose hash is `digest` (format of ledgers at
    schema 0003, from the seq in `ledger_meta.ids_bound_from`): the event's millisecond clock
    (12 hex digits, so ids sort by time and the unique index grows at its right edge) and the
    first 80 bits of its hash. Anyone can recompute it, so an id cannot be renamed or moved to
    another event without verification naming it; the record format and its hash are unchanged."""
    prefix = id_prefix(timestamp) if isinstance(timestamp, str) else ""
    return prefix + digest[:20] if prefix and isinstance(digest, str) else ""


_STORED_TYPES = {bytes: "a BLOB", bytearray: "a BLOB", memoryview: "a BLOB", int: "an INTEGER",
                 float: "a REAL", bool: "an INTEGER", type(None): "NULL"}
_TEXT_COLUMNS = ("event_id", "timestamp", "event_type", "actor", "job_id", "payload",
                 "prev_hash", "hash")


def stored_type_problem(seq: Any, column: str, value: Any) -> str | None:
    """`event N: <column> is stored as a BLOB, not text` when a stored value has the wrong type
    (a BLOB holding the same bytes hashes alike in SQL but breaks every reader), else None."""
    if isinstance(value, str) or (column == "job_id" and value is None):
        return None
    if column == "payload" and isinstance(value, Mapping):  # an event given as decoded values
        return None
    kind = _STORED_TYPES.get(type(value), f"a {type(value).__name__}")
    if kind == "NULL":
        return f"event {seq}: {column} is NULL, not text (altered outside fedpact)"
    return f"event {seq}: {column} is stored as {kind}, not text (altered outside fedpact)"


def stored_types_problem(row: Any) -> str | None:
    """The first `stored_type_problem` of a row (mapping or object), over the columns it has."""
    seq = _field(row, "seq")
    for column in _TEXT_COLUMNS:
        try:
            value = _field(row, column)
        except (KeyError, AttributeError):
            continue
        problem = stored_type_problem(seq, column, value)
        if problem is not None:
            return problem
    return None


@dataclass(frozen=True)
class ChainVerification:
    """Outcome of checking a ledger's hash chain; `reason` is written for a compliance officer.

    On failure, `first_bad_seq` is the earliest sequence number that cannot be trusted and
    `head_hash` is the hash of the last event that verified (GENESIS_HASH if none did).
    """

    ok: bool
    events_checked: int
    first_bad_seq: int | None
    reason: str
    head_hash: str
    checkpoints_checked: int = 0
    signed_tree_size: int = 0
    notes: tuple[str, ...] = field(default=(), compare=False)
    """How the verdict was reached when that is worth saying (e.g. the parallel check failed
    and the sequential one decided). Not part of the verdict: equal verdicts may differ here."""


def _check_json_value(value: Any, path: str) -> None:
    """Raise LedgerError naming `path` if `value` is not plain, finite, UTF-8-encodable JSON data."""
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, str):
        _check_text(value, path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LedgerError(
                f"{path} is {value!r}: NaN and infinity cannot be recorded in the ledger"
            )
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise LedgerError(
                    f"{path} has a {type(key).__name__} key {key!r}: ledger keys must be strings"
                )
            _check_text(key, f"key {key!r} of {path}")
            _check_json_value(item, f"{path}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json_value(item, f"{path}[{index}]")
        return
    raise LedgerError(
        f"{path} is a {type(value).__name__}, which is not JSON-serialisable "
        "(use str, int, float, bool, None, lists and dicts; convert numpy values with .item())"
    )


def _check_text(text: str, path: str) -> None:
    """Raise LedgerError if `text` cannot be encoded as UTF-8 (e.g. holds a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LedgerError(f"{path} is not valid Unicode text: {exc.reason}") from None


def canonical_json(obj: Any, *, label: str = "value") -> bytes:
    """Encode `obj` as canonical JSON bytes: sorted keys, compact, UTF-8; NaN/inf are refused.

    `label` names the object in error messages (e.g. "payload" gives "payload['auc'] is nan ...").
    """
    return canonical_json_and_value(obj, label=label)[0]


def canonical_json_and_value(obj: Any, *, label: str = "value") -> tuple[bytes, Any]:
    """`canonical_json(obj)` and the plain JSON value it encodes (what a reader will decode)."""
    try:  # fast path: encode, and accept only if decoding gives back exactly `obj`
        text = _ENCODER.encode(obj)
        encoded = text.encode("utf-8")
        decoded = _DECODER.decode(text)
        if decoded == obj and type(decoded) is type(obj):
            return encoded, decoded
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
        pass  # the slow path below names the offending field
    try:
        _check_json_value(obj, label)
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except RecursionError:
        raise LedgerError(f"{label} is nested too deeply to record in the ledger") from None
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"{label} cannot be encoded as canonical JSON: {exc}") from exc
    return text.encode("utf-8"), json.loads(text)


_SCALARS = frozenset({str, int, bool, type(None), float})


def _plain_copy(value: Any) -> Any:
    """A copy of `value` if it holds only exact JSON types (dict with str keys, list, str, int,
    float, bool, None), else `_NOT_PLAIN`. For such values, decoding their canonical JSON gives
    back an equal object of the same types, so the copy can stand in for the decoded value."""
    kind = type(value)
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                return _NOT_PLAIN
            item_kind = type(item)
            if item_kind in _SCALARS:
                out[key] = item
            else:
                copied = _plain_copy(item)
                if copied is _NOT_PLAIN:
                    return _NOT_PLAIN
                out[key] = copied
        return out
    if kind is list:
        result = []
        for item in value:
            if type(item) in _SCALARS:
                result.append(item)
            else:
                copied = _plain_copy(item)
                if copied is _NOT_PLAIN:
                    return _NOT_PLAIN
                result.append(copied)
        return result
    if kind in _SCALARS:
        return value
    return _NOT_PLAIN


_NOT_PLAIN = object()


def canonical_text_and_value(obj: Any, *, label: str = "value") -> tuple[str, Any]:
    """`canonical_json_and_value` with the JSON as text; the fast path skips the decode when `obj`
    holds only exact JSON types (then the decoded value is just a copy of `obj`)."""
    try:
        text = _ENCODER.encode(obj)  # refuses NaN/inf and non-JSON types (slow path names them)
        if not text.isascii():
            text.encode("utf-8")  # lone surrogates cannot be stored
        value = _plain_copy(obj)
        if value is not _NOT_PLAIN:
            return text, value
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
        pass
    encoded, value = canonical_json_and_value(obj, label=label)
    return encoded.decode("utf-8"), value


def event_hash(
    prev_hash: str,
    seq: int,
    timestamp: str,
    event_type: str,
    actor: str,
    job_id: str | None,
    payload: Mapping[str, Any],
) -> str:
    """Return the hex SHA-256 of the canonical JSON of an event's fields and its predecessor's hash."""
    record = {
        "prev_hash": prev_hash,
        "seq": seq,
        "timestamp": timestamp,
        "event_type": event_type.value if isinstance(event_type, Enum) else event_type,
        "actor": actor,
        "job_id": job_id,
        "payload": payload,
    }
    return hashlib.sha256(canonical_json(record, label="event")).hexdigest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_stored_payload(text: str) -> dict[str, Any]:
    """Decode a payload stored as canonical JSON text; raise LedgerError if it is not canonical."""
    if not isinstance(text, str):
        raise LedgerError(f"stored payload is a {type(text).__name__}, not JSON text")
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise LedgerError(f"stored payload is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise LedgerError(f"stored payload is a JSON {type(payload).__name__}, not an object")
    if canonical_json(payload, label="payload").decode("utf-8") != text:
        raise LedgerError("stored payload is not in canonical form")
    return payload


def _field(row: Any, name: str) -> Any:
    """Read column `name` from a mapping or an object with attributes (dataclass, SQLAlchemy Row)."""
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def record_text(
    prev_hash: str,
    seq: int,
    timestamp: str,
    event_type: str,
    actor: str,
    job_id: str | None,
    payload_text: str,
) -> str:
    """The canonical JSON text that `event_hash` hashes, built from an already-canonical payload.

    Equal to `canonical_json(record)` whenever `payload_text` is `canonical_json(payload)`: the
    record's keys sort as actor, event_type, job_id, payload, prev_hash, seq, timestamp.
    """
    return (
        f'{{"actor":{_quote(actor)},"event_type":{_quote(event_type)},'
        f'"job_id":{"null" if job_id is None else _quote(job_id)},"payload":{payload_text},'
        f'"prev_hash":{_quote(prev_hash)},"seq":{seq},"timestamp":{_quote(timestamp)}}}'
    )


def event_hash_from_text(
    prev_hash: str,
    seq: int,
    timestamp: str,
    event_type: str,
    actor: str,
    job_id: str | None,
    payload_text: str,
) -> str:
    """`event_hash` for a payload already encoded by `canonical_json` (no re-encoding)."""
    text = record_text(prev_hash, seq, timestamp, event_type, actor, job_id, payload_text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_row(row: Any, last_seq: int, last_hash: str) -> tuple[int, str] | None:
    """Check one stored event against its predecessor; return (first bad seq, reason) or None."""
    seq = _field(row, "seq")
    expected_seq = last_seq + 1
    if not isinstance(seq, int) or isinstance(seq, bool):
        return expected_seq, f"event after event {last_seq} has a malformed seq {seq!r}"
    if seq > expected_seq:
        if last_seq == 0:
            return expected_seq, f"gap: the first event is event {seq}; event 1 is missing"
        return expected_seq, f"gap: event {seq} follows event {last_seq}"
    if seq < expected_seq:
        return seq, f"event {seq} is out of order: it follows event {last_seq}"

    typed = stored_types_problem(row)
    if typed is not None:
        return seq, typed
    predecessor = f"event {last_seq}" if last_seq else "the genesis hash"
    if _field(row, "prev_hash") != last_hash:
        return seq, f"event {seq}: prev_hash does not link to {predecessor}"

    payload = _field(row, "payload")
    try:
        if not isinstance(payload, Mapping):
            payload = parse_stored_payload(payload)
        recomputed = event_hash(
            last_hash,
            seq,
            _field(row, "timestamp"),
            _field(row, "event_type"),
            _field(row, "actor"),
            _field(row, "job_id"),
            payload,
        )
    except LedgerError as exc:
        return seq, f"event {seq}: {exc} (altered after it was written)"
    if recomputed != _field(row, "hash"):
        return seq, f"event {seq}: hash does not match its contents (altered after it was written)"
    return None


def verify_chain(
    rows: Iterable[Any], *, start_seq: int = 0, start_hash: str = GENESIS_HASH
) -> ChainVerification:
    """Check events given in seq order: seq runs 1, 2, 3…, each links to its predecessor, hashes recompute.

    Each row has seq, timestamp, event_type, actor, job_id, payload (a dict, or the stored canonical
    JSON text), prev_hash and hash. Stops at the first event that fails. `start_seq`/`start_hash`
    resume from an already-verified event (checking a segment of a longer log).
    """
    checked = 0
    last_seq, last_hash = start_seq, start_hash
    for row in rows:
        checked += 1
        problem = check_row(row, last_seq, last_hash)
        if problem is not None:
            return ChainVerification(False, checked, problem[0], problem[1], last_hash)
        last_seq, last_hash = _field(row, "seq"), _field(row, "hash")

    noun = "event" if checked == 1 else "events"
    summary = (
        f"{checked} {noun} verified; chain intact"
        if checked
        else "ledger is empty; nothing to verify"
    )
    return ChainVerification(True, checked, None, summary, last_hash)
