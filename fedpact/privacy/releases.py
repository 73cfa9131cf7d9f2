"""Every field a partner node sends, classified: DP, public, or a non-private release its policy allows.

A node's replies are the only way anything about its rows leaves it, so the privacy guarantee is
exactly as strong as the weakest field in them. This module is the one list of those fields
(`RELEASES`) and the check (`check_reply`) the node runs on every reply before sending it: a
field not in the list, or a non-private field the node's policy (`node_policy.NodePolicy`) does
not allow, stops the reply. docs/privacy.md renders the same table (`release_table`).

No Flower here: a reply is given as {record name: {key: value}} (`flatten` of a Flower
RecordDict is done by the caller).
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedpact.errors import FedpactError


class Protection(str, enum.Enum):  # noqa: UP042 - the documented (str, Enum) form
    DP = "dp"  # a DP mechanism, charged in the dataset's account
    PUBLIC = "public"  # a function of public settings (the job's, the mapping's declared ones)
    POLICY = "non-private"  # exact, sent only when the node's own policy allows `policy`


@dataclass(frozen=True)
class Release:
    """One field (or a family, with `*`) of one phase's reply and how it is protected."""

    phase: str  # query | train | evaluate
    record: str
    key: str  # fnmatch pattern
    protection: Protection
    how: str
    policy: str = ""  # the node-policy release name (Protection.POLICY only)


ROW_COUNTS = "row-counts"
MEMBERSHIP_AUDIT = "membership-audit"
NON_PRIVATE_MODEL = "non-private-model"
POLICY_RELEASES = {
    ROW_COUNTS: "exact numbers of training and held-out rows (FedAvg weights, the DP sampling "
                "rate and the δ < 1/n check need them)",
    MEMBERSHIP_AUDIT: "the loss-threshold membership-attack AUC, once, after the last round "
                      "(rounded to 0.01)",
    NON_PRIVATE_MODEL: "model updates without DP (a job with dp = false): no formal guarantee",
}

_P, _D, _N = Protection.PUBLIC, Protection.DP, Protection.POLICY
RELEASES: tuple[Release, ...] = (
    # handshake
    Release("query", "layout", "layout", _P, "the mapping's declared columns, categories and bounds"),
    Release("query", "layout", "partner", _P, "the dataset's registered name"),
    Release("query", "layout", "train-rows", _N, "exact row count", ROW_COUNTS),
    Release("query", "layout", "test-rows", _N, "exact row count", ROW_COUNTS),
    Release("query", "layout", "reproducible", _P, "the node's own randomness setting"),
    # training round
    Release("train", "arrays", "*", _D, "DP-SGD: per-example clipping to C, Gaussian noise σ·C, "
            "Poisson sampling at q from a CSPRNG (without DP: the node policy's "
            "non-private-model release)"),
    Release("train", "metrics", "num-examples", _N, "exact row count", ROW_COUNTS),
    Release("train", "metrics", "epsilon", _P, "the accountant's ε of (σ, q, steps, δ)"),
    Release("train", "metrics", "noise-multiplier", _P, "σ, planned from the job's settings"),
    Release("train", "metrics", "steps", _P, "steps taken: the job's settings and the row count"),
    Release("train", "metrics", "sample-rate", _P, "q: the job's batch size and the row count"),
    Release("train", "metrics", "reproducible", _P, "the node's own randomness setting"),
    Release("train", "access", "partner", _P, "the dataset's registered name"),
    Release("train", "access", "dataset", _P, "the mapping's dataset name"),
    Release("train", "access", "rows", _N, "exact row count", ROW_COUNTS),
    Release("train", "access", "columns", _P, "the mapping's feature columns"),
    Release("train", "access", "purpose", _P, "the job's purpose"),
    Release("train", "access", "phase", _P, "constant"),
    # evaluation (only in the job's evaluation rounds; by default the last)
    Release("evaluate", "histogram", "pos", _D, "Gaussian mechanism: held-out score counts per "
            "bin of positives, L2 sensitivity 1, noise σ_eval"),
    Release("evaluate", "histogram", "neg", _D, "the same for negatives (one row is in one bin)"),
    Release("evaluate", "histogram", "edges", _P, "the fixed bin edges (models.metrics)"),
    Release("evaluate", "metrics", "num-examples", _N, "exact row count", ROW_COUNTS),
    Release("evaluate", "metrics", "epsilon", _P, "the accountant's ε after this release"),
    Release("evaluate", "metrics", "eval-noise-multiplier", _P, "σ_eval, from the job's settings"),
    Release("evaluate", "metrics", "eval-releases", _P, "how many evaluations were released"),
    Release("evaluate", "metrics", "membership-auc", _N, "membership-attack AUC, once, rounded "
            "(-1 when not measured)", MEMBERSHIP_AUDIT),
    Release("evaluate", "access", "partner", _P, "the dataset's registered name"),
    Release("evaluate", "access", "dataset", _P, "the mapping's dataset name"),
    Release("evaluate", "access", "rows", _N, "exact row count", ROW_COUNTS),
    Release("evaluate", "access", "columns", _P, "the mapping's feature columns"),
    Release("evaluate", "access", "purpose", _P, "the job's purpose"),
    Release("evaluate", "access", "phase", _P, "constant"),
)


class ReleaseRefused(FedpactError):
    """A reply would send a field that is unclassified or that the node's policy does not allow."""


def classify(phase: str, record: str, key: str) -> Release | None:
    """The classification of one field of a reply, or None when it is not classified."""
    for release in RELEASES:
        if release.phase == phase and release.record == record and fnmatch.fnmatchcase(key, release.key):
            return release
    return None


def check_reply(phase: str, fields: Mapping[str, Iterable[str]], allowed: Iterable[str], *,
                dp: bool = True) -> list[Release]:
    """Check every field of a reply ({record: keys}); return their classifications.

    Raises `ReleaseRefused` naming each unclassified field and each non-private one whose
    release the node's policy (`allowed`: release names) does not allow. Without DP (`dp` False)
    the model update itself is a non-private release (`non-private-model`)."""
    allowed = set(allowed)
    problems, found = [], []
    for record, keys in fields.items():
        for key in keys:
            release = classify(phase, record, key)
            if release is None:
                problems.append(f"{phase} reply field {record}.{key} is not classified in "
                                "fedpact.privacy.releases; a node sends nothing unclassified")
                continue
            if release.protection is Protection.POLICY and release.policy not in allowed:
                problems.append(f"{record}.{key} ({release.how}) is a non-private release that "
                                f"this node's policy does not allow (allow = [\"{release.policy}\"])")
            if (not dp and release.protection is Protection.DP and record == "arrays"
                    and NON_PRIVATE_MODEL not in allowed):
                problems.append(f"this job has no DP: its model update is a non-private release "
                                f"this node's policy does not allow (allow = [\"{NON_PRIVATE_MODEL}\"])")
            found.append(release)
    if problems:
        raise ReleaseRefused("refused by this node's release policy: "
                             + "; ".join(dict.fromkeys(problems)))
    return found


def release_table() -> str:
    """Markdown table of every field a node sends (docs/privacy.md)."""
    lines = ["| phase | field | protection | how |", "|---|---|---|---|"]
    for r in RELEASES:
        protection = r.protection.value + (f" (`{r.policy}`)" if r.policy else "")
        lines.append(f"| {r.phase} | `{r.record}.{r.key}` | {protection} | {r.how} |")
    return "\n".join(lines)
