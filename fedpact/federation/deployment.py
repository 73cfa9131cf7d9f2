"""Flower's deployment engine for fedpact jobs: SuperLink, app bundle, `flwr run`, results.

The coordinator machine runs one `flower-superlink` (TLS, SuperNode authentication on); each
partner runs `fedpact node start` (see `node_runtime`). A job becomes a tiny Flower app directory
whose `[tool.flwr.app.config]` is the job's full `JobConfig`; its components point at fedpact's
installed ServerApp and ClientApp (no code travels: runtime dependency installation is off and
partners refuse any other ClientApp). `flwr run` submits it; the ServerApp writes the ledger and
`result.json` exactly as the simulation does.

Secure aggregation (SecAgg+) is not available here yet: the bundle's components are the plain
Message-API apps, and partners run only `fedpact.federation.client_app:app`. A job asking for it
is refused (`job.refused`) before any bundle is written or node contacted, instead of running
with the coordinator seeing every partner's update.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

from fedpact.errors import FedpactError

from .coordinator import JobFailed, JobResult
from .job import JobConfig
from .rounds import DelegatingGrid, exchange

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
              "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05"}
REPLY_POLL_INTERVAL = 0.02


def flower_env(**extra: str) -> dict[str, str]:
    """This environment, offline-safe for Flower, with this interpreter's scripts on PATH (the
    SuperLink starts `flower-superexec` / `flwr-serverapp` by name)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "PATH": path, **extra}


class DeploymentError(FedpactError):
    """The deployment engine could not start, accept or finish a job."""


SECURE_AGGREGATION_REFUSED = (
    "secure aggregation (SecAgg+) is not available on Flower's deployment engine: its job bundle "
    "holds fedpact's plain apps (partner nodes run only fedpact.federation.client_app:app), so "
    "the coordinator would see each partner's update. Run the job without secure_aggregation")


def refuse_unsupported(job: JobConfig) -> None:
    """Refuse, before anything is written or sent, a job this engine cannot run as asked: one
    `job.refused` event with the reason, then DeploymentError."""
    if not job.secure_aggregation:
        return
    from fedpact.audit import EventType, Ledger

    from .coordinator import refuse

    job.ledger_path.parent.mkdir(parents=True, exist_ok=True)
    error = DeploymentError(f"job {job.job_id} refused: {SECURE_AGGREGATION_REFUSED}")
    with Ledger.open(job.ledger_path) as ledger:
        if not ledger.events(job_id=job.job_id, event_type=EventType.JOB_REFUSED.value):
            refuse(job, ledger, error)
    raise error


class PollingGrid(DelegatingGrid):
    """A Grid that waits for replies with a short poll instead of Flower's fixed 3 s sleep.

    Every call is delegated to the deployment Grid; only `send_and_receive`'s waiting differs.
    """

    def __init__(self, grid: Grid, poll_interval: float = REPLY_POLL_INTERVAL) -> None:
        super().__init__(grid)
        self._poll = poll_interval

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull replies every `poll_interval` until all arrived or `timeout` passed."""
        return exchange(self, list(messages), math.inf if timeout is None else timeout,
                        self._poll)[0]

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_job_app(job: JobConfig, directory: str | Path) -> Path:
    """A Flower app directory for `job`: pyproject with fedpact's components and the job config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{key} = {_toml_value(value)}" for key, value in job.to_config().items())
    (directory / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedpact-job"
version = "1.0.0"
description = "fedpact job {job.job_id}: components come from the installed fedpact package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedpact"

[tool.flwr.app.components]
serverapp = "fedpact.federation.server_app:app"
clientapp = "fedpact.federation.client_app:app"

[tool.flwr.app.config]
{config}
''')
    return directory


@dataclass
class Connection:
    """How the coordinator reaches its SuperLink's Control API (a `flwr` connection)."""

    address: str = "127.0.0.1:9093"
    root_certificates: Path | None = None
    flwr_home: Path = Path(".fedpact/flwr")
    name: str = "fedpact"

    def write(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{self.name}"', "", f"[superlink.{self.name}]",
                 f'address = "{self.address}"']
        if self.root_certificates:
            lines.append(f'root-certificates = "{Path(self.root_certificates).resolve()}"')
        else:
            lines.append("insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def env(self) -> dict[str, str]:
        return flower_env(FLWR_HOME=str(self.flwr_home.resolve()))


def _flwr() -> str:
    found = Path(sys.executable).with_name("flwr")
    return str(found) if found.exists() else (shutil.which("flwr") or "flwr")


def flwr_cli(connection: Connection, *args: str, timeout: float = 120) -> dict:
    """Run `flwr ARGS --format json` against the connection; return its JSON or raise."""
    connection.write()
    try:
        proc = subprocess.run([_flwr(), *args, "--format", "json"], env=connection.env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeploymentError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:.0f} s "
                              f"(SuperLink {connection.address})") from None
    except OSError as exc:
        raise DeploymentError(f"cannot run the Flower CLI `flwr`: {exc}") from None
    out = proc.stdout.strip()
    try:
        doc = json.loads(out[out.index("{"):]) if "{" in out else {}
    except ValueError:
        doc = {}
    if proc.returncode != 0 or not doc.get("success", False):
        reason = doc.get("error-message") or (proc.stderr or out).strip()[-500:]
        raise DeploymentError(f"`flwr {' '.join(args[:2])}` failed: {reason}")
    return doc


def register_node(connection: Connection, public_key: str | Path) -> int:
    """Admit a partner node's public key on the SuperLink; returns Flower's node id."""
    doc = flwr_cli(connection, "supernode", "register", str(public_key), connection.name)
    return int(doc["node-id"])


def submit_job(connection: Connection, job: JobConfig) -> int:
    """Start `job` on the SuperLink (`flwr run`); returns the Flower run id. A job this engine
    cannot run as asked (secure aggregation) is refused first (`refuse_unsupported`)."""
    refuse_unsupported(job)
    app = write_job_app(job, job.job_dir / "app")
    doc = flwr_cli(connection, "run", str(app), connection.name)
    return int(doc["run-id"])


def run_status(connection: Connection, run_id: int) -> str:
    doc = flwr_cli(connection, "list", "--run-id", str(run_id))
    runs = doc.get("runs") or []
    return str(runs[0].get("status", "")) if runs else ""


def _ledger_reason(ledger, job: JobConfig) -> str | None:
    from fedpact.audit import EventType

    for kind in (EventType.JOB_REFUSED, EventType.JOB_FAILED):
        events = ledger.events(job_id=job.job_id, event_type=kind.value)
        if events:
            return str(events[-1].payload.get("reason", kind.value))
    return None


def _new_rounds(ledger, job: JobConfig, since: int) -> tuple[list[tuple[int, dict]], int]:
    from fedpact.audit import EventType

    events = ledger.events(job_id=job.job_id, event_type=EventType.ROUND_AGGREGATED.value,
                           since_seq=since)
    rounds = [(int(ev.payload["round"]), {"round": int(ev.payload["round"]),
                                          **ev.payload.get("metrics", {})}) for ev in events]
    return rounds, (events[-1].seq if events else since)


def wait_for_result(connection: Connection, job: JobConfig, run_id: int, *,
                    timeout: float = 1800, poll: float = 0.5,
                    on_round: Callable[[int, dict], None] | None = None) -> JobResult:
    """Wait until the run finished; return the JobResult its ServerApp wrote, or raise with the
    reason the ledger gives. `on_round` sees each round as the ServerApp records it."""
    from fedpact.audit import Ledger

    job.ledger_path.parent.mkdir(parents=True, exist_ok=True)
    with Ledger.open(job.ledger_path) as ledger:  # one connection for the whole wait
        return _wait(connection, job, run_id, ledger, timeout, poll, on_round)


def _wait(connection: Connection, job: JobConfig, run_id: int, ledger, timeout: float,
          poll: float, on_round: Callable[[int, dict], None] | None) -> JobResult:
    result_path = job.job_dir / "result.json"
    deadline = time.monotonic() + timeout
    next_status, seen, failures = 0.0, 0, 0
    while time.monotonic() < deadline:
        if on_round is not None:
            rounds, seen = _new_rounds(ledger, job, seen)
            for number, entry in rounds:
                on_round(number, entry)
        if result_path.exists():
            try:
                return JobResult.from_dict(json.loads(result_path.read_text()))
            except ValueError:
                pass  # being written
        if time.monotonic() >= next_status:
            try:
                status = run_status(connection, run_id)
                failures = 0
            except DeploymentError:
                failures += 1  # a slow or briefly unreachable SuperLink: try again
                if failures >= 10:
                    raise
                status = ""
            if status.startswith("finished"):
                time.sleep(poll)
                if not result_path.exists():
                    reason = (_ledger_reason(ledger, job)
                              or f"run {run_id} ended ({status}) without a result")
                    raise JobFailed(f"job {job.job_id} failed: {reason}")
            next_status = time.monotonic() + 2
        time.sleep(poll)
    with contextlib.suppress(DeploymentError):  # don't leave a run spending ε unwatched
        flwr_cli(connection, "stop", str(run_id), connection.name)
    raise DeploymentError(f"job {job.job_id} (run {run_id}) did not finish within {timeout:.0f} s;"
                          " the run was stopped")


class DeploymentRun:
    """The coordinator service's job engine on a SuperLink (`fedpact serve --superlink ...`)."""

    engine = "flower-deployment"
    supports_secure_aggregation = False
    """The bundle holds the plain apps: the service refuses SecAgg+ requests for this engine."""

    def __init__(self, connection: Connection, timeout: float = 3600) -> None:
        self.connection = connection
        self.timeout = timeout

    def __call__(self, job: JobConfig, on_round: Callable[[int, dict], None]) -> JobResult:
        job.home = str(Path(job.home).resolve())  # the ServerApp process opens the same ledger
        refuse_unsupported(job)
        run_id = submit_job(self.connection, job)
        return wait_for_result(self.connection, job, run_id, timeout=self.timeout,
                               on_round=on_round)


@dataclass
class SuperLinkProcess:
    """A `flower-superlink` child process with TLS and SuperNode authentication."""

    state_dir: Path
    port: int = 9093
    host: str = "127.0.0.1"
    certificates: Path | None = None
    node_auth: bool = True
    process: subprocess.Popen | None = field(default=None, repr=False)

    def argv(self) -> list[str]:
        argv = ["--host", self.host, "--port", str(self.port),
                "--database", str(Path(self.state_dir) / "superlink.db"),
                "--disable-runtime-dependency-installation"]
        if self.certificates:
            c = Path(self.certificates)
            argv += ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile",
                     str(c / "superlink.crt"), "--ssl-keyfile", str(c / "superlink.key")]
            if self.node_auth:
                argv.append("--enable-supernode-auth")
        else:
            argv.append("--insecure")
        return argv

    def start(self, log_path: Path | None = None) -> SuperLinkProcess:
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        log = open(log_path or Path(self.state_dir) / "superlink.log", "ab")  # noqa: SIM115
        exe = Path(sys.executable).with_name("flower-superlink")
        self.process = subprocess.Popen([str(exe), *self.argv()], stdout=log,
                                        stderr=subprocess.STDOUT,
                                        env=flower_env())
        return self

    def wait_ready(self, timeout: float = 60) -> SuperLinkProcess:
        """Block until the SuperLink accepts connections; raise if it exited or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise DeploymentError(f"flower-superlink exited with code {self.process.returncode}"
                                      f"; see {Path(self.state_dir) / 'superlink.log'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise DeploymentError(f"flower-superlink did not listen on {self.host}:{self.port} "
                              f"within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
