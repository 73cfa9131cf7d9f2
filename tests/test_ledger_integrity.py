"""Issue #15, findings 1, 2, 3, 6 and 11: tampering a probe found undetected, now each named.

Every attack is made straight in the database (SQLite with `tamper`, PostgreSQL with `pg_tamper`),
by someone with write access to the file but without the ledger's keys.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ledger_tamper import pg_tamper, tamper, write_legacy_ledger
from typer.testing import CliRunner

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.chain import canonical_json, event_hash
from fedpact.audit.checkpoint import CheckpointSigner, parse_note
from fedpact.audit.consent import ConsentRegistry
from fedpact.audit.merkle import ProofError
from fedpact.audit.verifier import load_keys, verify_database, verify_inclusion_bundle

JOB = "job-1"
ACCESS = {"node": "bank-a", "dataset": "customers", "rows": 10, "columns": ["age"],
          "purpose": "churn model"}


def _fill(ledger: Ledger, n: int, start: int = 1) -> None:
    for i in range(start, start + n):
        ledger.append(EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, actor="node:bank-a",
                      job_id=JOB)


def _rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    connection = sqlite3.connect(db)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def _public_id(timestamp: str, digest: str) -> str:
    """The id anyone can compute for an event (what an attacker without keys can do too)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    millis = (datetime.fromisoformat(timestamp) - epoch) // timedelta(milliseconds=1)
    return f"{millis:012x}{digest[:20]}"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger.open(path, checkpoint_every=4) as ledger:
        _fill(ledger, 8)  # checkpoints at 4 and 8
    return path


# --- finding 1: event ids inside what the chain commits to -----------------------------------


def test_a_renamed_event_id_is_named_by_every_verifier(db: Path) -> None:
    [(original,)] = _rows(db, "SELECT event_id FROM ledger_events WHERE seq = 3")
    tamper(db, "UPDATE ledger_events SET event_id = ? WHERE seq = 3", ("f" * 32,))
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
        assert not result.ok and result.first_bad_seq == 3
        assert "event 3" in result.reason and "event_id" in result.reason
        with pytest.raises(LedgerError, match="no ledger event"):
            ledger.prove(original)
    keys = load_keys((db.parent / "ledger.db.pub").read_text())
    standalone = verify_database(f"sqlite:///{db}", keys)
    assert not standalone.ok and standalone.first_bad_seq == 3


def test_swapped_event_ids_fail_verify_and_prove(db: Path) -> None:
    ids = dict(_rows(db, "SELECT seq, event_id FROM ledger_events WHERE seq IN (2, 6)"))
    tamper(db, "UPDATE ledger_events SET event_id = 'tmp' WHERE seq = 2")
    tamper(db, "UPDATE ledger_events SET event_id = ? WHERE seq = 6", (ids[2],))
    tamper(db, "UPDATE ledger_events SET event_id = ? WHERE seq = 2", (ids[6],))
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
        kept = ledger.latest_checkpoint()
        assert kept is not None
        against = ledger.verify_against_checkpoint(kept.note)
        with pytest.raises(LedgerError, match="event_id"):
            ledger.prove(ids[2])  # would prove event 6 under event 2's id
    assert not result.ok and result.first_bad_seq == 2 and "event_id" in result.reason
    assert not against.ok
    runner = CliRunner()
    from fedpact.service.cli import app

    checked = runner.invoke(app, ["audit", "verify", "--home", str(db.parent), "--indexes"])
    assert checked.exit_code == 1 and "event_id" in checked.output


def test_a_bundle_with_another_events_id_does_not_verify(db: Path) -> None:
    with Ledger.open(db, read_only=True) as ledger:
        bundle = ledger.prove(5)
        other = ledger.event(6).event_id
    keys = load_keys((db.parent / "ledger.db.pub").read_text())
    verify_inclusion_bundle(bundle, keys)
    bundle["event"]["event_id"] = other
    with pytest.raises(ProofError, match="event_id"):
        verify_inclusion_bundle(bundle, keys)


def test_legacy_events_keep_verifying_and_new_ones_bind_their_ids(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    write_legacy_ledger(path, [("job.failed", "server", None, {"reason": f"old {seq}"})
                               for seq in (1, 2)])
    with Ledger.open(path) as ledger:
        new = ledger.append(EventType.JOB_FAILED, {"reason": "new"}, actor="server")
        assert [e.event_id for e in ledger.events()][:2] == ["e1", "e2"]  # old ids as they were
        assert new.event_id == _public_id(new.timestamp, new.hash)
        assert ledger.verify().ok
    tamper(path, "UPDATE ledger_events SET event_id = 'e9' WHERE seq = 3")
    with Ledger.open(path, read_only=True) as ledger:
        result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 3
    tamper(path, "UPDATE ledger_events SET event_id = ? WHERE seq = 3", (new.event_id,))
    # moving the boundary past the new events is caught by the signed checkpoint that states it
    tamper(path, "UPDATE ledger_meta SET value = '99' WHERE key = 'ids_bound_from'")
    with Ledger.open(path, read_only=True) as ledger:
        moved = ledger.verify()
    assert not moved.ok and "ids_bound_from" in moved.reason


# --- finding 2: writer authentication --------------------------------------------------------


def _consent_ledger(path: Path) -> str:
    with Ledger.open(path, checkpoint_every=1000) as ledger:
        registry = ConsentRegistry(ledger)
        registry.grant("S-1", "churn", channel="web", legal_basis="consent",
                       notice_version="v1", source="crm")
        registry.withdraw("S-1", "churn", channel="web", source="crm")
        return registry.pseudonym("S-1")


def _forge_tail_copy_of(path: Path, seq: int) -> int:
    """Append a copy of event `seq` (its payload, pseudonym and sealed envelope) at the tail,
    correctly linked, hashed and with the public id: all an attacker without keys can do."""
    connection = sqlite3.connect(path)
    try:
        tip, tip_hash = connection.execute(
            "SELECT seq, hash FROM ledger_events ORDER BY seq DESC LIMIT 1").fetchone()
        kind, actor, job_id, text = connection.execute(
            "SELECT event_type, actor, job_id, payload FROM ledger_events WHERE seq = ?",
            (seq,)).fetchone()
    finally:
        connection.close()
    payload = json.loads(text)
    payload["timestamp"] = datetime.now(UTC).isoformat()
    stamp = datetime.now(UTC).isoformat(timespec="microseconds")
    digest = event_hash(tip_hash, tip + 1, stamp, kind, actor, job_id, payload)
    tamper(path, "INSERT INTO ledger_events (seq, event_id, timestamp, event_type, actor, job_id, "
                 "payload, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
           (tip + 1, _public_id(stamp, digest), stamp, kind, actor, job_id,
            canonical_json(payload).decode(), tip_hash, digest))
    return tip + 1


def test_a_forged_tail_event_is_named_and_never_signed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    _consent_ledger(path)
    forged = _forge_tail_copy_of(path, 1)  # a new consent.granted for the withdrawn subject
    message = f"event seq {forged} was not written by this ledger's writer key"
    with Ledger.open(path, read_only=True) as ledger:
        result = ledger.verify()
    assert not result.ok and result.first_bad_seq == forged and message in result.reason
    with Ledger.open(path) as ledger:
        with pytest.raises(LedgerError, match=message):
            ledger.checkpoint()
        # an honest writer after it: its own events are authenticated, the forged one still named
        ledger.append(EventType.JOB_FAILED, {"reason": "later"}, actor="server")
        later = ledger.verify()
    assert not later.ok and later.first_bad_seq == forged and message in later.reason
    assert _rows(path, "SELECT count(*) FROM ledger_checkpoints WHERE tree_size >= ?",
                 (forged,)) == [(0,)]


def test_the_forged_grant_does_not_admit_the_withdrawn_subject(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    _consent_ledger(path)
    forged = _forge_tail_copy_of(path, 1)
    with Ledger.open(path, read_only=True) as ledger, pytest.raises(
            LedgerError, match=f"event seq {forged} was not written by this ledger's writer key"):
        ConsentRegistry(ledger).allowed(["S-1"], "churn")


def test_postgres_forged_and_renamed_events_are_named(pg_url: str, tmp_path: Path) -> None:
    with Ledger(pg_url, key_dir=tmp_path, checkpoint_every=4) as ledger:
        _fill(ledger, 6)
        head = ledger.head()
    assert head is not None
    stamp = datetime.now(UTC).isoformat(timespec="microseconds")
    payload = {"reason": "forged"}
    digest = event_hash(head.hash, 7, stamp, "job.failed", "server", None, payload)
    pg_tamper(pg_url, "INSERT INTO ledger_events (seq, event_id, timestamp, event_type, actor, "
                      "job_id, payload, prev_hash, hash) VALUES (7, %s, %s, 'job.failed', 'server',"
                      " NULL, %s, %s, %s)",
              (_public_id(stamp, digest), stamp, canonical_json(payload).decode(), head.hash,
               digest))
    with Ledger(pg_url, key_dir=tmp_path, read_only=True) as ledger:
        result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 7
    assert "event seq 7 was not written by this ledger's writer key" in result.reason
    pg_tamper(pg_url, "DELETE FROM ledger_events WHERE seq = 7")
    pg_tamper(pg_url, "UPDATE ledger_events SET event_id = 'renamed' WHERE seq = 2")
    with Ledger(pg_url, key_dir=tmp_path, read_only=True) as ledger:
        renamed = ledger.verify()
    assert not renamed.ok and renamed.first_bad_seq == 2 and "event_id" in renamed.reason


# --- finding 3: the stored Merkle tree -------------------------------------------------------


def test_a_corrupted_frontier_node_is_named_and_not_built_on(db: Path) -> None:
    # the tree of 8 leaves is the single perfect subtree (level 3, index 0)
    tamper(db, "UPDATE merkle_nodes SET hash = ? WHERE level = 3 AND idx = 0", (bytes(32),))
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
    assert not result.ok and result.first_bad_seq is None
    assert "merkle_nodes" in result.reason and "(level 3, index 0)" in result.reason
    with Ledger.open(db, checkpoint_every=1000) as ledger:
        ledger.append(EventType.JOB_FAILED, {"reason": "innocent"}, actor="server")
        with pytest.raises(LedgerError, match=r"merkle_nodes.*\(level 3, index 0\)"):
            ledger.checkpoint()
    assert _rows(db, "SELECT max(tree_size) FROM ledger_checkpoints") == [(8,)]


def test_a_corrupted_interior_node_is_found_by_the_index_check(db: Path) -> None:
    tamper(db, "UPDATE merkle_nodes SET hash = ? WHERE level = 1 AND idx = 1", (bytes(32),))
    with Ledger.open(db, read_only=True) as ledger:
        report = ledger.check_indexes()
    assert not report.ok
    assert any("merkle_nodes" in p and "(level 1, index 1)" in p for p in report.problems)


# --- finding 6: no keys from the database it checks ------------------------------------------


def _resign_with_mallory(db: Path) -> None:
    """Replace every checkpoint signature with an attacker's, register the attacker's key in
    the database, and delete the .pub file beside it."""
    connection = sqlite3.connect(db)
    try:
        notes = connection.execute("SELECT tree_size, note FROM ledger_checkpoints").fetchall()
    finally:
        connection.close()
    name = notes[0][1].split("\n\n")[1].split(" ")[1]
    mallory = CheckpointSigner.generate(name)
    for size, note in notes:
        checkpoint, _, _ = parse_note(note)
        tamper(db, "UPDATE ledger_checkpoints SET note = ? WHERE tree_size = ?",
               (mallory.sign(checkpoint), size))
    key = mallory.verifier
    tamper(db, "INSERT INTO ledger_keys (key_id, name, vkey, added) VALUES (?, ?, ?, 'now')",
           (key.key_id.hex(), key.name, key.encode()))
    (db.parent / "ledger.db.pub").unlink()


def test_verify_never_trusts_keys_from_the_database(db: Path, tmp_path: Path) -> None:
    saved = tmp_path / "their-copy.pub"
    shutil.copy(db.parent / "ledger.db.pub", saved)
    with Ledger.open(db, read_only=True) as ledger:
        kept = ledger.latest_checkpoint()
    assert kept is not None
    _resign_with_mallory(db)
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
        assert not result.ok and "public key" in result.reason
        assert "--public-key" in result.reason and "--checkpoint" in result.reason
        explicit = ledger.verify(public_keys=load_keys(saved.read_text()))
        assert not explicit.ok and "not signed by" in explicit.reason
        with_kept = ledger.verify(kept_note=kept.note)
        assert not with_kept.ok
    runner = CliRunner()
    from fedpact.service.cli import app

    bare = runner.invoke(app, ["audit", "verify", "--home", str(db.parent)])
    assert bare.exit_code == 1 and "public key" in bare.output
    given = runner.invoke(app, ["audit", "verify", "--home", str(db.parent),
                                "--public-key", str(saved)])
    assert given.exit_code == 1 and "not signed by" in given.output


def test_a_kept_checkpoint_alone_names_its_key(db: Path, tmp_path: Path) -> None:
    """Without the .pub file, a kept checkpoint picks the one database key that signed it."""
    with Ledger.open(db, read_only=True) as ledger:
        kept = ledger.latest_checkpoint()
    assert kept is not None
    (db.parent / "ledger.db.pub").unlink()
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify_against_checkpoint(kept.note)
    assert result.ok and "consistent with the kept checkpoint" in result.reason


# --- finding 11: type tricks -----------------------------------------------------------------


@pytest.mark.parametrize("column", ["payload", "actor", "event_type", "timestamp", "job_id",
                                    "prev_hash", "hash", "event_id"])
def test_a_value_stored_as_a_blob_is_named(db: Path, column: str) -> None:
    tamper(db, f"UPDATE ledger_events SET {column} = CAST({column} AS BLOB) WHERE seq = 5")
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
        assert not result.ok and result.first_bad_seq == 5
        assert f"event 5: {column} is stored as a BLOB" in result.reason
        with pytest.raises(LedgerError, match=f"event 5 is corrupt: {column} is stored as a BLOB"):
            ledger.events()


def test_a_merkle_node_or_checkpoint_stored_as_text_is_named(db: Path) -> None:
    tamper(db, "UPDATE merkle_nodes SET hash = hex(hash) WHERE level = 2 AND idx = 1")
    with Ledger.open(db, read_only=True) as ledger:
        with pytest.raises(LedgerError, match=r"merkle_nodes \(level 2, index 1\) is stored as"):
            ledger.prove(1)
        report = ledger.check_indexes()
    assert any("(level 2, index 1)" in p for p in report.problems)
    tamper(db, "UPDATE ledger_checkpoints SET note = CAST(note AS BLOB) WHERE tree_size = 8")
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
    assert not result.ok and "checkpoint at tree size 8 is stored as a BLOB" in result.reason


def test_a_lost_writer_key_is_not_recreated_and_its_absence_is_named(db: Path,
                                                                    tmp_path: Path) -> None:
    key = db.parent / "ledger.db.writer-key"
    saved = tmp_path / "saved.writer-key"
    shutil.move(key, saved)
    with Ledger.open(db, checkpoint_every=1) as ledger:  # a checkpoint would be due at once
        event = ledger.append(EventType.JOB_FAILED, {"reason": "untagged"}, actor="server")
        assert not key.exists()  # not re-created: it would vouch for whatever came meanwhile
        with pytest.raises(LedgerError, match="no writer key"):
            ledger.checkpoint()
        assert "writer tags not checked" in ledger.verify().reason
    shutil.move(saved, key)
    with Ledger.open(db, read_only=True) as ledger:
        result = ledger.verify()
    assert not result.ok and result.first_bad_seq == event.seq
    assert f"event seq {event.seq} was not written by this ledger's writer key" in result.reason
