"""`fedpact audit …`: verify, prove, query and export the ledger; consent; data-subject requests;
audit roles; retention.

Mounted by cli.py as the `audit` sub-command. Every failure ends in one clear line and a non-zero
exit (1 for a broken ledger or a proof that does not verify, 2 for bad input), never a traceback.
Commands that only look (verify, prove, query, events, record, consent show, role list,
retention enforce --dry-run, checkpoint --no-sign) open the ledger read-only: they create nothing,
write nothing and sign nothing, and refuse a ledger that does not exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, NoReturn

import typer
from rich.table import Table
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.errors import FedpactError

from .cli_options import HomeOption, console, err_console

audit_app = typer.Typer(
    help="Verify, prove, query and export the audit ledger; consent; data-subject requests.",
    no_args_is_help=True,
)
consent_app = typer.Typer(help="Record, import, expire and show consent per subject and purpose.",
                          no_args_is_help=True)
dsar_app = typer.Typer(help="Data-subject requests: access (JSON/CSV) and erasure.",
                       no_args_is_help=True)
export_app = typer.Typer(help="Four-eyes exports of personal data.", no_args_is_help=True)
role_app = typer.Typer(
    help="Audit roles recorded in the ledger: admin (grants roles) and dpo (approves exports).",
    no_args_is_help=True,
)
retention_app = typer.Typer(help="Retention: crypto-shred personal fields past their retention.",
                            no_args_is_help=True)
audit_app.add_typer(consent_app, name="consent")
audit_app.add_typer(dsar_app, name="dsar")
audit_app.add_typer(export_app, name="export")
audit_app.add_typer(role_app, name="role")
audit_app.add_typer(retention_app, name="retention")

DbOption = Annotated[
    str | None,
    typer.Option("--db", envvar="FEDPACT_AUDIT_DB",
                 help="Ledger database URL (postgresql://…), instead of HOME/ledger.db."),
]
OutOption = Annotated[
    Path | None, typer.Option("--out", help="Write to this file instead of standard output.")
]

_USER_ERRORS = (FedpactError, LedgerError, SQLAlchemyError, sqlite3.Error, OSError)


def _message(exc: BaseException) -> str:
    if isinstance(exc, SQLAlchemyError):
        return f"database error: {getattr(exc, 'orig', None) or exc}".splitlines()[0]
    if isinstance(exc, sqlite3.Error):
        return f"database error: {exc}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _sqlite_file(db: str) -> Path | None:
    """The file a sqlite:/// URL names (None for other databases and in-memory SQLite)."""
    try:
        url = make_url(db)
    except ArgumentError:
        return None  # Ledger() reports the bad URL
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(str(url.database)).expanduser().absolute()


def _open_ledger(home: str, db: str | None, *, create: bool, read_only: bool) -> Ledger:
    if db:
        path = _sqlite_file(db)
        if path is not None and not path.exists() and not (create or read_only):
            raise FedpactError(f"no ledger database at {path}")
        return Ledger(db, key_dir=Path(home), read_only=read_only)
    path = Path(home) / "ledger.db"
    if not path.exists() and not create:
        raise FedpactError(
            f"no ledger at {path}: run a job first (fedpact demo / fedpact train) "
            "or point --home at the run folder"
        )
    return Ledger.open(path, read_only=read_only)


@contextlib.contextmanager
def _ledger(
    home: str, db: str | None = None, *, create: bool = False, read_only: bool = False
) -> Iterator[Ledger]:
    """Open the run folder's ledger (or --db); errors become one line and exit code 2.

    `read_only`: the ledger must exist; nothing is created, written or signed. Otherwise, if
    closing cannot sign the events this command recorded, that is reported (exit 1).
    """
    try:
        opened = _open_ledger(home, db, create=create, read_only=read_only)
    except _USER_ERRORS as exc:
        _fail(exc)
    try:
        yield opened
    except _USER_ERRORS as exc:
        opened.close()
        _fail(exc)
    except BaseException:
        opened.close()
        raise
    opened.close()
    if opened.close_error is not None:
        _fail(LedgerError(f"recorded, but the closing checkpoint was not signed: "
                          f"{opened.close_error}"), code=1)


def _fail(exc: BaseException, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/bold red] {_message(exc)}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(exc, "exit_code", code))


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(FedpactError(f"{label} {path} does not exist"))
    except IsADirectoryError:
        _fail(FedpactError(f"{label} {path} is a directory, not a file"))
    except UnicodeDecodeError:
        _fail(FedpactError(f"{label} {path} is not a text file"))
    except OSError as exc:
        _fail(FedpactError(f"cannot read {label} {path}: {exc.strerror or exc}"))


class _Output:
    """Where a command's result goes: standard output, or --out opened *before* the work.

    Opening first means a bad path fails before anything is logged (a DSAR fulfilment, an
    export download); a file this command created is removed again if the command fails.
    """

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.handle = None
        self.created = False
        self.written = False

    def __enter__(self) -> _Output:
        out = self.out
        if out is None:
            return self
        if out.is_dir():
            _fail(FedpactError(f"--out {out} is a directory, not a file"))
        if not out.parent.is_dir():
            _fail(FedpactError(f"cannot write {out}: directory {out.parent} does not exist"))
        self.created = not out.exists()
        try:  # a new file is readable by its owner only: it may hold a subject's personal data
            descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.handle = os.fdopen(descriptor, "a", encoding="utf-8")
        except OSError as exc:
            _fail(FedpactError(f"cannot write {out}: {exc.strerror or exc}"))
        return self

    def write(self, text: str) -> None:
        text = text if text.endswith("\n") else text + "\n"
        if self.handle is None:
            sys.stdout.write(text)
            return
        try:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(text)
            self.handle.flush()
        except OSError as exc:
            _fail(FedpactError(f"cannot write {self.out}: {exc.strerror or exc}"))
        self.written = True
        console.print(f"written to {self.out}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.handle is not None:
            self.handle.close()
            if not self.written and self.created and self.out is not None:
                self.out.unlink(missing_ok=True)


def _emit(text: str, out: Path | None) -> None:
    with _Output(out) as output:
        output.write(text)


def _verification_line(result, *, kept: bool = False) -> str:
    if result.ok:
        return (f"[green]✓ chain verified[/green]: {result.events_checked} events, head "
                f"{result.head_hash[:16]}… — {result.reason}")
    if result.first_bad_seq is None:
        if kept and result.reason.startswith(("truncated", "rewritten", "the kept checkpoint")):
            return f"[red]✗ ledger does not match the kept checkpoint[/red]: {result.reason}"
        return f"[red]✗ ledger does not verify[/red]: {result.reason}"
    return f"[red]✗ chain broken[/red] at event {result.first_bad_seq}: {result.reason}"


@audit_app.command("verify")
def verify(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    public_key: Annotated[Path | None, typer.Option(
        help="Verifier key file (one key per line) obtained independently; default: the "
             "ledger's own .pub file (never keys recorded in the database; without a .pub file "
             "pass this or --checkpoint).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint",
        help="A signed checkpoint kept from earlier (`fedpact audit checkpoint --out`, or a "
             "`prove` bundle): the ledger must still extend it. Catches a tail truncated "
             "together with its checkpoints, and a rewritten history.")] = None,
    indexes: Annotated[bool, typer.Option(
        "--indexes", help="Also compare event_index, consent_state and job_subjects with the "
                          "chain.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Recheck the hash chain, Merkle roots and checkpoint signatures; exit 1 naming the first bad event.

    Read-only: nothing is written or signed, so a truncated log is never vouched for.
    """
    from fedpact.audit.verifier import kept_checkpoint_note, load_keys

    keys = kept = None
    try:
        if public_key is not None:
            keys = load_keys(_read_text(public_key, "public key file"))
        if checkpoint is not None:
            kept = kept_checkpoint_note(_read_text(checkpoint, "kept checkpoint file"))
    except LedgerError as exc:
        _fail(exc)
    index_check = None
    with _ledger(home, db, read_only=True) as ledger:
        result = ledger.verify(public_keys=keys, kept_note=kept)
        if kept is not None and result.ok:
            result = ledger.verify_against_checkpoint(kept, keys, verdict=result)
        if indexes and result.ok:
            index_check = ledger.check_indexes()
    if as_json:
        verdict = dict(result.__dict__)
        if index_check is not None:
            verdict["indexes"] = {"ok": index_check.ok, "problems": list(index_check.problems)}
        sys.stdout.write(json.dumps(verdict) + "\n")
    else:
        console.print(_verification_line(result, kept=kept is not None), highlight=False,
                      soft_wrap=True)
        for note in getattr(result, "notes", ()):
            console.print(f"[yellow]note[/yellow]: {note}", highlight=False, soft_wrap=True)
        if index_check is not None:
            if index_check.ok:
                console.print(f"[green]✓ indexes match the chain[/green]: {index_check.summary()}",
                              highlight=False)
            else:
                console.print(f"[red]✗ derived tables differ from the chain[/red]: "
                              f"{index_check.summary()}", highlight=False)
                console.print("repair event_index and consent_state with `fedpact audit reindex`")
    if not result.ok or (index_check is not None and not index_check.ok):
        raise typer.Exit(1)


@audit_app.command("events")
def events(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    job: Annotated[str | None, typer.Option(help="Only this job's events.")] = None,
    event_type: Annotated[str | None, typer.Option(
        "--type", help="Only this event type, e.g. data.accessed.")] = None,
    limit: Annotated[int, typer.Option(
        min=0, help="At most this many events (newest last); 0 for all.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print events as JSON lines.")] = False,
) -> None:
    """List ledger events, filtered by job and type."""
    from fedpact.service.reporting import events_table

    if event_type is not None:
        try:
            EventType(event_type)
        except ValueError:
            _fail(FedpactError(f"unknown event type {event_type!r}: choose one of "
                               f"{', '.join(t.value for t in EventType)}"))
    with _ledger(home, db, read_only=True) as ledger:
        found = ledger.events(job_id=job, event_type=event_type)
    found = found[-limit:] if limit else found
    if as_json:
        for event in found:
            sys.stdout.write(json.dumps(event.to_dict(), default=str) + "\n")
        return
    console.print(events_table(found))
    console.print(f"{len(found)} events shown")


@audit_app.command("prove")
def prove(
    event_id: Annotated[str, typer.Argument(help="Event id (hex) or seq number.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    out: OutOption = None,
) -> None:
    """Print an inclusion proof bundle for one event: check it with only the public key.

    Read-only: an event newer than the last signed checkpoint needs `fedpact audit checkpoint`.
    """
    from fedpact.audit.verifier import verify_inclusion_bundle

    ref: str | int = int(event_id) if event_id.isdigit() else event_id
    with _Output(out) as output:
        with _ledger(home, db, read_only=True) as ledger:
            bundle = ledger.prove(ref)
            keys = ledger.trusted_keys()
            pub = ledger.key_path("pub")
        if not keys:
            _fail(LedgerError(f"no public key file at {pub}: the proof cannot be checked before "
                              "it is handed out (keys recorded in the database are never used)"),
                  code=1)
        try:
            verify_inclusion_bundle(bundle, keys)  # never hand out a proof that does not check
        except LedgerError as exc:
            _fail(exc, code=1)
        output.write(json.dumps(bundle, indent=2, ensure_ascii=False))
    if out is not None and pub is not None:
        console.print(f"check it anywhere: python -m fedpact.audit.verifier {out} "
                      f"--public-key {pub}")


@audit_app.command("checkpoint")
def checkpoint(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Also write the latest signed checkpoint note here: give it to a partner "
                      "or regulator to keep, and later check the ledger against it with "
                      "`fedpact audit verify --checkpoint FILE`.")] = None,
    no_sign: Annotated[bool, typer.Option(
        "--no-sign", help="Sign nothing (read-only): only show or write the latest signed "
                          "checkpoint.")] = False,
) -> None:
    """Sign a checkpoint over every event now (normally done every N events or T seconds)."""
    with _Output(out) as output:
        with _ledger(home, db, read_only=no_sign) as ledger:
            info = ledger.latest_checkpoint() if no_sign else ledger.checkpoint()
        if info is None:
            _fail(LedgerError("the ledger has no signed checkpoint yet (it is empty)"), code=1)
        console.print(f"checkpoint: tree size {info.tree_size}, root {info.root_hash[:16]}…, "
                      f"signed {info.timestamp}")
        if out is not None:
            output.write(info.note)
            console.print(f"keep it; later: fedpact audit verify --checkpoint {out}")


@audit_app.command("reindex")
def reindex(home: HomeOption = ".fedpact", db: DbOption = None) -> None:
    """Rebuild event_index and consent_state from the chain, in one transaction.

    The chain is re-checked as it is read (a broken chain is refused). job_subjects is not in
    the chain (only its manifest hashes are): it is checked and reported, never rebuilt.
    """
    from fedpact.audit.ledger import UNREPAIRABLE

    with _ledger(home, db) as ledger, console.status("rebuilding the indexes from the chain…"):
        report = ledger.rebuild_indexes(actor="cli")
    left = [p for p in report.problems if p.startswith(UNREPAIRABLE)]
    fixed = len(report.problems) - len(left)
    console.print(f"reindexed {report.events} events: {report.index_rows} event_index rows, "
                  f"{report.consent_rows} consent_state rows; {fixed} differences repaired")
    for problem in left:
        console.print(f"[red]✗[/red] {problem}", highlight=False)
    if left:
        console.print("job_subjects and merkle_nodes cannot be rebuilt from the chain: restore "
                      "them from a backup")
        raise typer.Exit(1)


@audit_app.command("query")
def query(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    subject: Annotated[str | None, typer.Option(help="Subject id (pseudonymised here) or pseudonym.")] = None,
    partner: Annotated[str | None, typer.Option(help="Partner (node) name.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name.")] = None,
    purpose: Annotated[str | None, typer.Option(help="Processing purpose.")] = None,
    channel: Annotated[str | None, typer.Option(help="Consent or request channel.")] = None,
    event_type: Annotated[list[str] | None, typer.Option("--type", help="Event type (repeatable).")] = None,
    job: Annotated[str | None, typer.Option(help="Job id.")] = None,
    since: Annotated[str | None, typer.Option(help="From this ISO-8601 time (inclusive).")] = None,
    until: Annotated[str | None, typer.Option(help="Until this ISO-8601 time (exclusive).")] = None,
    after: Annotated[int, typer.Option(min=0, help="Page cursor: events after this seq.")] = 0,
    limit: Annotated[int, typer.Option(min=1, help="Page size.")] = 100,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    out: OutOption = None,
) -> None:
    """Find events by subject, partner, dataset, purpose, channel, type, job and time; paginated."""
    from fedpact.audit.query import EventFilter, query_events, to_csv, to_json_lines
    from fedpact.service.reporting import events_table

    if fmt not in ("table", "csv", "json"):
        _fail(FedpactError(f"--format {fmt!r} is not table, csv or json"))
    if fmt == "table" and out is not None:
        _fail(FedpactError("--out needs --format csv or json"))
    where = EventFilter(subject=subject, partner=partner, dataset=dataset, purpose=purpose,
                        channel=channel, event_types=tuple(event_type or ()), job_id=job,
                        since=since, until=until)
    with _Output(out) as output:
        with _ledger(home, db, read_only=True) as ledger:
            page = query_events(ledger, where, after_seq=after, limit=limit)
        if fmt == "csv":
            output.write(to_csv(page.events))
        elif fmt == "json":
            output.write(to_json_lines(page.events))
        else:
            console.print(events_table(page.events))
    more = f"; next page: --after {page.next_after_seq}" if page.next_after_seq else ""
    err_console.print(f"{len(page.events)} events{more}")


@audit_app.command("record")
def record(
    job: Annotated[str, typer.Argument(help="Job id.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    pipl: Annotated[bool, typer.Option("--pipl", help="PIPL Art. 55 impact assessment instead.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="md or html.")] = "md",
    controller: Annotated[str, typer.Option(help="Controller named in the record.")] = "the fedpact coordinator operator",
    out: OutOption = None,
) -> None:
    """GDPR Art. 30 record of processing (or PIPL Art. 55 assessment) of a job, from its events."""
    from fedpact.audit.records import processing_record

    if fmt not in ("md", "html"):
        _fail(FedpactError(f"--format {fmt!r} is not md or html"))
    with _Output(out) as output:
        with _ledger(home, db, read_only=True) as ledger:
            document = processing_record(ledger, job, controller=controller)
        target = document.pipl_assessment() if pipl else document
        output.write(target.to_markdown() if fmt == "md" else target.to_html())


# --- consent -----------------------------------------------------------------------------------


@consent_app.command("import")
def consent_import(
    csv_path: Annotated[Path, typer.Argument(help="CSV export of a consent-management tool.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    assume_utc: Annotated[bool, typer.Option(help="Read timestamps without an offset as UTC.")] = False,
) -> None:
    """Import consent records: bad rows are listed by line, good rows recorded together."""
    from fedpact.audit.consent import ConsentRegistry

    with _ledger(home, db, create=True) as ledger:
        report = ConsentRegistry(ledger, actor="cli").import_csv(csv_path, assume_utc=assume_utc)
    console.print(report.summary(), highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@consent_app.command("grant")
def consent_grant(
    subject: Annotated[str, typer.Argument(help="Subject id (stored only pseudonymised).")],
    purpose: Annotated[str, typer.Argument(help="One processing purpose.")],
    channel: Annotated[str, typer.Option(help="Where consent was collected.")],
    legal_basis: Annotated[str, typer.Option(help="e.g. consent (GDPR 6(1)(a), PIPL 13(1)).")],
    notice_version: Annotated[str, typer.Option(help="Privacy notice version shown.")],
    source: Annotated[str, typer.Option(help="System or person recording it.")],
    expires_at: Annotated[str | None, typer.Option(help="ISO-8601 expiry.")] = None,
    home: HomeOption = ".fedpact",
    db: DbOption = None,
) -> None:
    """Record a grant of consent for one purpose."""
    from fedpact.audit.consent import ConsentRegistry

    with _ledger(home, db, create=True) as ledger:
        event = ConsentRegistry(ledger, actor="cli").grant(
            subject, purpose, channel=channel, legal_basis=legal_basis,
            notice_version=notice_version, source=source, expires_at=expires_at)
        console.print(f"consent granted: event {event.seq}, subject {event.payload['subject']}")


@consent_app.command("withdraw")
def consent_withdraw(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    purpose: Annotated[str, typer.Argument(help="The purpose withdrawn.")],
    channel: Annotated[str, typer.Option(help="Where the withdrawal came in.")],
    source: Annotated[str, typer.Option(help="System or person recording it.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
) -> None:
    """Record a withdrawal of consent for one purpose (as easy as granting)."""
    from fedpact.audit.consent import ConsentRegistry

    with _ledger(home, db, create=True) as ledger:
        event = ConsentRegistry(ledger, actor="cli").withdraw(subject, purpose, channel=channel,
                                                              source=source)
        console.print(f"consent withdrawn: event {event.seq}, subject {event.payload['subject']}, "
                      f"purpose {event.payload['purpose']}", highlight=False)
        for warning in event.warnings:
            err_console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False,
                              soft_wrap=True)


@consent_app.command("expire")
def consent_expire(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    at: Annotated[str | None, typer.Option(
        help="Expire grants whose expiry is at or before this ISO-8601 time (default: now).")] = None,
    actor: Annotated[str, typer.Option(help="Who records the expiries.")] = "consent-registry",
) -> None:
    """Record consent.expired for every grant past its expiry (run it daily, e.g. from cron)."""
    from fedpact.audit.consent import ConsentRegistry

    when = None
    if at is not None:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            _fail(FedpactError(f"--at {at!r} is not an ISO-8601 time (e.g. 2026-01-31T00:00:00+00:00)"))
        if when.tzinfo is None:
            _fail(FedpactError(f"--at {at!r} has no UTC offset (add +00:00 or Z)"))
        if when > datetime.now(UTC):
            _fail(FedpactError(
                f"--at {at!r} is in the future: an expiry is recorded only once it has happened "
                "(a future one would also hide consents renewed before it)"))
    with _ledger(home, db) as ledger:
        with console.status("finding grants past their expiry and recording them…"):
            expired = ConsentRegistry(ledger, actor=actor).expire_due(when, actor=actor)
        if not expired:
            console.print("no consent is past its expiry: nothing recorded")
            return
        per_purpose: dict[str, int] = {}
        for event in expired:
            per_purpose[event.payload["purpose"]] = per_purpose.get(event.payload["purpose"], 0) + 1
        table = Table(title="consents expired", title_justify="left")
        table.add_column("purpose")
        table.add_column("subjects", justify="right")
        for purpose, count in sorted(per_purpose.items()):
            table.add_row(purpose, str(count))
        console.print(table)
        console.print(f"{len(expired)} consents expired: events {expired[0].seq}..{expired[-1].seq}")


@consent_app.command("show")
def consent_show(
    subject: Annotated[str, typer.Argument(help="Subject id or pseudonym.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
) -> None:
    """Current consent of one subject, per purpose."""
    from fedpact.audit.consent import ConsentRegistry

    with _ledger(home, db, read_only=True) as ledger:
        records = ConsentRegistry(ledger).current(subject)
    table = Table(title_justify="left")
    for column in ("purpose", "status", "channel", "legal basis", "notice", "since", "expires", "event"):
        table.add_column(column)
    for r in records:
        table.add_row(r.purpose, r.status, r.channel or "", r.legal_basis or "",
                      r.notice_version or "", r.effective_at[:19], (r.expires_at or "")[:19], str(r.seq))
    console.print(table)
    console.print(f"{len(records)} purposes")


# --- data-subject requests ---------------------------------------------------------------------

RegistryOption = Annotated[
    list[Path] | None,
    typer.Option("--registry", help="A partner's own registry (its node's consent-ledger file) "
                 "to search as well; repeatable. Without --db, the simulated partners' "
                 "registries under --home (nodes/*/ledger.db) are searched too."),
]


@contextlib.contextmanager
def _registries(home: str, db: str | None, given: list[Path] | None) -> Iterator[list[Ledger]]:
    """Open the partner registries a DSAR searches: each --registry file, and without --db the
    simulated partners' own registries under the run folder (federation.node_data
    .partner_registry_path: nodes/<partner>/ledger.db). Each keeps its own keys beside it."""
    paths = [Path(p) for p in given or ()]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        _fail(FedpactError(f"--registry {missing[0]}: no ledger database there"))
    if db is None:
        paths += sorted(Path(home).glob("nodes/*/ledger.db"))
    seen: set[Path] = set()
    with contextlib.ExitStack() as stack:
        opened = []
        for path in paths:
            if path.resolve() in seen or path.resolve() == (Path(home) / "ledger.db").resolve():
                continue
            seen.add(path.resolve())
            try:
                opened.append(stack.enter_context(Ledger.open(path)))
            except _USER_ERRORS as exc:
                _fail(FedpactError(f"partner registry {path}: {exc}"))
        yield opened



@dsar_app.command("access")
def dsar_access(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    fmt: Annotated[str, typer.Option("--format", help="json or csv.")] = "json",
    channel: Annotated[str, typer.Option(help="How the request arrived.")] = "dpo",
    out: OutOption = None,
    registry: RegistryOption = None,
) -> None:
    """Everything held about a subject (portability export); the request is logged.

    Partner registries (--registry, and the simulated partners' under --home) are searched too.
    --out is opened before the request is logged, so a bad path logs nothing.
    """
    from fedpact.audit.dsar import SubjectRequests

    if fmt not in ("json", "csv"):
        _fail(FedpactError(f"--format {fmt!r} is not json or csv"))
    with _Output(out) as output:
        with _ledger(home, db) as ledger, _registries(home, db, registry) as registries:
            report = SubjectRequests(ledger, actor="cli", registries=registries).access(
                subject, channel=channel)
        output.write(report.to_json() if fmt == "json" else report.to_csv())


@dsar_app.command("erase")
def dsar_erase(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: erasure cannot be undone.")] = False,
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    channel: Annotated[str, typer.Option(help="How the request arrived.")] = "dpo",
    registry: RegistryOption = None,
    purge_timeout: Annotated[float, typer.Option(
        "--purge-timeout", min=0.0, max=3600.0,
        help="Seconds to wait for other processes' read transactions to end so the destroyed "
             "key bytes can be removed from the database files.")] = 30.0,
) -> None:
    """Crypto-shred a subject: keys destroyed, consents withdrawn, models flagged; chain intact.

    In the ledger and in every partner registry (--registry, and the simulated partners' under
    --home), where the subjects each job used are kept: their models are flagged. Exit 1 if the
    destroyed key bytes may remain in a database file (e.g. another process held a read
    transaction past --purge-timeout): then run `fedpact audit dsar purge`."""
    from fedpact.audit.dsar import SubjectRequests

    if not yes:
        _fail(FedpactError("erasure destroys the subject's keys for good: add --yes to confirm"))
    with _ledger(home, db) as ledger, _registries(home, db, registry) as registries:
        report = SubjectRequests(ledger, actor="cli", registries=registries).erase(
            subject, channel=channel, purge_timeout_s=purge_timeout)
    console.print(f"erased {report.subject}: {report.keys_destroyed} keys destroyed, consents "
                  f"withdrawn for {', '.join(report.consents_withdrawn) or 'none'}, models flagged: "
                  f"{', '.join(report.models_flagged) or 'none'}")
    console.print(f"partner registries searched: {len(report.registries)}"
                  + (f" ({', '.join(report.registries)})" if report.registries else ""))
    if report.untraceable_models:
        console.print(f"[yellow]untraceable models:[/yellow] {', '.join(report.untraceable_models)}"
                      f" — {report.note}")
    if not report.key_bytes_purged:
        _fail(LedgerError(f"the keys are destroyed, but the wrapped key bytes may remain in the "
                          f"database files: {report.purge_note}"), code=1)


@dsar_app.command("purge")
def dsar_purge(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    registry: RegistryOption = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.0, max=3600.0,
        help="Seconds to wait for other processes' read transactions to end.")] = 30.0,
) -> None:
    """Remove destroyed key bytes from the database files (after an erasure that could not)."""
    from fedpact.audit.subjects import SubjectKeys

    with _ledger(home, db) as ledger, _registries(home, db, registry) as registries:
        results = [(str(ledger.store.database_path or ledger.store.display_url),
                    SubjectKeys.of(ledger).purge(timeout_s=timeout))]
        results += [(str(r.store.database_path), SubjectKeys.of(r).purge(timeout_s=timeout))
                    for r in registries]
    failed = [(where, purge) for where, purge in results if not purge.complete]
    for where, _purge in results:
        if all(where != w for w, _ in failed):
            console.print(f"purged: {where}", highlight=False)
    if failed:
        _fail(LedgerError("; ".join(f"{where}: {p.detail}" for where, p in failed)), code=1)


# --- four-eyes exports -------------------------------------------------------------------------


@export_app.command("request")
def export_request(
    requested_by: Annotated[str, typer.Option(help="Who asks for the export.")],
    purpose: Annotated[str, typer.Option(help="Why the export is needed.")],
    subject: Annotated[str | None, typer.Option()] = None,
    partner: Annotated[str | None, typer.Option()] = None,
    dataset: Annotated[str | None, typer.Option()] = None,
    event_type: Annotated[list[str] | None, typer.Option("--type")] = None,
    home: HomeOption = ".fedpact",
    db: DbOption = None,
) -> None:
    """Create an export request (pending a DPO's approval if it covers more than one subject)."""
    from fedpact.audit.exports import ExportApprovals
    from fedpact.audit.query import EventFilter

    where = EventFilter(subject=subject, partner=partner, dataset=dataset,
                        event_types=tuple(event_type or ()))
    with _ledger(home, db) as ledger:
        request = ExportApprovals(ledger).request(where, requested_by=requested_by, purpose=purpose)
    console.print(f"{request.request_id}: {request.status} ({request.subjects} subjects)")


@export_app.command("approve")
def export_approve(
    request_id: Annotated[str, typer.Argument()],
    approver: Annotated[str, typer.Option(help="A second person holding the dpo role.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
) -> None:
    """Approve a pending export (four-eyes: not the requester; needs the dpo role)."""
    from fedpact.audit.exports import ExportApprovals

    with _ledger(home, db) as ledger:
        request = ExportApprovals(ledger).approve(request_id, approver=approver)
    console.print(f"{request.request_id}: {request.status} by {request.approved_by}")


@export_app.command("download")
def export_download(
    request_id: Annotated[str, typer.Argument()],
    by: Annotated[str, typer.Option("--by", help="The requester.")],
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    out: OutOption = None,
) -> None:
    """Run an approved export; the download is logged with its row count and SHA-256."""
    from fedpact.audit.exports import ExportApprovals

    if fmt not in ("csv", "json"):
        _fail(FedpactError(f"--format {fmt!r} is not csv or json"))
    with _Output(out) as output:
        with _ledger(home, db) as ledger:
            content = ExportApprovals(ledger).download(request_id, downloaded_by=by, fmt=fmt)
        output.write(content)


# --- audit roles -------------------------------------------------------------------------------


@role_app.command("grant")
def role_grant(
    principal: Annotated[str, typer.Argument(help="Who receives the role.")],
    role: Annotated[str, typer.Argument(help="admin or dpo.")],
    by: Annotated[str, typer.Option("--by", help="The admin granting it (with --bootstrap: who "
                                               "creates the first admin).")],
    bootstrap: Annotated[bool, typer.Option(
        "--bootstrap", help="Create the first admin; refused once any admin exists.")] = False,
    home: HomeOption = ".fedpact",
    db: DbOption = None,
) -> None:
    """Grant an audit role; only an admin may (the first admin: --bootstrap, recorded as such)."""
    from fedpact.audit.exports import ExportApprovals

    with _ledger(home, db, create=bootstrap) as ledger:
        ExportApprovals(ledger).grant_role(principal, role, granted_by=by, bootstrap=bootstrap)
    console.print(f"{principal}: role {role} granted by {by}"
                  + (" (bootstrap: the first admin)" if bootstrap else ""))


@role_app.command("revoke")
def role_revoke(
    principal: Annotated[str, typer.Argument(help="Who loses the role.")],
    role: Annotated[str, typer.Argument(help="admin or dpo.")],
    by: Annotated[str, typer.Option("--by", help="The admin revoking it.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
) -> None:
    """Revoke an audit role; only an admin may, and the last admin cannot be removed."""
    from fedpact.audit.exports import ExportApprovals

    with _ledger(home, db) as ledger:
        ExportApprovals(ledger).revoke_role(principal, role, revoked_by=by)
    console.print(f"{principal}: role {role} revoked by {by}")


@role_app.command("list")
def role_list(home: HomeOption = ".fedpact", db: DbOption = None) -> None:
    """Who holds which audit role now, replayed from the ledger."""
    from fedpact.audit.exports import ExportApprovals

    with _ledger(home, db, read_only=True) as ledger:
        holders = ExportApprovals(ledger).role_holders()
    table = Table(title_justify="left")
    table.add_column("principal")
    table.add_column("roles")
    for principal, roles in sorted(holders.items()):
        table.add_row(principal, ", ".join(sorted(roles)))
    console.print(table)
    console.print(f"{len(holders)} principals hold audit roles"
                  + ("" if holders else "; create the first admin with `fedpact audit role grant "
                                        "NAME admin --by NAME --bootstrap`"))


# --- retention ---------------------------------------------------------------------------------


def _retention_table(rows: list[tuple[str, int, str, int]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column, justify in (("class", "left"), ("retention (days)", "right"),
                            ("months before", "left"), ("keys", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, days, cutoff, keys in rows:
        table.add_row(name, str(days), cutoff, str(keys))
    return table


@retention_app.command("enforce")
def retention_enforce(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only show which keys are due; destroy nothing, record nothing.")] = False,
    actor: Annotated[str, typer.Option(help="Who enforces it (recorded).")] = "retention",
) -> None:
    """Destroy the subject keys of months past their class's retention (events are kept).

    Run it regularly (e.g. monthly from cron); it records retention.enforced with the counts.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from fedpact.audit.retention import enforce_retention, plan_retention

    if dry_run:
        with _ledger(home, db, read_only=True) as ledger:
            steps = plan_retention(ledger)
        console.print(_retention_table(
            [(s.retention_class, s.days, s.cutoff, s.keys_due) for s in steps],
            "retention: keys due (dry run)"))
        console.print(f"dry run: {sum(s.keys_due for s in steps)} keys would be destroyed; "
                      "nothing was changed")
        return
    done: list[tuple[str, int, str, int]] = []
    with _ledger(home, db) as ledger:
        classes = len(plan_retention(ledger))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("enforcing retention", total=classes)

            def step(s, destroyed: int) -> None:
                done.append((s.retention_class, s.days, s.cutoff, destroyed))
                progress.update(task, advance=1,
                                description=f"{s.retention_class}: {destroyed} keys destroyed")

            event = enforce_retention(ledger, actor=actor, progress=step)
    console.print(_retention_table(done, "retention enforced"))
    console.print(f"{event.payload['keys_destroyed']} keys destroyed; recorded as event "
                  f"{event.seq} (retention.enforced)")
    if not event.payload.get("key_bytes_purged", True):
        _fail(LedgerError(f"the keys are destroyed, but their wrapped bytes may remain in the "
                          f"database files: {event.payload.get('purge_note')}"), code=1)
