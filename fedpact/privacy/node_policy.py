"""A partner's own limits on what its node releases, read on the partner's machine only.

The coordinator proposes jobs; it cannot change this file. A node refuses, with the reason, a job
whose planned ε exceeds `max_epsilon_per_job`, which would take the dataset's ε over all jobs
past `max_epsilon_total` (the sum of every job's ε kept in the node's own accountant store:
basic composition, a safe upper bound), that would train on fewer than `min_rows` rows, or whose
replies need a non-private release (`releases.POLICY_RELEASES`) that `allow` does not list.

    # policy.toml (node-config `policy`, else $FEDPACT_NODE_POLICY; a simulated node without
    # either reads the file its operator wrote for the run: `simulated_policy_path`)
    max_epsilon_per_job = 3.0
    max_epsilon_total = 10.0
    min_rows = 200
    allow = ["row-counts", "membership-audit"]
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fedpact.errors import ConfigurationError, FedpactError

from .releases import MEMBERSHIP_AUDIT, POLICY_RELEASES, ROW_COUNTS

POLICY_ENV = "FEDPACT_NODE_POLICY"
_KEYS = ("max_epsilon_per_job", "max_epsilon_total", "min_rows", "allow")


class PolicyRefusal(FedpactError):
    """The node's own policy refuses this job; the message says which limit and why."""


@dataclass(frozen=True)
class NodePolicy:
    max_epsilon_per_job: float = 3.0
    max_epsilon_total: float = 10.0
    min_rows: int = 100
    allow: frozenset[str] = field(default_factory=lambda: frozenset({ROW_COUNTS, MEMBERSHIP_AUDIT}))
    source: str = "the built-in default policy"

    @classmethod
    def load(cls, path: str | Path) -> NodePolicy:
        """Read a policy TOML file (settings at the top level or under [policy]); strict keys."""
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"{path}: node policy file not found")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
        doc = doc.get("policy", doc) if isinstance(doc.get("policy"), dict) else doc
        problems = []
        for key in doc:
            if key not in _KEYS:
                near = difflib.get_close_matches(key, _KEYS, n=1)
                problems.append(f"unknown setting {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        allow = doc.get("allow", sorted(cls().allow))
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            problems.append("allow must be a list of release names")
            allow = []
        for name in allow:
            if name not in POLICY_RELEASES:
                problems.append(f"allow: unknown release {name!r}; known: {sorted(POLICY_RELEASES)}")
        values = {}
        for key, kind in (("max_epsilon_per_job", float), ("max_epsilon_total", float), ("min_rows", int)):
            if key in doc:
                value = doc[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or not (
                        math.isfinite(value) and value >= 0):
                    problems.append(f"{key} = {value!r}: must be a non-negative number")
                else:
                    values[key] = kind(value)
        if problems:
            raise ConfigurationError(f"{path}: " + "; ".join(problems))
        return cls(**values, allow=frozenset(allow), source=str(path))

    @classmethod
    def for_node(cls, node_config, simulated_file: str | Path | None = None) -> NodePolicy:
        """The node's policy: node-config `policy`, else $FEDPACT_NODE_POLICY, else (a simulated
        node) `simulated_file` when its operator wrote one for the run, else the default."""
        configured = dict(node_config).get("policy") or os.environ.get(POLICY_ENV)
        if not configured and simulated_file and Path(simulated_file).is_file():
            configured = simulated_file
        return cls.load(configured) if configured else cls()

    def allowing(self, *releases: str, source: str) -> NodePolicy:
        """This policy with `releases` (names in POLICY_RELEASES) allowed too."""
        unknown = [r for r in releases if r not in POLICY_RELEASES]
        if unknown:
            raise ConfigurationError(f"unknown release {unknown[0]!r}; known: {sorted(POLICY_RELEASES)}")
        return NodePolicy(self.max_epsilon_per_job, self.max_epsilon_total, self.min_rows,
                          self.allow | frozenset(releases), source)

    def to_toml(self) -> str:
        allow = ", ".join(f'"{a}"' for a in sorted(self.allow))
        return (f"# {self.source}\nmax_epsilon_per_job = {self.max_epsilon_per_job!r}\n"
                f"max_epsilon_total = {self.max_epsilon_total!r}\nmin_rows = {self.min_rows}\n"
                f"allow = [{allow}]\n")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_toml(), encoding="utf-8")
        return path

    def check_job(self, *, dataset: str, dp: bool, planned_epsilon: float, rows: int,
                  spent_elsewhere: float) -> None:
        """Refuse a job outside this policy, naming the limit (nothing about other jobs leaks
        beyond the fact that a limit is reached)."""
        problems = []
        if rows < self.min_rows:
            problems.append(f"it would train on {rows} rows, fewer than the policy's min_rows "
                            f"{self.min_rows}")
        if dp and planned_epsilon > self.max_epsilon_per_job * 1.005:
            problems.append(f"it plans ε = {planned_epsilon:.3g}, above the policy's "
                            f"max_epsilon_per_job {self.max_epsilon_per_job:g}")
        if dp and spent_elsewhere + planned_epsilon > self.max_epsilon_total * 1.005:
            problems.append(f"with ε = {planned_epsilon:.3g} the dataset would pass the policy's "
                            f"max_epsilon_total {self.max_epsilon_total:g} over all jobs")
        if problems:
            raise PolicyRefusal(f"{dataset}: this node's policy ({self.source_label}) refuses the "
                                "job: " + "; ".join(problems))

    @property
    def source_label(self) -> str:
        return "default" if self.source.startswith("the built-in") else "node policy file"

    def describe(self) -> dict:
        return {"max_epsilon_per_job": self.max_epsilon_per_job,
                "max_epsilon_total": self.max_epsilon_total, "min_rows": self.min_rows,
                "allow": sorted(self.allow), "source": self.source}


def simulated_policy_path(home: str | Path, job_id: str) -> Path:
    """Where the operator of a simulation (who runs every simulated node on one machine) puts
    the simulated nodes' policy for one job: `<home>/nodes/policy-<job id>.toml`."""
    return Path(home) / "nodes" / f"policy-{job_id}.toml"


def spent_by_dataset(accountant_folder: str | Path, dataset: str, *, except_job: str = "") -> float:
    """ε this node's accountant store holds for `dataset` over all jobs but `except_job`."""
    folder = Path(accountant_folder)
    if not folder.is_dir():
        return 0.0
    from .accounting import epsilon_of

    total = 0.0
    for path in folder.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("dataset") == dataset and doc.get("job_id") != except_job and doc.get("history"):
            total += epsilon_of([tuple(h) for h in doc["history"]], doc["delta"], doc["accountant"])
    return total
