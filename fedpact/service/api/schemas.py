"""Request bodies of the coordinator API (pydantic): what each field means and its bounds.

Bounds here are the first check (a 422 naming the field); `JobConfig.validate()` and the privacy
budgets are the second, at submission and again at admission.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedpact.federation.partition import SCHEMES
from fedpact.models.datasets import BUILTIN_SPECS, TASKS
from fedpact.models.networks import MODEL_KINDS

SLUG = r"^[a-z][a-z0-9_]{2,63}$"
MODEL_NAME = r"^[a-z][a-z0-9-]{2,47}$"
PARTNER = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"
PARTNER_DATASET = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$"
"""A registered partner dataset's name (JobConfig's PARTNER_NAME)."""
GROUP = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""The consortium's dataset several partner datasets belong to (JobConfig's DATASET_NAME)."""
COLUMN = r"^[^\x00-\x1f\x7f]{1,200}$"
"""A column name or category value as a mapping declares it: printable, at most 200 characters."""

Partitioning = Literal[tuple(SCHEMES)]  # type: ignore[valid-type]
ModelKind = Literal[tuple(MODEL_KINDS)]  # type: ignore[valid-type]
Task = Literal[tuple(TASKS)]  # type: ignore[valid-type]


class JobRequestIn(BaseModel):
    """A data team's request for a joint model; nothing runs until every partner approved it."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(pattern=GROUP, description="A built-in data set the simulated consortium "
                         f"holds ({', '.join(BUILTIN_SPECS)}), or, with `partner_datasets`, the "
                         "consortium's dataset (group) its registered partner datasets belong to.")
    partner_datasets: list[Annotated[str, Field(pattern=PARTNER_DATASET)]] | None = Field(
        None, min_length=1, max_length=20, description="The registered partner datasets the job "
        "trains on (each partner's own data, `fedpact dataset register`), all of group `dataset`, "
        "with the same task, label and layout. Leave out for a built-in data set's split.")
    task: Task | None = Field(None, description="propensity or churn; must match the data set.")
    partitioning: Partitioning = Field("segment", description="How a built-in data set is split "
                                       "into partners (not with partner_datasets).")
    partners: int = Field(3, ge=1, le=20, description="Number of partner datasets (nodes) of a "
                          "built-in data set's split (with partner_datasets: their number).")
    purpose: str = Field(pattern=SLUG, description="Purpose of processing, a slug recorded in "
                         "the ledger with every data access, e.g. churn_model_training.")
    features: list[str] | None = Field(
        None, max_length=500, description="Columns the job reads. Defaults to the data set's feature "
        "columns; a different list is refused (feature subsets are not supported yet).")
    target_epsilon: float = Field(1.0, gt=0, le=100, description="ε per partner dataset for the job.")
    target_delta: float = Field(1e-5, gt=0, lt=1, description="δ per partner dataset for the job.")
    rounds: int = Field(3, ge=1, le=200)
    dp: bool = Field(True, description="Record-level DP-SGD on every partner (recommended). "
                     "Without it the job gives no formal privacy guarantee (ε = ∞), and every "
                     "partner admin must confirm that explicitly to approve it.")
    require_consent: bool = Field(
        True, description="Consent enforcement (on by default): each partner's data loader drops "
        "the rows of subjects without a valid consent for `purpose` before any feature is "
        "computed. Turning it off (false) is recorded in the ledger and stated in the job's "
        "record of processing.")
    secure_aggregation: bool = Field(
        False, description="Flower SecAgg+: the coordinator sees only the sum of the partners' "
        "updates (needs at least 2 partners). Not available on Flower's deployment engine yet: a "
        "coordinator running jobs on a SuperLink refuses it.")
    model: ModelKind = "logreg"
    local_epochs: int = Field(1, ge=1, le=50)
    batch_size: int = Field(512, ge=1, le=65536)
    learning_rate: float = Field(0.3, gt=0, le=10)
    max_grad_norm: float = Field(1.0, gt=0, le=100)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    model_name: str | None = Field(None, pattern=MODEL_NAME,
                                   description="Registry name; default TASK-DATASET.")

    @model_validator(mode="after")
    def _dataset_or_partner_datasets(self) -> JobRequestIn:
        if self.partner_datasets is None:
            if self.dataset not in BUILTIN_SPECS:
                raise ValueError(
                    f"dataset {self.dataset!r} is not a built-in data set ({', '.join(BUILTIN_SPECS)}); "
                    "for the consortium's own data name its registered partner datasets in "
                    "partner_datasets (GET /api/v1/datasets lists them)")
            return self
        names = self.partner_datasets
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"partner_datasets names {', '.join(twice)} more than once")
        if "partitioning" in self.model_fields_set:
            raise ValueError("partitioning splits a built-in data set; a job on partner_datasets "
                             "trains on each partner's own rows: leave partitioning out")
        if "partners" in self.model_fields_set and self.partners != len(names):
            raise ValueError(f"partners = {self.partners} but partner_datasets names {len(names)}; "
                             "leave partners out")
        if self.dataset in BUILTIN_SPECS:
            raise ValueError(f"dataset {self.dataset!r} is a built-in data set; with "
                             "partner_datasets name their group (GET /api/v1/datasets)")
        return self


class DecisionIn(BaseModel):
    """A partner admin's decision on a job, for one partner dataset they administer."""

    model_config = ConfigDict(extra="forbid")

    partner: str = Field(pattern=PARTNER, description="The partner dataset, e.g. telco-churn/dsl.")
    reason: str | None = Field(None, max_length=500,
                               description="Why (required to reject or revoke); no personal data.")
    acknowledge_no_privacy: bool = Field(
        False, description="Required (true) to approve a job without differential privacy: the "
        "admin confirms the job gives no formal privacy guarantee (ε = ∞) for the partner's rows. "
        "Ignored for jobs with DP.")


class BudgetIn(BaseModel):
    """A partner dataset's total privacy budget over all jobs."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(gt=0, le=1000, description="Total ε the dataset may spend.")
    delta: float = Field(gt=0, lt=1, description="Total δ over all jobs (keep it below 1/rows).")


class LayoutIn(BaseModel):
    """The public feature layout a partner node announces (`FeaturePipeline.public(spec).layout()`):
    declared category lists and numeric bounds, never a statistic of the rows."""

    model_config = ConfigDict(extra="forbid")

    categorical: dict[Annotated[str, Field(pattern=COLUMN)],
                      Annotated[list[Annotated[str, Field(pattern=COLUMN)]],
                                Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict, max_length=2000,
        description="Each categorical column, in order, with its declared values in order.")
    numeric: list[Annotated[str, Field(pattern=COLUMN)]] = Field(
        default_factory=list, max_length=2000, description="The numeric columns, in order.")
    bounds: dict[Annotated[str, Field(pattern=COLUMN)],
                 Annotated[list[float], Field(min_length=2, max_length=2)]] = Field(
        default_factory=dict, max_length=2000,
        description="[low, high] of every numeric column (values are clipped to them).")

    @model_validator(mode="after")
    def _consistent(self) -> LayoutIn:
        problems = []
        if not self.categorical and not self.numeric:
            problems.append("no feature column: give categorical and/or numeric columns")
        twice = sorted({c for c in self.numeric if self.numeric.count(c) > 1})
        if twice:
            problems.append(f"numeric lists {', '.join(map(repr, twice[:5]))} twice")
        both = [c for c in self.numeric if c in self.categorical]
        if both:
            problems.append(f"{', '.join(map(repr, both[:5]))} is both categorical and numeric")
        for col, values in self.categorical.items():
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                problems.append(f"categorical.{col} lists {', '.join(map(repr, dup[:5]))} twice")
        missing = [c for c in self.numeric if c not in self.bounds]
        if missing:
            problems.append(f"bounds: no [low, high] for numeric {', '.join(map(repr, missing[:5]))} "
                            "(a node announces the bounds its mapping declares)")
        extra = [c for c in self.bounds if c not in self.numeric]
        if extra:
            problems.append(f"bounds: {', '.join(map(repr, extra[:5]))} is not a numeric column")
        for col, pair in self.bounds.items():
            if not (all(math.isfinite(v) for v in pair) and pair[0] < pair[1]):
                problems.append(f"bounds.{col}: give two finite numbers [low, high] with low < high")
        if problems:
            raise ValueError("; ".join(problems[:10]))
        return self

    def as_layout(self) -> dict:
        """The layout in the node's own form and order (bounds in the numeric columns' order)."""
        return {"categorical": {c: list(v) for c, v in self.categorical.items()},
                "numeric": list(self.numeric),
                "bounds": {c: [float(self.bounds[c][0]), float(self.bounds[c][1])]
                           for c in self.numeric}}


class DatasetIn(BaseModel):
    """A partner dataset registered by its partner admin: what its node will announce, no rows."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=PARTNER_DATASET, description="The partner dataset, e.g. north or "
                      "telco-churn/dsl (the scope of its partner_admin and node roles).")
    group: str = Field(pattern=GROUP, description="The consortium's dataset it belongs to, e.g. "
                       "bank-churn: a job names a group and some of its partner datasets.")
    task: Task = Field(description="propensity or churn, as the partner's mapping says.")
    label: str = Field(pattern=COLUMN, description="The label (target) column of the mapping.")
    positive: list[Annotated[str, Field(pattern=COLUMN)]] | None = Field(
        None, max_length=50, description="The label values marking a positive row (optional).")
    purpose: str = Field(pattern=SLUG, description="Purpose of processing the mapping declares, "
                         "a slug, e.g. churn_model_training.")
    layout: LayoutIn = Field(description="The public layout the partner's node announces "
                             "(`fedpact data check` prints it).")


# --------------------------------------------------------------------------- validation errors

MAX_ERRORS = 10
"""A 422 lists at most this many problems."""
_MAX_PART = 64  # characters of one path element (a field name or dict key) a 422 repeats
_MAX_MSG = 300


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())  # one line
    return text if len(text) <= limit else text[:limit - 1] + "…"


def clean_errors(errors: list[dict]) -> list[dict]:
    """Pydantic/FastAPI validation errors as a response may carry them: the field path (each
    element cut to 64 characters: a key the client made up is not echoed whole), the type, the
    message and the bounds; never the `input` (a 30 MB body would come back 30 MB) or a URL."""
    out = []
    for e in errors[:MAX_ERRORS]:
        loc = [p if isinstance(p, int) and not isinstance(p, bool) else _short(p, _MAX_PART)
               for p in (e.get("loc") or ())]
        clean = {"type": _short(e.get("type", "value_error"), _MAX_PART), "loc": loc,
                 "msg": _short(str(e.get("msg", "")).removeprefix("Value error, "), _MAX_MSG)}
        ctx = {k: v for k, v in (e.get("ctx") or {}).items()
               if k != "error" and (isinstance(v, int | float | bool) or
                                    (isinstance(v, str) and len(v) <= 200))}
        if ctx:
            clean["ctx"] = ctx
        out.append(clean)
    return out


def error_field(loc: list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie") and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts) or "request"


def error_summary(errors: list[dict], *, located: bool = True) -> str:
    """One line naming each field at fault and why (from `clean_errors` output)."""
    lines = []
    for e in errors:
        loc = e.get("loc") or ["?"]
        if not located:
            lines.append(f"{'.'.join(str(p) for p in loc)}: {e['msg']}")
        elif len(loc) == 1 and loc[0] == "body":  # a check of the whole body names its fields
            lines.append(f"body: {e['msg']}")
        else:
            lines.append(f"{loc[0]} field {error_field(loc)}: {e['msg']}")
    return "; ".join(lines)
