"""`fedpact match`: run one audience-match job with a partner node (see docs/matching.md).

One node listens, the other connects; both name their identifier file and column:

    fedpact match --mode psi-cardinality --listen 0.0.0.0:7400 --ids ours.csv --column email --kind email
    fedpact match --mode psi-cardinality --connect partner:7400 --ids theirs.csv --column email --kind email
"""

from __future__ import annotations

import csv
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from fedpact.errors import ConfigurationError, DataValidationError
from fedpact.privacy.matching.normalize import ConsentFilter

match_app = typer.Typer(
    help="Count (and, with consent on both sides, link) the customers two partners share.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

CONSENT_STATUSES = ("granted", "withdrawn")


def load_consent_csv(path: Path, purpose: str) -> ConsentFilter:
    """Stand-in consent source: a CSV of subject_id,purpose,status (granted|withdrawn).

    A subject takes part if its last row for `purpose` says ``granted``. This is a stop-gap until
    the consent registry is wired in; `run_match` only needs the returned filter.
    """
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigurationError(f"cannot read consent file {path}: {exc.strerror}") from None
    latest: dict[str, bool] = {}
    problems: list[str] = []
    with handle:
        reader = csv.DictReader(handle)
        missing = {"subject_id", "purpose", "status"} - set(reader.fieldnames or [])
        if missing:
            raise DataValidationError(str(path), [
                f"missing column(s) {', '.join(sorted(missing))}; a consent file has columns "
                "subject_id,purpose,status"])
        for line, row in enumerate(reader, start=2):
            status = (row["status"] or "").strip().lower()
            if status not in CONSENT_STATUSES:
                problems.append(f"line {line}: status {row['status']!r} is not granted or withdrawn")
                continue
            if (row["purpose"] or "").strip() == purpose:
                latest[(row["subject_id"] or "").strip()] = status == "granted"
    if problems:
        raise DataValidationError(str(path), problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    granted = frozenset(s for s, ok in latest.items() if ok and s)

    def consent_filter(subjects: Sequence[str]) -> np.ndarray:
        return np.fromiter((s in granted for s in subjects), dtype=bool, count=len(subjects))

    return consent_filter


def _read_columns(path: Path, columns: list[str]) -> dict[str, list[str]]:
    import pandas as pd

    if not path.is_file():
        raise ConfigurationError(f"identifier file {path} does not exist")
    try:
        header = pd.read_csv(path, nrows=0).columns.tolist()
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path} as CSV: {exc}") from None
    missing = [c for c in dict.fromkeys(columns) if c not in header]
    if missing:
        raise ConfigurationError(
            f"{path} has no column {', '.join(repr(c) for c in missing)}; its columns are: "
            + ", ".join(header))
    frame = pd.read_csv(path, usecols=list(dict.fromkeys(columns)), dtype=str,
                        keep_default_na=False, na_filter=False)
    return {c: frame[c].tolist() for c in dict.fromkeys(columns)}


@match_app.callback(invoke_without_command=True)
def match(
    mode: Annotated[str, typer.Option(help="hash | psi | psi-cardinality (same on both nodes)")],
    ids: Annotated[Path, typer.Option(help="CSV file holding this node's identifiers.")],
    column: Annotated[str, typer.Option(help="Column of --ids with the identifier to match on.")],
    kind: Annotated[str, typer.Option(help="email | phone | string")] = "string",
    listen: Annotated[str | None, typer.Option(help="Wait for the partner on HOST:PORT.")] = None,
    connect: Annotated[str | None, typer.Option(help="Connect to the partner at HOST:PORT.")] = None,
    default_region: Annotated[str | None, typer.Option(
        help="Region (ISO code, e.g. GB) for phone numbers written without +country code.")] = None,
    case_sensitive: Annotated[bool, typer.Option(
        help="--kind string: keep case (default: case-insensitive).")] = False,
    provider_rules: Annotated[bool, typer.Option(
        help="--kind email: apply Gmail dots and +tag rules.")] = True,
    party: Annotated[str | None, typer.Option(help="This node's name (default: host name).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default: file name).")] = None,
    group: Annotated[str, typer.Option(help="PSI group: x25519 | ristretto255")] = "x25519",
    matched_out: Annotated[Path | None, typer.Option(
        help="Opt in to matched rows: write row,token for each matched row here. Happens only "
             "if the partner opts in too (not with psi-cardinality).")] = None,
    segment_column: Annotated[str | None, typer.Option(
        help="Column of --ids to count the overlap by (e.g. label, age band, channel).")] = None,
    min_count: Annotated[int, typer.Option(help="Suppress report counts below this (k).")] = 10,
    epsilon: Annotated[float | None, typer.Option(
        help="Add discrete Laplace noise to the report with this ε (charged to the dataset).")] = None,
    consent_csv: Annotated[Path | None, typer.Option(
        help="Stand-in consent source: CSV subject_id,purpose,status; only subjects granted "
             "'audience_matching' take part.")] = None,
    subject_column: Annotated[str | None, typer.Option(
        help="Column of --ids with the subject id for --consent-csv (default: --column).")] = None,
    report_out: Annotated[Path | None, typer.Option(help="Write the overlap report (JSON).")] = None,
    home: Annotated[str, typer.Option("--home", envvar="FEDPACT_HOME",
                                      help="Run folder; the audit ledger is HOME/ledger.db.")] = ".fedpact",
    workers: Annotated[int, typer.Option(help="Threads for the PSI group operations.")] = 2,
    max_peer_ids: Annotated[int, typer.Option(help="Refuse a partner set larger than this.")] = 50_000_000,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each partner message.")] = 3600.0,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate (PEM) to verify the partner.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run one match job with the partner node and write its audit events."""
    from fedpact.audit import Ledger
    from fedpact.federation.match_channel import TlsFiles
    from fedpact.federation.match_channel import connect as open_connect
    from fedpact.federation.match_channel import listen as open_listen
    from fedpact.privacy.matching import (
        MATCHING_PURPOSE,
        MatchConfig,
        MatchParty,
        build_overlap_report,
        normalize_ids,
        record_match,
        run_match,
    )

    if (listen is None) == (connect is None):
        raise ConfigurationError("give exactly one of --listen HOST:PORT or --connect HOST:PORT")
    if min_count < 1:
        raise ConfigurationError(f"--min-count must be at least 1, not {min_count}")
    config = MatchConfig(mode=mode, group=group, reveal_matches=matched_out is not None,
                         workers=workers, max_peer_ids=max_peer_ids, report_epsilon=epsilon,
                         timeout_s=timeout)
    subject_col = subject_column or column
    wanted = [column] + ([segment_column] if segment_column else []) + (
        [subject_col] if consent_csv else [])
    data = _read_columns(ids, wanted)
    consent = load_consent_csv(consent_csv, MATCHING_PURPOSE) if consent_csv else None
    normalized = normalize_ids(
        data[column], kind, default_region, provider_rules=provider_rules,
        case_sensitive=case_sensitive, consent_filter=consent,
        subjects=data[subject_col] if consent_csv else None)
    if normalized.valid == 0:
        raise ConfigurationError(
            f"{ids} column {column!r}: no valid {normalized.kind.value} identifiers to match "
            f"(invalid by reason: {normalized.invalid_by_reason or 'none'}, excluded by consent: "
            f"{normalized.excluded_by_consent})")
    me = MatchParty(name=party or socket.gethostname(), dataset=dataset or ids.name,
                    ids=normalized, segments=data[segment_column] if segment_column else None)
    tls = TlsFiles(tls_cert, tls_key, tls_ca) if (tls_cert or tls_key or tls_ca) else None
    ledger = Ledger.open(Path(home) / "ledger.db")
    try:
        if listen is not None:
            console.print(f"waiting for the partner on {listen} ...", highlight=False)
            channel = open_listen(listen, tls=tls, timeout=timeout)
        else:
            channel = open_connect(connect or "", tls=tls, timeout=timeout)
        with channel:
            result = run_match(me, channel, config)
        report = build_overlap_report(result, min_count=min_count, epsilon=epsilon)
        events = record_match(ledger, result, report)
    finally:
        ledger.close()
    if matched_out is not None:
        _write_matches(matched_out, result)
    if report_out is not None:
        report_out.parent.mkdir(parents=True, exist_ok=True)
        report_out.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    if as_json:
        console.print_json(json.dumps(report.to_dict(), allow_nan=False))
        return
    _print_result(result, report, len(events), matched_out)


def _write_matches(path: Path, result) -> None:
    if result.matched_rows is None:
        console.print("[yellow]matched rows not written:[/yellow] the partner did not opt in "
                      "(--matched-out on both nodes), so only counts were exchanged",
                      highlight=False)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "token"])
        for row, token in zip(result.matched_rows.tolist(), result.tokens or [], strict=True):
            writer.writerow([row, token])


def _print_result(result, report, n_events: int, matched_out: Path | None) -> None:
    table = Table(title=f"match job {result.job_id} ({result.mode.value})", show_header=False)
    table.add_row("this node", f"{result.party} / {result.dataset}")
    table.add_row("partner", f"{result.peer_party} / {result.peer_dataset}")
    norm = result.own_normalization
    table.add_row("rows read", str(norm.get("rows")))
    table.add_row("excluded (no consent)", str(norm.get("excluded_by_consent", 0)))
    reasons = ", ".join(f"{k}: {v}" for k, v in norm.get("invalid_by_reason", {}).items())
    table.add_row("invalid identifiers", f"{norm.get('invalid', 0)}" + (f" ({reasons})" if reasons else ""))
    table.add_row("distinct identifiers", f"{result.own_size} here, {result.peer_size} at partner")
    table.add_row("overlap (exact, this node only)", str(result.overlap))
    shown = "suppressed" if report.overlap is None else str(report.overlap)
    noise = f", discrete Laplace ε={report.epsilon}" if report.epsilon is not None else ""
    table.add_row("overlap in report", f"{shown} (k={report.min_count}{noise})")
    for seg in report.segments:
        size = "suppressed" if seg.size is None else seg.size
        ov = "suppressed/unknown" if seg.overlap is None else seg.overlap
        table.add_row(f"  segment {seg.segment}", f"overlap {ov} of {size}")
    if report.segments_note:
        table.add_row("  note", report.segments_note)
    if matched_out is not None and result.matched_rows is not None:
        table.add_row("matched rows written", f"{len(result.matched_rows)} to {matched_out}")
    table.add_row("ledger events written", str(n_events))
    console.print(table)
