"""Feature pipeline: one-hot categories and scaled numbers.

Two kinds:

- `FeaturePipeline.public(spec)` — what federated jobs train and score with. It is a function of
  the mapping's *declared* settings only: the category lists and each numeric column's bounds
  `[lo, hi]`. A number is clipped to its bounds and mapped to [-1, 1]; a category outside its
  list encodes as all zeros. No statistic of any row goes into it, so one row's value changes no
  other row's features (per-example clipping in DP-SGD then bounds a row's influence, as the
  accountant assumes), nothing about the data leaves the node in the layout, and a row's encoding
  never depends on the other rows it is scored with. The model carries it (`to_dict`).
- `FeaturePipeline.fit(rows)` — statistics (means, standard deviations, local categories) fitted
  on rows: for non-private references on one machine (centralised and partner-alone baselines)
  only; it is outside any privacy guarantee and never used by a node in a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedpact.errors import DataValidationError
from fedpact.models.datasets import DatasetSpec, PartnerData

CLIP_SD = 5.0


class PreprocessingNotPublic(DataValidationError):
    """A mapping leaves a feature's encoding to the data (no declared bounds or categories)."""


def undeclared_settings(spec: DatasetSpec) -> list[str]:
    """What a mapping must still declare so that its encoding depends on no row (empty: nothing)."""
    problems = []
    for col in spec.categorical:
        if not spec.categories.get(col):
            problems.append(
                f"categorical column {col!r} has no declared categories: list them under "
                f"[categories] (e.g. {col} = [\"a\", \"b\"]); categories read from the rows would "
                "leave the node in the job's feature layout")
    for col in spec.numeric:
        if col not in spec.bounds:
            problems.append(
                f"numeric column {col!r} has no declared bounds: set [bounds] {col} = [LOW, HIGH] "
                "(values are clipped to them); statistics fitted on the rows would be outside the "
                "privacy guarantee")
    for col, policy in spec.missing.items():
        if policy == "median":
            problems.append(
                f"missing.{col} = \"median\" imputes a statistic of the rows, outside the privacy "
                "guarantee: use \"zero\" or \"drop\"")
    return problems


@dataclass
class FeaturePipeline:
    """A fitted encoder from a partner's feature table to a float32 matrix."""

    categorical: dict[str, tuple[str, ...]]
    numeric: tuple[str, ...]
    means: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    # Declared bounds (public pipelines): numbers are clipped to [lo, hi] before scaling.
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    # True: a function of declared settings only (`public`); False: fitted on rows (`fit`).
    public_encoding: bool = False

    @classmethod
    def public(cls, spec: DatasetSpec, origin: str | None = None) -> FeaturePipeline:
        """The encoding fixed by the mapping alone: declared categories, numbers clipped to their
        declared bounds and mapped to [-1, 1]. Raises `PreprocessingNotPublic` listing every
        column the mapping leaves to the data."""
        problems = undeclared_settings(spec)
        if problems:
            raise PreprocessingNotPublic(origin or f"dataset {spec.name!r}", problems)
        bounds = {c: (float(spec.bounds[c][0]), float(spec.bounds[c][1])) for c in spec.numeric}
        return cls(
            categorical={c: tuple(spec.categories[c]) for c in spec.categorical},
            numeric=tuple(spec.numeric),
            means={c: (lo + hi) / 2 for c, (lo, hi) in bounds.items()},
            scales={c: (hi - lo) / 2 for c, (lo, hi) in bounds.items()},
            bounds=bounds,
            public_encoding=True,
        )

    @property
    def is_public(self) -> bool:
        """True when the encoding is a function of declared settings only (`public`)."""
        return self.public_encoding

    @classmethod
    def fit(cls, data: PartnerData | pd.DataFrame, spec: DatasetSpec | None = None) -> FeaturePipeline:
        """Fit on local rows; declared categories fix the layout, otherwise the local ones do."""
        frame = data.features if isinstance(data, PartnerData) else data
        spec = spec or data.spec  # type: ignore[union-attr]
        categorical = {}
        for col in spec.categorical:
            declared = spec.categories.get(col)
            categorical[col] = tuple(declared) if declared else tuple(sorted(frame[col].unique()))
        means, scales = {}, {}
        for col in spec.numeric:
            values = frame[col].to_numpy(dtype=float)
            means[col] = float(values.mean()) if len(values) else 0.0
            sd = float(values.std()) if len(values) else 1.0
            scales[col] = sd if sd > 1e-12 else 1.0
        return cls(categorical=categorical, numeric=tuple(spec.numeric), means=means, scales=scales)

    @property
    def feature_names(self) -> list[str]:
        names = [f"{col}={value}" for col, values in self.categorical.items() for value in values]
        return names + list(self.numeric)

    @property
    def n_features(self) -> int:
        return sum(len(v) for v in self.categorical.values()) + len(self.numeric)

    def transform(self, data: PartnerData | pd.DataFrame) -> np.ndarray:
        frame = data.features if isinstance(data, PartnerData) else data
        blocks = []
        for col, values in self.categorical.items():
            codes = pd.Categorical(frame[col].astype(str), categories=list(values)).codes
            block = np.zeros((len(frame), len(values)), dtype=np.float32)
            rows = np.flatnonzero(codes >= 0)
            block[rows, codes[rows]] = 1.0
            blocks.append(block)
        if self.numeric:
            blocks.append(self.scale_numbers(frame[list(self.numeric)].to_numpy(dtype=np.float64)))
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0), np.float32)

    def scale_numbers(self, num: np.ndarray) -> np.ndarray:
        """The numeric block: clipped to declared bounds (public) and scaled, as float32."""
        if self.bounds:
            lo = np.array([self.bounds[c][0] for c in self.numeric])
            hi = np.array([self.bounds[c][1] for c in self.numeric])
            num = np.clip(num, lo, hi)
        mu = np.array([self.means[c] for c in self.numeric])
        sd = np.array([self.scales[c] for c in self.numeric])
        return np.clip((num - mu) / sd, -CLIP_SD, CLIP_SD).astype(np.float32)

    def layout(self) -> dict:
        """The shareable part: column order, declared categories and bounds; no statistics."""
        doc = {"categorical": {k: list(v) for k, v in self.categorical.items()},
               "numeric": list(self.numeric)}
        if self.is_public:
            doc["bounds"] = {c: list(self.bounds[c]) for c in self.numeric}
        return doc

    def to_dict(self) -> dict:
        return {**self.layout(), "means": self.means, "scales": self.scales,
                "bounds": {c: list(b) for c, b in self.bounds.items()},
                "public": self.public_encoding}

    @classmethod
    def from_dict(cls, doc: dict) -> FeaturePipeline:
        return cls(
            categorical={k: tuple(v) for k, v in doc["categorical"].items()},
            numeric=tuple(doc["numeric"]),
            means=dict(doc.get("means", {})),
            scales=dict(doc.get("scales", {})),
            bounds={k: (float(v[0]), float(v[1])) for k, v in doc.get("bounds", {}).items()},
            public_encoding=bool(doc.get("public", False)),
        )

    @classmethod
    def from_layout(cls, layout: dict) -> FeaturePipeline:
        """The public pipeline a job's shared layout describes (categories and bounds)."""
        missing = [c for c in layout["numeric"] if c not in layout.get("bounds", {})]
        if missing:
            from fedpact.errors import ConfigurationError

            raise ConfigurationError(f"the feature layout declares no bounds for {missing}")
        bounds = {c: (float(v[0]), float(v[1])) for c, v in layout.get("bounds", {}).items()}
        return cls(
            categorical={k: tuple(v) for k, v in layout["categorical"].items()},
            numeric=tuple(layout["numeric"]),
            means={c: (lo + hi) / 2 for c, (lo, hi) in bounds.items()},
            scales={c: (hi - lo) / 2 for c, (lo, hi) in bounds.items()},
            bounds=bounds,
            public_encoding=True,
        )
