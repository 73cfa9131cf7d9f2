"""Privacy budgets per partner dataset, kept in the audit ledger.

The data owner sets a total (ε_max, δ) for each dataset (`privacy.budget_set`). Every job charges
what it spends (`privacy.spent`, per round, so a job that stops half-way is still charged for what it
used). Across jobs the charges add up (basic sequential composition: conservative but always valid);
within a job the RDP accountant gives the tight figure. A job whose plan would exceed any dataset's
remaining budget is refused before it starts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from fedpact.audit import EventType, Ledger
from fedpact.errors import FedpactError


class BudgetError(FedpactError):
    """A dataset has no budget, or a job would spend more than what is left of it."""


@dataclass
class DatasetBudget:
    dataset: str
    epsilon_max: float
    delta: float
    epsilon_spent: float
    delta_spent: float
    jobs: dict[str, float]

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_max - self.epsilon_spent)


class PrivacyBudgets:
    """Read and write dataset budgets and spend through the ledger."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def set(self, dataset: str, epsilon_max: float, delta: float, *, actor: str) -> None:
        """The data owner sets (or changes) the total budget of a dataset."""
        if not dataset:
            raise BudgetError("dataset name is empty")
        if not epsilon_max > 0:
            raise BudgetError(f"budget for {dataset}: epsilon_max must be positive, got {epsilon_max}")
        if not 0 < delta < 1:
            raise BudgetError(f"budget for {dataset}: delta must be in (0, 1), got {delta}")
        self.ledger.append(EventType.BUDGET_SET,
                           {"dataset": dataset, "epsilon_max": float(epsilon_max), "delta": float(delta)},
                           actor=actor)

    def charge(self, dataset: str, epsilon: float, delta: float, *, job_id: str, actor: str,
               round: int | None = None) -> None:
        """Record that `job_id` spent `epsilon` (and `delta`) of `dataset`'s budget."""
        payload = {"dataset": dataset, "epsilon": float(epsilon), "delta": float(delta)}
        if round is not None:
            payload["round"] = int(round)
        self.ledger.append(EventType.PRIVACY_SPENT, payload, actor=actor, job_id=job_id)

    def all(self) -> dict[str, DatasetBudget]:
        """Every dataset that has a budget or a charge, with its spend per job."""
        budgets: dict[str, tuple[float, float]] = {}
        for ev in self.ledger.events(event_type=EventType.BUDGET_SET.value):
            budgets[ev.payload["dataset"]] = (ev.payload["epsilon_max"], ev.payload["delta"])
        spent: dict[str, float] = defaultdict(float)
        dspent: dict[str, float] = defaultdict(float)
        jobs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for ev in self.ledger.events(event_type=EventType.PRIVACY_SPENT.value):
            d = ev.payload["dataset"]
            spent[d] += ev.payload["epsilon"]
            dspent[d] += ev.payload["delta"]
            jobs[d][ev.job_id or "-"] += ev.payload["epsilon"]
        out = {}
        for d in sorted(set(budgets) | set(spent)):
            eps_max, delta = budgets.get(d, (0.0, 0.0))
            out[d] = DatasetBudget(d, eps_max, delta, spent[d], dspent[d], dict(jobs[d]))
        return out

    def get(self, dataset: str) -> DatasetBudget | None:
        b = self.all().get(dataset)
        return b if b is not None and b.epsilon_max > 0 else None

    def check(self, requests: dict[str, float], delta: float) -> None:
        """Refuse unless every dataset has a budget with room for its requested ε and δ."""
        problems = []
        budgets = self.all()
        for dataset, eps in sorted(requests.items()):
            b = budgets.get(dataset)
            if b is None or b.epsilon_max <= 0:
                problems.append(
                    f"dataset {dataset!r} has no privacy budget; its owner sets one with "
                    f"`fedpact privacy set-budget {dataset} --epsilon E --delta D`")
                continue
            if eps > b.epsilon_remaining + 1e-9:
                problems.append(
                    f"dataset {dataset!r}: requested ε={eps:.3f} but only {b.epsilon_remaining:.3f} of "
                    f"{b.epsilon_max:g} remains ({b.epsilon_spent:.3f} spent by {len(b.jobs)} jobs)")
            if delta > b.delta - b.delta_spent + 1e-15:
                problems.append(
                    f"dataset {dataset!r}: requested δ={delta:g} but only "
                    f"{max(0.0, b.delta - b.delta_spent):g} of δ={b.delta:g} remains")
        if problems:
            raise BudgetError("privacy budget check failed: " + "; ".join(problems))
