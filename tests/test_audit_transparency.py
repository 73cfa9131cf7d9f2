"""Signed checkpoints over the ledger: every kind of tampering is named, proofs verify with a public key."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import pytest
from ledger_tamper import tamper, write_legacy_ledger

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.audit.chain import canonical_json, event_hash
from fedpact.audit.checkpoint import CheckpointError, CheckpointSigner, VerifierKey
from fedpact.audit.merkle import ProofError
from fedpact.audit.store import SCHEMA_HEAD
from fedpact.audit.verifier import (
    load_keys,
    main,
    verify_consistency_bundle,
    verify_database,
    verify_inclusion_bundle,
)

JOB = "job-42"
ACCESS = {"node": "bank-a", "dataset": "customers", "rows": 10, "columns": ["age"],
          "purpose": "churn model"}


def _fill(ledger: Ledger, n: int) -> None:
    ledger.append_many(
        (EventType.DATA_ACCESSED, {**ACCESS, "rows": i}, "node:bank-a", JOB) for i in range(1, n + 1)
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger.open(path, checkpoint_every=10) as ledger:
        for _ in range(3):
            _fill(ledger, 10)  # a checkpoint after each batch: tree sizes 10, 20, 30
    return path


def _verify(db: Path):
    with Ledger.open(db) as ledger:
        return ledger.verify()


def test_checkpoints_are_written_every_n_events_and_on_close(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l.db", checkpoint_every=4) as ledger:
        for i in range(10):
            ledger.append(EventType.JOB_FAILED, {"reason": "test", "i": i}, actor="server")
        assert [c.tree_size for c in ledger.checkpoints()] == [4, 8]
    with Ledger.open(tmp_path / "l.db") as ledger:
        assert [c.tree_size for c in ledger.checkpoints()] == [4, 8, 10]
        result = ledger.verify()
    assert result.ok and result.checkpoints_checked == 3 and result.signed_tree_size == 10
    assert "matches 3 signed checkpoints" in result.reason


def test_checkpoints_are_written_after_the_interval(tmp_path: Path, monkeypatch) -> None:
    import fedpact.audit.ledger as ledger_module

    clock = {"now": 1000.0}
    monkeypatch.setattr(ledger_module.time, "time", lambda: clock["now"])
    with Ledger.open(tmp_path / "l.db", checkpoint_every=1000, checkpoint_interval_s=30) as ledger:
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
        clock["now"] += 10
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
        assert ledger.checkpoints() == []
        clock["now"] += 25
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
        assert [c.tree_size for c in ledger.checkpoints()] == [3]


def test_intact_log_verifies(db: Path) -> None:
    result = _verify(db)
    assert result.ok and result.events_checked == 30 and result.signed_tree_size == 30


# --- the six tampering faults of the issue, each named at the first bad event -------------------


def test_modified_field_is_named(db: Path) -> None:
    tamper(db, "UPDATE ledger_events SET actor = 'node:mallory' WHERE seq = 12")
    result = _verify(db)
    assert not result.ok and result.first_bad_seq == 12
    assert result.reason.startswith("event 12:")


def test_deleted_row_is_named(db: Path) -> None:
    tamper(db, "DELETE FROM ledger_events WHERE seq = 17")
    result = _verify(db)
    assert not result.ok and result.first_bad_seq == 17
    assert result.reason == "gap: event 18 follows event 16"


def test_inserted_row_is_named(db: Path) -> None:
    """A forged event slipped in as event 8, correctly hashed and linked to event 7."""
    with Ledger.open(db) as ledger:
        seven = ledger.event(7)
    tamper(db, "UPDATE ledger_events SET seq = seq + 1000 WHERE seq >= 8")
    tamper(db, "UPDATE ledger_events SET seq = seq - 999 WHERE seq >= 1000")
    forged = {**ACCESS, "rows": 999999}
    digest = event_hash(seven.hash, 8, seven.timestamp, "data.accessed", "node:bank-a", JOB, forged)
    tamper(
        db,
        "INSERT INTO ledger_events VALUES (8, 'forged', ?, 'data.accessed', 'node:bank-a', ?, ?, ?, ?)",
        (seven.timestamp, JOB, canonical_json(forged).decode(), seven.hash, digest),
    )
    result = _verify(db)
    assert not result.ok and result.first_bad_seq == 9
    assert result.reason == "event 9: prev_hash does not link to event 8"


def test_swapped_rows_are_named(db: Path) -> None:
    tamper(db, "UPDATE ledger_events SET seq = -1 WHERE seq = 5")
    tamper(db, "UPDATE ledger_events SET seq = 5 WHERE seq = 6")
    tamper(db, "UPDATE ledger_events SET seq = 6 WHERE seq = -1")
    result = _verify(db)
    assert not result.ok and result.first_bad_seq == 5
    assert result.reason == "event 5: prev_hash does not link to event 4"


def test_truncated_tail_is_caught_by_the_signed_checkpoint(db: Path) -> None:
    """Deleting the newest events leaves a perfect chain; only the checkpoint knows it was longer."""
    tamper(db, "DELETE FROM ledger_events WHERE seq > 26")
    result = _verify(db)
    assert not result.ok and result.first_bad_seq == 27
    assert result.reason.startswith("truncated: the signed checkpoint at tree size 30")
    assert "events 27..30 were removed" in result.reason
    assert result.events_checked == 26


def test_truncate_then_append_is_caught_too(db: Path) -> None:
    tamper(db, "DELETE FROM ledger_events WHERE seq > 28")
    with Ledger.open(db, checkpoint_every=10_000) as ledger:
        # the reopened writer refuses to build on a chain that contradicts its own signed tree
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
        result = ledger.verify()
    assert not result.ok and result.first_bad_seq == 29
    assert "differ from those signed in the checkpoint at tree size 30" in result.reason


def test_replaced_checkpoint_signature_is_named(db: Path) -> None:
    connection = sqlite3.connect(db)
    note = connection.execute("SELECT note FROM ledger_checkpoints WHERE tree_size = 30").fetchone()[0]
    connection.close()
    body, _, signature_line = note.partition("\n\n")
    name, blob = signature_line.strip().split(" ")[1:]
    raw = base64.b64decode(blob)
    forged = raw[:4] + bytes(64)  # right key id, signature of zeros
    forged_note = f"{body}\n\n\u2014 {name} {base64.b64encode(forged).decode()}\n"
    tamper(db, "UPDATE ledger_checkpoints SET note = ? WHERE tree_size = 30", (forged_note,))
    result = _verify(db)
    assert not result.ok and result.first_bad_seq == 21  # first event only that checkpoint vouches for
    assert "tree size 30" in result.reason and "does not verify" in result.reason


def test_checkpoint_resigned_with_an_attackers_key_is_refused(db: Path) -> None:
    connection = sqlite3.connect(db)
    note = connection.execute("SELECT note FROM ledger_checkpoints WHERE tree_size = 10").fetchone()[0]
    connection.close()
    mallory = CheckpointSigner.generate(note.split("\n\n")[1].split(" ")[1])
    from fedpact.audit.checkpoint import parse_note

    checkpoint, _, _ = parse_note(note)
    tamper(db, "UPDATE ledger_checkpoints SET note = ? WHERE tree_size = 10", (mallory.sign(checkpoint),))
    result = _verify(db)
    assert not result.ok and result.first_bad_seq == 1 and "not signed by" in result.reason


def test_fully_rehashed_history_is_caught_by_the_checkpoint(db: Path) -> None:
    """Rewriting event 14 and re-hashing every later event fools the chain, not the signed root."""
    with Ledger.open(db) as ledger:
        events = ledger.events()
    prev = events[12].hash
    for original in events[13:]:
        payload = {**original.payload, "purpose": "rewritten"} if original.seq == 14 else original.payload
        digest = event_hash(prev, original.seq, original.timestamp, original.event_type,
                            original.actor, original.job_id, payload)
        tamper(db, "UPDATE ledger_events SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (canonical_json(payload).decode(), prev, digest, original.seq))
        prev = digest
    result = _verify(db)
    assert not result.ok and result.first_bad_seq == 14
    assert "checkpoint at tree size 20" in result.reason and "rewritten" in result.reason


def test_refuses_to_sign_over_a_broken_chain(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, checkpoint_every=1000) as ledger:
        _fill(ledger, 3)
        ledger.checkpoint()
        _fill(ledger, 3)
        tamper(path, "UPDATE ledger_events SET actor = 'x' WHERE seq = 5")
        with pytest.raises(LedgerError, match="refusing to sign.*event 5"):
            ledger.checkpoint()


# --- proofs and the third-party verifier ---------------------------------------------------------


def test_inclusion_proofs_verify_with_only_the_public_key(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, checkpoint_every=100) as ledger:
        for n in (100, 100, 50):
            _fill(ledger, n)
        vkey = ledger.verifier_key
        bundles = [ledger.prove(seq) for seq in (1, 2, 99, 100, 101, 200, 250)]
        by_id = ledger.prove(ledger.event(77).event_id, tree_size=100)
    public = VerifierKey.parse((tmp_path / "l.db.pub").read_text().split()[0])
    assert public == vkey
    for bundle in bundles:
        json.loads(json.dumps(bundle))  # plain JSON
        verdict = verify_inclusion_bundle(bundle, public)
        assert verdict.seq == bundle["event"]["seq"]
        # the latest checkpoint at proving time; proving event 250 signed a new one
        assert verdict.tree_size == (250 if verdict.seq == 250 else 200)
    assert verify_inclusion_bundle(by_id, public).tree_size == 100

    forged = json.loads(json.dumps(bundles[3]))
    forged["event"]["payload"]["rows"] = 1
    with pytest.raises(ProofError, match="do not hash"):
        verify_inclusion_bundle(forged, public)
    wrong_path = json.loads(json.dumps(bundles[3]))
    wrong_path["inclusion_proof"][0] = base64.b64encode(bytes(32)).decode()
    with pytest.raises(ProofError, match="does not lead to the signed root"):
        verify_inclusion_bundle(wrong_path, public)
    with pytest.raises(CheckpointError, match="not signed by"):
        verify_inclusion_bundle(bundles[0], CheckpointSigner.generate(public.name).verifier)


def test_prove_signs_a_checkpoint_for_a_new_event(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l.db", checkpoint_every=1000) as ledger:
        _fill(ledger, 3)
        bundle = ledger.prove(3)
        assert verify_inclusion_bundle(bundle, ledger.verifier_key).tree_size == 3
        with pytest.raises(LedgerError, match="no ledger event"):
            ledger.prove(4)


def test_consistency_proofs_between_checkpoints(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l.db", checkpoint_every=7) as ledger:
        for _ in range(5):
            _fill(ledger, 7)
        sizes = [c.tree_size for c in ledger.checkpoints()]
        key = ledger.verifier_key
        assert sizes == [7, 14, 21, 28, 35]
        for old in sizes:
            bundle = ledger.prove_consistency(old)
            assert verify_consistency_bundle(bundle, key) == (old, 35)
        bundle = ledger.prove_consistency(7, 21)
        assert verify_consistency_bundle(bundle, key) == (7, 21)
        with pytest.raises(LedgerError, match="no signed checkpoint at tree size 8"):
            ledger.prove_consistency(8)


def test_tampered_merkle_node_makes_proofs_fail_verification(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, checkpoint_every=16) as ledger:
        _fill(ledger, 16)
        key = ledger.verifier_key
    tamper(path, "UPDATE merkle_nodes SET hash = ? WHERE level = 1 AND idx = 1", (bytes(32),))
    with Ledger.open(path) as ledger:
        bundle = ledger.prove(1)
    with pytest.raises(ProofError):
        verify_inclusion_bundle(bundle, key)


def test_database_copy_verifies_by_a_third_party(tmp_path: Path, capsys) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, checkpoint_every=10) as ledger:
        _fill(ledger, 23)
        bundle = ledger.prove(5)
    copy = tmp_path / "copy" / "ledger.db"
    copy.parent.mkdir()
    with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    keys = load_keys((tmp_path / "l.db.pub").read_text())
    assert verify_database(f"sqlite:///{copy}", keys).ok
    bundle_file = tmp_path / "proof.json"
    bundle_file.write_text(json.dumps(bundle))
    (tmp_path / "key.pub").write_text((tmp_path / "l.db.pub").read_text())
    assert main([str(bundle_file), "--public-key", str(tmp_path / "key.pub")]) == 0
    assert main([str(copy), "--public-key", str(tmp_path / "key.pub")]) == 0
    tamper(copy, "DELETE FROM ledger_events WHERE seq = 23")
    assert main([str(copy), "--public-key", str(tmp_path / "key.pub")]) == 1
    out = capsys.readouterr().out
    assert "OK: event 5" in out and "BROKEN at event 23: truncated" in out
    stranger = tmp_path / "stranger.pub"
    stranger.write_text(CheckpointSigner.generate("x").verifier.encode())
    assert main([str(bundle_file), "--public-key", str(stranger)]) == 1


def test_copy_without_keys_still_verifies_and_appends_unsigned(tmp_path: Path) -> None:
    path = tmp_path / "a" / "ledger.db"
    with Ledger.open(path, checkpoint_every=5) as ledger:
        _fill(ledger, 5)
    copy = tmp_path / "b" / "ledger.db"
    copy.parent.mkdir()
    with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    with Ledger.open(copy) as ledger:
        assert ledger.verifier_key is None
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
        # no .pub beside the copy: the key comes from elsewhere, never from the database (#15)
        result = ledger.verify(load_keys((path.parent / "ledger.db.pub").read_text()))
        with pytest.raises(LedgerError, match="no signing key"):
            ledger.checkpoint()
    assert result.ok and "1 newest not yet in a signed checkpoint" in result.reason
    assert not (copy.parent / "ledger.db.signing-key").exists()


def test_key_rotation_keeps_old_checkpoints_verifiable(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, checkpoint_every=5) as ledger:
        _fill(ledger, 5)
        old = ledger.verifier_key
        new = ledger.rotate_signing_key(actor="admin:alice", reason="annual rotation")
        _fill(ledger, 5)
        assert new != old
        assert ledger.events(event_type=EventType.KEYS_ROTATED)[0].payload["new_key_id"] == new.key_id.hex()
    with Ledger.open(path) as ledger:
        result = ledger.verify()
        assert result.ok and result.signed_tree_size == 11
        assert not ledger.verify(public_keys=[new]).ok  # the old checkpoints need the old key
        assert ledger.verify(public_keys=[old, new]).ok


def test_legacy_database_is_migrated_and_checkpointed(tmp_path: Path) -> None:
    """A ledger written before checkpoints existed (one table, no alembic) opens and gets signed."""
    path = tmp_path / "old.db"
    write_legacy_ledger(path, [("job.failed", "server", None, {"reason": f"old {seq}"})
                               for seq in (1, 2)])
    with Ledger.open(path) as ledger:
        assert ledger.count() == 2
        ledger.append(EventType.JOB_FAILED, {"reason": "test"}, actor="server")
    with Ledger.open(path) as ledger:
        result = ledger.verify()
    assert result.ok and result.signed_tree_size == 3
    version = sqlite3.connect(path).execute("SELECT version_num FROM alembic_version").fetchone()
    assert version == (SCHEMA_HEAD,)
