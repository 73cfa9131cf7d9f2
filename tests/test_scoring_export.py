"""Scoring that matches training: exported TorchScript and ONNX models embed the training layout's
encoding (declared categories one-hot, numbers clipped to their bounds and scaled) and the
calibration fitted from the pooled held-out histograms, so a row's score never depends on the rows
it is scored with; ONNX agrees with TorchScript; scoring ignores the label column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fedpact.errors import ConfigurationError, DataValidationError
from fedpact.models.datasets import TELCO_CHURN, load_dataset
from fedpact.models.export import (
    ExportError,
    export_onnx,
    export_torchscript,
    load_exported,
    torchscript_to_onnx,
)
from fedpact.models.features import FeaturePipeline
from fedpact.models.metrics import score_histogram
from fedpact.models.networks import build_model
from fedpact.models.scoring import (
    Calibration,
    calibration_summary,
    encode_inputs,
    fit_calibration,
    read_scoring_rows,
    score_rows,
)
from fedpact.service import cli_jobs
from fedpact.service.api.testing import write_mapping

runner = CliRunner()
LAYOUT = FeaturePipeline.public(TELCO_CHURN).layout()
WIDTH = sum(len(v) for v in LAYOUT["categorical"].values()) + len(LAYOUT["numeric"])


def save_model(path: Path, kind: str, seed: int, layout: dict = LAYOUT) -> torch.nn.Module:
    width = sum(len(v) for v in layout["categorical"].values()) + len(layout["numeric"])
    net = build_model(kind, width, seed=seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.6 if kind == "logreg" else 0.2, generator=torch.Generator().manual_seed(seed + 11))
    torch.save({"state_dict": net.state_dict(), "model": kind, "layout": layout}, path)
    return net.eval()


def csv_of(data, path: Path, *, rows=None, label=None, sep=",") -> Path:
    frame = data.features.copy()
    frame.insert(0, "customerID", data.ids)
    if label is not None:
        frame["Churn"] = label
    if rows is not None:
        frame = frame.iloc[rows]
    frame.to_csv(path, index=False, sep=sep)
    return path


@pytest.fixture(scope="module")
def telco():
    return load_dataset("telco")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, telco):
    """A logreg and an MLP with random weights on the public telco layout, exported with a
    calibration correction, as TorchScript and ONNX; the rows as CSV with its mapping."""
    folder = tmp_path_factory.mktemp("export")
    cal = Calibration(a=0.8, b=0.7, method="platt")
    out = {"folder": folder, "cal": cal}
    for kind, seed in (("logreg", 3), ("mlp", 5)):
        net = save_model(folder / f"{kind}.pt", kind, seed)
        card = {"model": f"test-{kind}@1"}
        export_torchscript(folder / f"{kind}.pt", folder / f"{kind}.ts.pt", card=card, calibration=cal)
        export_onnx(folder / f"{kind}.pt", folder / f"{kind}.onnx", card=card, calibration=cal)
        out[kind] = net
    out["mapping"] = write_mapping(TELCO_CHURN, folder / "telco.toml")
    out["all"] = csv_of(telco, folder / "all.csv")
    return out


def reference_scores(net, data, cal: Calibration) -> np.ndarray:
    """The training encoding (FeaturePipeline.from_layout) + network + calibration, in float64."""
    X = FeaturePipeline.from_layout(LAYOUT).transform(data)
    with torch.no_grad():
        z = net(torch.from_numpy(X)).squeeze(-1).double().numpy()
    return 1 / (1 + np.exp(-(cal.a * z + cal.b)))


# --------------------------------------------------------------------------- matches training


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
@pytest.mark.parametrize("fmt", ["ts.pt", "onnx"])
def test_export_embeds_the_training_encoding_and_calibration(exported, telco, kind, fmt):
    model = load_exported(exported["folder"] / f"{kind}.{fmt}")
    assert model.layout["bounds"] == LAYOUT["bounds"] and model.label == f"test-{kind}@1"
    assert (model.calibration.a, model.calibration.b) == (0.8, 0.7)
    numeric, categorical = encode_inputs(telco.features, model.layout)
    assert numeric.dtype == np.float64 and categorical.dtype == np.int64
    got = model.score(numeric, categorical)
    assert got.dtype == np.float64 and got.shape == (len(telco),)
    np.testing.assert_allclose(got, reference_scores(exported[kind], telco, exported["cal"]), atol=1e-6)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_onnx_equals_torchscript_on_real_rows(exported, telco, kind):
    ts = load_exported(exported["folder"] / f"{kind}.ts.pt")
    ox = load_exported(exported["folder"] / f"{kind}.onnx")
    assert ts.runtime == "torchscript" and ox.runtime == "onnx"
    numeric, categorical = encode_inputs(telco.features, LAYOUT)
    a, b = ts.score(numeric, categorical), ox.score(numeric, categorical)
    assert np.abs(a - b).max() <= 1e-6
    assert a.std() > 0.02  # the scores are spread out, so the comparison means something


def test_onnx_converted_from_the_torchscript_file_is_the_same_model(exported, telco, tmp_path):
    torchscript_to_onnx(exported["folder"] / "mlp.ts.pt", tmp_path / "m.onnx")
    numeric, categorical = encode_inputs(telco.features, LAYOUT)
    direct = load_exported(exported["folder"] / "mlp.onnx").score(numeric, categorical)
    converted = load_exported(tmp_path / "m.onnx")
    assert converted.label == "test-mlp@1"
    np.testing.assert_array_equal(converted.score(numeric, categorical), direct)


def test_out_of_list_categories_and_out_of_bounds_numbers(exported, telco):
    """Code -1 (or any code outside the list) encodes as all zeros, like a value outside the
    declared categories in training; numbers outside the bounds are clipped to them."""
    model = load_exported(exported["folder"] / "mlp.onnx")
    frame = telco.features.head(20).copy()
    frame.loc[0:9, "Contract"] = "Three year"
    frame.loc[0:9, "tenure"] = 500.0
    frame.loc[0:9, "MonthlyCharges"] = -40.0
    numeric, categorical = encode_inputs(frame, LAYOUT)
    col = list(LAYOUT["categorical"]).index("Contract")
    assert (categorical[:10, col] == -1).all()
    expected = reference_scores(exported["mlp"], frame, exported["cal"])
    np.testing.assert_allclose(model.score(numeric, categorical), expected, atol=1e-6)
    big = categorical.copy()
    big[:10, col] = 99
    np.testing.assert_array_equal(model.score(numeric, big), model.score(numeric, categorical))
    clipped = numeric.copy()
    clipped[:10, 0] = 72.0
    clipped[:10, 1] = 0.0
    np.testing.assert_array_equal(model.score(clipped, categorical), model.score(numeric, categorical))


# --------------------------------------------------------------------------- no dependence on the batch


@pytest.mark.parametrize("fmt", ["ts.pt", "onnx"])
def test_each_row_alone_scores_as_in_a_batch(exported, telco, tmp_path, fmt):
    model = load_exported(exported["folder"] / f"mlp.{fmt}")
    batch = read_scoring_rows(csv_of(telco, tmp_path / "b.csv", rows=slice(0, 505)), exported["mapping"],
                              layout=model.layout)
    pooled, _ = score_rows(model, batch)
    fifty, _ = score_rows(model, read_scoring_rows(csv_of(telco, tmp_path / "f.csv", rows=slice(0, 50)),
                                                   exported["mapping"], layout=model.layout))
    assert np.abs(fifty["score"].to_numpy() - pooled["score"].to_numpy()[:50]).max() <= 1e-7
    for i in range(0, 505, 25):
        alone, _ = score_rows(model, batch.subset([i]))
        assert alone["customerID"].tolist() == [pooled["customerID"][i]]
        assert abs(float(alone["score"][0]) - float(pooled["score"][i])) <= 1e-7, i


def test_pooled_and_per_group_scoring_agree(exported, telco):
    model = load_exported(exported["folder"] / "logreg.ts.pt")
    data = telco
    pooled, _ = score_rows(model, data)
    pooled = pooled.set_index("customerID")["score"]
    for service in LAYOUT["categorical"]["InternetService"]:
        part = data.subset((data.features["InternetService"] == service).to_numpy())
        scored, _ = score_rows(model, part)
        got = scored.set_index("customerID")["score"]
        assert np.abs(got.to_numpy() - pooled.loc[got.index].to_numpy()).max() <= 1e-7, service


# --------------------------------------------------------------------------- reading the rows to score


def test_a_bad_or_missing_label_column_does_not_block_scoring(exported, telco, tmp_path):
    model = load_exported(exported["folder"] / "mlp.onnx")
    rows = slice(0, 300)
    label = np.array(["maybe", "", "Yes", "n/a"] * 2000)[: len(telco)]
    bad = read_scoring_rows(csv_of(telco, tmp_path / "bad.csv", rows=rows, label=label),
                            exported["mapping"], layout=model.layout)
    none = read_scoring_rows(csv_of(telco, tmp_path / "none.csv", rows=rows), exported["mapping"],
                             layout=model.layout)
    assert np.isnan(bad.labels).all() and np.isnan(none.labels).all()
    a, notes = score_rows(model, bad)
    b, _ = score_rows(model, none)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 300 and not any("Churn" in n and "label" not in n for n in notes)


def test_a_semicolon_file_gives_the_separator_hint(exported, telco, tmp_path):
    path = csv_of(telco, tmp_path / "semi.csv", rows=slice(0, 40), sep=";")
    with pytest.raises(DataValidationError) as info:
        read_scoring_rows(path, exported["mapping"], layout=LAYOUT)
    text = str(info.value)
    assert "set separator = ';' in the mapping" in text
    assert "Churn" not in text  # no column it invented (the file has no label column)
    assert len(text) < 400  # the whole header line is not repeated


def test_a_missing_feature_column_names_only_the_files_columns(exported, telco, tmp_path):
    frame = pd.read_csv(exported["all"], dtype=str, keep_default_na=False).head(30)
    frame.drop(columns=["tenure"]).to_csv(tmp_path / "no_tenure.csv", index=False)
    with pytest.raises(DataValidationError) as info:
        read_scoring_rows(tmp_path / "no_tenure.csv", exported["mapping"], layout=LAYOUT)
    text = str(info.value)
    assert "column 'tenure' (numeric in the model) is missing" in text
    assert "Churn" not in text


def test_long_values_are_truncated_in_messages(exported, tmp_path):
    frame = pd.read_csv(exported["all"], dtype=str, keep_default_na=False).head(30)
    frame.loc[3, "tenure"] = "x" * 5000
    frame.loc[4, "customerID"] = "y" * 5000
    frame.loc[5, "customerID"] = "y" * 5000
    frame.loc[6, "Contract"] = "z" * 5000
    frame.to_csv(tmp_path / "long.csv", index=False)
    with pytest.raises(DataValidationError) as info:
        read_scoring_rows(tmp_path / "long.csv", exported["mapping"], layout=LAYOUT)
    text = str(info.value)
    assert "not numbers" in text and "more than once" in text and "…" in text
    assert len(text) < 1500 and "x" * 200 not in text and "y" * 200 not in text
    frame.loc[3, "tenure"] = "5"
    frame.loc[5, "customerID"] = "other-id"
    frame.to_csv(tmp_path / "long.csv", index=False)
    data = read_scoring_rows(tmp_path / "long.csv", exported["mapping"], layout=LAYOUT)
    assert data.ids[4] == "y" * 5000  # the value itself is kept; only the message is short
    assert all(len(n) < 400 for n in data.notes) and any("Contract" in n for n in data.notes)


def test_a_mapping_that_disagrees_with_the_model(exported, tmp_path):
    spec_text = exported["mapping"].read_text().replace('"tenure", ', "")
    (tmp_path / "m.toml").write_text(spec_text.replace('"tenure" = [0, 72]\n', ""))
    with pytest.raises(ConfigurationError, match="'tenure'"):
        read_scoring_rows(exported["all"], tmp_path / "m.toml", layout=LAYOUT)
    median = exported["mapping"].read_text().replace('"TotalCharges" = "zero"', '"TotalCharges" = "median"')
    (tmp_path / "median.toml").write_text(median)
    with pytest.raises(ConfigurationError, match="median"):
        read_scoring_rows(exported["all"], tmp_path / "median.toml", layout=LAYOUT)


def test_a_model_trained_on_batch_statistics_is_refused(tmp_path, telco):
    fitted = FeaturePipeline.fit(telco).layout()  # no bounds: its encoding depended on the rows
    save_model(tmp_path / "old.pt", "logreg", 1, layout=fitted)
    with pytest.raises(ExportError, match="bounds"):
        export_torchscript(tmp_path / "old.pt", tmp_path / "old.ts.pt")


# --------------------------------------------------------------------------- calibration


def miscalibrated(seed: int = 0, n: int = 40_000):
    """A model whose scores are too low: true P(y=1) = sigmoid(z), score = sigmoid(z - 1.1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.4, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    scores = 1 / (1 + np.exp(-(z - 1.1)))
    return y, scores


def test_calibration_reduces_the_error_on_a_miscalibrated_model():
    y, scores = miscalibrated()
    pos, neg, _ = score_histogram(y, scores)
    before = calibration_summary(pos, neg)
    cal = fit_calibration(pos, neg)
    after = calibration_summary(pos, neg, calibration=cal)
    assert cal.method == "platt" and cal.a == pytest.approx(1.0, abs=0.05)
    assert cal.b == pytest.approx(1.1, abs=0.08)
    assert before["mean_score"] < before["positive_rate"] - 0.1
    assert abs(after["mean_score"] - after["positive_rate"]) < 0.005
    assert after["expected_calibration_error"] < before["expected_calibration_error"] / 5
    # the same on rows the correction did not see
    y2, s2 = miscalibrated(seed=1)
    corrected = cal.apply(s2)
    assert abs(corrected.mean() - y2.mean()) < 0.01 and abs(s2.mean() - y2.mean()) > 0.1


def test_calibration_tolerates_noisy_negative_counts_and_coarse_bins():
    y, scores = miscalibrated(seed=2)
    rng = np.random.default_rng(3)
    pos, neg, _ = score_histogram(y, scores, bins=50)
    noisy_pos = pos + rng.laplace(0, 20, pos.shape)
    noisy_neg = neg + rng.laplace(0, 20, neg.shape)
    assert (noisy_pos < 0).any()
    edges = np.linspace(0, 1, 51)
    cal = fit_calibration(noisy_pos, noisy_neg, edges)
    by_count = fit_calibration(noisy_pos, noisy_neg, 50)
    assert (by_count.a, by_count.b) == pytest.approx((cal.a, cal.b), abs=1e-9)
    before = calibration_summary(pos, neg, 50)
    after = calibration_summary(pos, neg, 50, calibration=cal)
    assert after["expected_calibration_error"] < before["expected_calibration_error"] / 3
    nothing = fit_calibration(np.zeros(10), np.full(10, -3.0))
    assert (nothing.a, nothing.b, nothing.method) == (1.0, 0.0, "none")


def test_intercept_only_correction():
    y, scores = miscalibrated(seed=4)
    pos, neg, _ = score_histogram(y, scores)
    cal = fit_calibration(pos, neg, method="intercept")
    assert cal.method == "intercept" and cal.a == 1.0
    after = calibration_summary(pos, neg, calibration=cal)
    assert abs(after["mean_score"] - after["positive_rate"]) < 1e-3


# --------------------------------------------------------------------------- command line


def test_cli_scores_with_torchscript_and_onnx_alike(exported, tmp_path):
    outputs = {}
    for fmt in ("ts.pt", "onnx"):
        target = tmp_path / f"scores-{fmt}.csv"
        r = runner.invoke(cli_jobs.model_app, ["score", str(exported["folder"] / f"mlp.{fmt}"),
                                               str(exported["all"]), "--mapping", str(exported["mapping"]),
                                               "--home", str(tmp_path / "h"), "--out", str(target)])
        assert r.exit_code == 0, r.output
        outputs[fmt] = pd.read_csv(target)
    a, b = outputs["ts.pt"], outputs["onnx"]
    assert list(a.columns) == ["customerID", "score"] and len(a) == 7043
    assert (a["customerID"] == b["customerID"]).all()
    assert np.abs(a["score"] - b["score"]).max() <= 1e-6


def test_cli_scoring_reports_the_separator_hint_in_one_line(exported, telco, tmp_path):
    path = csv_of(telco, tmp_path / "semi.csv", rows=slice(0, 40), sep=";")
    r = runner.invoke(cli_jobs.model_app, ["score", str(exported["folder"] / "mlp.onnx"), str(path),
                                           "--mapping", str(exported["mapping"]),
                                           "--home", str(tmp_path / "h")])
    assert r.exit_code == 2 and "separator = ';'" in r.output and "Traceback" not in r.output


def test_export_contract_is_in_the_files(exported):
    model = load_exported(exported["folder"] / "logreg.onnx")
    contract = model.contract
    assert [i["name"] for i in contract["inputs"]] == ["numeric", "categorical"]
    assert contract["inputs"][0]["columns"] == list(LAYOUT["numeric"])
    assert contract["inputs"][1]["columns"] == list(LAYOUT["categorical"])
    assert contract["output"]["name"] == "score"
    json.dumps(contract)


# --------------------------------------------------------------------------- registry


def test_registration_fits_the_calibration_and_writes_both_exports(tmp_path, telco):
    from fedpact.audit import Ledger
    from fedpact.federation.coordinator import JobResult, PartnerSummary
    from fedpact.federation.job import JobConfig
    from fedpact.service.api.registry import ModelRegistry, PooledScores
    from fedpact.service.api.store import ServiceStore

    y, scores = miscalibrated(seed=5)
    pos, neg, sq = score_histogram(y, scores)
    pooled = PooledScores(pos, neg, sq, "test")
    job = JobConfig(dataset="telco", rounds=2, home=str(tmp_path), purpose="churn_model_training")
    job.job_dir.mkdir(parents=True)
    save_model(job.job_dir / "model.pt", "mlp", 5)
    final = {"round": 2, **pooled.metrics(), "epsilon": 0.9}
    partners = [PartnerSummary("telco-churn/p0", 1000, 250, 0.9, 1.1, 0.25, 8, 0.91, 0.85, 0.51)]
    result = JobResult(job.job_id, job.as_dict(), partners, [final], final, 0.9, 1e-5, 10, 1.0,
                       str(job.job_dir / "model.pt"), LAYOUT, 0.51)
    result.histograms = {"pos": pos.tolist(), "neg": neg.tolist(), "sq_error": sq}
    store = ServiceStore(tmp_path)
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        registry = ModelRegistry(store, ledger)
        registry.register(job, result, name="churn-telco", requested_by="dana", partners=["telco-churn/p0"])
        card = registry.get("churn-telco@1")["card"]
        fix = card["calibration_correction"]
        assert fix["method"] == "platt" and fix["epsilon_cost"] == 0.0
        assert fix["before"]["expected_calibration_error"] == pytest.approx(
            card["calibration"]["expected_calibration_error"], abs=1e-12)
        assert fix["after"]["expected_calibration_error"] < fix["before"]["expected_calibration_error"] / 5
        assert abs(fix["after"]["mean_score"] - fix["after"]["positive_rate"]) < 0.005
        assert card["files"]["onnx"] == "model.onnx"
        assert [i["name"] for i in card["export"]["inputs"]] == ["numeric", "categorical"]
        ts = registry.scorer("churn-telco@1")
        onnx_path, filename = registry.export_file("churn-telco@1", "onnx")
        assert filename == "churn-telco-v1.onnx"
        ox = load_exported(onnx_path)
        assert (ts.calibration.a, ts.calibration.b) == (fix["a"], fix["b"]) == (ox.calibration.a, ox.calibration.b)
        numeric, categorical = encode_inputs(telco.features, LAYOUT)
        assert np.abs(ts.score(numeric, categorical) - ox.score(numeric, categorical)).max() <= 1e-6
        onnx_path.unlink()  # a model registered before ONNX exports: written from the TorchScript
        again, _ = registry.export_file("churn-telco@1", "onnx")
        np.testing.assert_array_equal(load_exported(again).score(numeric, categorical),
                                      ox.score(numeric, categorical))
    store.close()
