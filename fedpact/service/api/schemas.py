"""Request bodies of the coordinator API (pydantic): what each field means and its bounds.

Bounds here are the first check (a 422 naming the field); `JobConfig.validate()` and the privacy
budgets are the second, at submission and again at admission.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedpact.federation.partition import SCHEMES
from fedpact.models.datasets import BUILTIN_SPECS, TASKS
from fedpact.models.networks import MODEL_KINDS

SLUG = r"^[a-z][a-z0-9_]{2,63}$"
MODEL_NAME = r"^[a-z][a-z0-9-]{2,47}$"
PARTNER = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"

DatasetName = Literal[tuple(BUILTIN_SPECS)]  # type: ignore[valid-type]
Partitioning = Literal[tuple(SCHEMES)]  # type: ignore[valid-type]
ModelKind = Literal[tuple(MODEL_KINDS)]  # type: ignore[valid-type]
Task = Literal[tuple(TASKS)]  # type: ignore[valid-type]


class JobRequestIn(BaseModel):
    """A data team's request for a joint model; nothing runs until every partner approved it."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName = Field(description="Built-in data set the simulated consortium holds.")
    task: Task | None = Field(None, description="propensity or churn; must match the data set.")
    partitioning: Partitioning = Field("segment", description="How the data set is split into partners.")
    partners: int = Field(3, ge=1, le=20, description="Number of partner datasets (nodes).")
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
