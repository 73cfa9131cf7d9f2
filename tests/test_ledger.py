"""Tests of the tamper-evident audit ledger: chaining, tamper detection, validation, concurrency."""

from __future__ import annotations

import math
import multiprocessing
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event as sa_event

from fedpact.audit import ChainVerification, EventType, Ledger, LedgerError, LedgerEvent
from fedpact.audit.chain import GENESIS_HASH, canonical_json, event_hash, verify_chain
from fedpact.audit.events import (
    RAW_PII_KEYS,
    REQUIRED_FIELDS,
    is_personal_key,
    looks_personal,
    validate_payload,
)

JOB = "job-7"

DATA_ACCESS = {
    "node": "bank-a",
    "dataset": "customers_2024",
    "rows": 41188,
    "columns": ["age", "balance", "tenure"],
    "purpose": "churn propensity model",
}


def _fill(ledger: Ledger, n: int, *, job_id: str = JOB) -> list[LedgerEvent]:
    """Append `n` data-access events with distinct row counts."""
    return [
        ledger.append(
            EventType.DATA_ACCESSED, {**DATA_ACCESS, "rows": i}, actor="node:bank-a", job_id=job_id
        )
        for i in range(1, n + 1)
    ]


def _tamper(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Edit the ledger file behind the Ledger's back, as an attacker with file access would."""
    connection = sqlite3.connect(db_path)
    try:
        connection.execute("DROP TRIGGER IF EXISTS ledger_events_no_update")
        connection.execute("DROP TRIGGER IF EXISTS ledger_events_no_delete")
        connection.execute(sql, params)
        connection.commit()
    finally:
        connection.close()


def _raw_row(db_path: Path, seq: int) -> dict[str, Any]:
    connection = sqlite3.connect(db_path)
    connection.row_factory = sqlite3.Row
    try:
        row = connection.execute("SELECT * FROM ledger_events WHERE seq = ?", (seq,)).fetchone()
        return dict(row)
    finally:
        connection.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "ledger.db"


@pytest.fixture
def ledger(db_path: Path):
    with Ledger.open(db_path) as opened:
        yield opened


# --- recording and reading -------------------------------------------------------------------


def test_append_then_read_round_trip(ledger: Ledger) -> None:
    created = ledger.append(
        EventType.JOB_CREATED,
        {"task": "churn", "partners": ["bank-a", "telco-b"], "purpose": "retention offers"},
        actor="officer:alice",
        job_id=JOB,
    )
    accessed = ledger.append("data.accessed", DATA_ACCESS, actor="node:bank-a", job_id=JOB)

    assert created.seq == 1 and created.prev_hash == GENESIS_HASH
    assert accessed.seq == 2 and accessed.prev_hash == created.hash
    assert accessed.event_type == "data.accessed"
    assert ledger.events() == [created, accessed]
    assert ledger.events()[1].payload == DATA_ACCESS
    assert len(created.event_id) == 32 and created.event_id != accessed.event_id
    assert created.timestamp.endswith("+00:00") and "." in created.timestamp


def test_events_filters_count_and_head(ledger: Ledger) -> None:
    assert ledger.head() is None and ledger.count() == 0
    _fill(ledger, 3, job_id="job-a")
    ledger.append(
        EventType.JOB_FAILED, {"reason": "partner offline"}, actor="server", job_id="job-b"
    )
    ledger.append(EventType.MODEL_DELIVERED, {"model": "m@1", "recipient": "bank-a", "purpose": "churn"}, actor="server")

    assert [e.seq for e in ledger.events(job_id="job-a")] == [1, 2, 3]
    assert [e.seq for e in ledger.events(event_type=EventType.JOB_FAILED)] == [4]
    assert [e.seq for e in ledger.events(event_type="model.delivered")] == [5]
    assert [e.seq for e in ledger.events(since_seq=3)] == [4, 5]
    assert [e.seq for e in ledger.events(since_seq=1, limit=2)] == [2, 3]
    assert ledger.count() == 5 and ledger.count("job-a") == 3 and ledger.count("nope") == 0
    head = ledger.head()
    assert head is not None and head.seq == 5 and head.job_id is None


def test_event_to_dict_is_plain_data(ledger: Ledger) -> None:
    recorded = ledger.append(EventType.DATA_ACCESSED, DATA_ACCESS, actor="node:bank-a", job_id=JOB)
    as_dict = recorded.to_dict()
    assert set(as_dict) == {
        "seq",
        "event_id",
        "timestamp",
        "event_type",
        "actor",
        "job_id",
        "payload",
        "prev_hash",
        "hash",
    }
    assert as_dict["payload"] == DATA_ACCESS and as_dict["seq"] == 1
    as_dict["payload"]["rows"] = 0
    assert recorded.payload["rows"] == DATA_ACCESS["rows"]


def test_reopened_ledger_continues_the_chain(db_path: Path) -> None:
    with Ledger.open(db_path) as first:
        _fill(first, 2)
    with Ledger.open(db_path) as second:
        third = second.append(EventType.MODEL_DELIVERED,
                              {"model": "m@1", "recipient": "telco-b", "purpose": "churn"},
                              actor="server")
        assert third.seq == 3
        result = second.verify()
    assert result.ok and result.events_checked == 3 and result.head_hash == third.hash


def test_in_memory_ledger() -> None:
    with Ledger("sqlite://") as memory:
        _fill(memory, 3)
        assert memory.verify().ok and memory.count() == 3


def test_sqlite_runs_in_wal_mode_with_full_sync(ledger: Ledger, db_path: Path) -> None:
    with ledger._engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_append_begins_an_immediate_transaction(ledger: Ledger) -> None:
    """Appends run on the ledger's raw sqlite3 writer: BEGIN IMMEDIATE, then one COMMIT (fsync)."""
    statements: list[str] = []
    sa_event.listen(
        ledger._engine, "before_cursor_execute", lambda *args: statements.append(args[2])
    )
    ledger._writer().set_trace_callback(statements.append)
    _fill(ledger, 1)
    assert statements[0] == "BEGIN IMMEDIATE"
    assert statements[-1] == "COMMIT" and statements.count("COMMIT") == 1
    assert ledger._writer().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_ledger_is_append_only(ledger: Ledger, db_path: Path) -> None:
    _fill(ledger, 2)
    for name in ("update", "delete", "remove", "truncate", "clear", "edit"):
        assert not hasattr(ledger, name)
    connection = sqlite3.connect(db_path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute("UPDATE ledger_events SET actor = 'mallory'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute("DELETE FROM ledger_events")
    finally:
        connection.close()


def test_closed_ledger_refuses_work(db_path: Path) -> None:
    ledger = Ledger.open(db_path)
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.count()


# --- chain verification ----------------------------------------------------------------------


def test_empty_ledger_verifies(ledger: Ledger) -> None:
    assert ledger.verify() == ChainVerification(
        True, 0, None, "ledger is empty; nothing to verify", GENESIS_HASH
    )


def test_chain_verifies_and_hashes_recompute(ledger: Ledger) -> None:
    recorded = _fill(ledger, 5)
    result = ledger.verify()
    assert result.ok and result.events_checked == 5 and result.first_bad_seq is None
    assert result.head_hash == recorded[-1].hash
    for previous, current in zip([None, *recorded], recorded, strict=False):
        assert current.prev_hash == (previous.hash if previous else GENESIS_HASH)
        assert current.hash == event_hash(
            current.prev_hash,
            current.seq,
            current.timestamp,
            current.event_type,
            current.actor,
            current.job_id,
            current.payload,
        )


def test_verify_chain_accepts_events_and_mappings(ledger: Ledger) -> None:
    recorded = _fill(ledger, 3)
    assert verify_chain(recorded).ok
    assert verify_chain([e.to_dict() for e in recorded]).ok
    forged = [recorded[0], recorded[2]]
    assert verify_chain(forged).reason == "gap: event 3 follows event 1"


# --- tampering ------------------------------------------------------------------------------


def test_altered_payload_is_detected_at_that_event(ledger: Ledger, db_path: Path) -> None:
    _fill(ledger, 5)
    _tamper(
        db_path,
        "UPDATE ledger_events SET payload = replace(payload, '\"rows\":3', '\"rows\":30') WHERE seq = 3",
    )
    assert _raw_row(db_path, 3)["payload"].count('"rows":30') == 1

    result = ledger.verify()
    assert not result.ok
    assert result.first_bad_seq == 3
    assert (
        result.reason == "event 3: hash does not match its contents (altered after it was written)"
    )
    assert result.events_checked == 3
    assert result.head_hash == ledger.events()[1].hash


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "node:mallory"),
        ("timestamp", "2020-01-01T00:00:00.000000+00:00"),
        ("event_type", "job.failed"),
        ("job_id", "other-job"),
        ("hash", "f" * 64),
    ],
)
def test_any_altered_column_is_detected(
    ledger: Ledger, db_path: Path, column: str, value: str
) -> None:
    _fill(ledger, 4)
    _tamper(db_path, f"UPDATE ledger_events SET {column} = ? WHERE seq = 2", (value,))
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 2
    assert result.reason.startswith("event 2:")


def test_corrupt_payload_text_is_detected(ledger: Ledger, db_path: Path) -> None:
    _fill(ledger, 3)
    _tamper(db_path, "UPDATE ledger_events SET payload = '{\"rows\": NaN' WHERE seq = 2")
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 2
    assert "event 2" in result.reason and "altered after it was written" in result.reason
    with pytest.raises(LedgerError, match="event 2 is corrupt"):
        ledger.events()


def test_non_canonical_payload_text_is_detected(ledger: Ledger, db_path: Path) -> None:
    _fill(ledger, 2)
    stored = _raw_row(db_path, 1)["payload"]
    _tamper(
        db_path, "UPDATE ledger_events SET payload = ? WHERE seq = 1", (stored.replace(",", ", "),)
    )
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 1 and "canonical" in result.reason


def test_deleted_middle_event_leaves_a_gap(ledger: Ledger, db_path: Path) -> None:
    _fill(ledger, 9)
    _tamper(db_path, "DELETE FROM ledger_events WHERE seq = 8")
    result = ledger.verify()
    assert not result.ok
    assert result.reason == "gap: event 9 follows event 7"
    assert result.first_bad_seq == 8


def test_deleted_first_event_is_detected(ledger: Ledger, db_path: Path) -> None:
    _fill(ledger, 3)
    _tamper(db_path, "DELETE FROM ledger_events WHERE seq = 1")
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 1 and "event 1 is missing" in result.reason


def test_rehashed_alteration_is_caught_at_next_link(ledger: Ledger, db_path: Path) -> None:
    """An attacker who edits event 3 and recomputes its hash still breaks event 4's prev_hash."""
    recorded = _fill(ledger, 5)
    original = recorded[2]
    forged_payload = {**original.payload, "purpose": "marketing"}
    forged_hash = event_hash(
        original.prev_hash,
        3,
        original.timestamp,
        original.event_type,
        original.actor,
        original.job_id,
        forged_payload,
    )
    _tamper(
        db_path,
        "UPDATE ledger_events SET payload = ?, hash = ? WHERE seq = 3",
        (canonical_json(forged_payload).decode(), forged_hash),
    )
    result = ledger.verify()
    assert not result.ok
    assert result.first_bad_seq == 4
    assert result.reason == "event 4: prev_hash does not link to event 3"
    assert result.head_hash == forged_hash


def test_swapped_events_are_detected(ledger: Ledger, db_path: Path) -> None:
    _fill(ledger, 5)
    _tamper(db_path, "UPDATE ledger_events SET seq = 100 WHERE seq = 2")
    _tamper(db_path, "UPDATE ledger_events SET seq = 2 WHERE seq = 4")
    _tamper(db_path, "UPDATE ledger_events SET seq = 4 WHERE seq = 100")
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 2
    assert result.reason == "event 2: prev_hash does not link to event 1"


def test_forged_event_inserted_in_the_middle_is_detected(ledger: Ledger, db_path: Path) -> None:
    """A forged event 3, correctly linked and hashed, still breaks the renumbered event after it."""
    recorded = _fill(ledger, 5)
    _tamper(db_path, "UPDATE ledger_events SET seq = seq + 100 WHERE seq >= 3")
    _tamper(db_path, "UPDATE ledger_events SET seq = seq - 99 WHERE seq >= 100")
    forged = {**DATA_ACCESS, "purpose": "backdated consent"}
    timestamp = recorded[1].timestamp
    forged_hash = event_hash(
        recorded[1].hash, 3, timestamp, "data.accessed", "node:bank-a", JOB, forged
    )
    _tamper(
        db_path,
        "INSERT INTO ledger_events VALUES (3, 'f0rged', ?, 'data.accessed', 'node:bank-a', ?, ?, ?, ?)",
        (timestamp, JOB, canonical_json(forged).decode(), recorded[1].hash, forged_hash),
    )
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 4
    assert result.reason == "event 4: prev_hash does not link to event 3"


def test_forged_event_appended_with_wrong_link_is_detected(ledger: Ledger, db_path: Path) -> None:
    _fill(ledger, 3)
    forged = {**DATA_ACCESS, "rows": 1}
    _tamper(
        db_path,
        "INSERT INTO ledger_events VALUES (4, 'f0rged', '2030-01-01T00:00:00.000000+00:00', "
        "'data.accessed', 'node:bank-a', ?, ?, ?, ?)",
        (JOB, canonical_json(forged).decode(), GENESIS_HASH, "0" * 64),
    )
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 4
    assert result.reason == "event 4: prev_hash does not link to event 3"


def test_fully_rehashed_chain_needs_an_external_head_anchor(ledger: Ledger, db_path: Path) -> None:
    """Rewriting every later hash fools the chain alone; a head_hash kept elsewhere still exposes
    it, and since issue #15 so do the event ids bound to the records and the writer tags."""
    recorded = _fill(ledger, 3)
    anchored_head = ledger.verify().head_hash
    prev_hash = recorded[0].hash
    for original in recorded[1:]:
        payload = {**original.payload, "purpose": "rewritten"}
        new_hash = event_hash(
            prev_hash,
            original.seq,
            original.timestamp,
            original.event_type,
            original.actor,
            original.job_id,
            payload,
        )
        _tamper(
            db_path,
            "UPDATE ledger_events SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (canonical_json(payload).decode(), prev_hash, new_hash, original.seq),
        )
        prev_hash = new_hash
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 2 and "event_id" in result.reason
    assert result.head_hash == recorded[0].hash != anchored_head


# --- validation -----------------------------------------------------------------------------


def test_missing_required_fields_are_named(ledger: Ledger) -> None:
    incomplete = {k: v for k, v in DATA_ACCESS.items() if k not in {"purpose", "columns"}}
    with pytest.raises(LedgerError, match=r"data\.accessed .*missing .*columns, purpose"):
        ledger.append(EventType.DATA_ACCESSED, incomplete, actor="node:bank-a")
    with pytest.raises(LedgerError, match="epsilon"):
        ledger.append(EventType.JOB_FINISHED, {"metrics": {"auc": 0.8}}, actor="server")
    assert ledger.count() == 0


def test_required_fields_table() -> None:
    assert REQUIRED_FIELDS[EventType.DATA_ACCESSED] == {
        "node",
        "dataset",
        "rows",
        "columns",
        "purpose",
    }
    assert REQUIRED_FIELDS[EventType.JOB_CREATED] == {"task", "partners", "purpose"}
    assert REQUIRED_FIELDS[EventType.ROUND_AGGREGATED] == {"round", "nodes"}
    assert REQUIRED_FIELDS[EventType.JOB_FINISHED] == {"metrics", "epsilon"}
    assert REQUIRED_FIELDS[EventType.JOB_FAILED] == {"reason"}
    assert REQUIRED_FIELDS[EventType.MODEL_DELIVERED] == {"model", "recipient", "purpose"}
    validate_payload(EventType.JOB_FAILED, {"reason": "partner offline"})
    validate_payload("model.delivered", {"model": "m@1", "recipient": "bank-a", "purpose": "churn"})
    with pytest.raises(LedgerError, match="must be a dict"):
        validate_payload(EventType.JOB_FAILED, ["not", "a", "dict"])  # type: ignore[arg-type]


def test_unknown_event_type_is_refused(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="unknown ledger event type 'data.acessed'"):
        ledger.append("data.acessed", DATA_ACCESS, actor="node:bank-a")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(ledger: Ledger, bad: float) -> None:
    with pytest.raises(LedgerError, match=r"payload\['metrics'\]\['auc'\].*NaN and infinity"):
        ledger.append(
            EventType.JOB_FINISHED, {"metrics": {"auc": bad}, "epsilon": 1.0}, actor="server"
        )
    assert ledger.count() == 0


def test_non_serialisable_payload_names_the_key(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match=r"payload\['when'\] is a object"):
        ledger.append(EventType.JOB_FAILED, {"reason": "test", "when": object()}, actor="server")
    with pytest.raises(LedgerError, match=r"payload\['nodes'\]\[1\] is a set"):
        ledger.append(EventType.JOB_FAILED, {"reason": "test", "nodes": ["a", {"b"}]}, actor="server")
    with pytest.raises(LedgerError, match="int key 3"):
        ledger.append(EventType.JOB_FAILED, {"reason": "test", "by_round": {3: 0.1}}, actor="server")
    with pytest.raises(LedgerError, match="not valid Unicode"):
        ledger.append(EventType.JOB_FAILED, {"reason": "test", "note": "\ud800"}, actor="server")


def test_actor_is_required(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="actor"):
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="")


def test_open_in_unusable_location_explains(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    with pytest.raises(LedgerError, match="cannot create the directory for ledger"):
        Ledger.open(blocker / "sub" / "ledger.db")
    with pytest.raises(LedgerError, match="is a directory"):
        Ledger.open(tmp_path)
    with pytest.raises(LedgerError, match="invalid ledger database URL"):
        Ledger("not a url")
    with pytest.raises(LedgerError, match="cannot open ledger database"):
        Ledger(f"sqlite:///{blocker}/ledger.db")


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": [1.5, None, True], "ü": "日本"}) == (
        '{"a":[1.5,null,true],"b":1,"ü":"日本"}'.encode()
    )
    fields = ("0" * 64, 1, "2025-01-01T00:00:00.000000+00:00")
    assert event_hash(*fields, EventType.JOB_FAILED, "a", None, {}) == event_hash(
        *fields, "job.failed", "a", None, {}
    )


# --- concurrency ----------------------------------------------------------------------------


def test_lost_race_is_retried_instead_of_forking(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If another appender takes the next seq first, the unique seq makes this append retry."""
    _fill(ledger, 2)
    stale_tip = (1, ledger.events()[0].hash)
    real_tip = Ledger._chain_tip
    calls = {"n": 0}

    def tip_stale_once(connection: Any) -> tuple[int, str]:
        calls["n"] += 1
        return stale_tip if calls["n"] == 1 else real_tip(connection)

    monkeypatch.setattr(Ledger, "_chain_tip", staticmethod(tip_stale_once))
    ledger._invalidate_state()  # as if another process had committed: the head is re-read
    recorded = ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
    assert calls["n"] == 2 and recorded.seq == 3
    assert ledger.verify().ok

    monkeypatch.setattr(Ledger, "_chain_tip", staticmethod(lambda connection: stale_tip))
    ledger._invalidate_state()
    with pytest.raises(LedgerError, match="after 5 attempts"):
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
    assert ledger.count() == 3


def test_concurrent_threads_keep_one_chain(ledger: Ledger) -> None:
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def appender(worker: int) -> None:
        try:
            start.wait()
            for i in range(50):
                ledger.append(
                    EventType.JOB_FAILED, {"reason": "test", "worker": worker, "i": i}, actor=f"thread-{worker}"
                )
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=appender, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert ledger.count() == 200
    assert [e.seq for e in ledger.events()] == list(range(1, 201))
    result = ledger.verify()
    assert result.ok and result.events_checked == 200


def _append_from_process(db_path: str, worker: int, count: int, start: Any) -> None:
    """Child-process body: open the shared ledger file, wait for the other child, append `count` events."""
    with Ledger.open(db_path) as ledger:
        start.wait(timeout=60)
        for i in range(count):
            ledger.append(
                EventType.JOB_FAILED, {"reason": "test", "worker": worker, "i": i}, actor=f"process-{worker}"
            )
            time.sleep(
                0.001
            )  # let the other process win the lock now and then, so chains interleave


def test_concurrent_processes_keep_one_chain(db_path: Path) -> None:
    Ledger.open(db_path).close()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [
        context.Process(target=_append_from_process, args=(str(db_path), w, 50, start))
        for w in range(2)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [process.exitcode for process in workers] == [0, 0]

    with Ledger.open(db_path) as ledger:
        assert ledger.count() == 100
        assert {e.actor for e in ledger.events()} == {"process-0", "process-1"}
        result = ledger.verify()
    assert result.ok and result.events_checked == 100


# --- property -------------------------------------------------------------------------------

# text the ledger refuses (e-mail addresses, phone numbers) and keys naming personal data
_texts = st.text().filter(lambda text: not looks_personal(text))
_keys = st.text().filter(lambda key: not is_personal_key(key) and key not in RAW_PII_KEYS)
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _texts
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4)
    ),
    max_leaves=15,
)
_DELIVERED = {"model": "m@1", "recipient": "bank-a", "purpose": "churn"}
# any extra fields beside the required ones (not the envelope, not a required field's name)
_payload_keys = _keys.filter(lambda key: key not in {"personal", *_DELIVERED})
_payloads = st.dictionaries(_payload_keys, _json_values, max_size=5).map(
    lambda extra: {**extra, **_DELIVERED}
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(_payloads, min_size=1, max_size=6))
def test_any_json_payloads_give_a_verifying_chain(payloads: list[dict[str, Any]]) -> None:
    with (
        tempfile.TemporaryDirectory() as directory,
        Ledger.open(Path(directory) / "l.db") as ledger,
    ):
        for payload in payloads:
            ledger.append(EventType.MODEL_DELIVERED, payload, actor="server", job_id=JOB)
        result = ledger.verify()
        stored = ledger.events()
        connection = sqlite3.connect(Path(directory) / "l.db")
        try:
            raw_hashes = [
                h for (h,) in connection.execute("SELECT hash FROM ledger_events ORDER BY seq")
            ]
        finally:
            connection.close()

    assert result.ok and result.events_checked == len(payloads)
    assert [e.payload for e in stored] == payloads
    recomputed = [
        event_hash(e.prev_hash, e.seq, e.timestamp, e.event_type, e.actor, e.job_id, e.payload)
        for e in stored
    ]
    assert recomputed == [e.hash for e in stored] == raw_hashes
