"""Point-in-time RFM features and labels: hand-computed values, no leakage, chunked == in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpact.errors import ConfigurationError, DataValidationError, FedpactError
from fedpact.models import rfm
from fedpact.models.rfm import (
    CDNOW_CUTOFF,
    CDNOW_HORIZON_DAYS,
    CDNOW_TRANSACTIONS,
    RFM_FEATURES,
    CustomerCodes,
    RFMBuilder,
    build_rfm,
    cdnow_log_path,
    cdnow_table,
    ltv_metrics,
    quintile_scores,
    stream_rfm,
)
from fedpact.models.transactions import TransactionSpec, load_transactions

CUTOFF = pd.Timestamp("2024-04-01")


def log(rows: list[tuple[str, str, float, str]]) -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": [r[0] for r in rows],
        "timestamp": pd.to_datetime([r[1] for r in rows], format="ISO8601").astype("datetime64[ns]"),
        "amount": [float(r[2]) for r in rows],
        "category": [r[3] for r in rows],
    })


HAND_LOG = log([
    ("A", "2024-01-01", 10.0, "books"),
    ("A", "2024-01-01", 5.0, "books"),        # same timestamp: the same purchase occasion
    ("A", "2024-02-01", 20.0, "music"),
    ("A", "2024-03-22", 30.0, "books"),
    ("A", "2024-04-10", 40.0, "books"),       # label window
    ("B", "2024-03-31 12:00", 8.0, "music"),
    ("B", "2024-05-30", 9.0, "music"),        # label window (ends 2024-05-31)
    ("B", "2024-06-15", 100.0, "books"),      # after the window: ignored
    ("C", "2024-01-15", 0.0, "books"),        # a free item is a purchase
    ("D", "2024-04-02", 5.0, "books"),        # no purchase before the cut-off: not a row
    ("E", "2024-04-01", 5.0, "books"),        # at the cut-off instant: a label, not a feature
])


def test_hand_computed_features_and_labels():
    table = build_rfm(HAND_LOG, CUTOFF, horizon_days=60, half_life_days=30, trend_days=30,
                      category="books")
    f, y = table.features, table.labels
    assert list(f.index) == ["A", "B", "C"]
    assert list(f.columns) == list(RFM_FEATURES) + ["category_frequency", "category_spend"]
    a, b, c = f.loc["A"], f.loc["B"], f.loc["C"]
    # A: occasions 2024-01-01, 02-01, 03-22; gaps 31 and 50 days (2024 is a leap year).
    assert (a.recency_days, a.frequency, a.monetary_total, a.monetary_mean, a.tenure_days) == \
        (10, 4, 65, 16.25, 91)
    assert (a.ipt_mean_days, a.ipt_std_days, a.ipt_max_days) == pytest.approx((40.5, 9.5, 50))
    assert a.overdue_ratio == pytest.approx(10 / 40.5)
    assert a.decayed_frequency == pytest.approx(2 * 2 ** (-91 / 30) + 2 ** (-60 / 30) + 2 ** (-10 / 30))
    assert a.decayed_spend == pytest.approx(15 * 2 ** (-91 / 30) + 20 * 2 ** -2 + 30 * 2 ** (-10 / 30))
    # Trend periods of 30 days: [03-02, 04-01) holds 03-22; [01-31, 03-02) holds 02-01.
    assert (a.frequency_last_period, a.frequency_prev_period, a.trend_frequency) == (1, 1, 0)
    assert a.trend_spend == pytest.approx((30 - 20) / 50)
    assert (a.category_frequency, a.category_spend) == (3, 45)
    # B: a single purchase half a day before the cut-off.
    assert (b.recency_days, b.tenure_days, b.ipt_mean_days, b.ipt_std_days, b.ipt_max_days) == \
        (0.5, 0.5, 0.5, 0, 0.5)
    assert b.overdue_ratio == 0.5
    assert (b.trend_frequency, b.trend_spend) == (1, 1)
    assert (c.recency_days, c.frequency, c.monetary_total, c.trend_frequency) == (77, 1, 0, 0)
    # Quintiles among A, B, C: recency B < A < C; frequency A > B = C; spend A > B > C.
    assert list(f.r_score) == [4, 5, 2]
    assert list(f.f_score) == [5, 3, 3]
    assert list(f.m_score) == [5, 4, 2]
    assert list(f.rfm_score) == [14, 12, 7]
    assert list(y.churn) == [0, 0, 1]
    assert list(y.propensity) == [1, 0, 0]  # a books purchase in the window
    assert list(y.ltv) == [40, 9, 0]
    assert table.first_purchase["B"] == pd.Timestamp("2024-03-31 12:00")
    assert list(table.cohorts()) == ["2024-01", "2024-03", "2024-01"]


def test_c_recency_counts_calendar_days():
    table = build_rfm(HAND_LOG, CUTOFF)
    assert table.features.loc["C", "recency_days"] == (CUTOFF - pd.Timestamp("2024-01-15")).days
    assert table.labels is None


def test_later_transactions_change_no_feature_but_do_change_labels():
    base = HAND_LOG[HAND_LOG["timestamp"] < CUTOFF]
    later = log([("A", "2024-04-01", 1000.0, "books"), ("C", "2024-05-01", 50.0, "music"),
                 ("Z", "2024-04-05", 70.0, "books")])
    before = build_rfm(base, CUTOFF)
    after = build_rfm(pd.concat([base, later], ignore_index=True), CUTOFF)
    pd.testing.assert_frame_equal(before.features, after.features, check_exact=True)
    labelled = build_rfm(pd.concat([HAND_LOG, later], ignore_index=True), CUTOFF, horizon_days=60)
    assert build_rfm(HAND_LOG, CUTOFF, horizon_days=60).labels.loc["C", "churn"] == 1
    assert labelled.labels.loc["C", "churn"] == 0  # the later purchase is in C's label window


events = st.lists(
    st.tuples(st.sampled_from("abcdef"), st.integers(-400, -1), st.integers(0, 5000)),
    min_size=1, max_size=40)
later_events = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 400), st.integers(0, 5000)), max_size=30)


def _frame(rows) -> pd.DataFrame:
    """(customer, half-days from the cut-off, cents) tuples as a canonical log."""
    return pd.DataFrame({
        "customer_id": [r[0] for r in rows],
        "timestamp": [CUTOFF + pd.Timedelta(hours=12 * r[1]) for r in rows],
        "amount": [r[2] / 100 for r in rows],
    }).astype({"timestamp": "datetime64[ns]", "customer_id": object})


@settings(max_examples=60, deadline=None)
@given(history=events, later=later_events)
def test_property_no_feature_sees_past_the_cutoff(history, later):
    """Features at the cut-off are identical whatever happens at or after it."""
    base = _frame(history)
    extended = pd.concat([base, _frame(later)], ignore_index=True).sample(frac=1, random_state=0)
    before = build_rfm(base, CUTOFF).features
    after = build_rfm(extended, CUTOFF).features
    assert set(after.index) == set(before.index)
    pd.testing.assert_frame_equal(before, after.loc[before.index], check_exact=False, rtol=1e-12,
                                  atol=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=events, later=later_events, chunk=st.integers(1, 12))
def test_property_chunked_stream_equals_in_memory(tmp_path, history, later, chunk):
    """Streaming a time-ordered log in chunks of any size gives the in-memory table."""
    frame = pd.concat([_frame(history), _frame(later)], ignore_index=True)
    frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    path = tmp_path / "log.csv"
    frame.assign(timestamp=frame["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S")).to_csv(path, index=False)
    streamed = stream_rfm(path, TransactionSpec(), CUTOFF, chunk_rows=chunk, horizon_days=30,
                          observed_until=CUTOFF + pd.Timedelta(days=400))
    whole = build_rfm(frame.sample(frac=1, random_state=1), CUTOFF, horizon_days=30,
                      observed_until=CUTOFF + pd.Timedelta(days=400))
    whole_f = whole.features.loc[streamed.features.index]
    pd.testing.assert_frame_equal(streamed.features, whole_f, check_exact=False, rtol=1e-9, atol=1e-9)
    pd.testing.assert_frame_equal(streamed.labels, whole.labels.loc[streamed.labels.index],
                                  check_exact=False, rtol=1e-9, atol=1e-9)
    # Rows come in order of first appearance in the log, whatever the chunk size.
    kept = frame.loc[frame["timestamp"] < CUTOFF + pd.Timedelta(days=30), "customer_id"]
    active = set(streamed.features.index)
    assert list(streamed.features.index) == [c for c in dict.fromkeys(kept) if c in active]


def test_out_of_order_purchases_across_chunks_raise_but_load_whole(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("customer_id,timestamp,amount\na,2024-03-01,1\nb,2024-03-02,1\n"
                    "a,2024-02-01,1\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match="customer 'a': a purchase at 2024-02-01"):
        stream_rfm(path, TransactionSpec(), CUTOFF, chunk_rows=2)
    whole = build_rfm(load_transactions(path, TransactionSpec()), CUTOFF)
    assert whole.features.loc["a", "ipt_mean_days"] == 29


def test_label_window_must_end_inside_the_log():
    with pytest.raises(ConfigurationError, match="labelled churned for lack of data"):
        build_rfm(HAND_LOG, CUTOFF, horizon_days=365)
    table = build_rfm(HAND_LOG, CUTOFF, horizon_days=365, observed_until="2025-06-01")
    assert table.labels.loc["B", "ltv"] == 109


def test_settings_are_checked():
    with pytest.raises(ConfigurationError, match="cutoff"):
        RFMBuilder("not a date")
    with pytest.raises(ConfigurationError, match="half_life_days"):
        RFMBuilder(CUTOFF, half_life_days=0)
    with pytest.raises(DataValidationError, match="no purchase before the cut-off"):
        build_rfm(HAND_LOG, "2023-01-01")
    with pytest.raises(ConfigurationError, match="category column"):
        build_rfm(HAND_LOG.drop(columns="category"), CUTOFF, category="books")
    with pytest.raises(DataValidationError, match="must hold datetimes"):
        build_rfm(HAND_LOG.assign(timestamp="2024-01-01"), CUTOFF)


def test_quintile_scores_match_average_rank_and_ties_share_a_score():
    values = np.array([5.0, 1.0, 1.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 6.0])
    expected = np.ceil(5 * pd.Series(values).rank(method="average", pct=True)).to_numpy()
    assert quintile_scores(values).tolist() == expected.tolist()
    assert len(set(quintile_scores(values)[[1, 2, 3]])) == 1
    assert quintile_scores(values, higher_is_better=False).tolist() == \
        np.ceil(5 * pd.Series(-values).rank(method="average", pct=True)).tolist()


def test_a_hash_clash_stops_rather_than_merging_customers(monkeypatch):
    def same_first_hash(self, ids):
        return np.zeros(len(ids), np.uint64), ids.hash(seed=1).to_numpy()

    monkeypatch.setattr(CustomerCodes, "hash", same_first_hash)
    with pytest.raises(FedpactError, match="have the same 64-bit hash"):
        build_rfm(HAND_LOG, CUTOFF)  # within one chunk
    builder = RFMBuilder(CUTOFF)
    builder.add(HAND_LOG.iloc[:1])
    with pytest.raises(FedpactError, match="'A' and 'B' have the same 64-bit hash"):
        builder.add(HAND_LOG.iloc[5:6])  # across chunks


def test_ltv_metrics():
    y = np.array([0.0, 10.0, 0.0, 30.0, 60.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    perfect = ltv_metrics(y, y)
    assert (perfect["mae"], perfect["rmse"], perfect["r2"], perfect["spearman"]) == (0, 0, 1, 1)
    assert perfect["top_decile_share"] == 0.6
    mean = ltv_metrics(y, np.full(10, y.mean()))
    assert np.isnan(mean["spearman"])  # a constant prediction ranks nobody
    assert mean["r2"] == pytest.approx(0.0)
    assert mean["mae"] == pytest.approx(np.abs(y - 10).mean())
    with pytest.raises(ConfigurationError):
        ltv_metrics(y, y[:3])


# --------------------------------------------------------------------------- CDNOW


@pytest.fixture(scope="module")
def cdnow():
    return cdnow_table()


def test_cdnow_table_matches_an_independent_pandas_computation(cdnow):
    """Recency, frequency, spend, tenure, gaps and labels recomputed with a plain groupby."""
    raw = pd.read_csv(cdnow_log_path(), sep=r"\s+", dtype={"customer_id": str, "date": str})
    raw["t"] = pd.to_datetime(raw["date"], format="%Y%m%d")
    past = raw[raw["t"] < CDNOW_CUTOFF]
    window = raw[(raw["t"] >= CDNOW_CUTOFF) &
                 (raw["t"] < CDNOW_CUTOFF + pd.Timedelta(days=CDNOW_HORIZON_DAYS))]
    g = past.groupby("customer_id")
    days = pd.Timedelta(days=1)
    visits = past.drop_duplicates(["customer_id", "t"]).sort_values(["customer_id", "t"])
    gaps = visits.groupby("customer_id")["t"].diff().dt.days.dropna()
    gap_stats = gaps.groupby(visits.loc[gaps.index, "customer_id"]).agg(["std", "max"])
    f = cdnow.features
    assert len(f) == 23_570 and f.index.is_unique
    assert list(f.index[:3]) == ["00001", "00002", "00003"]  # order of first appearance
    pd.testing.assert_series_equal(f["frequency"], g.size().astype(float), check_names=False)
    pd.testing.assert_series_equal(f["monetary_total"], g["dollar_value"].sum(), check_names=False)
    pd.testing.assert_series_equal(f["recency_days"], (CDNOW_CUTOFF - g["t"].max()) / days,
                                   check_names=False)
    pd.testing.assert_series_equal(f["tenure_days"], (CDNOW_CUTOFF - g["t"].min()) / days,
                                   check_names=False)
    repeat = gap_stats.index
    pop_std = gaps.groupby(visits.loc[gaps.index, "customer_id"]).std(ddof=0)
    np.testing.assert_allclose(f.loc[repeat, "ipt_std_days"], pop_std.loc[repeat], atol=1e-9)
    np.testing.assert_allclose(f.loc[repeat, "ipt_max_days"], gap_stats.loc[repeat, "max"])
    bought = window.groupby("customer_id")["dollar_value"].sum()
    churn = (~f.index.isin(bought.index)).astype(int)
    assert cdnow.labels["churn"].tolist() == churn.tolist()
    np.testing.assert_allclose(cdnow.labels["ltv"], bought.reindex(f.index, fill_value=0.0))
    assert int(cdnow.labels["churn"].sum()) == 17_510
    # Chunk boundaries that split customers' histories change nothing.
    chunked = stream_rfm(cdnow_log_path(), CDNOW_TRANSACTIONS, CDNOW_CUTOFF, chunk_rows=4_999,
                         horizon_days=CDNOW_HORIZON_DAYS)
    pd.testing.assert_frame_equal(chunked.features, f, check_exact=False, rtol=1e-12)


def test_cdnow_features_predict_future_spend(cdnow):
    """A least-squares fit of next-180-day spend on the features beats the mean on held-out rows."""
    X = np.column_stack([np.ones(len(cdnow)), cdnow.features.to_numpy()])
    y = cdnow.labels["ltv"].to_numpy()
    train = np.arange(len(y)) % 5 != 0
    coef, *_ = np.linalg.lstsq(X[train], y[train], rcond=None)
    scores = ltv_metrics(y[~train], X[~train] @ coef)
    baseline = ltv_metrics(y[~train], np.full((~train).sum(), y[train].mean()))
    assert scores["r2"] > 0.2
    assert scores["rmse"] < baseline["rmse"]
    assert scores["top_decile_share"] > 0.4  # the top 10% by prediction make > 40% of the spend


def test_cdnow_builtin_dataset_for_the_federation():
    from fedpact.federation.partition import partition
    from fedpact.models.datasets import BUILTIN_SPECS, load_dataset

    data = load_dataset("cdnow")
    assert data.spec is BUILTIN_SPECS["cdnow"] and data.spec.task == "churn"
    assert len(data) == 23_570 and int(data.labels.sum()) == 17_510
    assert list(data.features.columns) == ["cohort", *RFM_FEATURES]
    assert data.ids is not None and data.ids.is_unique
    assert data.features["cohort"].value_counts().to_dict() == {
        "1997-02": 8_476, "1997-01": 7_846, "1997-03": 7_248}
    assert np.isfinite(data.features[list(RFM_FEATURES)].to_numpy()).all()
    shares = partition(data, "iid", 3, seed=0)
    again = partition(data, "iid", 3, seed=0)
    assert [len(p.data) for p in shares] == [7_857, 7_857, 7_856]
    assert all(a.data.ids.equals(b.data.ids) for a, b in zip(shares, again, strict=True))
    assert set().union(*(set(p.data.ids) for p in shares)) == set(data.ids)
    cohorts = partition(data, "segment", 3)
    assert sorted(p.data.features["cohort"].nunique() for p in cohorts) == [1, 1, 1]


def test_rfm_table_as_partner_data_without_a_spec():
    table = build_rfm(HAND_LOG, CUTOFF, horizon_days=60)
    data = table.to_partner_data(task="propensity")
    assert data.spec.label == "propensity" and list(data.labels) == [1.0, 1.0, 0.0]
    assert list(data.ids) == ["A", "B", "C"]
    with pytest.raises(ConfigurationError, match="regression target"):
        table.to_partner_data(task="ltv")
    with pytest.raises(ConfigurationError, match="no labels"):
        build_rfm(HAND_LOG, CUTOFF).to_partner_data()


def test_module_has_no_federation_or_privacy_imports():
    source = Path(rfm.__file__).read_text() + Path(rfm.__file__).with_name("transactions.py").read_text()
    assert "fedpact.federation" not in source and "fedpact.privacy" not in source
