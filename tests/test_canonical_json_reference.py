"""The canonical JSON of the ledger stays byte-identical to the reference encoder.

Every event hash is computed over `chain.canonical_json` (sorted keys, compact, UTF-8, no NaN);
any faster encoder put behind it (a C library, a cached encoder, the SQL-side rendering of the
hashed record) must produce exactly the bytes of `json.dumps(..., sort_keys=True,
separators=(",", ":"), ensure_ascii=False, allow_nan=False)`, or old events stop verifying.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpact.audit.chain import canonical_json, canonical_json_and_value, event_hash
from fedpact.audit.events import LedgerError

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | _text)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


def _reference(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(payload=st.dictionaries(_text, _json, max_size=6))
def test_canonical_json_is_the_reference_encoding(payload: dict[str, Any]) -> None:
    encoded, value = canonical_json_and_value(payload)
    assert encoded == _reference(payload)
    assert value == json.loads(encoded)
    assert canonical_json(payload) == encoded


@settings(max_examples=100, deadline=None)
@given(payload=st.dictionaries(_text, _json, max_size=4), seq=st.integers(1, 2**40))
def test_event_hash_is_over_the_reference_record(payload: dict[str, Any], seq: int) -> None:
    import hashlib

    record = {"actor": "a", "event_type": "data.accessed", "job_id": None, "payload": payload,
              "prev_hash": "0" * 64, "seq": seq, "timestamp": "2026-01-01T00:00:00.000000+00:00"}
    want = hashlib.sha256(_reference(record)).hexdigest()
    assert event_hash("0" * 64, seq, record["timestamp"], "data.accessed", "a", None,
                      payload) == want


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "\ud800"])
def test_what_the_reference_refuses_is_refused(bad: Any) -> None:
    with pytest.raises(LedgerError):
        canonical_json({"x": bad})
