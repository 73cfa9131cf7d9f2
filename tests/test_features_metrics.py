"""Tests of the feature pipeline (shared layout, local statistics) and the model metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from fedpact.models.datasets import DatasetSpec, validate_frame
from fedpact.models.features import CLIP_SD, FeaturePipeline
from fedpact.models.metrics import (
    HISTOGRAM_BINS,
    evaluate_scores,
    lift_at,
    metrics_from_histograms,
    score_histogram,
)

SPEC = DatasetSpec(
    name="shop",
    task="churn",
    label="y",
    positive=("1",),
    negative=("0",),
    categorical=("region", "plan"),
    numeric=("age", "spend"),
    categories={"region": ("north", "south", "east", "west"), "plan": ("basic", "pro")},
)
LAYOUT = [
    "region=north", "region=south", "region=east", "region=west", "plan=basic", "plan=pro",
    "age", "spend",
]


def partner_a() -> pd.DataFrame:
    return pd.DataFrame({
        "region": ["north", "north", "south"],
        "plan": ["basic", "pro", "basic"],
        "age": [20.0, 30.0, 40.0],
        "spend": [10.0, 10.0, 40.0],
    })


def partner_b() -> pd.DataFrame:
    return pd.DataFrame({
        "region": ["west", "east", "east", "west"],
        "plan": ["pro", "pro", "pro", "pro"],
        "age": [60.0, 70.0, 80.0, 90.0],
        "spend": [1000.0, 3000.0, 5000.0, 7000.0],
    })


# --------------------------------------------------------------------------- feature pipeline


def test_declared_categories_give_every_partner_the_same_layout():
    """Two partners with disjoint local values get identical feature_names from declared categories."""
    a = FeaturePipeline.fit(partner_a(), SPEC)
    b = FeaturePipeline.fit(partner_b(), SPEC)
    assert a.feature_names == b.feature_names == LAYOUT
    assert a.n_features == b.n_features == len(LAYOUT)
    assert a.layout() == b.layout()
    assert a.transform(partner_a()).shape == (3, len(LAYOUT))
    assert b.transform(partner_b()).shape == (4, len(LAYOUT))


def test_one_hot_encoding_follows_the_layout():
    """Each categorical value sets exactly its own indicator."""
    X = FeaturePipeline.fit(partner_a(), SPEC).transform(partner_a())
    np.testing.assert_array_equal(X[:, :6], [
        [1, 0, 0, 0, 1, 0],
        [1, 0, 0, 0, 0, 1],
        [0, 1, 0, 0, 1, 0],
    ])


def test_unseen_category_gives_all_zero_indicators():
    """A value outside the declared categories encodes as all zeros in that column's block."""
    pipe = FeaturePipeline.fit(partner_a(), SPEC)
    rows = partner_a().assign(region=["mars", "north", ""])
    X = pipe.transform(rows)
    np.testing.assert_array_equal(X[0, :4], [0, 0, 0, 0])
    np.testing.assert_array_equal(X[2, :4], [0, 0, 0, 0])
    np.testing.assert_array_equal(X[1, :4], [1, 0, 0, 0])
    np.testing.assert_array_equal(X[:, 4:6], [[1, 0], [0, 1], [1, 0]])


def test_undeclared_categories_fall_back_to_sorted_local_values():
    """Without declared categories the local values, sorted, make the layout."""
    spec = DatasetSpec(name="s", task="churn", label="y", positive=("1",), negative=("0",),
                       categorical=("region",), numeric=())
    pipe = FeaturePipeline.fit(partner_b(), spec)
    assert pipe.feature_names == ["region=east", "region=west"]


def test_statistics_are_fitted_locally_per_partner():
    """Means and scales come from each partner's own rows, so they differ between partners."""
    a = FeaturePipeline.fit(partner_a(), SPEC)
    b = FeaturePipeline.fit(partner_b(), SPEC)
    assert a.means == {"age": pytest.approx(30.0), "spend": pytest.approx(20.0)}
    assert a.scales["age"] == pytest.approx(np.std([20.0, 30.0, 40.0]))
    assert b.means == {"age": pytest.approx(75.0), "spend": pytest.approx(4000.0)}
    assert a.scales != b.scales
    # Locally standardised: each partner's own numeric columns have mean 0 and sd 1.
    for pipe, frame in ((a, partner_a()), (b, partner_b())):
        num = pipe.transform(frame)[:, -2:]
        np.testing.assert_allclose(num.mean(axis=0), 0.0, atol=1e-6)
        np.testing.assert_allclose(num.std(axis=0), 1.0, atol=1e-6)
    # The layout that is shared carries no statistics.
    assert "means" not in a.layout() and "scales" not in a.layout()


def test_pipeline_fits_from_partner_data():
    """fit() accepts a validated PartnerData and uses its spec."""
    frame = partner_a().astype({"age": str, "spend": str}).assign(y=["1", "0", "1"])
    data = validate_frame(frame, SPEC, source="memory")
    pipe = FeaturePipeline.fit(data)
    assert pipe.feature_names == LAYOUT
    np.testing.assert_array_equal(pipe.transform(data), FeaturePipeline.fit(partner_a(), SPEC)
                                  .transform(partner_a()))


def test_to_dict_from_dict_round_trip():
    """to_dict -> JSON -> from_dict restores an equal pipeline with identical transforms."""
    pipe = FeaturePipeline.fit(partner_b(), SPEC)
    restored = FeaturePipeline.from_dict(json.loads(json.dumps(pipe.to_dict())))
    assert restored == pipe
    assert restored.feature_names == pipe.feature_names
    np.testing.assert_array_equal(restored.transform(partner_a()), pipe.transform(partner_a()))


def test_transform_is_finite_float32_and_clipped():
    """Outliers clip to ±5 sd, constant columns do not divide by zero, output is finite float32."""
    frame = pd.DataFrame({
        "region": ["north"] * 4,
        "plan": ["basic"] * 4,
        "age": [30.0, 30.0, 30.0, 30.0],  # constant: scale falls back to 1
        "spend": [1.0, 2.0, 3.0, 4.0],
    })
    pipe = FeaturePipeline.fit(frame, SPEC)
    assert pipe.scales["age"] == 1.0
    extreme = frame.assign(spend=[1e12, -1e12, 2.5, 3.0], age=[30.0, 1e9, -1e9, 31.0])
    X = pipe.transform(extreme)
    assert X.dtype == np.float32
    assert np.isfinite(X).all()
    assert np.abs(X).max() <= CLIP_SD
    assert CLIP_SD == 5.0
    np.testing.assert_array_equal(X[:, -1][:2], [5.0, -5.0])
    np.testing.assert_array_equal(X[:, -2], [0.0, 5.0, -5.0, 1.0])


# --------------------------------------------------------------------------- metrics: hand-computed


def test_evaluate_scores_on_a_hand_computed_example():
    """4 rows: ROC-AUC 3/4, AP (1 + 2/3)/2, Brier 0.158125, lift@10% (top 1 row) 2.0."""
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    m = evaluate_scores(y, s)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert m["lift_at_10"] == pytest.approx(2.0)
    assert m["n"] == 4 and m["positive_rate"] == 0.5


def test_roc_auc_counts_ties_as_half():
    """A positive tied with a negative counts 1/2: 3.5 of 4 pairs ordered -> 0.875."""
    m = evaluate_scores(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9]))
    assert m["roc_auc"] == pytest.approx(0.875)


def test_lift_at_10_on_a_hand_computed_example():
    """20 rows, 4 positives (base 0.2); the top 2 hold one positive -> lift (1/2)/0.2 = 2.5."""
    y = np.zeros(20)
    y[[0, 5, 12, 19]] = 1
    s = np.linspace(0.05, 0.5, 20)
    s[0], s[7] = 0.99, 0.95  # top two: a positive, then a negative
    assert lift_at(y, s, 0.1) == pytest.approx(2.5)
    assert evaluate_scores(y, s)["lift_at_10"] == pytest.approx(2.5)
    # A perfect ranking puts all 4 positives in the top 20%: lift@20% = 1 / 0.2 = 5.
    assert lift_at(y, y + 0.0, 0.2) == pytest.approx(5.0)


def test_single_class_metrics_are_nan():
    """ROC-AUC, PR-AUC and lift are undefined (NaN) when only one class is present."""
    m = evaluate_scores(np.zeros(5), np.linspace(0, 1, 5))
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"]) and math.isnan(m["lift_at_10"])
    h = metrics_from_histograms(*score_histogram(np.ones(5), np.linspace(0, 1, 5)))
    assert math.isnan(h["roc_auc"]) and math.isnan(h["pr_auc"]) and h["positive_rate"] == 1.0


def test_histogram_metrics_on_a_hand_computed_example():
    """Histogram metrics match the exact ones on the 4-row example, and lift shares a tied bin."""
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    pos, neg, sq = score_histogram(y, s)
    assert len(pos) == len(neg) == HISTOGRAM_BINS
    assert pos.sum() == 2 and neg.sum() == 2
    assert pos[350] == 1 and pos[800] == 1 and neg[100] == 1 and neg[400] == 1
    m = metrics_from_histograms(pos, neg, sq)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["brier"] == pytest.approx(0.158125)
    assert m["lift_at_10"] == pytest.approx(2.0)
    # 2 positives and 2 negatives tied in the top bin, 16 negatives below; k = 2 of 20 rows takes
    # half of the tied bin: 1 expected positive -> (1/2) / (2/20) = 5.
    y2 = np.array([1, 1, 0, 0] + [0] * 16)
    s2 = np.array([0.9] * 4 + [0.1] * 16)
    assert metrics_from_histograms(*score_histogram(y2, s2))["lift_at_10"] == pytest.approx(5.0)


def test_histograms_add_across_partners():
    """Summed per-partner histograms equal the histogram of the pooled rows."""
    rng = np.random.default_rng(1)
    y1, s1 = rng.integers(0, 2, 300), rng.random(300)
    y2, s2 = rng.integers(0, 2, 200), rng.random(200)
    p1, n1, e1 = score_histogram(y1, s1)
    p2, n2, e2 = score_histogram(y2, s2)
    pooled = score_histogram(np.concatenate([y1, y2]), np.concatenate([s1, s2]))
    np.testing.assert_array_equal(p1 + p2, pooled[0])
    np.testing.assert_array_equal(n1 + n2, pooled[1])
    assert e1 + e2 == pytest.approx(pooled[2])


# --------------------------------------------------------------------------- metrics: properties


@st.composite
def grid_labels_and_scores(draw, unique: bool = False):
    """0/1 labels with both classes present and scores k/1000, k in 0..999 (one bin per value)."""
    n = draw(st.integers(min_value=2, max_value=300))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)
                  .filter(lambda ys: 0 < sum(ys) < len(ys)))
    ks = draw(st.lists(st.integers(0, HISTOGRAM_BINS - 1), min_size=n, max_size=n, unique=unique))
    return np.array(labels, dtype=float), np.array(ks, dtype=float) / HISTOGRAM_BINS


@settings(max_examples=150, deadline=None)
@given(grid_labels_and_scores())
def test_histogram_metrics_equal_sklearn_when_binning_is_exact(data):
    """Scores on the bin grid: histogram ROC-AUC, AP and Brier equal sklearn's (ties included)."""
    y, s = data
    m = metrics_from_histograms(*score_histogram(y, s))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert m["brier"] == pytest.approx(np.mean((s - y) ** 2), abs=1e-12)
    assert m["n"] == len(y) and m["positive_rate"] == pytest.approx(y.mean())


@settings(max_examples=100, deadline=None)
@given(grid_labels_and_scores(unique=True))
def test_histogram_lift_equals_exact_lift_without_ties(data):
    """Distinct grid scores: the histogram's lift@10% equals the row-level lift@10%."""
    y, s = data
    m = metrics_from_histograms(*score_histogram(y, s))
    assert m["lift_at_10"] == pytest.approx(lift_at(y, s, 0.1), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(100, 2000),
    rate=st.floats(0.05, 0.95),
    signal=st.floats(0.0, 3.0),
)
def test_histogram_metrics_approximate_sklearn_for_continuous_scores(seed, n, rate, signal):
    """Continuous scores: the histogram's ROC-AUC and AP differ from sklearn's only through the
    rows that share a bin (ties), by at most the bound those ties allow:
    ROC-AUC: within-bin (pos, neg) pairs count 1/2 instead of 0 or 1, so |Δ| ≤ ½ Σ_b p_b n_b / (P N);
    AP: each positive of bin b is credited the bin's block precision, which lies, like the exact
    precision at that positive's rank, between (TP_before + 1)/(K_before + n_b) and
    (TP_before + p_b)/(K_before + p_b), so |Δ| ≤ Σ_b p_b/P · (that interval's width)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(float)
    y[0], y[1] = 0.0, 1.0  # both classes present
    s = 1.0 / (1.0 + np.exp(-(signal * (y - 0.5) + rng.normal(size=n))))
    pos, neg, sq = score_histogram(y, s)
    m = metrics_from_histograms(pos, neg, sq)
    p, q = pos[::-1].astype(float), neg[::-1].astype(float)  # highest scores first
    P, N = p.sum(), q.sum()
    auc_bound = 0.5 * float((p * q).sum()) / (P * N)
    tp_before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
    k_before = np.concatenate([[0.0], np.cumsum(p + q)[:-1]])
    with np.errstate(invalid="ignore", divide="ignore"):
        hi = (tp_before + p) / (k_before + p)
        lo = (tp_before + 1) / (k_before + p + q)
    ap_bound = float(np.where(p > 0, p / P * (hi - lo), 0.0).sum())
    assert abs(m["roc_auc"] - roc_auc_score(y, s)) <= auc_bound + 1e-12
    assert abs(m["pr_auc"] - average_precision_score(y, s)) <= ap_bound + 1e-12
