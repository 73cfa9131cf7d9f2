"""Tests of simulated partners cut from the real bank and telco files (period, segment, iid)."""

from __future__ import annotations

import numpy as np
import pytest

from fedpact.errors import ConfigurationError
from fedpact.federation.partition import NAMED_SEGMENTS, partition
from fedpact.models.datasets import load_dataset

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def bank(shared_data):
    data = load_dataset("bank", data_dir=shared_data)
    # A row key (file line order) to follow rows through partitions.
    data.features["_row"] = np.arange(len(data))
    return data


@pytest.fixture(scope="module")
def telco(shared_data):
    return load_dataset("telco", data_dir=shared_data)


def rows_of(part) -> np.ndarray:
    return part.data.features["_row"].to_numpy()


def test_period_gives_consecutive_thirds_with_rising_positive_rate(bank):
    """period/3: consecutive file thirds; positive rate climbs from about 4% to about 25%."""
    parts = partition(bank, "period", 3)
    assert [p.name for p in parts] == [f"bank-marketing/period-{i}" for i in (1, 2, 3)]
    assert [len(p.data) for p in parts] == [15_070, 15_070, 15_071]
    np.testing.assert_array_equal(np.concatenate([rows_of(p) for p in parts]), np.arange(len(bank)))
    rates = [p.data.positive_rate for p in parts]
    assert rates[0] < 0.07
    assert rates[2] > 0.18
    assert rates[0] < rates[1] < rates[2]
    assert sum(int(p.data.labels.sum()) for p in parts) == 5_289


def test_segment_gives_the_three_named_job_groups(bank):
    """segment/3 on bank: white-collar, blue-collar-services, other-jobs, each row exactly once."""
    parts = partition(bank, "segment", 3)
    groups = NAMED_SEGMENTS[("bank-marketing", 3)]
    assert [p.name for p in parts] == [f"bank-marketing/{g}" for g in groups]
    assert [p.name.split("/")[1] for p in parts] == [
        "white-collar", "blue-collar-services", "other-jobs"]
    # Every job value in the data belongs to exactly one group.
    members = [job for jobs in groups.values() for job in jobs]
    assert len(members) == len(set(members))
    assert set(bank.features["job"].unique()) <= set(members)
    for part, jobs in zip(parts, groups.values(), strict=True):
        assert set(part.data.features["job"].unique()) <= set(jobs)
        assert len(part.data) > 0
    all_rows = np.concatenate([rows_of(p) for p in parts])
    assert len(all_rows) == len(bank)
    np.testing.assert_array_equal(np.sort(all_rows), np.arange(len(bank)))
    assert sum(int(p.data.labels.sum()) for p in parts) == 5_289


def test_segment_keeps_labels_aligned_with_rows(bank):
    """A partner's labels are the labels of the rows it holds."""
    for part in partition(bank, "segment", 3):
        np.testing.assert_array_equal(part.data.labels, bank.labels[rows_of(part)])


def test_iid_is_deterministic_for_a_seed_and_differs_across_seeds(bank):
    """iid: same seed -> same rows per partner; another seed -> different rows; all rows once."""
    a = partition(bank, "iid", 3, seed=5)
    b = partition(bank, "iid", 3, seed=5)
    c = partition(bank, "iid", 3, seed=6)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(rows_of(pa), rows_of(pb))
    assert not np.array_equal(rows_of(a[0]), rows_of(c[0]))
    np.testing.assert_array_equal(np.sort(np.concatenate([rows_of(p) for p in a])),
                                  np.arange(len(bank)))
    assert sorted(len(p.data) for p in a) == [15_070, 15_070, 15_071]
    # Random shares all sit near the overall 11.7% positive rate.
    assert all(abs(p.data.positive_rate - 0.117) < 0.01 for p in a)


@pytest.mark.parametrize("scheme", ["random", "", "Segment"])
def test_unknown_scheme_is_a_configuration_error(bank, scheme):
    """An unknown scheme names itself and lists the valid ones."""
    with pytest.raises(ConfigurationError, match=f"unknown partitioning '{scheme}'.*segment, period, iid"):
        partition(bank, scheme, 3)


@pytest.mark.parametrize("n", [0, -1, 45_212])
def test_impossible_partner_count_is_a_configuration_error(bank, n):
    """Fewer than 1 partner, or more partners than rows, is refused with the numbers."""
    with pytest.raises(ConfigurationError, match=f"cannot split 45211 rows into {n} partners"):
        partition(bank, "iid", n)


def test_more_segments_than_values_is_a_configuration_error(telco):
    """InternetService has 3 values: 4 segments is refused naming the column."""
    with pytest.raises(ConfigurationError, match="'InternetService' has only 3 distinct values"):
        partition(telco, "segment", 4)


def test_telco_segment_gives_three_internet_service_partners(telco):
    """telco segment/3: one partner per InternetService value, covering all 7,043 rows."""
    parts = partition(telco, "segment", 3)
    assert len(parts) == 3
    values = [set(p.data.features["InternetService"].unique()) for p in parts]
    assert sorted(v.pop() for v in values if len(v) == 1) == ["DSL", "Fiber optic", "No"]
    assert sum(len(p.data) for p in parts) == 7_043
    ids = np.concatenate([p.data.ids.to_numpy() for p in parts])
    assert len(set(ids)) == 7_043
    assert [p.name for p in parts] == ["telco-churn/dsl", "telco-churn/fiber-optic",
                                       "telco-churn/no-internet"]


@pytest.mark.parametrize("scheme", ["segment", "period", "iid"])
@pytest.mark.parametrize("n", [2, 3])
def test_partition_names_are_known_before_reading_rows(telco, scheme, n):
    """partition_names() (used for budget checks before a job starts) matches the real split."""
    from fedpact.federation.partition import partition_names

    assert partition_names(telco.spec.name, scheme, n) == [p.name for p in partition(telco, scheme, n)]

