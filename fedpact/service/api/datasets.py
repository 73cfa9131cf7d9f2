"""The consortium's dataset registry: partner datasets as named objects of the coordinator.

A partner brings its own CSV and mapping; on its own machine `fedpact dataset register` reads
them, checks that the mapping fixes the encoding (declared categories and bounds), and sends only
the public layout its node will announce, with the task, label column and purpose. Here each
registration is a row of `service.db` (`datasets`) and a `dataset.registered` ledger event (names,
task, label, purpose, a SHA-256 of the layout and its feature count: never a path or a row).

A job request naming partner datasets is checked against the registry before anyone is asked to
approve it (`check_request`): every dataset registered, all of the requested group, one task and
label, identical layouts (partner, column and value named where they differ), a partner admin for
each and, for a DP job, a privacy budget.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import and_, insert, select, update

from fedpact.audit import EventType, Ledger, LedgerError
from fedpact.errors import FedpactError
from fedpact.models.layout import layout_differences
from fedpact.privacy.budget import PrivacyBudgets

from .store import ServiceStore, datasets, grants, job_requests, users

OPEN_STATES = ("pending_approval", "queued")
"""Job states in which partners still decide (governance.OPEN; repeated here to avoid a cycle)."""


@dataclass(frozen=True)
class RequestProblem:
    """One reason `check_request` refuses a request: what kind (`unregistered`, `group`, `task`,
    `tasks`, `label`, `positive`, `layout`, `admin`, `budget`), the partner dataset it concerns
    (None when it concerns several: `tasks`, `label`, `positive`, `layout`), the facts a front end
    words it with (`found`: e.g. the dataset's group or task; `details`: the layout differences),
    and the API's message."""

    kind: str
    dataset: str | None
    message: str
    found: str | None = None
    details: tuple[str, ...] = ()


class DatasetError(FedpactError):
    """A registration or a request naming partner datasets is refused; `status` is the HTTP one.
    `problems` holds each reason of a refused request (`check_request`), for a front end that
    words them per dataset (the console's request form)."""

    def __init__(self, message: str, status: int = 422,
                 problems: list[RequestProblem] | None = None):
        super().__init__(message)
        self.status = status
        self.problems = list(problems or [])


def canonical_layout(layout: dict) -> dict:
    """The layout in one form: categorical columns and values in order, numeric columns in
    order, bounds as floats in the numeric columns' order. Order is part of a layout (it fixes
    the model's inputs), so it is kept."""
    numeric = [str(c) for c in layout.get("numeric") or []]
    bounds = layout.get("bounds") or {}
    return {"categorical": {str(c): [str(v) for v in vs]
                            for c, vs in (layout.get("categorical") or {}).items()},
            "numeric": numeric,
            "bounds": {c: [float(bounds[c][0]), float(bounds[c][1])] for c in numeric if c in bounds}}


def layout_digest(layout: dict) -> str:
    """SHA-256 over the canonical layout's compact JSON: equal exactly when the layouts are."""
    text = json.dumps(canonical_layout(layout), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def layout_columns(layout: dict) -> list[str]:
    """The feature columns a layout reads, in the model's order (categorical, then numeric)."""
    return [*layout.get("categorical", {}), *layout.get("numeric", [])]


def model_inputs(layout: dict) -> int:
    """The model's input width: one per declared category, one per numeric column."""
    return sum(len(v) for v in layout.get("categorical", {}).values()) + len(layout.get("numeric", []))


@dataclass
class RegisteredDataset:
    name: str
    group: str
    task: str
    label: str
    positive: list[str] | None
    purpose: str
    layout: dict
    layout_sha256: str
    features: int
    registered_by: str
    registered_at: float
    event_id: str

    def to_dict(self) -> dict:
        return {"name": self.name, "group": self.group, "task": self.task, "label": self.label,
                "positive": self.positive, "purpose": self.purpose, "layout": self.layout,
                "layout_sha256": self.layout_sha256, "features": self.features,
                "model_inputs": model_inputs(self.layout), "registered_by": self.registered_by,
                "registered_at": self.registered_at, "event_id": self.event_id}


def _entry(row) -> RegisteredDataset:
    return RegisteredDataset(row.name, row.dataset_group, row.task, row.label,
                             json.loads(row.positive) if row.positive else None, row.purpose,
                             json.loads(row.layout), row.layout_sha256, row.features,
                             row.registered_by, row.registered_at, row.event_id)


@dataclass
class CheckedRequest:
    """What `check_request` established: the datasets, in the request's order, and their layout."""

    group: str
    names: list[str]
    task: str
    label: str
    layout: dict
    layout_sha256: str

    @property
    def features(self) -> list[str]:
        return layout_columns(self.layout)


def budget_hint(name: str) -> str:
    """How a partner admin sets a dataset's privacy budget, on every front end."""
    return (f"its partner admin sets one in the console (Privacy budgets, /console/budgets) or "
            f"with the API (PUT /api/v1/budgets/{name} with {{\"epsilon\": E, \"delta\": D}}); "
            f"on the coordinator machine also `fedpact privacy set-budget {name} --epsilon E "
            "--delta D`")


class DatasetRegistry:
    """Registered partner datasets in `service.db`, each registration a ledger event."""

    def __init__(self, store: ServiceStore, ledger: Ledger):
        self.store = store
        self.ledger = ledger

    # ---- reading

    def get(self, name: str) -> RegisteredDataset | None:
        with self.store.engine.connect() as conn:
            row = conn.execute(select(datasets).where(datasets.c.name == name)).first()
        return _entry(row) if row is not None else None

    def list(self, group: str | None = None) -> list[RegisteredDataset]:
        query = select(datasets).order_by(datasets.c.dataset_group, datasets.c.name)
        if group:
            query = query.where(datasets.c.dataset_group == group)
        with self.store.engine.connect() as conn:
            return [_entry(r) for r in conn.execute(query)]

    def admins(self, name: str) -> list[str]:
        """Enabled users holding partner_admin for `name` (the accounts' role grants)."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(users.c.username).join(grants, grants.c.user_id == users.c.id)
                                .where(and_(grants.c.role == "partner_admin", grants.c.scope == name,
                                            users.c.disabled.is_(False)))
                                .order_by(users.c.username)).all()
        return [r.username for r in rows]

    def open_jobs(self, name: str) -> list[str]:
        """Jobs naming `name` on which partners may still decide (pending approval or queued)."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(job_requests.c.job_id, job_requests.c.partners).where(
                job_requests.c.status.in_(OPEN_STATES))).all()
        return sorted(r.job_id for r in rows if name in json.loads(r.partners))

    # ---- registering

    def register(self, *, name: str, group: str, task: str, label: str, purpose: str, layout: dict,
                 positive: list[str] | None = None, registered_by: str, actor: str) -> RegisteredDataset:
        """Register `name` (or register it again): a `dataset.registered` event, then the row.

        Changing what a job request was checked against (group, task, label or layout) while a
        job naming the dataset is open is refused (409): its partners approve what they saw."""
        from fedpact.models.datasets import BUILTIN_SPECS

        if group in BUILTIN_SPECS:
            raise DatasetError(f"group {group!r} is the name of a built-in data set; name the "
                               "consortium's dataset otherwise (e.g. telco-churn-eu)")
        layout = canonical_layout(layout)
        digest = layout_digest(layout)
        features = len(layout_columns(layout))
        with self.store.write_lock:
            previous = self.get(name)
            if previous is not None:
                changed = [what for what, old, new in (
                    ("layout", previous.layout_sha256, digest), ("group", previous.group, group),
                    ("task", previous.task, task), ("label", previous.label, label)) if old != new]
                jobs = self.open_jobs(name) if changed else []
                if jobs:
                    raise DatasetError(
                        f"dataset {name!r} is named by open job(s) {', '.join(jobs)}: its "
                        f"{', '.join(changed)} cannot change until they have run or been rejected "
                        "(their partners approve what was registered)", 409)
            payload = {"dataset": name, "group": group, "task": task, "label": label,
                       "purpose": purpose, "layout_sha256": digest, "features": features,
                       "registered_by": registered_by,
                       "replaces": previous.event_id if previous else None}
            try:
                event = self.ledger.append(EventType.DATASET_REGISTERED, payload, actor=actor)
            except LedgerError as exc:  # e.g. something personal-looking in a name
                raise DatasetError(str(exc), 422) from None
            values = dict(dataset_group=group, task=task, label=label,
                          positive=json.dumps(list(positive)) if positive is not None else None,
                          purpose=purpose, layout=json.dumps(layout, ensure_ascii=False),
                          layout_sha256=digest, features=features, registered_by=registered_by,
                          registered_at=self.store.now(), event_id=event.event_id)
            with self.store.engine.begin() as conn:
                if previous is None:
                    conn.execute(insert(datasets).values(name=name, **values))
                else:
                    conn.execute(update(datasets).where(datasets.c.name == name).values(**values))
        return self.get(name)  # type: ignore[return-value]

    # ---- checking a job request

    def check_request(self, group: str, names: list[str], *, task: str | None, dp: bool) -> CheckedRequest:
        """Refuse (422), naming each dataset and why, a request whose partner datasets are not
        registered, not all of `group`, of another task or label, of different layouts, without a
        partner admin, or (with DP) without a privacy budget."""
        found = {n: self.get(n) for n in names}
        problems: list[RequestProblem] = []

        def problem(kind: str, dataset: str | None, message: str, **facts) -> None:
            problems.append(RequestProblem(kind, dataset, message, **facts))

        unknown = [n for n, e in found.items() if e is None]
        if unknown:
            message = (f"partner dataset(s) {', '.join(unknown)} not registered: each "
                       "partner admin registers its own with `fedpact dataset register` "
                       "(POST /api/v1/datasets); GET /api/v1/datasets lists them")
            for n in unknown:
                problem("unregistered", n, message)
        known = {n: e for n, e in found.items() if e is not None}
        for n, e in known.items():
            if e.group != group:
                problem("group", n, f"partner dataset {n} belongs to group {e.group!r}, not {group!r}",
                        found=e.group)
        if task is not None:
            for n, e in known.items():
                if e.task != task:
                    problem("task", n, f"partner dataset {n} is a {e.task} dataset, not {task}",
                            found=e.task)
        tasks = {e.task for e in known.values()}
        if len(tasks) > 1:
            problem("tasks", None, "the partner datasets have different tasks: "
                    + "; ".join(f"{n}: {e.task}" for n, e in known.items()),
                    details=tuple(f"{n}: {e.task}" for n, e in known.items()))
        labels = {(e.label, tuple(e.positive) if e.positive is not None else None) for e in known.values()}
        if len({lab for lab, _ in labels}) > 1:
            problem("label", None, "the partner datasets have different label columns: "
                    + "; ".join(f"{n}: {e.label!r}" for n, e in known.items()),
                    details=tuple(f"{n}: {e.label}" for n, e in known.items()))
        else:
            declared = {pos for _, pos in labels if pos is not None}
            if len(declared) > 1:
                positives = [(n, list(e.positive)) for n, e in known.items() if e.positive is not None]
                problem("positive", None, "the partner datasets mark positive rows with different "
                        "label values: " + "; ".join(f"{n}: {pos}" for n, pos in positives),
                        details=tuple(f"{n}: {', '.join(pos)}" for n, pos in positives))
        diffs = layout_differences({n: e.layout for n, e in known.items()})
        if diffs:
            problem("layout", None, "the partner datasets' layouts differ, so their models could not "
                    "be averaged: " + "; ".join(diffs[:20])
                    + ("; …" if len(diffs) > 20 else "")
                    + " (each partner declares the same columns, categories and bounds in "
                      "its mapping and registers again; `fedpact data compare` shows them)",
                    details=tuple(diffs[:20]))
        for n in known:
            if not self.admins(n):
                problem("admin", n, f"partner dataset {n} has no partner admin to approve the job: "
                        f"an operator grants one (fedpact admin role grant USER partner_admin "
                        f"--scope {n})")
        if dp:
            budgets = PrivacyBudgets(self.ledger).all()
            for n in known:
                b = budgets.get(n)
                if b is None or b.epsilon_max <= 0:
                    problem("budget", n, f"partner dataset {n} has no privacy budget: {budget_hint(n)}")
        if problems:
            messages = list(dict.fromkeys(p.message for p in problems))  # `unregistered`: one line
            raise DatasetError("cannot request this job: " + "; ".join(messages), 422, problems)
        first = known[names[0]]
        return CheckedRequest(group, list(names), first.task, first.label, first.layout,
                              first.layout_sha256)


def register_builtin_partners(registry: DatasetRegistry, dataset: str, partitioning: str,
                              num_partitions: int, *, actor: str = "operator:seed") -> list[RegisteredDataset]:
    """Register a built-in data set's split as ordinary partner datasets (demo and tests): each
    split's public layout under the group of the data set's name (e.g. telco-churn)."""
    from fedpact.federation.coordinator import partner_datasets
    from fedpact.federation.job import JobConfig
    from fedpact.models.datasets import BUILTIN_SPECS
    from fedpact.models.features import FeaturePipeline

    spec = BUILTIN_SPECS[dataset]
    layout = FeaturePipeline.public(spec).layout()
    job = JobConfig(dataset=dataset, partitioning=partitioning, num_partitions=num_partitions)
    return [registry.register(name=name, group=spec.name, task=spec.task, label=spec.label,
                              positive=list(spec.positive), purpose=spec.purpose, layout=layout,
                              registered_by=actor.split(":", 1)[-1], actor=actor)
            for name in partner_datasets(job)]
