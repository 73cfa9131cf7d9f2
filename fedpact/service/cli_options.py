"""What every `fedpact` command group shares: the consoles and the run-folder option."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

HomeOption = Annotated[
    str,
    typer.Option("--home", envvar="FEDPACT_HOME",
                 help="Run folder: ledger, jobs, node state, service database, registry and "
                      "FLWR_HOME live here."),
]
