"""Partner files made from a public data set: the worked example of docs/data.md and docs/deploy.md.

`write_partner_files("telco", "north,south,west", out)` writes `north.csv` + `north.toml`, ... — the
kind of files a consortium's partners bring (their own names, their own CSVs with an id column
and the label as text, one mapping each declaring the same public categories and bounds). Rows
are dealt to partners by a seeded shuffle with uneven shares, so each partner holds a different
number of customers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedpact.errors import ConfigurationError

from .datasets import BUILTIN_SPECS, load_dataset, render_mapping

SHARES = (0.5, 0.3, 0.2)
EXAMPLE_PURPOSE = "churn_model"
CONSENT_SHARE = 0.95  # the example's consent exports: 95 % granted, the others withdrawn


def write_partner_files(dataset: str, names: list[str], out: str | Path, *, seed: int = 0,
                        data_dir: str | Path | None = None) -> list[tuple[str, Path, Path]]:
    """Split built-in `dataset` into one CSV and one mapping per partner name under `out`."""
    if dataset not in BUILTIN_SPECS:
        raise ConfigurationError(f"example data set {dataset!r}: choose one of {', '.join(BUILTIN_SPECS)}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigurationError("give two or more different partner names")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ConfigurationError(f"partner name {name!r}: use letters, digits and . _ -")
    data = load_dataset(dataset, data_dir)
    spec = data.spec
    frame = data.features.copy()
    id_column = spec.id_column or "customer_id"
    ids = data.ids if data.ids is not None else [f"C{i:07d}" for i in range(len(frame))]
    frame.insert(0, id_column, list(ids))
    frame[spec.label] = np.where(data.labels == 1, spec.positive[0], spec.negative[0])
    shares = np.array(SHARES[:len(names)] if len(names) <= len(SHARES) else [1.0] * len(names))
    shares = shares / shares.sum()
    order = np.random.default_rng(seed).permutation(len(frame))
    cuts = np.round(np.cumsum(shares)[:-1] * len(frame)).astype(int)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mapping_spec = spec if spec.id_column else _with_id(spec, id_column)
    written = []
    for name, rows in zip(names, np.split(order, cuts), strict=True):
        csv = out / f"{name}.csv"
        frame.iloc[np.sort(rows)].to_csv(csv, index=False)
        mapping = out / f"{name}.toml"
        mapping.write_text(render_mapping(mapping_spec, name=name), encoding="utf-8")
        _write_consents(out / f"{name}-consents.csv", frame.iloc[np.sort(rows)][id_column], seed)
        written.append((name, csv, mapping))
    return written


def _write_consents(path: Path, ids, seed: int) -> None:
    """A consent-management export for the example partner: each customer granted the example
    purpose, then a few withdrew (what `fedpact audit consent import` reads)."""
    import pandas as pd

    ids = list(ids)
    rng = np.random.default_rng(seed + 1)
    withdrawn = set(rng.choice(len(ids), size=int(round(len(ids) * (1 - CONSENT_SHARE))), replace=False))
    rows = [{"subject_id": sid, "purpose": EXAMPLE_PURPOSE, "status": "granted", "channel": "web form",
             "timestamp": "2026-01-15T09:00:00+00:00", "legal_basis": "consent", "notice_version": "v3"}
            for sid in ids]
    rows += [{"subject_id": ids[i], "purpose": EXAMPLE_PURPOSE, "status": "withdrawn",
              "channel": "web form", "timestamp": "2026-06-01T09:00:00+00:00", "legal_basis": "",
              "notice_version": ""} for i in sorted(withdrawn)]
    pd.DataFrame(rows).to_csv(path, index=False)


def _with_id(spec, id_column: str):
    from dataclasses import replace

    return replace(spec, id_column=id_column)
