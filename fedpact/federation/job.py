"""A federated job's settings, as they travel in Flower's run config and message configs."""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedpact.errors import ConfigurationError
from fedpact.models.datasets import BUILTIN_SPECS, TASKS
from fedpact.models.networks import MODEL_KINDS
from fedpact.privacy.accounting import ACCOUNTANTS
from fedpact.privacy.dp_sgd import GRAD_SAMPLE_MODES

from .partition import SCHEMES

OWN = "own"  # `partitioning` of a job on the partners' own datasets (no split)
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PARTNER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")


@dataclass
class JobConfig:
    """Everything the coordinator and the partner nodes must agree on for one training job."""

    # A built-in public data set split into simulated partners (`partitioning`), or, with
    # `partners`, the name of the consortium's joint dataset (any name) held by those partners.
    dataset: str = "bank"
    partitioning: str = "segment"
    num_partitions: int = 3
    # The partner datasets a job on the consortium's own data names, comma-separated (each one
    # a partner's own CSV, registered by its node); empty for a built-in data set's split.
    partners: str = ""
    # propensity | churn: what the label means (a built-in data set says it itself).
    task: str = ""
    rounds: int = 8
    local_epochs: int = 1
    batch_size: int = 256
    learning_rate: float = 0.05
    model: str = "logreg"
    dp: bool = True
    target_epsilon: float = 1.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    # > 0: use this noise multiplier and report the ε it gives; 0: solve it for target_epsilon.
    noise_multiplier: float = 0.0
    accountant: str = "rdp"
    # How Opacus computes per-example gradient norms; every mode clips exactly (same guarantee).
    grad_sample_mode: str = "ghost"
    # Loss-threshold membership-inference attack on the final model, run on each partner's node.
    membership_audit: bool = True
    # Held-out evaluation: each partner releases score histograms (Gaussian mechanism, L2
    # sensitivity 1, noise eval_noise_multiplier per bin), charged in the same account as training
    # (DP-SGD's σ is planned for the total). After the last round, and every `eval_every` rounds.
    eval_every: int = 0
    eval_noise_multiplier: float = 10.0
    # Flower SecAgg+: the coordinator receives only the masked updates and their sum
    # (docs/secure-aggregation.md); needs at least 2 partners, and all of them in every round.
    secure_aggregation: bool = False
    # Central (client-level) DP on the aggregate: Gaussian noise of std
    # central_dp_noise * central_dp_clip / partners on the average of updates clipped to
    # central_dp_clip (L2). 0 = off. Record-level DP-SGD (`dp`) is unaffected.
    central_dp_noise: float = 0.0
    central_dp_clip: float = 1.0
    seed: int = 0
    test_fraction: float = 0.2
    purpose: str = "model_training"
    # Default on: exclude rows without valid consent for `purpose` in the partner's registry.
    require_consent: bool = True
    # Robust aggregation: fedavg | median | trimmed-mean | krum (Flower's strategies).
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    # Reject a partner's update whose L2 distance from the global model exceeds this (0 = off).
    update_norm_bound: float = 0.0
    # A round proceeds with at least this many acceptable updates (0 = all partners).
    min_partners: int = 0
    # A node that has not answered a round's message within this many seconds counts as missing.
    round_timeout: float = 120.0
    # Below min_partners a round pauses `retry_pause` s and is retried this many times, then fails.
    round_retries: int = 2
    retry_pause: float = 5.0
    job_id: str = ""
    home: str = ".fedpact"

    def __post_init__(self) -> None:
        if not self.job_id:
            self.job_id = "job-" + uuid.uuid4().hex[:12]
        if isinstance(self.partners, list | tuple):
            self.partners = ",".join(str(p) for p in self.partners)
        if self.partners:
            self.partitioning = OWN
        elif not self.task and self.dataset in BUILTIN_SPECS:
            self.task = BUILTIN_SPECS[self.dataset].task
        if self.partners:
            self.num_partitions = len(self.partner_list)

    @property
    def partner_list(self) -> list[str]:
        """The partner datasets named by a job on the consortium's own data ([] for a split)."""
        return [p.strip() for p in self.partners.split(",") if p.strip()]

    @property
    def own_data(self) -> bool:
        return bool(self.partners)

    def validate(self) -> JobConfig:
        """Reject settings that cannot work, naming the parameter and what is allowed."""
        def bad(name: str, why: str):
            raise ConfigurationError(f"job setting {name} = {getattr(self, name)!r}: {why}")

        if self.own_data:
            if not DATASET_NAME.fullmatch(self.dataset):
                bad("dataset", "name the consortium's dataset with letters, digits and . _ - "
                    "(at most 64 characters)")
            names = self.partner_list
            for name in names:
                if not PARTNER_NAME.fullmatch(name):
                    bad("partners", f"partner dataset name {name!r}: use letters, digits and "
                        ". _ - / (at most 100 characters)")
            if len(set(names)) != len(names):
                bad("partners", "each partner dataset may be named once")
            if self.task not in TASKS:
                bad("task", f"name the partners' task: {' or '.join(TASKS)}")
        elif self.dataset not in BUILTIN_SPECS:
            bad("dataset", f"choose one of {', '.join(BUILTIN_SPECS)}, or name the partner "
                "datasets of the consortium's own data (partners)")
        elif self.partitioning not in SCHEMES:
            bad("partitioning", f"choose one of {', '.join(SCHEMES)}")
        if self.model not in MODEL_KINDS:
            bad("model", f"choose one of {', '.join(MODEL_KINDS)}")
        if self.aggregation not in ("fedavg", "median", "trimmed-mean", "krum"):
            bad("aggregation", "choose one of fedavg, median, trimmed-mean, krum")
        if not 0 <= self.trim_fraction < 0.5:
            bad("trim_fraction", "must be in [0, 0.5)")
        if not self.update_norm_bound >= 0:
            bad("update_norm_bound", "must be 0 (off) or positive")
        if not 0 <= self.min_partners <= self.num_partitions:
            bad("min_partners", f"must be between 0 (all) and num_partitions = {self.num_partitions}")
        if not self.round_timeout > 0:
            bad("round_timeout", "must be a positive number of seconds")
        if not 0 <= self.round_retries <= 100:
            bad("round_retries", "must be between 0 and 100")
        if not self.retry_pause >= 0:
            bad("retry_pause", "must be 0 or a positive number of seconds")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            bad("grad_sample_mode", f"choose one of {', '.join(GRAD_SAMPLE_MODES)}")
        if self.accountant not in ACCOUNTANTS:
            bad("accountant", f"choose one of {', '.join(ACCOUNTANTS)}")
        if not 1 <= self.num_partitions <= 1000:
            bad("num_partitions", "must be between 1 and 1000")
        if not 1 <= self.rounds <= 10_000:
            bad("rounds", "must be between 1 and 10000")
        if not 1 <= self.local_epochs <= 1000:
            bad("local_epochs", "must be between 1 and 1000")
        if self.batch_size < 1:
            bad("batch_size", "must be at least 1")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be positive")
        if self.dp:
            if self.noise_multiplier < 0:
                bad("noise_multiplier", "must be positive (or 0 to solve it from target_epsilon)")
            if self.noise_multiplier == 0 and not self.target_epsilon > 0:
                bad("target_epsilon", "must be positive (or turn DP off explicitly with dp=false)")
            if not 0 < self.target_delta < 1:
                bad("target_delta", "must be in (0, 1); choose it below 1/n for a dataset of n rows")
            if not self.max_grad_norm > 0:
                bad("max_grad_norm", "must be positive")
        if self.eval_every < 0:
            bad("eval_every", "must be 0 (evaluate after the last round only) or a number of rounds")
        if self.dp and not (self.eval_noise_multiplier > 0 and math.isfinite(self.eval_noise_multiplier)):
            bad("eval_noise_multiplier", "must be a positive noise multiplier")
        if not 0 < self.test_fraction < 1:
            bad("test_fraction", "must be in (0, 1)")
        if self.secure_aggregation and self.num_partitions < 2:
            bad("num_partitions", "secure aggregation needs at least 2 partners (the sum of one "
                "update is that update)")
        if self.central_dp_noise > 0 and 0 < self.min_partners < self.num_partitions:
            bad("min_partners", "central DP calibrates its noise to every partner taking part; "
                "with central_dp_noise keep min_partners at 0 (all)")
        if not (self.central_dp_noise >= 0 and math.isfinite(self.central_dp_noise)):
            bad("central_dp_noise", "must be 0 (off) or a positive noise multiplier")
        if self.central_dp_noise > 0 and not (self.central_dp_clip > 0
                                              and math.isfinite(self.central_dp_clip)):
            bad("central_dp_clip", "must be a positive L2 bound on each partner's update")
        return self

    def evaluation_rounds(self) -> list[int]:
        """Rounds after which partners release held-out score histograms (each one charged)."""
        every = self.eval_every
        rounds = {r for r in range(1, self.rounds + 1) if every and r % every == 0}
        return sorted(rounds | {self.rounds})

    @property
    def job_dir(self) -> Path:
        return Path(self.home) / "jobs" / self.job_id

    @property
    def ledger_path(self) -> Path:
        return Path(self.home) / "ledger.db"

    def to_config(self) -> dict:
        """Flat dict of str/int/float/bool, with Flower's dashed keys (run config / ConfigRecord)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config) -> JobConfig:
        """Build from a Flower run config or ConfigRecord; unknown keys are ignored."""
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in dict(config).items():
            name = str(key).replace("-", "_")
            if name in known:
                values[name] = value
        job = cls(**values)
        # Flower may hand ints for float settings and vice versa.
        for f in fields(cls):
            v = getattr(job, f.name)
            if f.type in ("float",) and isinstance(v, int | float):
                setattr(job, f.name, float(v))
            elif f.type in ("int",) and isinstance(v, int | float):
                setattr(job, f.name, int(v))
            elif f.type in ("bool",) and isinstance(v, str):
                setattr(job, f.name, v.lower() in ("1", "true", "yes"))
        return job

    def as_dict(self) -> dict:
        return asdict(self)
