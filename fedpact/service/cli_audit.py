"""`fedpact audit …`: verify, prove, query and export the ledger; consent; data-subject requests.

Mounted by cli.py as the `audit` sub-command. Every failure ends in one clear line and a non-zero
exit (1 for a broken ledger or a proof that does not verify, 2 for bad input), never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.errors import FedpactError

from .cli_options import HomeOption, console, err_console

audit_app = typer.Typer(
    help="Verify, prove, query and export the audit ledger; consent; data-subject requests.",
    no_args_is_help=True,
)
consent_app = typer.Typer(help="Record, import and show consent per subject and purpose.",
                          no_args_is_help=True)
dsar_app = typer.Typer(help="Data-subject requests: access (JSON/CSV) and erasure.",
                       no_args_is_help=True)
export_app = typer.Typer(help="Four-eyes exports of personal data.", no_args_is_help=True)
audit_app.add_typer(consent_app, name="consent")
audit_app.add_typer(dsar_app, name="dsar")
audit_app.add_typer(export_app, name="export")

DbOption = Annotated[
    str | None,
    typer.Option("--db", envvar="FEDPACT_AUDIT_DB",
                 help="Ledger database URL (postgresql://…), instead of HOME/ledger.db."),
]
OutOption = Annotated[
    Path | None, typer.Option("--out", help="Write to this file instead of standard output.")
]


@contextlib.contextmanager
def _ledger(home: str, db: str | None = None, *, create: bool = False) -> Iterator[Ledger]:
    """Open the run folder's ledger (or --db); errors become one line and exit code 2."""
    try:
        if db:
            opened = Ledger(db, key_dir=Path(home))
        else:
            path = Path(home) / "ledger.db"
            if not path.exists() and not create:
                raise FedpactError(
                    f"no ledger at {path}: run a job first (fedpact demo / fedpact train) "
                    "or point --home at the run folder"
                )
            opened = Ledger.open(path)
    except (FedpactError, LedgerError) as exc:
        _fail(exc)
    try:
        yield opened
    except (FedpactError, LedgerError) as exc:
        _fail(exc)
    finally:
        opened.close()


def _fail(exc: Exception, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
    raise typer.Exit(getattr(exc, "exit_code", code))


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"written to {out}")


def _verification_line(result) -> str:
    if result.ok:
        return (f"[green]✓ chain verified[/green]: {result.events_checked} events, head "
                f"{result.head_hash[:16]}… — {result.reason}")
    return f"[red]✗ chain broken[/red] at event {result.first_bad_seq}: {result.reason}"


@audit_app.command("verify")
def verify(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    public_key: Annotated[Path | None, typer.Option(
        help="Verifier key file (one key per line) obtained independently; default: the "
             "ledger's own .pub file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Recheck the hash chain, Merkle roots and checkpoint signatures; exit 1 naming the first bad event."""
    from fedpact.audit.verifier import load_keys

    with _ledger(home, db) as ledger:
        keys = load_keys(public_key.read_text()) if public_key else None
        result = ledger.verify(public_keys=keys)
    if as_json:
        sys.stdout.write(json.dumps(result.__dict__) + "\n")
    else:
        console.print(_verification_line(result), highlight=False)
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command("events")
def events(
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    job: Annotated[str | None, typer.Option(help="Only this job's events.")] = None,
    event_type: Annotated[str | None, typer.Option(
        "--type", help="Only this event type, e.g. data.accessed.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many events (newest last).")] = 50,
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
    with _ledger(home, db) as ledger:
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
    """Print an inclusion proof bundle for one event: check it with only the public key."""
    from fedpact.audit.verifier import verify_inclusion_bundle

    ref: str | int = int(event_id) if event_id.isdigit() else event_id
    with _ledger(home, db) as ledger:
        bundle = ledger.prove(ref)
        key = ledger.verifier_key
        pub = ledger.key_path("pub")
    if key is not None:
        verify_inclusion_bundle(bundle, key)  # never hand out a proof that does not check
    _emit(json.dumps(bundle, indent=2, ensure_ascii=False), out)
    if out is not None and pub is not None:
        console.print(f"check it anywhere: python -m fedpact.audit.verifier {out} "
                      f"--public-key {pub}")


@audit_app.command("checkpoint")
def checkpoint(home: HomeOption = ".fedpact", db: DbOption = None) -> None:
    """Sign a checkpoint over every event now (normally done every N events or T seconds)."""
    with _ledger(home, db) as ledger:
        info = ledger.checkpoint()
    console.print("ledger is empty" if info is None else
                  f"checkpoint: tree size {info.tree_size}, root {info.root_hash[:16]}…")


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
    after: Annotated[int, typer.Option(help="Page cursor: events after this seq.")] = 0,
    limit: Annotated[int, typer.Option(help="Page size.")] = 100,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    out: OutOption = None,
) -> None:
    """Find events by subject, partner, dataset, purpose, channel, type, job and time; paginated."""
    from fedpact.audit.query import EventFilter, query_events, to_csv, to_json_lines
    from fedpact.service.reporting import events_table

    where = EventFilter(subject=subject, partner=partner, dataset=dataset, purpose=purpose,
                        channel=channel, event_types=tuple(event_type or ()), job_id=job,
                        since=since, until=until)
    with _ledger(home, db) as ledger:
        page = query_events(ledger, where, after_seq=after, limit=limit)
    if fmt == "csv":
        _emit(to_csv(page.events), out)
    elif fmt == "json":
        _emit(to_json_lines(page.events), out)
    elif fmt == "table":
        console.print(events_table(page.events))
    else:
        _fail(FedpactError(f"--format {fmt!r} is not table, csv or json"))
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
    with _ledger(home, db) as ledger:
        document = processing_record(ledger, job, controller=controller)
    target = document.pipl_assessment() if pipl else document
    _emit(target.to_markdown() if fmt == "md" else target.to_html(), out)


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
    console.print(f"consent withdrawn: event {event.seq}, subject {event.payload['subject']}")


@consent_app.command("show")
def consent_show(
    subject: Annotated[str, typer.Argument(help="Subject id or pseudonym.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
) -> None:
    """Current consent of one subject, per purpose."""
    from fedpact.audit.consent import ConsentRegistry

    with _ledger(home, db) as ledger:
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


@dsar_app.command("access")
def dsar_access(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    fmt: Annotated[str, typer.Option("--format", help="json or csv.")] = "json",
    channel: Annotated[str, typer.Option(help="How the request arrived.")] = "dpo",
    out: OutOption = None,
) -> None:
    """Everything held about a subject (portability export); the request is logged."""
    from fedpact.audit.dsar import SubjectRequests

    if fmt not in ("json", "csv"):
        _fail(FedpactError(f"--format {fmt!r} is not json or csv"))
    with _ledger(home, db) as ledger:
        report = SubjectRequests(ledger, actor="cli").access(subject, channel=channel)
    _emit(report.to_json() if fmt == "json" else report.to_csv(), out)


@dsar_app.command("erase")
def dsar_erase(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: erasure cannot be undone.")] = False,
    home: HomeOption = ".fedpact",
    db: DbOption = None,
    channel: Annotated[str, typer.Option(help="How the request arrived.")] = "dpo",
) -> None:
    """Crypto-shred a subject: keys destroyed, consents withdrawn, models flagged; chain intact."""
    from fedpact.audit.dsar import SubjectRequests

    if not yes:
        _fail(FedpactError("erasure destroys the subject's keys for good: add --yes to confirm"))
    with _ledger(home, db) as ledger:
        report = SubjectRequests(ledger, actor="cli").erase(subject, channel=channel)
    console.print(f"erased {report.subject}: {report.keys_destroyed} keys destroyed, consents "
                  f"withdrawn for {', '.join(report.consents_withdrawn) or 'none'}, models flagged: "
                  f"{', '.join(report.models_flagged) or 'none'}")


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

    with _ledger(home, db) as ledger:
        content = ExportApprovals(ledger).download(request_id, downloaded_by=by, fmt=fmt)
    _emit(content, out)
