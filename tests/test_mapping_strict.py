"""Strict mapping files, CSV reading errors, node-safe refusal reasons and layout comparison
(issue #14 items 3 and 4), on a synthetic retail-bank churn file shaped like a partner's own."""

from __future__ import annotations

import numpy as np
import pytest

from fedpact.errors import ConfigurationError, DataValidationError
from fedpact.models.datasets import load_csv, load_mapping, load_partner_csv, render_mapping
from fedpact.models.features import FeaturePipeline

HEADER = ("RowNumber,CustomerId,Surname,CreditScore,Geography,Gender,Age,Tenure,Balance,"
          "NumOfProducts,HasCrCard,IsActiveMember,EstimatedSalary,Exited")
SURNAMES = ("Hargrave", "Hill", "Onio", "Boni", "Mitchell", "Chu", "Bartlett", "Obinna")
COUNTRIES = ("France", "Germany", "Spain")


def churn_rows(n: int = 40, seed: int = 3) -> list[str]:
    """Synthetic rows in the layout of a retail bank's churn export (no real customer)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        balance = 0.0 if i % 3 == 0 else round(float(rng.uniform(20_000, 250_000)), 2)
        rows.append(",".join(str(v) for v in (
            i + 1, 15_600_000 + i, SURNAMES[i % len(SURNAMES)], int(rng.integers(350, 851)),
            COUNTRIES[i % 3], ("Female", "Male")[i % 2], int(rng.integers(18, 93)),
            int(rng.integers(0, 11)), balance, int(rng.integers(1, 5)), i % 2, (i // 2) % 2,
            round(float(rng.uniform(11.58, 199_992.48)), 2), int(i % 5 == 0))))
    return rows


def churn_csv(rows: list[str] | None = None, header: str = HEADER) -> str:
    return "\n".join([header, *(churn_rows() if rows is None else rows)]) + "\n"


MAPPING = """\
name = "northbank-churn"
task = "churn"
id = "CustomerId"
label = "Exited"
positive = ["1"]
negative = ["0"]
categorical = ["Geography", "Gender", "HasCrCard", "IsActiveMember"]
numeric = ["CreditScore", "Age", "Tenure", "Balance", "NumOfProducts", "EstimatedSalary"]
drop = ["RowNumber", "Surname"]

[categories]
Geography = ["France", "Germany", "Spain"]
Gender = ["Female", "Male"]
HasCrCard = ["0", "1"]
IsActiveMember = ["0", "1"]

[bounds]
CreditScore = [300, 900]
Age = [18, 100]
Tenure = [0, 10]
Balance = [0, 300000]
NumOfProducts = [1, 4]
EstimatedSalary = [0, 200000]
"""


def write(folder, name: str, text: str | bytes):
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def mapping_error(tmp_path, text: str) -> DataValidationError:
    path = write(tmp_path, "churn.toml", text)
    with pytest.raises(DataValidationError) as info:
        load_mapping(path)
    assert str(info.value).startswith(str(path))
    return info.value


def csv_error(tmp_path, data: str | bytes, mapping: str = MAPPING) -> DataValidationError:
    csv = write(tmp_path, "churn.csv", data)
    with pytest.raises(DataValidationError) as info:
        load_partner_csv(csv, write(tmp_path, "churn.toml", mapping))
    assert info.value.source == str(csv)
    return info.value


def test_the_churn_fixture_loads_and_is_public(tmp_path):
    """The reference file and mapping load cleanly: the bad-input tests below differ by one thing."""
    data = load_partner_csv(write(tmp_path, "c.csv", churn_csv()), write(tmp_path, "c.toml", MAPPING))
    assert len(data) == 40 and data.notes == []
    assert "Surname" not in data.features.columns and "RowNumber" not in data.features.columns
    assert FeaturePipeline.public(data.spec).layout()["numeric"][0] == "CreditScore"


# --------------------------------------------------------------------------- drop


def test_a_dropped_column_listed_as_a_feature_is_an_error(tmp_path):
    """docs/data.md: drop = "must never be used"; a column in drop and numeric is a contradiction."""
    text = MAPPING.replace('"EstimatedSalary"]\ndrop = ["RowNumber", "Surname"]',
                           '"EstimatedSalary"]\ndrop = ["RowNumber", "Surname", "Balance"]')
    err = mapping_error(tmp_path, text)
    assert len(err.problems) == 1
    assert "column 'Balance' is listed in drop and in numeric" in err.problems[0]


def test_a_dropped_categorical_column_is_an_error(tmp_path):
    err = mapping_error(tmp_path, MAPPING.replace('drop = ["RowNumber", "Surname"]',
                                                  'drop = ["Surname", "Gender"]'))
    assert "column 'Gender' is listed in drop and in categorical" in str(err)


def test_dropping_the_id_or_the_label_is_an_error(tmp_path):
    err = mapping_error(tmp_path, MAPPING.replace('drop = ["RowNumber", "Surname"]',
                                                  'drop = ["CustomerId", "Exited"]'))
    assert "column 'CustomerId' is listed in drop and is the id column" in str(err)
    assert "column 'Exited' is listed in drop and is the label column" in str(err)


def test_drop_naming_a_column_missing_from_the_file_is_a_note(tmp_path):
    """Not an error (the column may be absent from this export), but said, with a suggestion."""
    data = load_partner_csv(
        write(tmp_path, "c.csv", churn_csv()),
        write(tmp_path, "c.toml", MAPPING.replace('"Surname"]', '"Surname", "Surnames"]')))
    assert len(data) == 40
    assert any("drop: 'Surnames' is not a column of the file" in n and "'Surname'" in n
               for n in data.notes), data.notes


def test_unmapped_columns_are_listed_in_a_note(tmp_path):
    """Columns that are neither id, label, feature nor drop are ignored, and the notes say which."""
    data = load_partner_csv(write(tmp_path, "c.csv", churn_csv()),
                            write(tmp_path, "c.toml", MAPPING.replace('drop = ["RowNumber", "Surname"]',
                                                                      "drop = []")))
    [note] = [n for n in data.notes if "unmapped" in n]
    assert "2 unmapped columns" in note and "'RowNumber', 'Surname'" in note
    assert "drop" in note


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_setting_suggests_the_known_one(tmp_path):
    err = mapping_error(tmp_path, MAPPING.replace("categorical =", "categorcal ="))
    assert "unknown setting 'categorcal' (did you mean 'categorical'?)" in str(err)
    # The misspelling is the problem: not also each [categories] key it leaves without a column.
    assert err.problems == ["unknown setting 'categorcal' (did you mean 'categorical'?)"]


def test_a_typo_among_category_keys_is_an_error(tmp_path):
    """Before: [categories] Geograpy = [...] passed silently and Geography had no declared list."""
    err = mapping_error(tmp_path, MAPPING.replace("\nGeography = [", "\nGeograpy = ["))
    assert "categories.Geograpy: 'Geograpy' is not a categorical feature" in str(err)
    assert "(did you mean 'Geography'?)" in str(err)


def test_categories_for_a_numeric_column_are_an_error(tmp_path):
    err = mapping_error(tmp_path, MAPPING.replace('IsActiveMember = ["0", "1"]',
                                                  'IsActiveMember = ["0", "1"]\nTenure = ["0", "1"]'))
    assert "categories.Tenure: 'Tenure' is numeric" in str(err)


def test_missing_policy_for_an_unknown_column_suggests_one(tmp_path):
    err = mapping_error(tmp_path, MAPPING + '\n[missing]\nBalanse = "zero"\n')
    assert "missing.Balanse: 'Balanse' is not a numeric feature" in str(err)
    assert "(did you mean 'Balance'?)" in str(err)


def test_missing_policy_for_a_categorical_column_is_an_error(tmp_path):
    err = mapping_error(tmp_path, MAPPING + '\n[missing]\nGender = "zero"\n')
    assert "missing.Gender: 'Gender' is categorical" in str(err)


def test_bounds_for_an_unknown_column_suggest_one(tmp_path):
    err = mapping_error(tmp_path, MAPPING.replace("EstimatedSalary = [0", "EstimatedSalery = [0"))
    assert "bounds.EstimatedSalery: 'EstimatedSalery' is not a numeric feature" in str(err)
    assert "(did you mean 'EstimatedSalary'?)" in str(err)


def test_an_unknown_policy_suggests_the_closest(tmp_path):
    err = mapping_error(tmp_path, MAPPING + '\n[missing]\nBalance = "mean"\n')
    assert "missing.Balance = 'mean'" in str(err) and "(did you mean 'median'?)" in str(err)


def test_a_table_outside_the_dataset_section_is_an_error(tmp_path):
    """After [dataset], a TOML [categories] header is a top-level table, not dataset.categories."""
    head, tables = MAPPING.split("\n[categories]\n")
    err = mapping_error(tmp_path, "[dataset]\n" + head + "\n[categories]\n" + tables)
    assert "[categories] is outside [dataset]" in str(err)
    assert "[dataset.categories]" in str(err)


def test_every_mapping_problem_is_reported_at_once(tmp_path):
    text = (MAPPING.replace('task = "churn"', 'task = "churn"\npurpos = "x"')
            .replace("\nGeography = [", "\nGeograpy = [")
            .replace("EstimatedSalary = [0, 200000]", "EstimatedSalary = [200000, 0]")
            .replace('drop = ["RowNumber", "Surname"]', 'drop = ["RowNumber", "Surname", "Age"]')
            + '\n[missing]\nTenure = "zeroes"\n')
    err = mapping_error(tmp_path, text)
    message = str(err)
    assert len(err.problems) == 5
    for part in ("unknown setting 'purpos' (did you mean 'purpose'?)", "categories.Geograpy", "bounds.EstimatedSalary",
                 "column 'Age' is listed in drop and in numeric", "missing.Tenure = 'zeroes'"):
        assert part in message, part
    # Wrong value types are collected with the rest too, not raised one at a time.
    err = mapping_error(tmp_path, MAPPING.replace('Gender = ["Female", "Male"]', 'Gender = "Female"')
                        .replace("Age = [18, 100]", 'Age = "18-100"').replace("categorical =", "categorcal ="))
    assert "categories.Gender must be a list of values" in str(err)
    assert "bounds.Age must be [low, high]" in str(err)
    assert "unknown setting 'categorcal'" in str(err)


def test_duplicate_feature_names_are_an_error(tmp_path):
    err = mapping_error(tmp_path, MAPPING.replace('"EstimatedSalary"]', '"EstimatedSalary", "Age"]'))
    assert "numeric lists 'Age' twice" in str(err)


# --------------------------------------------------------------------------- encoding


def latin1_csv() -> bytes:
    rows = churn_rows()
    rows[2] = rows[2].replace("Bartlett", "Müller").replace("Onio", "Müller")
    return churn_csv(rows).encode("latin-1")


def test_latin1_bytes_name_line_column_and_the_encoding_to_try(tmp_path):
    """Before: "cannot be parsed as CSV with separator ',': ... position 1" and no line."""
    err = csv_error(tmp_path, latin1_csv())
    [problem] = err.problems
    assert "not valid utf-8" in problem
    assert "line 4, column " in problem
    assert 'try encoding = "latin-1"' in problem
    assert "'ü' in latin-1" in problem


def test_the_encoding_setting_reads_a_latin1_file(tmp_path):
    csv = write(tmp_path, "c.csv", latin1_csv())
    mapping = write(tmp_path, "c.toml", 'encoding = "latin-1"\n' + MAPPING)
    spec = load_mapping(mapping)
    assert spec.encoding == "latin-1"
    data = load_csv(csv, spec)
    assert len(data) == 40
    # render_mapping keeps it: the file it writes loads to the same spec.
    again = load_mapping(write(tmp_path, "again.toml", render_mapping(spec)))
    assert again == spec


def test_an_unknown_encoding_is_a_mapping_error(tmp_path):
    err = mapping_error(tmp_path, 'encoding = "latin-15x"\n' + MAPPING)
    assert "encoding = 'latin-15x' is not a text encoding Python knows" in str(err)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Spreadsheet "CSV UTF-8" exports start with a BOM; the first column is still 'RowNumber'."""
    data = load_partner_csv(write(tmp_path, "c.csv", b"\xef\xbb\xbf" + churn_csv().encode()),
                            write(tmp_path, "c.toml", MAPPING.replace('"RowNumber", ', "")
                                  .replace('id = "CustomerId"', 'id = "RowNumber"')
                                  .replace('"Surname"]', '"Surname", "CustomerId"]')))
    assert data.ids.iloc[0] == "1"


# --------------------------------------------------------------------------- conflict markers


def test_git_conflict_markers_are_named_with_their_lines(tmp_path):
    """Before: reported as empty numeric cells with advice to set a `missing` policy."""
    rows = churn_rows()
    rows[3:3] = ["<<<<<<< HEAD", rows[3].replace(",France,", ",Spain,"), "=======",
                 rows[3], ">>>>>>> partner-export"]
    del rows[8]
    err = csv_error(tmp_path, churn_csv(rows))
    [problem] = err.problems
    assert "git merge conflict markers" in problem
    assert "lines 5, 7, 9" in problem
    assert "missing." not in problem


# --------------------------------------------------------------------------- long values


def test_a_5mb_field_is_never_echoed_in_full(tmp_path):
    rows = churn_rows()
    huge = "x" * 5_000_000
    rows[5] = rows[5].replace(",Spain,", f",Spain{huge},", 1)
    cells = rows[7].split(",")
    cells[8] = huge  # Balance
    cells[1] = huge  # CustomerId
    rows[7] = ",".join(cells)
    rows[9] = rows[9].rsplit(",", 1)[0] + "," + huge  # Exited
    rows[10] = rows[10].rsplit(",", 1)[0] + "," + huge  # a second, identical bad label
    err = csv_error(tmp_path, churn_csv(rows))
    message = str(err)
    assert len(message) < 4000, len(message)
    assert "… (5000000 chars)" in message
    assert "'Balance'" in message and "'Exited'" in message


def test_a_long_value_outside_the_declared_categories_is_truncated_in_the_note(tmp_path):
    rows = churn_rows()
    rows[5] = rows[5].replace(",Spain,", ",Spain" + "y" * 10_000 + ",", 1)
    data = load_partner_csv(write(tmp_path, "c.csv", churn_csv(rows)), write(tmp_path, "c.toml", MAPPING))
    [note] = [n for n in data.notes if n.startswith("Geography")]
    assert len(note) < 400 and "… (10005 chars)" in note


def test_a_long_header_name_is_truncated_in_the_missing_column_message(tmp_path):
    err = csv_error(tmp_path, churn_csv(header=HEADER.replace("Tenure", "T" * 100_000)))
    assert len(str(err)) < 3000
    assert "column 'Tenure' (numeric in the mapping) is missing" in str(err)


def test_a_row_with_too_many_fields_names_its_line(tmp_path):
    rows = churn_rows()
    rows[6] += ",extra"
    err = csv_error(tmp_path, churn_csv(rows))
    assert "line 8 has 15 fields where the header has 14" in str(err)


def test_a_missing_column_suggests_the_similar_one(tmp_path):
    err = csv_error(tmp_path, churn_csv(header=HEADER.replace("Geography", "Geograhpy")))
    assert "column 'Geography' (categorical in the mapping) is missing" in str(err)
    assert "(did you mean 'Geograhpy'?)" in str(err)


def test_a_declared_category_that_looks_like_a_typo_is_noted(tmp_path):
    data = load_partner_csv(write(tmp_path, "c.csv", churn_csv()),
                            write(tmp_path, "c.toml", MAPPING.replace('"Spain"]', '"Spian"]')))
    [note] = [n for n in data.notes if n.startswith("Geography")]
    assert "declared 'Spian' never occurs but is close to 'Spain'" in note


# --------------------------------------------------------------------------- node-safe reasons


def test_node_safe_reason_has_no_path_no_lines_and_no_values(tmp_path):
    """What a node sends the coordinator: the dataset and the problems, not where or which rows."""
    rows = churn_rows()
    rows[4] = rows[4].replace(str(15_600_000 + 4), str(15_600_000 + 2), 1)  # duplicate id
    cells = rows[6].split(",")
    cells[3] = "n/a"
    rows[6] = ",".join(cells)
    err = csv_error(tmp_path, churn_csv(rows))
    assert str(tmp_path) in str(err) and "lines" in str(err)
    reason = node_safe_reason(err, "northbank-churn")
    assert reason.startswith("northbank-churn: 2 problems found")
    assert str(tmp_path) not in reason and "churn.csv" not in reason
    assert "line" not in reason
    assert "column 'CustomerId'" in reason and "column 'CreditScore'" in reason
    assert "15600002" not in reason and "n/a" not in reason  # no subject's id, no cell value


def test_node_safe_reason_of_a_mapping_or_encoding_error(tmp_path):
    err = csv_error(tmp_path, latin1_csv())
    reason = node_safe_reason(err, "northbank-churn")
    assert str(tmp_path) not in reason and "line" not in reason
    assert "not valid utf-8" in reason and 'encoding = "latin-1"' in reason
    with pytest.raises(ConfigurationError) as info:
        load_mapping(tmp_path / "nowhere" / "churn.toml")
    reason = node_safe_reason(info.value, "northbank-churn")
    assert reason == "northbank-churn: mapping file not found"
    err = mapping_error(tmp_path, MAPPING.replace("\nGeography = [", "\nGeograpy = ["))
    reason = node_safe_reason(err, "northbank-churn")
    assert str(tmp_path) not in reason and "categories.Geograpy" in reason


def test_node_safe_reason_of_a_streamed_file_drops_the_chunk_lines():
    err = DataValidationError("/srv/partner/data/churn.csv", [
        "in lines 2-100001 (line numbers below count from line 2): column 'Age' (numeric): 3 of "
        "100000 rows are empty; lines 7, 9, 12, …; set missing.Age = \"zero\" or \"drop\""])
    reason = node_safe_reason(err, "northbank-churn")
    assert "/srv" not in reason and "line" not in reason and "7, 9" not in reason
    assert "column 'Age' (numeric): 3 of 100000 rows are empty" in reason
    assert 'set missing.Age = "zero" or "drop"' in reason


# --------------------------------------------------------------------------- layout comparison


def layout_differences(named_layouts: dict[str, dict]) -> list[str]:
    from fedpact.models.layout import layout_differences

    return layout_differences(named_layouts)


def node_safe_reason(exc: Exception, dataset: str) -> str:
    from fedpact.errors import node_safe_reason

    return node_safe_reason(exc, dataset)


def layout(mapping: str = MAPPING, tmp_path=None, name: str = "m.toml") -> dict:
    return FeaturePipeline.public(load_mapping(write(tmp_path, name, mapping))).layout()


def test_identical_layouts_have_no_differences(tmp_path):
    one = layout(MAPPING, tmp_path)
    assert layout_differences({"northbank": one, "southbank": dict(one)}) == []


def test_layout_differences_name_partner_column_and_value(tmp_path):
    base = layout(MAPPING, tmp_path, "a.toml")
    no_spain = layout(MAPPING.replace(', "Spain"]', "]"), tmp_path, "b.toml")
    wider = layout(MAPPING.replace("Balance = [0, 300000]", "Balance = [0, 250000]"), tmp_path, "c.toml")
    no_tenure = layout(MAPPING.replace('"Tenure", ', "").replace("Tenure = [0, 10]\n", "")
                       .replace('drop = ["RowNumber", "Surname"]', 'drop = ["RowNumber", "Surname", "Tenure"]'),
                       tmp_path, "d.toml")
    swapped = layout(MAPPING.replace('"Geography", "Gender"', '"Gender", "Geography"'), tmp_path, "e.toml")
    diffs = layout_differences({"northbank": base, "southbank": no_spain, "eastbank": wider,
                                "westbank": no_tenure, "midbank": swapped})
    text = "\n".join(diffs)
    assert ("column 'Geography': category 'Spain' is declared by northbank, eastbank, westbank, "
            "midbank but not by southbank") in text
    assert "column 'Balance': bounds differ: [0, 300000] in northbank, southbank, westbank, midbank; " \
           "[0, 250000] in eastbank" in text
    assert "column 'Tenure': numeric in northbank, southbank, eastbank, midbank; absent from westbank" in text
    assert "order of categorical columns differs" in text and "midbank: Gender, Geography" in text


def test_layout_differences_category_order_and_kind(tmp_path):
    base = layout(MAPPING, tmp_path, "a.toml")
    reordered = layout(MAPPING.replace('["France", "Germany", "Spain"]', '["Spain", "France", "Germany"]'),
                       tmp_path, "b.toml")
    diffs = layout_differences({"northbank": base, "southbank": reordered})
    assert diffs == ["column 'Geography': categories in a different order: northbank: 'France', "
                     "'Germany', 'Spain'; southbank: 'Spain', 'France', 'Germany'"]
    as_number = layout(MAPPING.replace('"Gender", "HasCrCard"', '"Gender"').replace('HasCrCard = ["0", "1"]\n', "")
                       .replace('"Tenure", ', '"Tenure", "HasCrCard", ').replace("Tenure = [0, 10]",
                                                                              "Tenure = [0, 10]\nHasCrCard = [0, 1]"),
                       tmp_path, "c.toml")
    diffs = layout_differences({"northbank": base, "southbank": as_number})
    assert "column 'HasCrCard': categorical in northbank; numeric in southbank" in diffs
