"""`fedpact match`: run one audience-match job with a partner node (see docs/matching.md).

One node listens, the other connects; both name their identifier file and column, and the column
with the subject id their consent registry knows (only subjects with a current consent for
'audience_matching' in the ledger's registry take part):

    fedpact match --mode psi-cardinality --listen 0.0.0.0:7400 --ids ours.csv --column email \
        --kind email --subject-column customer_id
    fedpact match --mode psi-cardinality --connect partner:7400 --ids theirs.csv --column email \
        --kind email --subject-column member_id
"""

from __future__ import annotations

import csv
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from fedpact.errors import ConfigurationError
from fedpact.privacy.matching.normalize import ConsentFilter

if TYPE_CHECKING:
    from fedpact.audit.consent import ConsentRegistry

match_app = typer.Typer(
    help="Count (and, with consent on both sides, link) the customers two partners share.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
"""Progress and warnings: stderr, so that stdout holds only the result (pure JSON with --json)."""

def ledger_consent_filter(registry: ConsentRegistry, purpose: str) -> ConsentFilter:
    """A `normalize_ids` consent filter backed by the ledger's consent registry.

    A row takes part if its subject (pseudonymised as everywhere in the ledger: HMAC of the raw
    id under the deployment secret, `ConsentRegistry.pseudonym`) holds a current, unexpired grant
    for exactly `purpose` — the same check the training data loader makes. Rows without a
    subject id never take part.
    """

    def consent_filter(subjects: Sequence[str]) -> np.ndarray:
        mask = np.zeros(len(subjects), dtype=bool)
        present = [i for i, s in enumerate(subjects) if s]
        if present:
            mask[present] = registry.allowed([subjects[i] for i in present], purpose)
        return mask

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
    min_count: Annotated[int, typer.Option(
        help="Suppress report counts below this (k); in PSI also the fewest identifiers a "
             "segment may hold, on either side.")] = 10,
    max_segments: Annotated[int, typer.Option(
        help="In PSI, refuse more segments than this, on either side.")] = 64,
    epsilon: Annotated[float | None, typer.Option(
        help="Add discrete Laplace noise to the report with this ε (charged to the dataset).")] = None,
    require_consent: Annotated[bool, typer.Option(
        "--require-consent/--no-require-consent",
        help="Only rows whose subject holds a current consent for 'audience_matching' in the "
             "consent registry take part (default). --no-require-consent is recorded in the "
             "ledger.")] = True,
    subject_column: Annotated[str | None, typer.Option(
        help="Column of --ids with the subject id the consent registry knows (default: "
             "--column).")] = None,
    consent_ledger: Annotated[Path | None, typer.Option(
        help="Ledger holding the consent registry (default: HOME/ledger.db; see `fedpact "
             "audit consent import`).")] = None,
    report_out: Annotated[Path | None, typer.Option(help="Write the overlap report (JSON).")] = None,
    home: Annotated[str, typer.Option("--home", envvar="FEDPACT_HOME",
                                      help="Run folder; the audit ledger is HOME/ledger.db.")] = ".fedpact",
    workers: Annotated[int, typer.Option(help="Threads for the PSI group operations.")] = 2,
    max_peer_ids: Annotated[int, typer.Option(help="Refuse a partner set larger than this.")] = 50_000_000,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each partner message.")] = 3600.0,
    connect_timeout: Annotated[float, typer.Option(
        help="--connect: seconds to keep dialling until the partner listens.")] = 60.0,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate (PEM) to verify the partner.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    accept_enumeration_risk: Annotated[bool, typer.Option(
        "--accept-enumeration-risk",
        help="--mode hash with low-entropy identifiers (phone numbers, short numeric ids): run "
             "anyway, although the partner can enumerate them; the report and the ledger state "
             "the risk. Prefer --mode psi.")] = False,
) -> None:
    """Run one match job with the partner node and write its audit events."""
    from fedpact.audit import Ledger
    from fedpact.audit.consent import ConsentRegistry
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
    from fedpact.privacy.matching.normalize import enumeration_risk
    from fedpact.privacy.matching.protocol import check_segments, enumeration_refusal
    from fedpact.privacy.matching.report import (
        MatchAttempt,
        budget_check,
        record_match_failed,
        record_match_started,
    )

    if (listen is None) == (connect is None):
        raise ConfigurationError("give exactly one of --listen HOST:PORT or --connect HOST:PORT")
    if min_count < 1:
        raise ConfigurationError(f"--min-count must be at least 1, not {min_count}")
    if not connect_timeout > 0:
        raise ConfigurationError(f"--connect-timeout must be positive, not {connect_timeout}")
    config = MatchConfig(mode=mode, group=group, reveal_matches=matched_out is not None,
                         workers=workers, max_peer_ids=max_peer_ids, report_epsilon=epsilon,
                         timeout_s=timeout, min_segment_size=min_count, max_segments=max_segments,
                         accept_enumeration_risk=accept_enumeration_risk)
    for path, option in ((matched_out, "--matched-out"), (report_out, "--report-out")):
        if path is not None:
            _check_writable(path, option)
    subject_col = subject_column or column
    wanted = [column] + ([segment_column] if segment_column else []) + (
        [subject_col] if require_consent else [])
    data = _read_columns(ids, wanted)
    if config.mode.value == "hash":  # refused before the ledger is opened: nothing is written
        risk = enumeration_risk(kind, [v.strip() for v in data[column]])
        if risk is not None and not accept_enumeration_risk:
            raise ConfigurationError(enumeration_refusal(risk))
        if risk is not None:
            err_console.print(f"[yellow]warning:[/yellow] --mode hash on low-entropy "
                              f"identifiers: {risk}; the partner can enumerate them "
                              "(--accept-enumeration-risk given)", highlight=False)
    name = party or socket.gethostname()
    dataset_name = dataset or ids.name
    ledger_path = Path(home) / "ledger.db"
    if consent_ledger is not None and not consent_ledger.is_file():
        raise ConfigurationError(f"--consent-ledger {consent_ledger} does not exist")
    ledger = Ledger.open(ledger_path)
    consent_source = None
    try:
        # The budget must have room for this node's ε before anything happens; the partner's
        # announced ε is added and checked again right after the handshake (run_match).
        check_budget = budget_check(ledger, dataset_name, own_epsilon=epsilon)
        if epsilon is not None:
            check_budget(epsilon)
        registry = None
        if require_consent:
            same = consent_ledger is None or consent_ledger.resolve() == ledger_path.resolve()
            consent_source = ledger if same else Ledger.open(consent_ledger)
            registry = ConsentRegistry(consent_source, actor=f"node:{name}")
        normalized = normalize_ids(
            data[column], kind, default_region, provider_rules=provider_rules,
            case_sensitive=case_sensitive,
            consent_filter=ledger_consent_filter(registry, MATCHING_PURPOSE) if registry else None,
            subjects=data[subject_col] if registry else None)
        if normalized.valid == 0:
            hint = (" — no row's subject holds a current 'audience_matching' consent in the "
                    "registry (`fedpact audit consent import`), or --subject-column names the "
                    "wrong column" if normalized.excluded_by_consent == normalized.total else "")
            raise ConfigurationError(
                f"{ids} column {column!r}: no valid {normalized.kind.value} identifiers to match "
                f"(invalid by reason: {normalized.invalid_by_reason or 'none'}, excluded by "
                f"consent: {normalized.excluded_by_consent}){hint}")
        me = MatchParty(name=name, dataset=dataset_name, ids=normalized,
                        segments=data[segment_column] if segment_column else None)
        check_segments(me, config)  # what run_match refuses before sending, refused now
        tls = TlsFiles(tls_cert, tls_key, tls_ca) if (tls_cert or tls_key or tls_ca) else None
        attempt = MatchAttempt(
            party=name, dataset=dataset_name, mode=config.mode.value, purpose=config.purpose,
            role="responder" if listen is not None else "initiator",
            partner=listen if listen is not None else (connect or ""),
            group=config.group if config.mode.value != "hash" else None, report_epsilon=epsilon)
        record_match_started(ledger, attempt, actor=f"node:{name}")
        stage = "connect"
        try:
            if listen is not None:
                err_console.print(f"waiting for the partner on {listen} ...", highlight=False)
                channel = open_listen(listen, tls=tls, timeout=timeout)
            else:
                channel = open_connect(connect or "", tls=tls, timeout=timeout,
                                       connect_timeout=connect_timeout)
            stage = "exchange"
            with channel:
                result = run_match(me, channel, config, budget_check=check_budget)
            stage = "report"
            report = build_overlap_report(result, min_count=min_count, epsilon=epsilon)
        except BaseException as exc:
            try:
                record_match_failed(ledger, attempt, exc, stage=stage, actor=f"node:{name}")
            except Exception as audit_exc:  # noqa: BLE001 - the job's own error goes first
                err_console.print(f"[red]could not record the failure in the ledger:[/red] "
                                  f"{audit_exc}", highlight=False)
            raise
        consent_facts = {"enforced": require_consent, "purpose": MATCHING_PURPOSE,
                         "rows": normalized.total, "excluded": normalized.excluded_by_consent}
        events = record_match(ledger, result, report, consent=consent_facts,
                              attempt=attempt.attempt_id)
        if registry is not None:
            actor = f"node:{name}"
            registry.record_exclusion(result.job_id, dataset_name, MATCHING_PURPOSE,
                                      normalized.excluded_by_consent, normalized.total,
                                      actor=actor)
            subjects = data[subject_col]
            registry.record_subjects_used(
                result.job_id, dataset_name, MATCHING_PURPOSE,
                sorted({subjects[int(r)].strip() for r in normalized.rows}), actor=actor)
    finally:
        if consent_source is not None and consent_source is not ledger:
            consent_source.close()
        ledger.close()
    try:
        if matched_out is not None:
            _write_matches(matched_out, result)
        if report_out is not None:
            report_out.parent.mkdir(parents=True, exist_ok=True)
            report_out.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise ConfigurationError(
            f"match job {result.job_id} completed and is recorded in the ledger, but its output "
            f"could not be written: {exc.filename or ''}: {exc.strerror or exc}") from None
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()
        return
    _print_result(result, report, len(events), matched_out)


def _check_writable(path: Path, option: str) -> None:
    """Refuse, before connecting, an output path the job could not write once it has finished."""
    if path.is_dir():
        raise ConfigurationError(f"{option} {path} is a folder; give the name of a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):  # appends nothing: only checks that it may be written
                pass
        else:
            with open(path, "xb"):
                pass
            path.unlink()
    except OSError as exc:
        raise ConfigurationError(
            f"{option} {path} cannot be written: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else "")
        ) from None


def _write_matches(path: Path, result) -> None:
    if result.matched_rows is None:
        err_console.print("[yellow]matched rows not written:[/yellow] the partner did not opt in "
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
    if report.residual_risk:
        table.add_row("residual risk", report.residual_risk)
    if matched_out is not None and result.matched_rows is not None:
        table.add_row("matched rows written", f"{len(result.matched_rows)} to {matched_out}")
    table.add_row("ledger events written", str(n_events))
    console.print(table)
