"""A consortium's own CSVs in a local rehearsal: `fedpact train --partner NAME=FILE.csv:MAPPING`.

Everything here runs on the operator's machine, which in a simulation plays every partner: the
files are checked (the report a node would give at start), the layouts the nodes would announce
are compared (partner, column and value named), consent is looked up in each partner's own
registry, and each simulated partner is set up to serve its file (`node_data.write_simulated_node`)
so that the job runs through the same nodes, ledger, budgets and references as the demo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedpact.errors import ConfigurationError, DataValidationError, FedpactError

PARTNER_OPTION = re.compile(r"(?P<name>[^=]+)=(?P<csv>.+?):(?P<mapping>[^:]+\.(?:toml|ya?ml))"
                            r"(?::(?P<consents>.+\.csv))?")


@dataclass(frozen=True)
class PartnerFile:
    name: str
    csv: Path
    mapping: Path
    consents: Path | None = None


@dataclass
class Rehearsal:
    """What the pre-flight found: the consortium's dataset name and task, rows per partner."""

    dataset: str
    task: str
    partners: list[PartnerFile]
    rows: dict[str, int]
    consented: dict[str, str]
    imported: dict[str, str]


def parse_partner(value: str) -> PartnerFile:
    """`NAME=FILE.csv:MAPPING.toml` (or .yaml), optionally `:CONSENTS.csv` (the partner's
    consent-management export, imported into its own registry before the job)."""
    match = PARTNER_OPTION.fullmatch(value.strip())
    if not match:
        raise ConfigurationError(f"--partner {value!r}: expected NAME=FILE.csv:MAPPING.toml[:CONSENTS.csv] "
                                 "(e.g. --partner france=france.csv:france.toml)")
    return PartnerFile(match["name"].strip(), Path(match["csv"]), Path(match["mapping"]),
                       Path(match["consents"]) if match["consents"] else None)


def import_consents(partner: PartnerFile, home: str) -> str:
    """The partner's consent export, recorded in its own registry (as its admin would with
    `fedpact audit consent import`); bad rows stop the rehearsal with the import's report."""
    from fedpact.audit import Ledger
    from fedpact.audit.consent import ConsentRegistry
    from fedpact.federation.job import JobConfig
    from fedpact.federation.node_data import partner_registry_path

    path = partner_registry_path({}, JobConfig(home=home, job_id="-"), partner.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Ledger.open(path) as ledger:
        report = ConsentRegistry(ledger, actor=f"partner_admin:{partner.name}").import_csv(partner.consents)
    if not report.ok:
        raise FedpactError(f"{partner.name}: consent import from {partner.consents} failed:\n"
                           + report.summary())
    return report.summary()


def _consent_state(partner: PartnerFile, data, home: str, purpose: str) -> str:
    """How many of the partner's rows have a valid consent for `purpose` in its own registry."""
    from fedpact.audit import Ledger
    from fedpact.audit.consent import ConsentRegistry
    from fedpact.federation.job import JobConfig
    from fedpact.federation.node_data import partner_registry_path

    if data.ids is None:
        return "not checkable (no id column): rows are used, the records say so"
    path = partner_registry_path({}, JobConfig(home=home, job_id="-"), partner.name)
    if not path.exists():
        allowed = 0
    else:
        with Ledger.open(path) as ledger:
            allowed = int(ConsentRegistry(ledger, actor="cli").allowed(data.ids.tolist(), purpose).sum())
    if allowed == 0:
        raise ConfigurationError(
            f"{partner.name}: none of its {len(data):,} subjects has a consent for purpose "
            f"{purpose!r} in its own registry ({path}); every row would be excluded. Import the "
            f"partner's consents first: fedpact audit consent import CONSENTS.csv --home {path.parent} "
            "— or rehearse without the check: --no-require-consent (recorded as such)")
    return f"{allowed:,} of {len(data):,} subjects consented; the others are excluded"


def prepare(partners: list[PartnerFile], *, home: str, dataset: str | None, purpose: str,
            require_consent: bool) -> Rehearsal:
    """Check every partner's file and mapping, compare their layouts, look up consent, and set
    up the simulated nodes; raise one error listing every problem of every partner."""
    from fedpact.federation.job import DATASET_NAME, PARTNER_NAME
    from fedpact.federation.node_data import write_simulated_node
    from fedpact.models.datasets import load_partner_csv
    from fedpact.models.features import FeaturePipeline, undeclared_settings
    from fedpact.models.layout import layout_differences

    if len(partners) < 2:
        raise ConfigurationError("a federated job needs at least two partners: repeat --partner")
    names = [p.name for p in partners]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"--partner names must differ: {', '.join(names)}")
    problems: list[str] = []
    for p in partners:
        if not PARTNER_NAME.fullmatch(p.name):
            problems.append(f"{p.name}: a partner name uses letters, digits and . _ - /")
        for what, path in (("CSV", p.csv), ("mapping", p.mapping), ("consents", p.consents)):
            if path is not None and not path.is_file():
                problems.append(f"{p.name}: {what} file {path} not found")
    if problems:
        raise ConfigurationError("cannot rehearse this job:\n" + "\n".join(f"  - {x}" for x in problems))
    loaded, layouts, failures = {}, {}, []
    for p in partners:
        try:
            data = load_partner_csv(p.csv, p.mapping)
        except DataValidationError as exc:
            failures.append(f"{p.name}: {exc}")
            continue
        loaded[p.name] = data
        missing = undeclared_settings(data.spec)
        if missing:
            failures.append(f"{p.name}: its node would refuse the mapping {p.mapping} until it "
                            "declares:\n" + "\n".join(f"    - {m}" for m in missing)
                            + f"\n  (fedpact data check {p.csv} --mapping {p.mapping} suggests them)")
            continue
        layouts[p.name] = FeaturePipeline.public(data.spec).layout()
    if failures:
        raise FedpactError(f"{len(failures)} of {len(partners)} partners' data cannot be used:\n"
                           + "\n".join(failures))
    diffs = layout_differences(layouts)
    if diffs:
        raise FedpactError("the partners' mappings announce different feature layouts, so their "
                           "models could not be averaged:\n" + "\n".join(f"  - {d}" for d in diffs)
                           + "\n(fedpact data compare shows the same; declare the same columns, "
                           "categories and bounds in every mapping)")
    tasks = {d.spec.task for d in loaded.values()}
    labels = {(d.spec.label, d.spec.positive) for d in loaded.values()}
    if len(tasks) > 1 or len(labels) > 1:
        raise FedpactError("the partners' mappings describe different tasks or labels: "
                           + "; ".join(f"{n}: task {d.spec.task!r}, label {d.spec.label!r} "
                                       f"positive {list(d.spec.positive)}" for n, d in loaded.items()))
    if dataset is None:
        specs = {d.spec.name for d in loaded.values()}
        dataset = specs.pop() if len(specs) == 1 else f"{tasks.copy().pop()}-consortium"
        dataset = re.sub(r"[^A-Za-z0-9._-]", "-", dataset)[:64].strip("-.") or "consortium"
    if not DATASET_NAME.fullmatch(dataset):
        raise ConfigurationError(f"--name {dataset!r}: use letters, digits and . _ - (at most 64)")
    imported = {}
    for p in partners:
        if p.consents is not None:
            imported[p.name] = import_consents(p, home)
    consented = {}
    for p in partners:
        consented[p.name] = (_consent_state(p, loaded[p.name], home, purpose) if require_consent
                             else "off: rows used without a consent check (recorded)")
    for p in partners:
        write_simulated_node(home, p.name, p.csv, p.mapping)
    return Rehearsal(dataset, tasks.pop(), partners, {n: len(d) for n, d in loaded.items()},
                     consented, imported)
