"""Split a public data set into partner nodes by a natural attribute (non-IID, deterministic).

Used to simulate a consortium from one public file: `segment` gives each partner one group of
customers (bank: job groups), `period` gives each partner a consecutive slice of a date-ordered
file, `iid` deals rows out at random (the easy case, for contrast), `dirichlet` gives each
partner a label mix drawn from a Dirichlet(α) distribution (label skew, any number of partners).
`period`, `iid` and `dirichlet` scale to hundreds of partners; `segment` needs as many distinct
values of its column as partners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpact.errors import ConfigurationError
from fedpact.models.datasets import PartnerData

SCHEMES = ("segment", "period", "iid", "dirichlet")
# Concentration of the per-class Dirichlet shares: small α = strong label skew between partners.
DIRICHLET_ALPHA = 0.5
# Rows of each class every Dirichlet partner gets before the skewed shares (a stratified
# train/test split needs at least two rows of each class).
DIRICHLET_FLOOR = 2

# The attribute that separates partners, per built-in data set, and its named groups for 3 partners.
SEGMENT_COLUMNS = {
    "bank-marketing": "job",
    "telco-churn": "InternetService",
    "caravan-insurance": "MOSHOOFD",
    "cdnow-churn": "cohort",  # month of first purchase: partners acquired customers at different times
}
NAMED_SEGMENTS = {
    ("bank-marketing", 3): {
        "white-collar": ("management", "admin.", "technician", "entrepreneur", "self-employed"),
        "blue-collar-services": ("blue-collar", "services", "housemaid"),
        "other-jobs": ("retired", "student", "unemployed", "unknown"),
    },
    ("telco-churn", 3): {
        "dsl": ("DSL",),
        "fiber-optic": ("Fiber optic",),
        "no-internet": ("No",),
    },
    # CDNOW customers by the month of their first purchase.
    ("cdnow-churn", 3): {
        "cohort-1997-01": ("1997-01",),
        "cohort-1997-02": ("1997-02",),
        "cohort-1997-03": ("1997-03",),
    },
    # CoIL 2000 customer main types (MOSHOOFD), grouped into three of similar size.
    ("caravan-insurance", 3): {
        "hedonists-growers-average-families": ("1", "2", "3"),
        "grown-up-families-farmers-loners": ("8", "10", "4"),
        "conservative-seniors-retired": ("9", "5", "7", "6"),
    },
}


@dataclass
class Partition:
    """One simulated partner: a name and its rows."""

    name: str
    data: PartnerData


def _greedy_groups(values: list[str], sizes: dict[str, int], n: int) -> list[list[str]]:
    """Deal category values into `n` groups of similar row counts, largest first (deterministic)."""
    groups: list[list[str]] = [[] for _ in range(n)]
    totals = [0] * n
    for value in sorted(values, key=lambda v: (-sizes[v], v)):
        i = int(np.argmin(totals))
        groups[i].append(value)
        totals[i] += sizes[value]
    return groups


def partition_names(spec_name: str, scheme: str, n: int) -> list[str]:
    """The partners' dataset names for a split, known without reading any row (budgets use them)."""
    if scheme == "period":
        return [f"{spec_name}/period-{i + 1}" for i in range(n)]
    if scheme == "iid":
        return [f"{spec_name}/share-{i + 1}" for i in range(n)]
    if scheme == "dirichlet":
        return [f"{spec_name}/dirichlet-{i + 1}" for i in range(n)]
    named = NAMED_SEGMENTS.get((spec_name, n))
    if named is not None:
        return [f"{spec_name}/{name}" for name in named]
    column = SEGMENT_COLUMNS.get(spec_name, "segment")
    return [f"{spec_name}/{column}-group-{i + 1}" for i in range(n)]


def dirichlet_indices(labels: np.ndarray, n: int, *, alpha: float = DIRICHLET_ALPHA, seed: int = 0,
                      floor: int = DIRICHLET_FLOOR) -> list[np.ndarray]:
    """Row indices of `n` label-skewed partners; every row goes to exactly one partner.

    For each class, every partner first receives `floor` random rows of it (when the class has
    enough), then the class's remaining rows are cut by proportions drawn from Dirichlet(α, …, α).
    """
    if not alpha > 0:
        raise ConfigurationError(f"dirichlet partitioning needs alpha > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in range(n)]
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        rng.shuffle(rows)
        base = floor if len(rows) >= floor * n else 0
        for i in range(n):
            shares[i].append(rows[i * base:(i + 1) * base])
        rest = rows[n * base:]
        cuts = np.floor(np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(rest)).astype(int)
        for i, chunk in enumerate(np.split(rest, cuts)):
            shares[i].append(chunk)
    return [np.sort(np.concatenate(s)) for s in shares]


def partition(data: PartnerData, scheme: str, n: int, *, seed: int = 0,
              column: str | None = None, alpha: float = DIRICHLET_ALPHA) -> list[Partition]:
    """Split `data` into `n` partners by `scheme` ('segment', 'period', 'iid' or 'dirichlet')."""
    if scheme not in SCHEMES:
        raise ConfigurationError(f"unknown partitioning {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if n < 1 or n > len(data):
        raise ConfigurationError(f"cannot split {len(data)} rows into {n} partners")
    prefix = data.spec.name
    if scheme == "period":
        bounds = np.linspace(0, len(data), n + 1).astype(int)
        return [Partition(f"{prefix}/period-{i + 1}", data.subset(np.arange(bounds[i], bounds[i + 1])))
                for i in range(n)]
    if scheme == "iid":
        order = np.random.default_rng(seed).permutation(len(data))
        return [Partition(f"{prefix}/share-{i + 1}", data.subset(np.sort(chunk)))
                for i, chunk in enumerate(np.array_split(order, n))]
    if scheme == "dirichlet":
        parts = dirichlet_indices(data.labels, n, alpha=alpha, seed=seed)
        empty = [i + 1 for i, rows in enumerate(parts) if len(rows) == 0]
        if empty:
            raise ConfigurationError(
                f"dirichlet split of {len(data)} rows into {n} partners left partners {empty[:5]} "
                "without rows; use fewer partners or the iid scheme")
        return [Partition(f"{prefix}/dirichlet-{i + 1}", data.subset(rows)) for i, rows in enumerate(parts)]

    column = column or SEGMENT_COLUMNS.get(data.spec.name)
    if column is None or column not in data.features.columns:
        raise ConfigurationError(
            f"partitioning 'segment' needs a column to split {data.spec.name!r} by; name one of its "
            f"categorical columns ({', '.join(data.spec.categorical)})"
        )
    values = data.features[column].astype(str)
    named = NAMED_SEGMENTS.get((data.spec.name, n))
    if named is None:
        sizes = values.value_counts().to_dict()
        if len(sizes) < n:
            raise ConfigurationError(
                f"column {column!r} has only {len(sizes)} distinct values: cannot make {n} segments")
        groups = _greedy_groups(list(sizes), sizes, n)
        named = {f"{column}-group-{i + 1}": tuple(g) for i, g in enumerate(groups)}
    parts = []
    for name, members in named.items():
        mask = values.isin(members).to_numpy()
        parts.append(Partition(f"{prefix}/{name}", data.subset(mask)))
    return parts
