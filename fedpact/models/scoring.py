"""Batch scoring that matches training, and calibration from pooled score histograms.

Scoring never looks at statistics of the batch: the rows are validated with the training rules
(the mapping's id column, missing-value policy and separator), then each row is turned into the
exported model's two inputs (`encode_inputs`: raw numbers in layout order, category codes into the
declared lists) and the model itself does the encoding of the training layout
(`fedpact.models.export`). A row's score is therefore the same alone, in a batch of 50 or of a
million, pooled or per country.

The label column is ignored: rows to score usually have no outcome yet, and a bad or missing label
column must not stop scoring. Problems are reported like `fedpact data check` reports them (file,
column, counts, line numbers, the `;` separator hint), naming only columns the file or the mapping
really has, with long values cut short.

Calibration (`fit_calibration`, `calibration_summary`) works on the pooled held-out histograms a
job releases (`pos` / `neg` counts per score bin); counts may be DP-noised, fractional or negative
and are clipped at 0. Fitting on an already released statistic is post-processing: it costs no ε.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fedpact.errors import ConfigurationError, DataValidationError
from fedpact.models.datasets import DatasetSpec, PartnerData, load_mapping, validate_frame

try:  # the training reader (encodings, merge markers, the separator hint) where this version has it
    from fedpact.models.datasets import column_notes, did_you_mean, read_frame
except ImportError:  # pragma: no cover - older datasets module: the local reader below
    read_frame = None

    def did_you_mean(word, choices) -> str:
        return ""

    def column_notes(columns, spec) -> list[str]:
        return []

SCORING_CHUNK = 131_072
MESSAGE_VALUE_CHARS = 60
QUOTED_LIMIT = 100  # quoted values longer than this are cut (validate_frame already cuts at 60)
MESSAGE_CHARS = 600
CALIBRATION_GROUPS = 10
MIN_CALIBRATION_ROWS = 100.0


class ScoringMismatch(ConfigurationError):
    """The rows or their mapping do not fit the model's feature layout; the message says where."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = [shorten(p) for p in problems]
        super().__init__(f"{source}: does not fit the model's feature layout: " + "; ".join(self.problems))


# --------------------------------------------------------------------------- messages

_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")


def clip_value(value: object, limit: int = MESSAGE_VALUE_CHARS) -> str:
    """repr(value), cut to `limit` characters with an ellipsis."""
    text = repr(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 2] + "…" + text[0]


def shorten(message, value_limit: int = MESSAGE_VALUE_CHARS, limit: int = MESSAGE_CHARS):
    """Cut every quoted value longer than QUOTED_LIMIT in `message` to `value_limit` characters,
    and the whole to `limit`; a problem that carries a node-safe text (`.safe`) keeps one."""
    def cut(m: re.Match) -> str:
        s = m.group(0)
        return s if len(s) <= QUOTED_LIMIT else s[: value_limit - 2] + "…" + s[0]

    def one(text: str) -> str:
        text = _QUOTED.sub(cut, str(text))
        return text if len(text) <= limit else text[: limit - 1] + "…"

    safe = getattr(message, "safe", None)
    if safe is not None and type(message) is not str:  # errors.Problem(text, safe)
        return type(message)(one(message), one(safe))
    return one(message)


def _fail(source: str, problems: list) -> DataValidationError:
    return DataValidationError(source, [shorten(p) for p in problems])


# --------------------------------------------------------------------------- the model's inputs


def encode_inputs(features: pd.DataFrame, layout: dict) -> tuple[np.ndarray, np.ndarray]:
    """The exported model's inputs for validated feature rows.

    `numeric`: float64 (rows, len(layout["numeric"])), the raw values in layout order (the model
    clips and scales them); `categorical`: int64 (rows, len(layout["categorical"])), each value's
    position in its declared category list, -1 for a value outside it (encoded as all zeros).
    """
    n = len(features)
    numeric_cols = list(layout["numeric"])
    numeric = (features[numeric_cols].to_numpy(dtype=np.float64) if numeric_cols
               else np.zeros((n, 0), np.float64))
    categorical = np.empty((n, len(layout["categorical"])), dtype=np.int64)
    for j, (col, values) in enumerate(layout["categorical"].items()):
        categorical[:, j] = pd.Categorical(features[col].astype(str), categories=list(values)).codes
    return np.ascontiguousarray(numeric), categorical


def score_rows(model, data: PartnerData, chunk: int = SCORING_CHUNK) -> tuple[pd.DataFrame, list[str]]:
    """Scores of validated rows with an exported model (`export.load_exported`): a frame of
    (id column or `row`, `score`) and the reading notes. Rows are scored in chunks; since the model
    uses no statistic of the batch, chunking changes no score."""
    layout = model.layout
    problems = [f"the model's {kind} column {col!r} is not a {kind} column of these rows"
                for kind, cols, have in (("numeric", layout["numeric"], data.spec.numeric),
                                         ("categorical", layout["categorical"], data.spec.categorical))
                for col in cols if col not in have or col not in data.features.columns]
    if problems:
        raise ScoringMismatch(data.source, problems)
    numeric, categorical = encode_inputs(data.features, layout)
    parts = [model.score(numeric[i:i + chunk], categorical[i:i + chunk])
             for i in range(0, len(data), chunk)]
    probs = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if data.spec.id_column and data.ids is not None:
        frame = pd.DataFrame({data.spec.id_column: data.ids.to_numpy(), "score": probs})
    elif data.ids is not None:  # file row numbers (1 = first data row), kept across dropped rows
        frame = pd.DataFrame({"row": data.ids.to_numpy(), "score": probs})
    else:
        frame = pd.DataFrame({"row": np.arange(1, len(data) + 1), "score": probs})
    return frame, list(data.notes)


# --------------------------------------------------------------------------- reading rows to score


def scoring_spec(spec: DatasetSpec, layout: dict | None, origin: str) -> tuple[DatasetSpec, list[str]]:
    """The spec the rows are validated with: the mapping's file settings (separator, id, missing
    policy) and the model's features, categories and bounds; raises `ScoringMismatch` when the
    mapping disagrees with the model. Also the notes about harmless differences."""
    notes: list[str] = []
    problems = [f"missing.{col} = \"median\" imputes the median of the rows being scored, so a "
                "row's score would depend on the other rows: use \"zero\" or \"drop\""
                for col, policy in spec.missing.items() if policy == "median"]
    if layout is None:
        if problems:
            raise ScoringMismatch(origin, problems)
        return spec, notes
    numeric, categorical = list(layout["numeric"]), list(layout["categorical"])
    for cols, kind, other_kind, mine, theirs in (
            (numeric, "numeric", "categorical", spec.numeric, spec.categorical),
            (categorical, "categorical", "numeric", spec.categorical, spec.numeric)):
        for col in cols:
            if col in theirs:
                problems.append(f"column {col!r} is {other_kind} in the mapping but {kind} in the model")
            elif col not in mine:
                problems.append(f"the model's {kind} column {col!r} is not in the mapping's "
                                f"{kind} list")
    unused = [c for c in spec.features if c not in numeric and c not in categorical]
    if unused:
        notes.append(f"mapping columns not used by the model: {', '.join(clip_value(c) for c in unused[:10])}")
    if problems:
        raise ScoringMismatch(origin, problems)
    for col, values in layout["categorical"].items():
        declared = spec.categories.get(col)
        if declared and list(declared) != list(values):
            notes.append(f"{col}: the mapping declares other categories than the model; the model's "
                         f"{len(values)} declared categories are used (others encode as all zeros)")
    bounds = {c: (float(v[0]), float(v[1])) for c, v in layout.get("bounds", {}).items()}
    for col, pair in spec.bounds.items():
        if col in bounds and tuple(map(float, pair)) != bounds[col]:
            notes.append(f"{col}: the mapping's bounds {list(pair)} differ from the model's "
                         f"{list(bounds[col])}; the model's are used")
    return replace(spec, categorical=tuple(categorical), numeric=tuple(numeric),
                   categories={c: tuple(v) for c, v in layout["categorical"].items()},
                   bounds=bounds,
                   missing={c: p for c, p in spec.missing.items() if c in numeric}), notes


def _read_table(path: Path, spec: DatasetSpec) -> pd.DataFrame:
    """The CSV as strings, with `load_csv`'s messages (and its separator hint)."""
    source = str(path)
    if read_frame is not None:
        try:
            frame = read_frame(path, spec)
        except DataValidationError as exc:
            raise _fail(exc.source, exc.problems) from None
        return frame.rename(columns=lambda c: str(c).strip())
    if not path.is_file():
        raise _fail(source, ["file not found"])
    if path.stat().st_size == 0:
        raise _fail(source, ["the file is empty: no header row and no data rows"])
    try:
        frame = pd.read_csv(path, sep=spec.separator, dtype=str, keep_default_na=False,
                            skipinitialspace=False)
    except pd.errors.EmptyDataError:
        raise _fail(source, ["the file is empty: no header row and no data rows"]) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise _fail(source, [f"cannot be parsed as CSV with separator {spec.separator!r}: {exc}"]) from None
    if len(frame.columns) == 1 and spec.separator not in str(frame.columns[0]) and len(spec.features) > 1:
        other = ";" if spec.separator == "," else ","
        if other in str(frame.columns[0]):
            raise _fail(source, [f"only one column was found with separator {spec.separator!r}; the "
                                 f"header contains {other!r}: set separator = {other!r} in the mapping"])
    return frame.rename(columns=lambda c: str(c).strip())


def read_scoring_rows(csv_path: str | Path, mapping: str | Path | DatasetSpec,
                      layout: dict | None = None) -> PartnerData:
    """Rows to score, validated with the training rules; the label column is ignored.

    `mapping` (a TOML/YAML file or a spec) gives the separator, the id column and the missing-value
    policy; `layout` (the model's) gives the feature columns, categories and bounds, and the mapping
    must agree with it on which columns are numeric and categorical. Labels come back as NaN.
    """
    spec = mapping if isinstance(mapping, DatasetSpec) else load_mapping(mapping)
    origin = str(mapping) if not isinstance(mapping, DatasetSpec) else f"mapping {spec.name!r}"
    spec, notes = scoring_spec(spec, layout, origin)
    path = Path(csv_path)
    source = str(path)
    frame = _read_table(path, spec)
    role_of = "model" if layout is not None else "mapping"
    missing = []
    needed = [c for c in (spec.id_column, *spec.features) if c]
    spare = [str(c) for c in frame.columns if c not in needed and c != spec.label]
    for col in needed:
        if col not in frame.columns:
            role = ("id in the mapping" if col == spec.id_column
                    else f"{'categorical' if col in spec.categorical else 'numeric'} in the {role_of}")
            missing.append((col, role))
    if missing:
        shown = ", ".join(clip_value(str(c), 40) for c in frame.columns[:25])
        more = f" and {len(frame.columns) - 25} more" if len(frame.columns) > 25 else ""
        raise _fail(source, [f"column {col!r} ({role}) is missing{did_you_mean(col, spare)}; the "
                             f"file has {len(frame)} rows and {len(frame.columns)} columns: "
                             f"{shown}{more}" for col, role in missing])
    if len(frame) == 0:
        raise _fail(source, ["the file has a header but no data rows"])
    notes += column_notes(frame.columns, spec)
    if spec.label in frame.columns:
        frame = frame.drop(columns=[spec.label])
        notes.append(f"the label column {spec.label!r} is ignored: scoring uses features only")
    else:
        notes.append(f"no {spec.label!r} column: scoring without labels")
    # validate_frame needs a label; the one given here is valid by construction and never reported.
    frame[spec.label] = spec.positive[0]
    row_numbers = None
    if not spec.id_column:
        keep = np.ones(len(frame), dtype=bool)
        for col, policy in spec.missing.items():
            if policy == "drop" and col in frame.columns:
                keep &= ~frame[col].astype(str).str.strip().eq("").to_numpy()
        row_numbers = pd.Series(np.flatnonzero(keep) + 1)
    try:
        data = validate_frame(frame, spec, source=source)
    except DataValidationError as exc:
        raise _fail(exc.source, exc.problems) from None
    data.labels = np.full(len(data), np.nan, dtype=np.float32)
    data.notes = [shorten(n) for n in notes + data.notes]
    if row_numbers is not None:
        data.ids = row_numbers
    return data


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """score' = sigmoid(a * logit(score) + b); a = 1, b = 0 is the identity."""

    a: float = 1.0
    b: float = 0.0
    method: str = "none"
    note: str = ""

    def apply(self, scores: np.ndarray) -> np.ndarray:
        s = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
        return _sigmoid(self.a * np.log(s / (1 - s)) + self.b)

    def to_dict(self) -> dict:
        return {"method": self.method, "a": self.a, "b": self.b, "note": self.note,
                "formula": "score = sigmoid(a * logit + b), logit = the network's output"}

    @classmethod
    def from_dict(cls, doc: dict | None) -> Calibration:
        doc = doc or {}
        return cls(float(doc.get("a", 1.0)), float(doc.get("b", 0.0)), str(doc.get("method", "none")),
                   str(doc.get("note", "")))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def _histogram(pos, neg, bins_or_edges) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts clipped at 0 (DP noise may make them negative) and each bin's representative score."""
    pos = np.clip(np.nan_to_num(np.asarray(pos, dtype=np.float64), nan=0.0), 0.0, None)
    neg = np.clip(np.nan_to_num(np.asarray(neg, dtype=np.float64), nan=0.0), 0.0, None)
    if pos.shape != neg.shape or pos.ndim != 1 or len(pos) == 0:
        raise ConfigurationError(f"score histograms: pos and neg must be two equal-length lists "
                                 f"(got {pos.shape} and {neg.shape})")
    if bins_or_edges is None or np.ndim(bins_or_edges) == 0:
        bins = len(pos) if bins_or_edges is None else int(bins_or_edges)  # type: ignore[arg-type]
        if bins != len(pos):
            raise ConfigurationError(f"score histograms: {len(pos)} counts for {bins} bins")
        centres = (np.arange(bins) + 0.5) / bins
    else:
        edges = np.asarray(bins_or_edges, dtype=np.float64)
        if edges.ndim != 1 or len(edges) != len(pos) + 1 or np.any(np.diff(edges) <= 0):
            raise ConfigurationError(f"score histograms: {len(pos)} bins need {len(pos) + 1} "
                                     "increasing edges")
        centres = (edges[:-1] + edges[1:]) / 2
    return pos, neg, np.clip(centres, 1e-6, 1 - 1e-6)


def fit_calibration(pos, neg, bins_or_edges=None, *, method: str = "platt",
                    min_rows: float = MIN_CALIBRATION_ROWS) -> Calibration:
    """A correction of the scores fitted on pooled held-out histograms.

    `pos`, `neg`: counts of positive / negative rows per score bin (noisy, fractional or negative
    counts are clipped at 0); `bins_or_edges`: the bin edges, or the number of equal-width bins over
    [0, 1] (default: len(pos)). Each bin stands for its centre. `method`: "platt" fits a and b
    (weighted logistic regression of the label on the logit of the score), "intercept" fits b only
    (the mean score then equals the positive rate). A Platt fit whose slope is not positive (it
    would reverse the ranking) falls back to the intercept. Too few rows, or only one class: the
    identity, method "none".
    """
    if method not in ("platt", "intercept"):
        raise ConfigurationError(f"calibration method {method!r}: use 'platt' or 'intercept'")
    p, q, centres = _histogram(pos, neg, bins_or_edges)
    n_pos, n_neg = float(p.sum()), float(q.sum())
    if n_pos + n_neg < min_rows or n_pos < 1 or n_neg < 1:
        return Calibration(note=f"not fitted: {n_pos:.0f} positive and {n_neg:.0f} negative rows in "
                                "the histograms (counts clipped at 0)")
    z = np.log(centres / (1 - centres))
    keep = (p + q) > 0
    z, p, q = z[keep], p[keep], q[keep]
    b = _fit_intercept(z, p, q)
    if method == "platt":
        fitted = _fit_platt(z, p, q, b)
        if fitted is not None:
            return Calibration(float(fitted[0]), float(fitted[1]), "platt")
        return Calibration(1.0, b, "intercept", note="the Platt slope was not positive; intercept only")
    return Calibration(1.0, b, "intercept")


def _fit_intercept(z, p, q) -> float:
    """b with sum((p + q) * sigmoid(z + b)) = sum(p): bisection (the left side rises with b)."""
    target, w = p.sum(), p + q
    lo, hi = -30.0, 30.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (w * _sigmoid(z + mid)).sum() < target:
            lo = mid
        else:
            hi = mid
    return float((lo + hi) / 2)


def _nll(a, b, z, p, q) -> float:
    t = a * z + b
    # -[p log s + q log (1 - s)] with log s = -log1p(e^-t), log (1 - s) = -log1p(e^t)
    return float((p * np.logaddexp(0, -t) + q * np.logaddexp(0, t)).sum())


def _fit_platt(z, p, q, b0: float) -> tuple[float, float] | None:
    """Newton's method with step halving on the weighted log-loss; None if the slope is not > 0."""
    a, b = 1.0, b0
    loss = _nll(a, b, z, p, q)
    w = p + q
    for _ in range(100):
        s = _sigmoid(a * z + b)
        r = w * s - p  # d loss / d t per bin
        g = np.array([(r * z).sum(), r.sum()])
        h = w * s * (1 - s)
        H = np.array([[(h * z * z).sum(), (h * z).sum()], [(h * z).sum(), h.sum()]])
        H += np.eye(2) * 1e-9 * max(w.sum(), 1.0)
        try:
            step = np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            return None
        t = 1.0
        while t > 1e-8:
            na, nb = a - t * step[0], b - t * step[1]
            nl = _nll(na, nb, z, p, q)
            if nl <= loss + 1e-12 * abs(loss):
                break
            t /= 2
        else:
            break
        done = abs(loss - nl) <= 1e-12 * max(abs(loss), 1.0)
        a, b, loss = na, nb, nl
        if done or np.abs(t * step).max() < 1e-10:
            break
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
        return None
    return a, b


def calibration_summary(pos, neg, bins_or_edges=None, *, calibration: Calibration | None = None,
                        groups: int = CALIBRATION_GROUPS) -> dict:
    """Expected calibration error over `groups` equal-width score ranges, mean score and positive
    rate, from the histograms (counts clipped at 0; each bin at its centre), with the scores passed
    through `calibration` when given. Without one, the ECE equals the model card's
    `calibration.expected_calibration_error`."""
    p, q, centres = _histogram(pos, neg, bins_or_edges)
    scores = calibration.apply(centres) if calibration is not None else centres
    w = p + q
    n = float(w.sum())
    if n <= 0:
        return {"expected_calibration_error": None, "mean_score": None, "positive_rate": None,
                "rows": 0.0, "groups": groups}
    group = np.minimum((scores * groups).astype(int), groups - 1)
    ece = 0.0
    for g in range(groups):
        inside = group == g
        count = float(w[inside].sum())
        if count > 0:
            ece += count / n * abs(float((w[inside] * scores[inside]).sum()) / count
                                   - float(p[inside].sum()) / count)
    return {"expected_calibration_error": ece, "mean_score": float((w * scores).sum() / n),
            "positive_rate": float(p.sum() / n), "rows": n, "groups": groups}


__all__ = ["Calibration", "ScoringMismatch", "calibration_summary", "clip_value", "encode_inputs",
           "fit_calibration", "read_scoring_rows", "score_rows", "scoring_spec", "shorten"]
