"""`fedpact job|model|admin|serve`: the coordinator service from the command line.

`job` and `model` talk to a running coordinator over its HTTP API (`--url`, `--token` or
FEDPACT_URL / FEDPACT_TOKEN), so the same roles and scopes apply as in the console. `model score`
runs locally on the partner's machine: the model comes from an exported TorchScript file or from
the API, the rows never leave. `admin` works directly on the run folder's service database (an
operator on the coordinator machine) and writes every change to the ledger. `serve` starts the
coordinator with uvicorn.

Every failure ends in one clear line and a non-zero exit (2 for bad input or a refused request,
3 when the coordinator cannot be reached), never a traceback.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpact.audit import LedgerError
from fedpact.audit.records import NO_PRIVACY_GUARANTEE
from fedpact.errors import FedpactError

from .cli_options import HomeOption, console, err_console

job_app = typer.Typer(help="Request joint-model jobs, decide on them as a partner admin, follow them.",
                      no_args_is_help=True)
model_app = typer.Typer(help="Registered models: list, model cards, export and local batch scoring.",
                        no_args_is_help=True)
admin_app = typer.Typer(help="Users, roles and API tokens of the coordinator service.",
                        no_args_is_help=True)
user_app = typer.Typer(help="People (password + TOTP) and machine identities (tokens only).",
                       no_args_is_help=True)
role_app = typer.Typer(help="Grant and revoke roles: partner_admin and node hold for one partner "
                            "dataset (--scope).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (shown once, stored hashed, always expiring).",
                        no_args_is_help=True)
admin_app.add_typer(user_app, name="user")
admin_app.add_typer(role_app, name="role")
admin_app.add_typer(token_app, name="token")


DEFAULT_URL = "http://127.0.0.1:8700"
TERMINAL = ("finished", "failed", "refused", "rejected", "revoked")

UrlOption = Annotated[str, typer.Option("--url", envvar="FEDPACT_URL",
                                        help="The coordinator's base URL.")]
TokenOption = Annotated[str | None, typer.Option("--token", envvar="FEDPACT_TOKEN",
                                                 help="API token (fpt_…).", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- HTTP client


def _http_client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


client_factory: Callable[[str, str | None], httpx.Client] = _http_client
"""How commands reach the coordinator (tests swap in a FastAPI TestClient)."""


class Api:
    """Thin client: JSON in and out, API errors become one-line messages."""

    def __init__(self, url: str, token: str | None):
        if not token:
            _fail("no API token: pass --token or set FEDPACT_TOKEN (an admin issues one with "
                  "`fedpact admin token issue USER`)")
        self.url = url
        self.client = client_factory(url, token)

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.request(method, "/api/v1" + path, **kwargs)
        except httpx.HTTPError as exc:
            _fail(f"cannot reach the coordinator at {self.url}: {exc} (start it with `fedpact serve`)", 3)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            _fail(f"{method} {path}: {response.status_code} {detail}")
        return response

    def json(self, method: str, path: str, **kwargs) -> Any:
        return self.call(method, path, **kwargs).json()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if value != value else f"{value:.{digits}f}"
    return str(value)


def _ts(value: Any) -> str:
    if not value:
        return "–"
    return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=1, default=str) + "\n")


# --------------------------------------------------------------------------- job


@job_app.command("submit")
def job_submit(
    purpose: Annotated[str, typer.Option(help="Purpose of processing, a slug, e.g. churn_model_training.")],
    dataset: Annotated[str, typer.Option(help="A built-in data set (bank | telco | caravan | cdnow), or "
                                              "with --partner-dataset the registered group's name.")] = "telco",
    partitioning: Annotated[str, typer.Option(help="segment | period | iid | dirichlet (label-skewed, any number of partners)")] = "segment",
    partners: Annotated[int, typer.Option(help="Number of partner datasets.")] = 3,
    partner_dataset: Annotated[list[str] | None, typer.Option(
        "--partner-dataset", help="A registered partner dataset of --dataset's group (repeat); "
                                  "see fedpact dataset list.")] = None,
    epsilon: Annotated[float, typer.Option(help="Target ε per partner dataset for the job.")] = 1.0,
    delta: Annotated[float, typer.Option(help="Target δ.")] = 1e-5,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Without differential privacy: the job "
                                        "gives no formal privacy guarantee (ε = ∞).")] = False,
    no_consent: Annotated[bool, typer.Option(
        "--no-consent", help="Turn consent enforcement off (it is on by default): rows are used "
        "without checking each subject's consent; the ledger and the job's record say so.")] = False,
    secure_aggregation: Annotated[bool, typer.Option(
        "--secure-aggregation", help="Flower SecAgg+ (refused by a coordinator that runs jobs on "
        "the deployment engine).")] = False,
    model: Annotated[str, typer.Option(help="logreg | mlp")] = "logreg",
    batch_size: Annotated[int, typer.Option(help="Expected batch size.")] = 512,
    learning_rate: Annotated[float, typer.Option(help="Local SGD learning rate.")] = 0.3,
    task: Annotated[str | None, typer.Option(help="propensity | churn (checked against the data set).")] = None,
    model_name: Annotated[str | None, typer.Option(help="Registry name (default TASK-DATASET).")] = None,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False,
) -> None:
    """Request a joint model (data_scientist); it runs once every partner admin approved it."""
    body = {"dataset": dataset, "purpose": purpose, "target_epsilon": epsilon, "target_delta": delta, "rounds": rounds, "dp": not no_dp,
            "require_consent": not no_consent, "secure_aggregation": secure_aggregation,
            "model": model, "batch_size": batch_size, "learning_rate": learning_rate}
    if partner_dataset:
        body["partner_datasets"] = list(partner_dataset)
    else:
        body.update(partitioning=partitioning, partners=partners)
    if task:
        body["task"] = task
    if model_name:
        body["model_name"] = model_name
    job = Api(url, token).json("POST", "/jobs", json=body)
    if as_json:
        _print_json(job)
        return
    console.print(f"job [bold]{job['job_id']}[/bold] requested: {job['task']} on {job['dataset']}, "
                  f"{job['rounds']} rounds, purpose {job['purpose']}")
    _print_settings(job)
    console.print(f"waiting for the approval of: {', '.join(job['awaiting'])}")


def _privacy(job: dict) -> str:
    return job.get("privacy") or ("DP-SGD" if job.get("dp", True) else NO_PRIVACY_GUARANTEE)


def _print_settings(job: dict) -> None:
    """Privacy, consent and secure aggregation, in the words the API and the records use."""
    dp = job.get("dp", True)
    console.print(f"  privacy: {'' if dp else '[bold red]'}{_privacy(job)}{'' if dp else '[/bold red]'}",
                  highlight=False)
    if job.get("consent"):
        off = not job.get("require_consent", True)
        console.print(f"  consent: {'[bold red]' if off else ''}{job['consent']}{'[/bold red]' if off else ''}",
                      highlight=False)
    if job.get("secure_aggregation"):
        console.print("  secure aggregation: SecAgg+ asked", highlight=False)


def _decide(kind: str, job_id: str, partner: str, reason: str | None, url: str, token: str | None,
            as_json: bool, acknowledge_no_privacy: bool = False) -> None:
    body = {"partner": partner, **({"reason": reason} if reason else {})}
    if acknowledge_no_privacy:
        body["acknowledge_no_privacy"] = True
    job = Api(url, token).json("POST", f"/jobs/{job_id}/{kind}", json=body)
    if as_json:
        _print_json(job)
        return
    noun = {"approve": "approval", "reject": "rejection", "revoke": "revocation"}[kind]
    console.print(f"{partner}: {noun} recorded for job {job_id}; the job is now [bold]{job['status']}[/bold]"
                  + (f" (still awaiting {', '.join(job['awaiting'])})" if job.get("awaiting") else ""))


PartnerOption = Annotated[str, typer.Option("--partner", help="The partner dataset you administer, "
                                            "e.g. telco-churn/dsl.")]


@job_app.command("approve")
def job_approve(job_id: str, partner: PartnerOption,
                acknowledge_no_privacy: Annotated[bool, typer.Option(
                    "--acknowledge-no-privacy", help="Needed to approve a job without differential "
                    "privacy: you confirm it gives no formal privacy guarantee (ε = ∞) for your "
                    "dataset's rows.")] = False,
                url: UrlOption = DEFAULT_URL,
                token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Approve a job for one partner dataset (partner_admin of that dataset)."""
    _decide("approve", job_id, partner, None, url, token, as_json, acknowledge_no_privacy)


@job_app.command("reject")
def job_reject(job_id: str, partner: PartnerOption,
               reason: Annotated[str, typer.Option(help="Why (no personal data).")],
               url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Reject a job for one partner dataset: it will not run."""
    _decide("reject", job_id, partner, reason, url, token, as_json)


@job_app.command("revoke")
def job_revoke(job_id: str, partner: PartnerOption,
               reason: Annotated[str, typer.Option(help="Why (no personal data).")],
               url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Withdraw an approval before the job starts: it will not run."""
    _decide("revoke", job_id, partner, reason, url, token, as_json)


def _rounds_table(rounds: list[dict], dp: bool = True) -> Table:
    table = Table(title="rounds", title_justify="left")
    for col in ("round", "train loss", "pooled ROC-AUC", "PR-AUC", "lift@10%", "ε so far"):
        table.add_column(col, justify="right")
    for r in rounds:
        table.add_row(str(r.get("round")), _fmt(r.get("train_loss")), _fmt(r.get("roc_auc")),
                      _fmt(r.get("pr_auc")), _fmt(r.get("lift_at_10"), 2),
                      _fmt(r.get("epsilon")) if dp else "∞")
    return table


def _show_job(api: Api, job: dict) -> None:
    console.print(f"job [bold]{job['job_id']}[/bold]: [bold]{job['status']}[/bold]"
                  + (f" — {job['reason']}" if job.get("reason") else ""))
    console.print(f"  {job['task']} on {job['dataset']}, purpose {job['purpose']}, requested by "
                  f"{job['submitted_by']} at {_ts(job['created_at'])}")
    _print_settings(job)
    table = Table(title="partner decisions", title_justify="left")
    for col in ("partner", "decision", "by", "when", "reason"):
        table.add_column(col)
    for p in job["partners"]:
        d = job["decisions"].get(p)
        table.add_row(p, d["decision"] if d else "awaiting", d["by"] if d else "–",
                      _ts(d["at"]) if d else "–", (d.get("reason") or "") if d else "")
    console.print(table)
    if job.get("rounds"):
        console.print(_rounds_table(job["rounds"], dp=job.get("dp", True)))
    if job.get("model"):
        console.print(f"model: {job['model']} (fedpact model card {job['model']})")
    logs = api.json("GET", f"/jobs/{job['job_id']}/logs")
    for line in logs[-8:]:
        console.print(f"  [dim]{_ts(line['at'])}[/dim] {line['message']}", highlight=False)


@job_app.command("status")
def job_status(
    job_id: Annotated[str | None, typer.Argument(help="A job id; leave out to list jobs.")] = None,
    status: Annotated[str | None, typer.Option(help="List only jobs in this state.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends (progress bar).")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 3600,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False,
) -> None:
    """A job's status, decisions, rounds and log; or the list of jobs you may see."""
    api = Api(url, token)
    if job_id is None:
        jobs = api.json("GET", "/jobs", params={"status": status} if status else None)
        if as_json:
            _print_json(jobs)
            return
        table = Table(title_justify="left")
        for col in ("job", "status", "task", "dataset", "partners", "purpose", "ε target",
                    "requested by", "created", "model"):
            table.add_column(col)
        for j in jobs:
            table.add_row(j["job_id"], j["status"], j["task"] or "", j["dataset"] or "",
                          ", ".join(j["partners"]), j["purpose"] or "",
                          _fmt(j.get("target_epsilon"), 2) if j.get("dp", True) else "∞ (no DP)",
                          j["submitted_by"], _ts(j["created_at"]), j.get("model") or "–")
        console.print(table)
        console.print(f"{len(jobs)} jobs")
        return
    job = api.json("GET", f"/jobs/{job_id}")
    if wait and job["status"] not in TERMINAL:
        job = _follow(api, job, timeout)
    if as_json:
        _print_json(job)
        return
    _show_job(api, job)
    if wait and job["status"] != "finished":
        raise typer.Exit(1)


def _follow(api: Api, job: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    rounds = int(job["request"].get("rounds") or 1)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task(f"job {job['job_id']}", total=rounds, status=job["status"])
        while job["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                _fail(f"job {job['job_id']} is still {job['status']} after {timeout:.0f} s", 1)
            time.sleep(1.0)
            job = api.json("GET", f"/jobs/{job['job_id']}")
            last = job["rounds"][-1] if job.get("rounds") else None
            eps = _fmt(last.get("epsilon")) if last and job.get("dp", True) else "∞"
            progress.update(bar, completed=len(job.get("rounds", [])),
                            status=(f"{job['status']}  AUC {_fmt(last.get('roc_auc'))}  ε {eps}"
                                    if last else job["status"]))
    return job


@job_app.command("result")
def job_result(job_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None,
               as_json: JsonOption = False) -> None:
    """The finished job's pooled metrics, ε per partner (with the dp-accounting cross-check)."""
    result = Api(url, token).json("GET", f"/jobs/{job_id}/result")
    if as_json:
        _print_json(result)
        return
    final = result.get("final", {})
    console.print(f"job {job_id}: ROC-AUC {_fmt(final.get('roc_auc'))}, PR-AUC {_fmt(final.get('pr_auc'))}, "
                  f"lift@10% {_fmt(final.get('lift_at_10'), 2)}, Brier {_fmt(final.get('brier'))} on "
                  f"{int(final.get('n') or 0)} pooled held-out rows; "
                  + (f"ε {_fmt(result.get('epsilon'))}, δ {result.get('delta')}"
                     if result.get("dp", True) else NO_PRIVACY_GUARANTEE)
                  + f"; model {result.get('model') or '–'}")
    table = Table(title_justify="left")
    for col in ("partner", "train rows", "test rows", "ε Opacus RDP", "ε dp-accounting RDP / PLD",
                "σ", "membership AUC"):
        table.add_column(col, justify="left" if col == "partner" else "right")
    for p in result.get("partners", []):
        dp = result.get("dp", True)
        table.add_row(p["name"], str(p["train_rows"]), str(p["test_rows"]),
                      _fmt(p["epsilon"]) if dp else "∞",
                      f"{_fmt(p['epsilon_google_rdp'])} / {_fmt(p['epsilon_google_pld'])}" if dp else "∞",
                      _fmt(p["noise_multiplier"], 2), _fmt(p.get("membership_auc")))
    console.print(table)


# --------------------------------------------------------------------------- model


@model_app.command("list")
def model_list(url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Registered model versions you may see."""
    entries = Api(url, token).json("GET", "/models")
    if as_json:
        _print_json(entries)
        return
    table = Table(title_justify="left")
    for col in ("model", "task", "dataset", "partners", "ROC-AUC", "ε spent", "job", "registered"):
        table.add_column(col)
    for m in entries:
        table.add_row(m["model"], m["task"] or "", m["dataset"] or "", ", ".join(m["partners"]),
                      _fmt(m["roc_auc"]),
                      _fmt(m["epsilon_spent"]) if m.get("dp", True) else "∞ (no DP)",
                      m["job_id"], _ts(m["created_at"]))
    console.print(table)


@model_app.command("card")
def model_card(ref: Annotated[str, typer.Argument(help="NAME@VERSION or NAME (latest).")],
               url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False,
               home: Annotated[str | None, typer.Option(
                   "--home", help="Read the local registry of this run folder (a model registered "
                                  "by fedpact train --model-name) instead of the service.")] = None) -> None:
    """The model card: data, metrics, calibration, privacy spent, membership attack, lineage."""
    if home is not None:
        entry = _local_model(home, ref)
    else:
        entry = Api(url, token).json("GET", f"/models/{ref}")
    card = entry["card"]
    if as_json:
        _print_json(card)
        return
    m, p, mi = card["metrics"], card["privacy"], card["membership_inference"]
    table = Table(title=f"model card {card['model']}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("task", f"{card['task']} on {card['dataset']} ({card['model_kind']}, {card['rounds']} rounds)")
    table.add_row("job", f"{card['job_id']}, requested by {card['requested_by']} for {card['purpose']}")
    table.add_row("partners", "; ".join(f"{x['dataset']} ({x['train_rows']} train / {x['test_rows']} test rows)"
                                        for x in card["partners"]))
    table.add_row("features", f"{len(card['features']['categorical'])} categorical, "
                              f"{len(card['features']['numeric'])} numeric → {card['features']['input_width']} inputs")
    table.add_row("metrics", f"ROC-AUC {_fmt(m['roc_auc'])}, PR-AUC {_fmt(m['pr_auc'])}, lift@10% "
                             f"{_fmt(m['lift_at_10'], 2)}, Brier {_fmt(m['brier'])} — {m['evaluated_on']}")
    table.add_row("calibration", f"ECE {_fmt(card['calibration']['expected_calibration_error'])}")
    if p["dp"]:
        table.add_row("privacy", f"ε spent {_fmt(p['epsilon_spent'])} (target {p['target_epsilon']}), "
                                 f"δ {p['delta']}, {p['accountant']} accountant")
        for name, pp in p["per_partner"].items():
            table.add_row("", f"{name}: ε Opacus {_fmt(pp['epsilon_opacus_rdp'])}, dp-accounting RDP "
                              f"{_fmt(pp['epsilon_dp_accounting_rdp'])} / PLD {_fmt(pp['epsilon_dp_accounting_pld'])}")
    else:
        table.add_row("privacy", f"[red]{NO_PRIVACY_GUARANTEE}: trained without differential "
                                 "privacy[/red]")
    table.add_row("membership attack", f"max AUC {_fmt(mi['auc_max'])} ({mi['reading']})")
    table.add_row("lineage", ", ".join(f"{t} ×{len(ids)}" for t, ids in card["lineage"]["ledger_events"].items()))
    table.add_row("card SHA-256", entry["card_sha256"])
    table.add_row("delivered", f"ledger event {entry['delivery_event_id']}")
    for kind, path in entry.get("files", {}).items() if home is not None else ():
        table.add_row(kind, path)
    console.print(table)


def _local_model(home: str, ref: str) -> dict:
    from pathlib import Path

    from fedpact.audit import Ledger

    from .api.registry import ModelRegistry
    from .api.store import ServiceStore

    if not (Path(home) / "ledger.db").exists():
        raise FedpactError(f"{home}: no run folder here (no ledger.db)")
    store = ServiceStore(home)
    try:
        with Ledger.open(Path(home) / "ledger.db") as ledger:
            entry = ModelRegistry(store, ledger).get(ref)
    finally:
        store.close()
    print_files = {k: str(Path(entry["folder"]) / f) for k, f in (
        ("torchscript", "model.torchscript.pt"), ("onnx", "model.onnx"), ("card", "card.json"))
        if (Path(entry["folder"]) / f).exists()}
    entry.setdefault("files", print_files)
    return entry


@model_app.command("export")
def model_export(ref: Annotated[str, typer.Argument(help="NAME@VERSION or NAME (latest).")],
                 out: Annotated[Path, typer.Option("--out", help="Where to write the exported model.")],
                 purpose: Annotated[str, typer.Option(help="Why you take the model (recorded).")] = "model_scoring",
                 fmt: Annotated[str, typer.Option("--format", help="torchscript | onnx")] = "torchscript",
                 url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """Download the scoring model (recorded in the ledger as model.exported): TorchScript or ONNX.

    Input: numeric columns as float64 raw values in layout order, categorical columns as int64
    codes into the declared category lists (-1 = any other value); the training encoding (clip to
    bounds, scale, one-hot) and the calibration are inside; output: calibrated probability. The
    contract is inside the file (fedpact.json) and in docs/service.md.
    """
    from fedpact.models.export import ExportError, torchscript_to_onnx

    fmt = fmt.strip().lower()
    if fmt not in ("torchscript", "onnx"):
        _fail(f"--format {fmt!r}: use torchscript or onnx")
    response = Api(url, token).call("GET", f"/models/{ref}/export",
                                    params={"purpose": purpose, "format": fmt})
    content = response.content
    if fmt == "onnx" and content[:4] == b"PK\x03\x04":  # a coordinator that serves TorchScript only
        with tempfile.TemporaryDirectory() as folder:
            source = Path(folder) / "model.torchscript.pt"
            source.write_bytes(content)
            try:
                torchscript_to_onnx(source, out)
            except ExportError as exc:
                _fail(str(exc))
        size = out.stat().st_size
    else:
        out.write_bytes(content)
        size = len(content)
    console.print(f"wrote {out} ({size:,} bytes): {'ONNX' if fmt == 'onnx' else 'TorchScript'}; "
                  "inputs numeric (float64, raw values) and categorical (int64 codes, -1 = other) "
                  "in the layout stored inside (fedpact.json); output score = calibrated "
                  "probability", highlight=False)


@model_app.command("score")
def model_score(
    model: Annotated[str, typer.Argument(help="An exported TorchScript or ONNX file, or NAME@VERSION "
                                              "to fetch from the coordinator.")],
    csv: Annotated[Path, typer.Argument(help="The rows to score (the label column may be absent).")],
    mapping: Annotated[Path, typer.Option("--mapping", "-m", help="TOML or YAML mapping file, as for training.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write scores here instead of standard output.")] = None,
    partner: Annotated[str | None, typer.Option(help="Who scores (recorded); default: the mapping's name.")] = None,
    purpose: Annotated[str, typer.Option(help="Purpose of this use of the rows (recorded).")] = "scoring",
    home: HomeOption = ".fedpact",
    url: UrlOption = DEFAULT_URL, token: TokenOption = None,
) -> None:
    """Score a CSV on this machine with the training validation rules; CSV of id, score to stdout.

    The model encodes each row with its training layout (declared categories, numbers clipped to
    their bounds and scaled) and applies its calibration, so a row's score never depends on the
    other rows in the file; the label column is ignored. The mapping gives the separator, id
    column and missing-value policy, and must list the model's numeric and categorical columns.
    The use of the rows is recorded in the ledger under --home as a data.accessed event.
    """
    from fedpact.audit import EventType, Ledger
    from fedpact.service.api.registry import load_torchscript, read_scoring_rows, score_rows

    try:
        with _model_file(model, url, token) as path:
            scorer = load_torchscript(path)
        data = read_scoring_rows(csv, mapping, layout=scorer.layout)
        frame, notes = score_rows(scorer, data)
        who = partner or data.spec.name
        Path(home).mkdir(parents=True, exist_ok=True)
        with Ledger.open(Path(home) / "ledger.db") as ledger:
            ledger.append(EventType.DATA_ACCESSED,
                          {"node": who, "dataset": data.spec.name, "rows": len(data),
                           "columns": list(data.spec.features), "purpose": purpose,
                           "phase": "scoring", "model": scorer.label}, actor=f"node:{who}")
    except (FedpactError, LedgerError) as exc:
        _fail(str(exc))
    text = frame.to_csv(index=False, float_format="%.6f")
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
    for note in notes:
        err_console.print(f"note: {note}", highlight=False)
    err_console.print(f"scored {len(frame):,} rows of {csv} with {scorer.label}", highlight=False)


@contextlib.contextmanager
def _model_file(model: str, url: str, token: str | None) -> Iterator[Path]:
    path = Path(model)
    if path.is_file():
        yield path
        return
    if "/" in model or model.endswith((".pt", ".onnx")):
        _fail(f"model file {model} not found")
    response = Api(url, token).call("GET", f"/models/{model}/export", params={"purpose": "model_scoring"})
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "model.torchscript.pt"
        target.write_bytes(response.content)
        yield target


# --------------------------------------------------------------------------- admin


@contextlib.contextmanager
def _accounts(home: str):
    from fedpact.audit import Ledger
    from fedpact.service.api.auth import Accounts
    from fedpact.service.api.store import ServiceStore

    store = ServiceStore(home)
    ledger = Ledger.open(Path(home) / "ledger.db")
    try:
        yield Accounts(store, ledger)
    except (FedpactError, LedgerError) as exc:
        _fail(str(exc))
    finally:
        ledger.close()
        store.close()


def _operator() -> str:
    try:
        return f"operator:{getpass.getuser()}"
    except (KeyError, OSError):
        return "operator:unknown"


@user_app.command("create")
def user_create(
    username: str,
    machine: Annotated[bool, typer.Option("--machine", help="A machine identity (a partner node): tokens only.")] = False,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")] = False,
    home: HomeOption = ".fedpact",
) -> None:
    """Create a person (password, then a TOTP secret to enrol) or a machine identity."""
    password = None
    if not machine:
        password = (sys.stdin.readline().rstrip("\n") if password_stdin else
                    typer.prompt("password (12+ characters)", hide_input=True, confirmation_prompt=True))
    with _accounts(home) as accounts:
        account = accounts.create_user(username, kind="machine" if machine else "person",
                                       password=password, created_by=_operator())
    console.print(f"created {account.kind} {account.username} (ledger event {account.event_id[:12]}…)")
    if account.totp_secret:
        console.print("Enrol this secret in an authenticator app now; it is not shown again:")
        console.print(f"  secret: [bold]{account.totp_secret}[/bold]")
        console.print(f"  uri:    {account.totp_uri}", soft_wrap=True)
    console.print("next: fedpact admin role grant USER ROLE [--scope PARTNER_DATASET]")


@user_app.command("list")
def user_list(home: HomeOption = ".fedpact", as_json: JsonOption = False) -> None:
    """Users, their kind and roles."""
    with _accounts(home) as accounts:
        rows = accounts.list_users()
    if as_json:
        _print_json(rows)
        return
    table = Table(title_justify="left")
    for col in ("user", "kind", "roles", "disabled"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["username"], r["kind"], ", ".join(f"{g['role']}({g['scope']})" if g["scope"] else g["role"]
                                                          for g in r["roles"]) or "–",
                      "yes" if r["disabled"] else "")
    console.print(table)


@user_app.command("disable")
def user_disable(username: str, home: HomeOption = ".fedpact") -> None:
    """Disable a user: tokens and console sessions stop working at once."""
    with _accounts(home) as accounts:
        accounts.set_disabled(username, True)
    console.print(f"{username} disabled")


@user_app.command("enable")
def user_enable(username: str, home: HomeOption = ".fedpact") -> None:
    """Enable a disabled user again."""
    with _accounts(home) as accounts:
        accounts.set_disabled(username, False)
    console.print(f"{username} enabled")


@user_app.command("password")
def user_password(
    username: str,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
    home: HomeOption = ".fedpact",
) -> None:
    """Set a new password for a person (and clear a sign-in lockout)."""
    password = (sys.stdin.readline().rstrip("\n") if password_stdin else
                typer.prompt("new password (12+ characters)", hide_input=True, confirmation_prompt=True))
    with _accounts(home) as accounts:
        accounts.set_password(username, password, actor=_operator())
    console.print(f"password of {username} changed")


ScopeOption = Annotated[str, typer.Option("--scope", help="Partner dataset (partner_admin, node), "
                                          "e.g. telco-churn/dsl.")]


@role_app.command("grant")
def role_grant(username: str, role: str, scope: ScopeOption = "", home: HomeOption = ".fedpact") -> None:
    """Grant partner_admin (--scope), data_scientist, compliance_officer or node (--scope)."""
    with _accounts(home) as accounts:
        event_id = accounts.grant(username, role, scope, granted_by=_operator())
    console.print(f"{username}: {role}{f' for {scope}' if scope else ''} granted (ledger event {event_id[:12]}…)")


@role_app.command("revoke")
def role_revoke(username: str, role: str, scope: ScopeOption = "", home: HomeOption = ".fedpact") -> None:
    """Revoke a role; it stops applying to the user's tokens and sessions at once."""
    with _accounts(home) as accounts:
        event_id = accounts.revoke(username, role, scope, revoked_by=_operator())
    console.print(f"{username}: {role}{f' for {scope}' if scope else ''} revoked (ledger event {event_id[:12]}…)")


@token_app.command("issue")
def token_issue(
    username: str,
    days: Annotated[float, typer.Option(help="Days until the token expires (at most 366).")] = 30,
    label: Annotated[str, typer.Option(help="What the token is for.")] = "",
    home: HomeOption = ".fedpact",
    as_json: JsonOption = False,
) -> None:
    """Issue an API token for a user; it is printed once and stored only as a SHA-256 digest."""
    with _accounts(home) as accounts:
        issued = accounts.issue_token(username, days=days, label=label, issued_by=_operator())
    if as_json:
        _print_json({"token": issued.token, "token_id": issued.token_id, "username": issued.username,
                     "expires_at": issued.expires_at})
        return
    console.print(f"token for {issued.username}, expires {_ts(issued.expires_at)} UTC (id {issued.token_id}):")
    sys.stdout.write(issued.token + "\n")


@token_app.command("list")
def token_list(username: Annotated[str | None, typer.Argument()] = None, home: HomeOption = ".fedpact",
               as_json: JsonOption = False) -> None:
    """Tokens (ids, owners, expiry, state); never the secrets."""
    with _accounts(home) as accounts:
        rows = accounts.list_tokens(username)
    if as_json:
        _print_json(rows)
        return
    table = Table(title_justify="left")
    for col in ("id", "user", "label", "created", "expires", "state", "last used"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["token_id"], r["username"], r["label"], _ts(r["created_at"]),
                      _ts(r["expires_at"]), r["state"], _ts(r["last_used_at"]))
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str, home: HomeOption = ".fedpact") -> None:
    """Revoke a token by its id; it stops working at once."""
    with _accounts(home) as accounts:
        accounts.revoke_token(token_id, revoked_by=_operator())
    console.print(f"token {token_id} revoked")


# --------------------------------------------------------------------------- serve


def serve(
    home: HomeOption = ".fedpact",
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback by default; put TLS in "
                                           "front before exposing it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8700,
    secure_cookies: Annotated[bool, typer.Option(
        help="Console cookies are Secure (and responses carry HSTS) unless a request comes over "
             "plain HTTP to loopback; this forces Secure there too (a TLS proxy that rewrites "
             "Host to 127.0.0.1 without X-Forwarded-Proto).")] = False,
    max_body_mib: Annotated[float, typer.Option(
        help="Largest request body accepted, in MiB (larger: 413 without reading it).")] = 1.0,
    superlink: Annotated[str | None, typer.Option(
        help="Run approved jobs on Flower's deployment engine at this SuperLink (HOST:PORT); "
             "without it they run in the simulation engine on this machine.")] = None,
    root_certificates: Annotated[Path | None, typer.Option(
        help="CA certificate of the SuperLink (with --superlink).")] = None,
) -> None:
    """Run the coordinator service (API at /api/v1, OpenAPI at /docs, console at /console)."""
    import uvicorn

    from fedpact.service.api.app import create_app
    from fedpact.service.api.governance import simulated_run

    run = simulated_run
    if superlink:
        from fedpact.federation.deployment import Connection, DeploymentRun

        if root_certificates is not None and not root_certificates.is_file():
            err_console.print(f"error: {root_certificates}: no such file", highlight=False)
            raise typer.Exit(2)
        run = DeploymentRun(Connection(superlink, root_certificates, Path(home) / "flwr"))

    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"warning: listening on {host} without TLS; tokens and passwords would "
                          "cross the network in clear text", highlight=False)
    if not 0 < max_body_mib <= 1024:
        err_console.print("error: --max-body-mib must be in (0, 1024]", highlight=False)
        raise typer.Exit(2)
    app = create_app(home, secure_cookies=secure_cookies, run=run,
                     max_body_bytes=int(max_body_mib * 1024 * 1024))
    console.print(f"fedpact coordinator on http://{host}:{port}  (console /console, API docs /docs, "
                  f"run folder {home})")
    uvicorn.run(app, host=host, port=port, log_level="info")
