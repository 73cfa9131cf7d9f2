"""A verifier a third party runs with only the ledger's public key.

Three checks, none trusting the machine that produced the ledger:

- `verify_inclusion_bundle`: the JSON from `fedpact audit prove EVENT` — the event's hash
  recomputes from its fields, and its audit path leads to the root of a checkpoint the key signed;
- `verify_consistency_bundle`: a newer signed checkpoint extends an older one (nothing rewritten);
- `verify_database`: a copy of the whole ledger database — chain, Merkle roots and signatures,
  event ids (bound to their records from the seq the signed checkpoints state), and, given a
  signed checkpoint kept from earlier (`kept=`), that the log still extends it (a log truncated
  together with its checkpoint rows, or rewritten, passes every other check). The per-event
  writer tags are a MAC: only the writer key's holder checks them (`Ledger.verify`); the ledger
  never signs a checkpoint over an event whose tag does not verify.

Command line: `python -m fedpact.audit.verifier --public-key ledger.db.pub BUNDLE.json|DB-URL
[--checkpoint KEPT]`. KEPT is a signed note (`fedpact audit checkpoint --out`) or a bundle that
holds one (`fedpact audit prove` output, a consistency bundle).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import make_url, select
from sqlalchemy.exc import SQLAlchemyError

from fedpact.audit.chain import ChainVerification, event_hash, event_id_for
from fedpact.audit.checkpoint import Checkpoint, CheckpointError, VerifierKey, open_checkpoint
from fedpact.audit.events import LedgerError
from fedpact.audit.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion


@dataclass(frozen=True)
class InclusionVerdict:
    """What a valid inclusion bundle proves: event `seq` with `event_hash` is in signed tree `tree_size`."""

    seq: int
    event_id: str
    event_hash: str
    tree_size: int
    root_hash: str
    signed_by: str


def load_keys(text: str) -> list[VerifierKey]:
    """Parse one verifier key per line (the `.pub` file beside a ledger)."""
    keys = [VerifierKey.parse(line) for line in text.split() if line.strip()]
    if not keys:
        raise CheckpointError("no verifier key given")
    return keys


def _open(note: str, keys: Sequence[VerifierKey]) -> tuple[Checkpoint, VerifierKey]:
    errors = []
    for key in keys:
        try:
            return open_checkpoint(note, key), key
        except CheckpointError as exc:
            errors.append(str(exc))
    raise CheckpointError("; ".join(errors) or "no verifier key given")


def _decode_hashes(values: Any, label: str) -> list[bytes]:
    if not isinstance(values, list):
        raise ProofError(f"{label} must be a list of base64 hashes")
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (binascii.Error, TypeError, ValueError):
        raise ProofError(f"{label} holds a value that is not base64") from None


def verify_inclusion_bundle(
    bundle: Mapping[str, Any], keys: VerifierKey | Sequence[VerifierKey]
) -> InclusionVerdict:
    """Check an inclusion bundle; raise ProofError/CheckpointError saying which check failed."""
    keys = [keys] if isinstance(keys, VerifierKey) else list(keys)
    try:
        event = bundle["event"]
        seq = int(event["seq"])
        index = int(bundle["leaf_index"])
        size = int(bundle["tree_size"])
        note = bundle["checkpoint"]
        recomputed = event_hash(
            event["prev_hash"], seq, event["timestamp"], event["event_type"], event["actor"],
            event["job_id"], event["payload"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProofError(f"inclusion bundle is malformed: missing or bad field {exc}") from None
    if recomputed != event["hash"]:
        raise ProofError(f"event {seq}: its fields do not hash to {event['hash'][:16]}… (altered)")
    if index != seq - 1:
        raise ProofError(f"event {seq} must be leaf {seq - 1}, bundle says leaf {index}")
    checkpoint, key = _open(note, keys)
    bound = checkpoint.ids_bound_from
    if bound is not None and seq >= bound:
        expected = event_id_for(event["timestamp"], recomputed)
        if event.get("event_id") != expected:
            raise ProofError(
                f"event {seq}: its event_id {event.get('event_id')!r} is not the id its record "
                f"gives ({expected}): the bundle names the event by another event's id"
            )
    if checkpoint.tree_size != size:
        raise ProofError(f"bundle claims tree size {size}, the signed checkpoint says {checkpoint.tree_size}")
    proof = _decode_hashes(bundle.get("inclusion_proof"), "inclusion_proof")
    verify_inclusion(index, size, leaf_hash(bytes.fromhex(recomputed)), proof, checkpoint.root_hash)
    return InclusionVerdict(
        seq, str(event.get("event_id")), recomputed, size, checkpoint.root_hash.hex(), key.encode()
    )


def verify_consistency_bundle(
    bundle: Mapping[str, Any], keys: VerifierKey | Sequence[VerifierKey]
) -> tuple[int, int]:
    """Check that the bundle's new signed checkpoint extends its old one; return (old, new) sizes."""
    keys = [keys] if isinstance(keys, VerifierKey) else list(keys)
    try:
        old, _ = _open(bundle["old_checkpoint"], keys)
        new, _ = _open(bundle["new_checkpoint"], keys)
    except KeyError as exc:
        raise ProofError(f"consistency bundle is missing {exc}") from None
    if old.origin != new.origin:
        raise ProofError(f"checkpoints are from different logs: {old.origin} vs {new.origin}")
    proof = _decode_hashes(bundle.get("consistency_proof"), "consistency_proof")
    verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof)
    return old.tree_size, new.tree_size


def kept_checkpoint_note(text: str) -> str:
    """The signed note in `text`: a note itself, or an inclusion / consistency bundle (JSON)."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            bundle = json.loads(stripped)
        except ValueError as exc:
            raise CheckpointError(f"kept checkpoint file is not valid JSON: {exc}") from None
        note = None
        if isinstance(bundle, dict):
            note = bundle.get("checkpoint") or bundle.get("new_checkpoint")
        if not isinstance(note, str):
            raise CheckpointError(
                "kept checkpoint file is JSON without a 'checkpoint' or 'new_checkpoint' note"
            )
        return note
    if "\n\n" not in text:
        raise CheckpointError(
            "kept checkpoint file is neither a signed note nor a proof bundle holding one"
        )
    return text


def verify_database(
    url: str, keys: Sequence[VerifierKey], *, kept: str | None = None
) -> ChainVerification:
    """Verify a ledger database (a copy is fine) with the given public keys; writes nothing.

    `kept`: a signed checkpoint note kept from earlier; the log must still extend it.
    """
    from fedpact.audit.ledger import check_kept_checkpoint, check_readable, verify_log
    from fedpact.audit.store import (
        IDS_BOUND_FROM,
        check_schema,
        ledger_checkpoints,
        ledger_meta,
        open_store,
    )

    try:
        parsed = make_url(url)
        check_readable(parsed)
        store = open_store(parsed, read_only=True)
    except LedgerError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as the verdict's reason
        raise LedgerError(f"cannot open {url}: {exc}") from None
    try:
        check_schema(store)
        with store.read() as connection:
            origin = connection.execute(
                select(ledger_meta.c.value).where(ledger_meta.c.key == "ledger_id")
            ).scalar()
            rows = connection.execute(
                select(ledger_checkpoints.c.tree_size, ledger_checkpoints.c.note).order_by(
                    ledger_checkpoints.c.tree_size
                )
            ).all()
            bound = connection.execute(
                select(ledger_meta.c.value).where(ledger_meta.c.key == IDS_BOUND_FROM)
            ).scalar()
            log_origin = f"fedpact-audit/{origin}" if origin else None
            verdict = verify_log(
                store, connection, [(int(s), n) for s, n in rows], keys, origin=log_origin,
                ids_from=int(bound) if bound is not None and str(bound).isdigit() else None,
            )
            if kept is None or not verdict.ok:
                return verdict
            return check_kept_checkpoint(
                store, connection, kept, keys, verdict, origin=log_origin
            )
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read ledger database {url}: {getattr(exc, 'orig', exc)}") from None
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedpact.audit.verifier",
        description="Verify a fedpact audit proof bundle or ledger database with only a public key.",
    )
    parser.add_argument("target", help="inclusion/consistency bundle (.json) or database URL/path")
    parser.add_argument("--public-key", required=True, help="file with verifier key line(s)")
    parser.add_argument(
        "--checkpoint", help="a signed checkpoint kept from earlier (note or proof bundle): the "
        "database must still extend it (catches truncation and rewriting)"
    )
    args = parser.parse_args(argv)
    try:
        keys = load_keys(Path(args.public_key).read_text())
        kept = kept_checkpoint_note(Path(args.checkpoint).read_text()) if args.checkpoint else None
        target = Path(args.target)
        if target.suffix == ".json" and target.exists():
            bundle = json.loads(target.read_text())
            if "inclusion_proof" in bundle:
                verdict = verify_inclusion_bundle(bundle, keys)
                print(f"OK: event {verdict.seq} ({verdict.event_hash[:16]}…) is in the signed log "
                      f"of {verdict.tree_size} events, root {verdict.root_hash[:16]}…")
            else:
                old, new = verify_consistency_bundle(bundle, keys)
                print(f"OK: the signed log of {new} events extends the one of {old} events")
            return 0
        url = args.target if "://" in args.target else f"sqlite:///{target.absolute()}"
        result = verify_database(url, keys, kept=kept)
        where = f" at event {result.first_bad_seq}" if result.first_bad_seq else ""
        print(("OK: " if result.ok else f"BROKEN{where}: ") + result.reason)
        for note in result.notes:
            print(f"note: {note}")
        return 0 if result.ok else 1
    except (LedgerError, OSError, ValueError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1


__all__ = [
    "InclusionVerdict",
    "kept_checkpoint_note",
    "load_keys",
    "main",
    "verify_consistency_bundle",
    "verify_database",
    "verify_inclusion_bundle",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
