"""Model registry: curves and calibration from pooled histograms, plots, TorchScript export, scoring
with the training validation rules, and versioned registration with a card and a delivery event."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedpact.audit import EventType, Ledger
from fedpact.errors import DataValidationError
from fedpact.federation.coordinator import JobResult, PartnerSummary
from fedpact.federation.job import JobConfig
from fedpact.models.datasets import TELCO_CHURN, load_dataset
from fedpact.models.features import FeaturePipeline
from fedpact.models.metrics import score_histogram
from fedpact.models.networks import build_model
from fedpact.models.scoring import ScoringMismatch
from fedpact.service.api.registry import (
    ModelRegistry,
    PooledScores,
    RegistryError,
    draw_plots,
    export_torchscript,
    load_torchscript,
    parse_ref,
    read_scoring_rows,
    score_rows,
)
from fedpact.service.api.store import ServiceStore
from fedpact.service.api.testing import write_mapping

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def synthetic():
    """Scores of a mildly informative model on 20,000 rows, as raw values and as pooled histograms."""
    rng = np.random.default_rng(7)
    y = (rng.random(20_000) < 0.25).astype(float)
    logits = rng.normal(-1.2, 1.0, len(y)) + 1.3 * y
    scores = 1 / (1 + np.exp(-logits))
    pos, neg, sq = score_histogram(y, scores)
    return y, scores, PooledScores(pos, neg, sq, "test")


def test_roc_curve_area_equals_pooled_auc_and_sklearn(synthetic):
    y, scores, pooled = synthetic
    fpr, tpr = pooled.roc()
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == pytest.approx(1) and tpr[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.trapezoid(tpr, fpr))
    assert area == pytest.approx(pooled.metrics()["roc_auc"], abs=1e-12)
    assert area == pytest.approx(roc_auc_score(y, scores), abs=2e-3)


def test_gains_curve_gives_the_top_decile_lift(synthetic):
    y, scores, pooled = synthetic
    targeted, captured = pooled.gains()
    assert captured[-1] == pytest.approx(1) and targeted[-1] == pytest.approx(1)
    at = np.searchsorted(targeted, 0.1)
    lift = captured[at] / targeted[at]
    assert lift == pytest.approx(pooled.metrics()["lift_at_10"], rel=0.02)
    top = np.argsort(-scores)[:2000]
    assert lift == pytest.approx(y[top].mean() / y.mean(), rel=0.03)


def test_calibration_table_matches_a_direct_computation(synthetic):
    y, scores, pooled = synthetic
    cal = pooled.calibration()
    assert len(cal["bins"]) == 10 and sum(b["rows"] for b in cal["bins"]) == len(y)
    ece = 0.0
    for b in cal["bins"]:
        inside = (scores >= b["lo"]) & (scores < b["hi"]) if b["hi"] < 1 else scores >= b["lo"]
        assert b["rows"] == int(inside.sum())
        if b["rows"]:
            assert b["observed"] == pytest.approx(y[inside].mean(), abs=1e-12)
            assert b["predicted"] == pytest.approx(scores[inside].mean(), abs=6e-4)
            ece += inside.mean() * abs(scores[inside].mean() - y[inside].mean())
    assert cal["expected_calibration_error"] == pytest.approx(ece, abs=1e-3)
    assert cal["brier"] == pytest.approx(np.mean((scores - y) ** 2), abs=1e-12)


def test_plots_are_png_images(synthetic):
    *_, pooled = synthetic
    plots = draw_plots(pooled, "test@1")
    assert set(plots) == {"roc", "gains", "calibration"}
    for png in plots.values():
        assert png.startswith(PNG) and len(png) > 10_000


@pytest.mark.parametrize("ref,expected", [("churn-telco", ("churn-telco", None)),
                                          ("churn-telco@3", ("churn-telco", 3)),
                                          ("churn-telco@v2", ("churn-telco", 2))])
def test_model_references(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "@1", "churn-telco@latest"])
def test_bad_model_references(ref):
    with pytest.raises(RegistryError):
        parse_ref(ref)


# --------------------------------------------------------------------------- export and scoring


def telco_mapping(path: Path, *, drop_category: str | None = None) -> Path:
    contract = None
    if drop_category:
        contract = {"Contract": tuple(v for v in TELCO_CHURN.categories["Contract"] if v != drop_category)}
    return write_mapping(TELCO_CHURN, path, categories=contract)


@pytest.fixture(scope="module")
def telco_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scoring")
    data = load_dataset("telco")
    frame = data.features.copy()
    frame.insert(0, "customerID", data.ids)
    frame["Churn"] = np.where(data.labels == 1, "Yes", "No")
    frame.head(400).to_csv(folder / "labelled.csv", index=False)
    frame.head(400).drop(columns=["Churn"]).to_csv(folder / "unlabelled.csv", index=False)
    frame.head(30).drop(columns=["Churn"]).to_csv(folder / "small.csv", index=False)
    mapping = telco_mapping(folder / "telco.toml")
    layout = FeaturePipeline.public(TELCO_CHURN).layout()
    net = build_model("logreg", sum(len(v) for v in layout["categorical"].values()) + len(layout["numeric"]), seed=3)
    with torch.no_grad():
        net[0].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    torch.save({"state_dict": net.state_dict(), "model": "logreg", "layout": layout}, folder / "model.pt")
    export_torchscript(folder / "model.pt", folder / "model.ts.pt", {"model": "test-model@1"})
    return folder, mapping, net


def test_torchscript_export_scores_like_the_saved_weights(telco_files):
    folder, mapping, net = telco_files
    scorer = load_torchscript(folder / "model.ts.pt")
    assert scorer.label == "test-model@1" and scorer.layout["numeric"] == list(TELCO_CHURN.numeric)
    data = read_scoring_rows(folder / "labelled.csv", mapping)
    X = FeaturePipeline.from_layout(scorer.layout).transform(data)
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy(X))).squeeze(-1).numpy()
    from fedpact.models.scoring import encode_inputs

    np.testing.assert_allclose(scorer.score(*encode_inputs(data.features, scorer.layout)), expected,
                               atol=1e-6)


def test_scoring_with_and_without_labels_gives_the_same_scores(telco_files):
    folder, mapping, _ = telco_files
    scorer = load_torchscript(folder / "model.ts.pt")
    labelled = read_scoring_rows(folder / "labelled.csv", mapping)
    unlabelled = read_scoring_rows(folder / "unlabelled.csv", mapping)
    # Scoring ignores the label column: both read as unlabelled rows.
    assert np.isnan(unlabelled.labels).all() and np.isnan(labelled.labels).all()
    a, _ = score_rows(scorer, labelled)
    b, notes = score_rows(scorer, unlabelled)
    assert list(a.columns) == ["customerID", "score"] and len(a) == 400
    pd.testing.assert_frame_equal(a, b)
    assert any("without labels" in n for n in notes)
    assert a["score"].between(0, 1).all() and a["score"].std() > 0.01
    # No statistic of the batch: the first 30 rows alone score exactly as inside the 400.
    small, _ = score_rows(scorer, read_scoring_rows(folder / "small.csv", mapping))
    pd.testing.assert_frame_equal(small, b.head(30))


def test_scoring_uses_the_models_encoding_whatever_the_mappings_categories(telco_files, tmp_path):
    """The model embeds its categories: a mapping declaring others changes no score (a note says
    so); a mapping that makes a model column the other kind is refused."""
    folder, mapping, _ = telco_files
    scorer = load_torchscript(folder / "model.ts.pt")
    other = telco_mapping(tmp_path / "other.toml", drop_category="Two year")
    rows = read_scoring_rows(folder / "unlabelled.csv", other, scorer.layout)
    assert any("Contract: the mapping declares other categories than the model" in n for n in rows.notes)
    a, _ = score_rows(scorer, rows)
    b, _ = score_rows(scorer, read_scoring_rows(folder / "unlabelled.csv", mapping, scorer.layout))
    pd.testing.assert_frame_equal(a, b)
    moved = write_mapping(dataclasses.replace(
        TELCO_CHURN, numeric=tuple(c for c in TELCO_CHURN.numeric if c != "tenure"),
        categorical=TELCO_CHURN.categorical + ("tenure",),
        bounds={k: v for k, v in TELCO_CHURN.bounds.items() if k != "tenure"},
        categories={**TELCO_CHURN.categories, "tenure": tuple(str(i) for i in range(73))}),
        tmp_path / "moved.toml")
    with pytest.raises(ScoringMismatch, match="'tenure' is categorical in the mapping but numeric"):
        read_scoring_rows(folder / "unlabelled.csv", moved, scorer.layout)


def test_scoring_applies_the_training_validation_rules(telco_files, tmp_path):
    folder, mapping, _ = telco_files
    frame = pd.read_csv(folder / "unlabelled.csv", dtype=str)
    frame.loc[3, "tenure"] = "twelve"
    frame.loc[5, "customerID"] = frame.loc[6, "customerID"]
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataValidationError) as info:
        read_scoring_rows(tmp_path / "bad.csv", mapping)
    text = str(info.value)
    assert "'tenure' (numeric): 1 of 400 rows are not numbers" in text and "lines 5" in text
    assert "ids appear more than once" in text
    with pytest.raises(RegistryError, match="not a fedpact TorchScript export"):
        load_torchscript(mapping)


# --------------------------------------------------------------------------- registration


def fake_finished_job(home: Path, model_file: Path, synthetic) -> tuple[JobConfig, JobResult]:
    """A finished job as the coordinator leaves it, with the pooled histograms on the result."""
    *_, pooled = synthetic
    job = JobConfig(dataset="telco", rounds=2, home=str(home), purpose="churn_model_training")
    job.job_dir.mkdir(parents=True)
    (job.job_dir / "model.pt").write_bytes(model_file.read_bytes())
    final = {"round": 2, **pooled.metrics(), "epsilon": 0.9}
    partners = [PartnerSummary(f"telco-churn/p{i}", 1000 + i, 250, 0.9, 1.1, 0.25, 8, 0.91, 0.85, 0.51)
                for i in range(3)]
    result = JobResult(job.job_id, job.as_dict(), partners, [final], final, 0.9, 1e-5, 10, 1.0,
                       str(job.job_dir / "model.pt"), torch.load(model_file, weights_only=False)["layout"], 0.51)
    result.histograms = {"pos": pooled.pos.tolist(), "neg": pooled.neg.tolist(),
                         "sq_error": pooled.sq_error}
    return job, result


def test_register_builds_a_versioned_model_with_card_plots_export_and_delivery_event(
        tmp_path, telco_files, synthetic):
    folder, *_ = telco_files
    store = ServiceStore(tmp_path)
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        registry = ModelRegistry(store, ledger)
        job, result = fake_finished_job(tmp_path, folder / "model.pt", synthetic)
        finished = ledger.append(EventType.JOB_FINISHED, {"metrics": {}, "epsilon": 0.9},
                                 actor="coordinator", job_id=job.job_id)
        partners = [p.name for p in result.partners]
        assert registry.register(job, result, name="churn-telco", requested_by="dana", partners=partners) == 1
        assert registry.register(job, result, name="churn-telco", requested_by="dana", partners=partners) == 2
        entry = registry.get("churn-telco")
        assert entry["version"] == 2 and registry.get("churn-telco@1")["version"] == 1
        card = entry["card"]
        assert card["task"] == "churn" and card["dataset"] == "telco-churn"
        assert [p["train_rows"] for p in card["partners"]] == [1000, 1001, 1002]
        assert card["metrics"]["roc_auc"] == pytest.approx(result.final["roc_auc"])
        assert card["privacy"]["per_partner"]["telco-churn/p0"]["epsilon_dp_accounting_pld"] == 0.85
        assert card["membership_inference"]["auc_max"] == 0.51
        assert card["lineage"]["ledger_events"]["job.finished"] == [finished.event_id]
        assert list(card["features"]["categorical"])[:2] == ["gender", "SeniorCitizen"]  # layout order
        files = Path(entry["folder"])
        for name in ("model.pt", "card.json", "roc.png", "gains.png", "calibration.png", "model.torchscript.pt"):
            assert (files / name).is_file(), name
        digest = hashlib.sha256((files / "card.json").read_bytes()).hexdigest()
        delivered = ledger.event(entry["delivery_event_id"])
        assert delivered.event_type == "model.delivered" and delivered.job_id == job.job_id
        assert delivered.payload["card_sha256"] == digest == entry["card_sha256"]
        assert delivered.payload["model"] == "churn-telco@2" and delivered.payload["recipient"] == "dana"
        scorer = registry.scorer("churn-telco@2")
        assert scorer.label == "churn-telco@2"
        with pytest.raises(RegistryError, match="no model 'churn-telco@9'"):
            registry.get("churn-telco@9")
    store.close()


def registry_is_empty(store: ServiceStore) -> bool:
    from fedpact.service.api.store import models

    with store.engine.connect() as conn:
        return conn.execute(models.select()).first() is None


def test_register_refuses_a_job_without_released_histograms(tmp_path, telco_files, synthetic):
    folder, *_ = telco_files
    store = ServiceStore(tmp_path)
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        job, result = fake_finished_job(tmp_path, folder / "model.pt", synthetic)
        result.histograms = {}  # a result that carries no histograms
        # Re-scoring the partners' rows for the card would be a release outside the privacy
        # account: the registry refuses instead.
        with pytest.raises(RegistryError, match="carries no released score histograms"):
            ModelRegistry(store, ledger).register(job, result, name="churn-telco", requested_by="dana",
                                                  partners=[])
        rescored = ledger.events(job_id=job.job_id, event_type=EventType.DATA_ACCESSED)
        assert rescored == []  # no partner row was touched for the card
        assert registry_is_empty(store)
    store.close()
