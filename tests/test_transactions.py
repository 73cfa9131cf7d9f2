"""Purchase-log loading: mapping files, per-row reasons with line numbers, good rows kept."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from fedpact.errors import ConfigurationError, DataValidationError
from fedpact.models.rfm import CDNOW_TRANSACTIONS, cdnow_log_path
from fedpact.models.transactions import (
    TransactionReader,
    TransactionSpec,
    load_transaction_mapping,
    load_transactions,
    parse_timestamps,
)

MAPPING = """\
name = "acme-orders"
customer = "cust"
timestamp = "ordered_at"
amount = "total"
category = "category"
customers = "customers.csv"
"""

# Line numbers (header = line 1) are in the comments; each bad row has one reason unless noted.
ORDERS = """\
cust,ordered_at,total,category,notes
c1,2024-01-05,10.50,books,ok
,2024-01-06,3.00,books,empty customer id (line 3)
c9,2024-01-07,4.00,books,not in the customer list (line 4)
c2,2024-13-45,5.00,music,impossible date (line 5)
c2,,6.00,music,empty timestamp (line 6)
c3,2024-01-08,abc,books,amount not a number (line 7)
c3,2024-01-09,-5.00,books,negative amount (line 8)
c1,2024-01-10,inf,books,infinite amount (line 9)
c2,2024-01-11,,music,empty amount (line 10)
c3,2024-01-12,7.25,music,ok
,yesterday,-1,books,three reasons (line 12)
c2, 2024-01-13T10:30:00 , 12 ,music,ok with blanks around values
"""
CUSTOMERS = "cust\nc1\nc2\nc3\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def orders(tmp_path: Path) -> tuple[Path, Path]:
    write(tmp_path, "customers.csv", CUSTOMERS)
    return write(tmp_path, "orders.csv", ORDERS), write(tmp_path, "orders.toml", MAPPING)


def test_bad_rows_are_set_aside_per_reason_and_good_rows_kept(orders):
    csv, mapping = orders
    log = load_transactions(csv, mapping)
    report = log.report
    assert (report.rows_read, report.rows_kept, report.rows_rejected) == (12, 3, 9)
    assert list(log.frame["customer_id"]) == ["c1", "c3", "c2"]
    assert list(log.frame["amount"]) == [10.5, 7.25, 12.0]
    assert list(log.frame["category"]) == ["books", "music", "music"]
    assert list(log.frame["timestamp"]) == [pd.Timestamp("2024-01-05"), pd.Timestamp("2024-01-12"),
                                            pd.Timestamp("2024-01-13 10:30")]
    assert log.frame["timestamp"].dtype == "datetime64[ns]"
    by_reason = {key: (r.column, r.count, r.lines) for key, r in report.rejected.items()}
    assert by_reason == {
        "customer-empty": ("cust", 2, [3, 12]),
        "customer-unknown": ("cust", 1, [4]),
        "timestamp-empty": ("ordered_at", 1, [6]),
        "timestamp-unreadable": ("ordered_at", 2, [5, 12]),
        "amount-not-number": ("total", 1, [7]),
        "amount-negative": ("total", 2, [8, 12]),
        "amount-infinite": ("total", 1, [9]),
        "amount-empty": ("total", 1, [10]),
    }
    messages = "\n".join(report.problems)
    assert "column 'total': 2 of 12 rows have a negative amount, e.g. '-5.00', '-1'; lines 8, 12" in messages
    assert "column 'cust': 1 of 12 rows name a customer that is not in the customer list" in messages
    assert "customers.csv" in messages and "'c9'" in messages
    assert "'2024-13-45'" in messages and "'yesterday'" in messages
    assert report.summary() == f"{csv}: 12 rows read, 3 kept, 9 set aside"


def test_strict_mode_raises_with_every_reason(orders):
    csv, mapping = orders
    with pytest.raises(DataValidationError) as info:
        load_transactions(csv, mapping, strict=True)
    assert info.value.source == str(csv)
    assert len(info.value.problems) == 8
    assert str(csv) in str(info.value)


def test_customer_list_can_be_given_in_code_and_overrides_the_mapping(orders):
    csv, mapping = orders
    log = load_transactions(csv, mapping, customers=["c1", "c9"])
    assert log.report.rejected["customer-unknown"].count == 7  # c2 on 4 lines, c3 on 3
    assert set(log.frame["customer_id"]) == {"c1", "c9"}


def test_chunked_reading_keeps_line_numbers(orders):
    csv, mapping = orders
    whole = load_transactions(csv, mapping)
    chunked = load_transactions(csv, mapping, chunk_rows=2)
    pd.testing.assert_frame_equal(whole.frame, chunked.frame)
    assert {k: r.lines for k, r in whole.report.rejected.items()} == \
        {k: r.lines for k, r in chunked.report.rejected.items()}


def test_yaml_mapping_under_a_transactions_table(tmp_path):
    write(tmp_path, "log.csv", "id;when;eur\nA;01/02/2024;1,5\nB;03/02/2024;2\n")
    mapping = write(tmp_path, "log.yaml", "transactions:\n  customer: id\n  timestamp: when\n"
                    "  amount: eur\n  separator: ';'\n  timestamp_format: '%d/%m/%Y'\n")
    log = load_transactions(tmp_path / "log.csv", mapping)
    assert log.spec.separator == ";" and log.spec.name == "log"
    assert list(log.frame["timestamp"]) == [pd.Timestamp("2024-02-03")]
    assert log.report.rejected["amount-not-number"].lines == [2]  # decimal comma is not a number


def test_mapping_problems_name_the_mapping_file_and_setting(tmp_path):
    bad = write(tmp_path, "bad.toml", 'customer = "c"\namount = ["a", "b"]\nlabel = "x"\n')
    with pytest.raises(DataValidationError) as info:
        load_transaction_mapping(bad)
    text = str(info.value)
    assert str(bad) in text
    assert "unknown setting 'label'" in text
    assert "required setting 'timestamp'" in text
    assert "setting 'amount' must be a single value" in text
    sep = write(tmp_path, "sep.toml", 'customer = "c"\ntimestamp = "t"\namount = "a"\nseparator = "::"\n')
    with pytest.raises(DataValidationError, match="separator = '::'"):
        load_transaction_mapping(sep)
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_transaction_mapping(write(tmp_path, "broken.toml", "customer = \n"))
    with pytest.raises(ConfigurationError, match="mapping file not found"):
        load_transaction_mapping(tmp_path / "absent.toml")


def test_structural_problems_raise_naming_file_and_columns(tmp_path):
    spec = TransactionSpec(customer="cust", timestamp="ts", amount="amt")
    missing = write(tmp_path, "missing.csv", "cust,ts,value\nc1,2024-01-01,3\n")
    with pytest.raises(DataValidationError) as info:
        load_transactions(missing, spec)
    assert "column 'amt' (amount in the mapping) is missing" in str(info.value)
    assert "cust, ts, value" in str(info.value)
    semicolons = write(tmp_path, "semi.csv", "cust;ts;amt\nc1;2024-01-01;3\n")
    with pytest.raises(DataValidationError, match="set separator = ';'"):
        load_transactions(semicolons, spec)
    with pytest.raises(DataValidationError, match="file not found"):
        load_transactions(tmp_path / "absent.csv", spec)
    with pytest.raises(DataValidationError, match="the file is empty"):
        load_transactions(write(tmp_path, "empty.csv", ""), spec)
    with pytest.raises(DataValidationError, match="header but no data rows"):
        load_transactions(write(tmp_path, "header.csv", "cust,ts,amt\n"), spec)
    with pytest.raises(DataValidationError, match="none of the 2 rows can be used"):
        load_transactions(write(tmp_path, "allbad.csv", "cust,ts,amt\nc1,x,1\nc2,2024-01-01,-1\n"), spec)
    ragged = write(tmp_path, "ragged.csv", "cust,ts,amt\nc1,2024-01-01,3\nc2,2024-01-02,4,extra\n")
    with pytest.raises(DataValidationError, match="cannot be read as CSV"):
        load_transactions(ragged, spec)
    with pytest.raises(ConfigurationError, match="chunk_rows"):
        TransactionReader(missing, spec, chunk_rows=0)


def test_iso_timestamps_in_several_forms_and_utc_offsets():
    text = pl.Series(["2024-01-05", "2024-01-05T10:30", "2024-01-05 10:30:15.25",
                      "2024-01-05T10:30:00Z", "2024-01-05T12:30:00+02:00", "05/01/2024", "", "2024-02-30"])
    parsed = parse_timestamps(text).to_list()
    assert parsed[:5] == [pd.Timestamp("2024-01-05"), pd.Timestamp("2024-01-05 10:30"),
                          pd.Timestamp("2024-01-05 10:30:15.25"), pd.Timestamp("2024-01-05 10:30"),
                          pd.Timestamp("2024-01-05 10:30")]
    assert parsed[5:] == [None, None, None]


def test_times_outside_the_datetime64_range_are_unreadable_not_wrapped(tmp_path):
    path = write(tmp_path, "far.csv", "customer_id,timestamp,amount\nc1,9999-12-31,1\nc1,2024-01-01,2\n")
    log = load_transactions(path, TransactionSpec())
    assert log.report.rejected["timestamp-unreadable"].lines == [2]
    assert list(log.frame["amount"]) == [2.0]


def test_parquet_logs_report_row_numbers(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({
        "customer_id": ["a", "b", None, "a"],
        "timestamp": [pd.Timestamp("2024-01-01"), None, pd.Timestamp("2024-01-03"),
                      pd.Timestamp("2024-01-04")],
        "amount": [1.0, 2.0, 3.0, -4.0],
    }).write_parquet(path)
    log = load_transactions(path, TransactionSpec())
    assert list(log.frame["customer_id"]) == ["a"]
    assert log.report.unit == "rows"
    assert {k: r.lines for k, r in log.report.rejected.items()} == {
        "customer-empty": [3], "timestamp-empty": [2], "amount-negative": [4]}
    assert "rows 4;" in log.report.problems[-1]


def test_blank_separated_logs_and_blank_lines(tmp_path):
    path = write(tmp_path, "cd.txt", " customer_id  date n  dollar_value\n 00001 19970101  1   11.77\n\n"
                 " 00002 19970112  5   77.00\n")
    log = load_transactions(path, CDNOW_TRANSACTIONS)
    assert list(log.frame["customer_id"]) == ["00001", "00002"]
    assert log.report.rejected["customer-empty"].lines == [3]


def test_cdnow_log_from_the_lifetimes_wheel_loads_whole():
    """The CDNOW master file: 69,659 purchases by 23,570 customers, 1997-01-01 .. 1998-06-30."""
    path = cdnow_log_path()
    assert path.name == "CDNOW_master.txt" and "lifetimes" in str(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "eff6889ed364c5199d6eacbbeb7a6d559971df4406ac876f322c373f00a072ef"
    log = load_transactions(path, CDNOW_TRANSACTIONS)
    frame = log.frame
    assert (log.report.rows_read, log.report.rows_rejected) == (69_659, 0)
    assert frame["customer_id"].nunique() == 23_570
    assert frame["timestamp"].min() == pd.Timestamp("1997-01-01")
    assert frame["timestamp"].max() == pd.Timestamp("1998-06-30")
    assert frame["amount"].sum() == pytest.approx(2_500_315.63, abs=0.01)
    assert np.all(frame["amount"].to_numpy() >= 0)


def test_blocks_never_split_a_quoted_line_break(tmp_path):
    """Rows whose quoted channel holds a line break parse whole across many read blocks."""
    rows = [f'c{i},2024-01-{1 + i % 28:02d},{i}.5,"web\nshop {i}"' for i in range(8000)]
    path = write(tmp_path, "quoted.csv", "customer_id,timestamp,amount,channel\n" + "\n".join(rows) + "\n")
    assert path.stat().st_size > 3 * (1 << 16)  # several blocks of at least 64 KiB
    log = load_transactions(path, TransactionSpec(channel="channel"), chunk_rows=50)
    assert log.report.rows_rejected == 0
    assert len(log) == 8000
    assert log.frame["channel"].iloc[7999] == "web\nshop 7999"
    assert log.frame["amount"].sum() == pytest.approx(sum(i + 0.5 for i in range(8000)))


def test_blank_lines_in_a_csv_keep_line_numbers(tmp_path):
    path = write(tmp_path, "blank.csv", "customer_id,timestamp,amount\nc1,2024-01-01,5\n\nc2,2024-01-02,-6\n")
    log = load_transactions(path, TransactionSpec())
    assert log.report.rejected["customer-empty"].lines == [3]
    assert log.report.rejected["amount-negative"].lines == [4]
