"""Feature pipeline: one-hot categories and standardised numbers, fitted on one partner's rows.

The statistics (means, standard deviations, and categories when none are declared) are computed
locally by each partner and never leave its node; only the *layout* of the feature vector (column
order and declared categories) is shared, so that every partner's vectors fit the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedpact.models.datasets import DatasetSpec, PartnerData

CLIP_SD = 5.0


@dataclass
class FeaturePipeline:
    """A fitted encoder from a partner's feature table to a float32 matrix."""

    categorical: dict[str, tuple[str, ...]]
    numeric: tuple[str, ...]
    means: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

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
            num = frame[list(self.numeric)].to_numpy(dtype=np.float64)
            mu = np.array([self.means[c] for c in self.numeric])
            sd = np.array([self.scales[c] for c in self.numeric])
            blocks.append(np.clip((num - mu) / sd, -CLIP_SD, CLIP_SD).astype(np.float32))
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0), np.float32)

    def layout(self) -> dict:
        """The shareable part: column order and categories, without any statistics."""
        return {"categorical": {k: list(v) for k, v in self.categorical.items()},
                "numeric": list(self.numeric)}

    def to_dict(self) -> dict:
        return {**self.layout(), "means": self.means, "scales": self.scales}

    @classmethod
    def from_dict(cls, doc: dict) -> FeaturePipeline:
        return cls(
            categorical={k: tuple(v) for k, v in doc["categorical"].items()},
            numeric=tuple(doc["numeric"]),
            means=dict(doc.get("means", {})),
            scales=dict(doc.get("scales", {})),
        )
