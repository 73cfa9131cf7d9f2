"""`fedpact dataset register|list`: a partner's own dataset as a named object of the consortium.

`register` runs on the partner's machine: it reads the partner's CSV and mapping there, refuses
(with the report the partner's node would give) a mapping that leaves the encoding to the data,
and sends the coordinator only what the node will announce anyway: the public layout (declared
categories and bounds), the task, the label column and values, the purpose. No row, no path, no
statistic of the rows leaves the machine. `list` shows what the consortium has registered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedpact.errors import FedpactError

from . import cli_jobs
from .cli_jobs import DEFAULT_URL, JsonOption, TokenOption, UrlOption, _print_json, _ts
from .cli_options import console

dataset_app = typer.Typer(help="Register your partner dataset's public layout with the "
                               "coordinator; list the consortium's datasets.",
                          no_args_is_help=True)


def registration_payload(csv: str | Path, mapping: str | Path, *, name: str, group: str,
                         purpose: str | None = None) -> dict[str, Any]:
    """The body of POST /api/v1/datasets for a partner's CSV and mapping, read on this machine.

    Every row is validated (as the node will); a mapping that does not declare every category
    list and numeric bound is refused with the node's report (`PreprocessingNotPublic`). The body
    holds the public layout, task, label and purpose only: no path, no row, no statistic."""
    from fedpact.models.datasets import load_partner_csv
    from fedpact.models.features import FeaturePipeline, PreprocessingNotPublic, undeclared_settings

    data = load_partner_csv(csv, mapping)
    missing = undeclared_settings(data.spec)
    if missing:  # the words the partner's node uses when it refuses the mapping in a job
        raise PreprocessingNotPublic(f"dataset {name!r}", missing)
    spec = data.spec
    return {"name": name, "group": group, "task": spec.task, "label": spec.label,
            "positive": list(spec.positive), "purpose": purpose or spec.purpose,
            "layout": FeaturePipeline.public(spec).layout()}


def _plain(text: str = "") -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@dataset_app.command("register")
def dataset_register(
    csv: Annotated[Path, typer.Argument(help="Your partner CSV (read here, never sent).")],
    mapping: Annotated[Path, typer.Option("--mapping", "-m", help="Its TOML or YAML mapping file.")],
    name: Annotated[str, typer.Option(help="Your partner dataset's name (the scope of your "
                                      "partner_admin role), e.g. north or telco-churn/dsl.")],
    group: Annotated[str, typer.Option(help="The consortium's dataset it belongs to, e.g. bank-churn.")],
    purpose: Annotated[str | None, typer.Option(help="Purpose of processing (default: the "
                                                "mapping's purpose).")] = None,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False,
) -> None:
    """Register your partner dataset (partner_admin of it): only its public layout, task, label
    and purpose are sent; the rows and the file stay on this machine."""
    from fedpact.models.features import PreprocessingNotPublic

    try:
        body = registration_payload(csv, mapping, name=name, group=group, purpose=purpose)
    except PreprocessingNotPublic as exc:
        _plain(f"a node will refuse this mapping in a federated job, so it is not registered:\n{exc}")
        _plain(f"(fedpact data check {csv} --mapping {mapping} suggests the [bounds] and "
               "[categories] to declare)")
        raise typer.Exit(2) from None
    except FedpactError as exc:
        cli_jobs._fail(str(exc))
    entry = cli_jobs.Api(url, token).json("POST", "/datasets", json=body)
    if as_json:
        _print_json(entry)
        return
    console.print(f"registered [bold]{entry['name']}[/bold] in group {entry['group']}: "
                  f"{entry['task']}, label {entry['label']}, {entry['features']} feature columns "
                  f"({entry['model_inputs']} model inputs), layout sha256 {entry['layout_sha256'][:16]}…",
                  highlight=False)
    console.print("sent: the public layout, task, label and purpose; no row and no path",
                  highlight=False)


@dataset_app.command("list")
def dataset_list(
    group: Annotated[str | None, typer.Option(help="Only this group.")] = None,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False,
) -> None:
    """The consortium's registered partner datasets."""
    entries = cli_jobs.Api(url, token).json("GET", "/datasets",
                                            params={"group": group} if group else None)
    if as_json:
        _print_json(entries)
        return
    table = Table(title_justify="left")
    for col in ("dataset", "group", "task", "features", "layout", "registered by", "registered"):
        table.add_column(col)
    for e in entries:
        table.add_row(e["name"], e["group"], e["task"], str(e["features"]), e["layout_sha256"][:8],
                      e["registered_by"], _ts(e["registered_at"]))
    console.print(table)
    console.print(f"{len(entries)} datasets")
