"""Flower ServerApp: the coordinator process of a deployment (`flwr run` against a SuperLink).

Job settings come from the run config (pyproject's [tool.flwr.app.config], overridable with
`--run-config`); the simulation path in `fedpact.federation.simulation` builds the same app.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedpact.audit import Ledger

from .coordinator import JobResult, run_job
from .deployment import PollingGrid
from .flower_tuning import tune_object_pulls
from .job import JobConfig


def make_server_app(job: JobConfig | None = None, *, results: list[JobResult] | None = None,
                    on_round: Callable[[int, dict], None] | None = None) -> ServerApp:
    """A ServerApp that runs `job` (or the job described by the run config) and collects its result."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        spec = job or JobConfig.from_config(context.run_config)
        if not isinstance(grid, InMemoryGrid):  # deployment engine: don't sleep 3 s per poll
            tune_object_pulls()
            grid = PollingGrid(grid)
        with Ledger.open(spec.ledger_path) as ledger:
            result = run_job(grid, spec, ledger, on_round)
        if results is not None:
            results.append(result)

    return app


app = make_server_app()
