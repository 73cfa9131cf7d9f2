"""`fedpact node ...` and `fedpact superlink ...`: running fedpact on Flower's deployment engine.

Coordinator: `fedpact node init --superlink-host HOST` (CA + SuperLink certificate), `fedpact
superlink start`, `fedpact node register partner.pub`, `fedpact serve --superlink ...`.
Partner: `fedpact node init --partner NAME` (its key pair; only the `.pub` leaves the machine),
`fedpact node start ...`. docs/deploy.md walks through a three-machine deployment.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from fedpact.errors import FedpactError

from .cli_options import HomeOption, console, err_console

node_app = typer.Typer(help="Partner nodes on Flower's deployment engine (TLS, node keys).",
                       no_args_is_help=True)
superlink_app = typer.Typer(help="The coordinator's Flower SuperLink.", no_args_is_help=True)

SuperLinkOption = Annotated[str, typer.Option(help="SuperLink address HOST:PORT.")]
CaOption = Annotated[Path | None, typer.Option(
    "--root-certificates", help="The consortium CA certificate (ca.crt) that signed the "
                                "SuperLink's certificate; omit only with --insecure.")]


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"error: {message}", highlight=False)
    raise typer.Exit(code)


@node_app.command("init")
def init(
    out: Annotated[Path, typer.Option(help="Folder for the certificates and keys.")] = Path("pki"),
    superlink_host: Annotated[list[str] | None, typer.Option(
        help="Coordinator: create the consortium CA and the SuperLink's TLS certificate for this "
             "host name or IP (repeat for each address nodes dial).")] = None,
    partner: Annotated[list[str] | None, typer.Option(
        help="Partner: create this partner's node key pair (repeat for several).")] = None,
    days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace existing certificates or keys.")] = False,
) -> None:
    """Create deployment credentials: the CA + SuperLink certificate and/or partner node keys."""
    from fedpact.privacy.pki import create_certificates, create_node_key, node_key_fingerprint

    if not superlink_host and not partner:
        _fail("say what to create: --superlink-host HOST (coordinator) and/or --partner NAME")
    existing = ([out / "ca.key"] if superlink_host else []) + [out / "keys" / n for n in partner or []]
    existing = [p for p in existing if p.exists()]
    if existing and not force:
        _fail(f"{', '.join(map(str, existing))} already exist; keys already registered or "
              "certificates already handed out would stop working — pass --force to replace them")
    try:
        if superlink_host:
            files = create_certificates(out, superlink_host, days=days)
            console.print(f"CA certificate      {files.ca_cert}  (give to every partner)")
            console.print(f"SuperLink TLS       {files.server_cert}, {files.server_key} "
                          f"for {', '.join(superlink_host)}")
            console.print(f"[dim]keep {files.ca_key} offline: it signs the SuperLink's "
                          "certificate[/dim]")
        for name in partner or []:
            public = create_node_key(out / "keys" / name)
            console.print(f"node key {name:12s} {public}  {node_key_fingerprint(public)}")
            console.print(f"[dim]send only {public.name} to the coordinator; "
                          f"{public.with_suffix('').name} stays on the partner's machine[/dim]")
    except FedpactError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write to {out}: {exc}")


@node_app.command("register")
def register(
    public_key: Annotated[Path, typer.Argument(help="The partner's node public key (.pub).")],
    superlink: SuperLinkOption = "127.0.0.1:9093",
    root_certificates: CaOption = None,
    partner: Annotated[str, typer.Option(help="Partner organisation this key belongs to "
                                              "(recorded in the ledger).")] = "",
    home: HomeOption = ".fedpact",
) -> None:
    """Admit a partner node's key on the SuperLink; only registered keys may connect."""
    from fedpact.audit import EventType, Ledger
    from fedpact.federation.deployment import Connection, register_node
    from fedpact.privacy.pki import node_key_fingerprint

    if not public_key.is_file():
        _fail(f"{public_key}: no such public key file")
    try:
        fingerprint = node_key_fingerprint(public_key)
        connection = Connection(superlink, root_certificates, Path(home) / "flwr")
        node_id = register_node(connection, public_key)
    except FedpactError as exc:
        _fail(str(exc))
    Path(home).mkdir(parents=True, exist_ok=True)
    with Ledger.open(Path(home) / "ledger.db") as ledger:
        ledger.append(EventType.ROLE_GRANTED,
                      {"principal": f"node:{partner or public_key.stem}", "role": "node",
                       "granted_by": "coordinator", "key_fingerprint": fingerprint,
                       "flower_node_id": str(node_id)}, actor="admin")
    console.print(f"registered {public_key} ({fingerprint}) as node {node_id}")


def _check_own_data(data_csv: Path, mapping: Path, partner: str) -> None:
    """The report a job's handshake would give, here on the partner's machine before the node
    starts: every problem of the CSV and its mapping at once (nothing is sent anywhere)."""
    from fedpact.errors import DataValidationError
    from fedpact.models.datasets import load_partner_csv
    from fedpact.models.features import FeaturePipeline, undeclared_settings

    try:
        data = load_partner_csv(data_csv, mapping)
    except DataValidationError as exc:
        _fail(f"this node will not start: its data cannot be used (nothing was sent):\n{exc}")
    missing = undeclared_settings(data.spec)
    if missing:
        _fail(f"this node will not start: {mapping} leaves the feature encoding to the data, "
              "which would release statistics of the rows; declare:\n"
              + "\n".join(f"  - {m}" for m in missing)
              + f"\n(fedpact data check {data_csv} --mapping {mapping} suggests the declarations)")
    width = FeaturePipeline.public(data.spec).n_features
    console.print(f"data: {partner}: {len(data):,} valid rows of {data_csv.name}, "
                  f"{len(data.spec.features)} feature columns → {width} model inputs "
                  "(declared encoding, no statistic of the rows)", highlight=False)
    for note in data.notes:
        console.print(f"  note: {note}", highlight=False, markup=False)


@node_app.command("start")
def start(
    superlink: SuperLinkOption = "127.0.0.1:9093",
    root_certificates: CaOption = None,
    key: Annotated[Path | None, typer.Option(help="This node's private key (from `fedpact node "
                                                  "init --partner`).")] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS and no node key (loopback tests only).")] = False,
    data_csv: Annotated[Path | None, typer.Option(help="This partner's own CSV.")] = None,
    mapping: Annotated[Path | None, typer.Option(help="Mapping file for --data-csv.")] = None,
    partner: Annotated[str, typer.Option(help="Partner name (with --data-csv).")] = "",
    partition_id: Annotated[int | None, typer.Option(help="Demo/benchmark: serve this partition "
                                                          "of a public data set instead.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder with the public data sets.")] = None,
    state_dir: Annotated[Path, typer.Option(help="This node's own disk: accountants, saved "
                                                 "replies, Runtime API secret.")] = Path(".fedpact/node"),
    consent_ledger: Annotated[Path | None, typer.Option(help="Ledger holding this partner's "
                                                            "consent records.")] = None,
    policy: Annotated[Path | None, typer.Option(
        help="This node's release policy (TOML: max_epsilon_per_job, max_epsilon_total, "
             "min_rows, allow; docs/privacy.md). Default: the built-in policy.")] = None,
    runtime_port: Annotated[int, typer.Option(help="Loopback port of the SuperNode's Runtime "
                                                   "API (one per node on a machine).")] = 9094,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls of the SuperLink "
                                                      "and the Runtime API.")] = 0.05,
    admission_wait: Annotated[float, typer.Option(
        help="Seconds to keep retrying when the SuperLink does not admit the node (after a "
             "crash it holds the old session for about a minute).")] = 120.0,
) -> None:
    """Run this partner's node: the SuperNode and a warm fedpact ClientApp executor."""
    from fedpact.federation.node_runtime import EXIT_NOT_ADMITTED, NodeProcessConfig, start_node

    if not insecure and (root_certificates is None or key is None):
        _fail("give --root-certificates ca.crt and --key NODE_KEY (or --insecure on loopback)")
    for path in (root_certificates, key, data_csv, mapping):
        if path is not None and not Path(path).is_file():
            _fail(f"{path}: no such file")
    if (data_csv is None) != (mapping is None):
        _fail("--data-csv and --mapping go together")
    if data_csv is None and partition_id is None:
        _fail("say which rows this node serves: --data-csv FILE --mapping FILE, or --partition-id")
    if policy is not None:
        from fedpact.privacy.node_policy import NodePolicy

        try:
            NodePolicy.load(policy)
        except FedpactError as exc:
            _fail(f"this node will not start: {exc}")
    if data_csv is not None:
        _check_own_data(data_csv, mapping, partner or data_csv.stem)
    entries = {"state-dir": str(state_dir.resolve())}
    if data_csv is not None:
        entries.update({"data-csv": str(data_csv.resolve()), "mapping": str(mapping.resolve()),
                        "partner": partner or data_csv.stem})
    else:
        entries["partition-id"] = partition_id
        if data_dir is not None:
            entries["data-dir"] = str(data_dir.resolve())
    if consent_ledger is not None:
        entries["consent-ledger"] = str(consent_ledger.resolve())
    if policy is not None:
        entries["policy"] = str(policy.resolve())
    node_config = " ".join(f'{k}={v}' if isinstance(v, int) else f'{k}="{v}"'
                           for k, v in entries.items())
    config = NodeProcessConfig(superlink=superlink, node_config=node_config,
                               runtime_port=runtime_port,
                               root_certificates=None if insecure else root_certificates,
                               private_key=None if insecure else key, state_dir=state_dir,
                               poll_interval=poll_interval)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    console.print(f"node → SuperLink {superlink} ({'insecure' if insecure else 'TLS + node key'}); "
                  f"Ctrl-C stops it")
    code = start_node(config, admission_wait=admission_wait)
    if code == EXIT_NOT_ADMITTED:
        _fail(f"the SuperLink at {superlink} did not admit this node: its key is not registered "
              "(ask the coordinator to run `fedpact node register` with your .pub file) or the "
              "address/certificate is wrong", EXIT_NOT_ADMITTED)
    if code not in (0, None, -15):
        _fail(f"the SuperNode exited with code {code}", 1)


@superlink_app.command("start")
def superlink_start(
    certificates: Annotated[Path | None, typer.Option(
        help="Folder from `fedpact node init --superlink-host` (ca.crt, superlink.crt/.key).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="One port for Fleet, Control and ServerApp APIs.")] = 9093,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node authentication (loopback "
                                                "tests only).")] = False,
    home: HomeOption = ".fedpact",
) -> None:
    """Run the coordinator's SuperLink with TLS and SuperNode authentication, until Ctrl-C."""
    from fedpact.federation.deployment import SuperLinkProcess

    if not insecure:
        if certificates is None:
            _fail("give --certificates DIR (from `fedpact node init --superlink-host`) or --insecure")
        for name in ("ca.crt", "superlink.crt", "superlink.key"):
            if not (certificates / name).is_file():
                _fail(f"{certificates / name}: missing; run `fedpact node init --superlink-host`")
    link = SuperLinkProcess(Path(home) / "superlink", port=port, host=host,
                            certificates=None if insecure else certificates)
    try:
        link.start().wait_ready()
    except FedpactError as exc:
        _fail(str(exc), 1)
    console.print(f"SuperLink on {host}:{port} "
                  f"({'insecure' if insecure else 'TLS, only registered node keys'}); "
                  f"log {Path(home) / 'superlink' / 'superlink.log'}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # stop the SuperLink too, not orphan it
    try:
        while link.process.poll() is None and not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        link.stop()
