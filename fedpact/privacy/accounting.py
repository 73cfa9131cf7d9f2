"""Privacy accounting: solve the noise for a target (ε, δ), compose steps, persist the history.

The accountant history — (noise multiplier, sampling rate, steps) triples — is the whole state a
DP-SGD guarantee depends on. It is kept on the data owner's disk (`AccountantStore`) so that the ε
reported at the end of a job composes every round, also across restarts of the partner's node.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opacus.accountants import create_accountant  # accountants only: no torch model code
from opacus.accountants.utils import get_noise_multiplier

from fedpact.errors import ConfigurationError

ACCOUNTANTS = ("rdp", "prv", "gdp")


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigurationError(f"unknown accountant {name!r}: choose one of {', '.join(ACCOUNTANTS)}")


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε after every step in `history` at the given δ (0 when nothing was spent)."""
    _check_accountant(accountant)
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def plan_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    fixed: tuple[tuple[float, float, int], ...] = (),
) -> float:
    """The smallest noise multiplier whose `steps` DP-SGD steps at `sample_rate` stay within ε,
    composed (in the same accountant) with the `fixed` releases — e.g. the job's DP evaluation
    histograms, (σ_eval, 1.0, k): a Gaussian mechanism applied k times."""
    _check_accountant(accountant)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigurationError(f"target epsilon must be a positive number, got {target_epsilon}")
    if not (0 < delta < 1):
        raise ConfigurationError(f"delta must be in (0, 1), got {delta}")
    if not (0 < sample_rate <= 1):
        raise ConfigurationError(
            f"sampling rate {sample_rate:.4g} is outside (0, 1]: the batch size is larger than the "
            "partner's training rows; lower batch-size"
        )
    if steps < 1:
        raise ConfigurationError(f"a DP job needs at least one training step, got {steps}")
    if fixed:
        return _plan_with_fixed(target_epsilon, delta, sample_rate, steps, accountant, list(fixed))
    return float(get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
        steps=steps, accountant=accountant, epsilon_tolerance=0.005,
    ))


def _plan_with_fixed(target: float, delta: float, q: float, steps: int, accountant: str,
                     fixed: list[tuple[float, float, int]]) -> float:
    """Bisection on σ (ε decreases as σ grows) with the fixed releases composed in."""
    if epsilon_of(fixed, delta, accountant) >= target:
        raise ConfigurationError(
            f"the job's evaluation releases alone spend ε ≥ {target:g}: lower eval_epsilon_share "
            "or evaluate fewer rounds")

    def eps(sigma: float) -> float:
        return epsilon_of(fixed + [(sigma, q, steps)], delta, accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ConfigurationError(f"no noise multiplier reaches ε = {target:g} for this plan")
    while hi - lo > 0.0025 * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return float(hi)


@dataclass
class AccountantState:
    """One dataset's privacy state within one job: the plan and every step taken so far."""

    job_id: str
    dataset: str
    accountant: str
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds_done: list[int] = field(default_factory=list)
    # Rounds whose evaluation histograms were released (each a Gaussian mechanism in `history`).
    evals_done: list[int] = field(default_factory=list)

    @property
    def steps_taken(self) -> int:
        return int(sum(h[2] for h in self.history))

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def projected_epsilon(self, extra_steps: int) -> float:
        """ε if `extra_steps` more steps at the planned noise and sampling rate were taken."""
        extra = [(self.noise_multiplier, self.sample_rate, int(extra_steps))] if extra_steps else []
        return epsilon_of(self.history + extra, self.delta, self.accountant)


class AccountantStore:
    """Accountant states on the data owner's disk, one JSON file per (job, dataset)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, job_id: str, dataset: str) -> Path:
        """A readable prefix plus a digest of the exact (job, dataset) pair, so names never collide."""
        readable = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{job_id}__{dataset}")[:80]
        digest = hashlib.sha256(f"{job_id}\0{dataset}".encode()).hexdigest()[:16]
        return self.folder / f"{readable}.{digest}.json"

    def load(self, job_id: str, dataset: str) -> AccountantState | None:
        path = self._path(job_id, dataset)
        if not path.exists():
            return None
        doc = json.loads(path.read_text())
        if doc.get("job_id") != job_id or doc.get("dataset") != dataset:
            raise ConfigurationError(
                f"{path}: holds the privacy history of job {doc.get('job_id')!r} / dataset "
                f"{doc.get('dataset')!r}, not {job_id!r} / {dataset!r}; refusing to mix histories"
            )
        doc["history"] = [tuple(h) for h in doc["history"]]
        return AccountantState(**doc)

    def save(self, state: AccountantState) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a history."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(state.job_id, state.dataset)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(state), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
