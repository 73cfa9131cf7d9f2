"""Scale: streamed (out-of-core) local training and splits into many partners.

The streamed path must be the in-memory path with a different storage: same feature vectors, a
model that scores alike, and the same accountant history (hence the same ε) for the same plan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpact.federation.job import JobConfig
from fedpact.federation.local_round import (
    _epsilon,
    evaluate_round,
    pipeline_for,
    plan_for,
    train_round,
)
from fedpact.federation.node_data import NodeData, load_node_data
from fedpact.federation.partition import (
    DIRICHLET_FLOOR,
    dirichlet_indices,
    partition,
    partition_names,
)
from fedpact.models.datasets import (
    BANK_MARKETING,
    DatasetSpec,
    load_csv,
    load_dataset,
    render_mapping,
)
from fedpact.models.features import FeaturePipeline
from fedpact.models.metrics import metrics_from_released
from fedpact.models.networks import build_model
from fedpact.models.streaming import (
    PoissonBatches,
    StreamedRows,
    build_stream,
    count_data_rows,
    poisson_sample,
    stream_threshold,
)
from fedpact.privacy.accounting import AccountantStore, epsilon_of

ROWS = 8_000


def mapping_file(spec: DatasetSpec, path: Path) -> Path:
    """A TOML mapping file describing `spec` (what a partner admin would write)."""
    path.write_text(render_mapping(spec))
    return path


@pytest.fixture(scope="module")
def bank_csv(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    """ROWS random rows of bank-full.csv (the file is date-ordered) and a mapping file for it."""
    folder = tmp_path_factory.mktemp("bank-small")
    frame = pd.read_csv(shared_data / "bank-full.csv", sep=";", dtype=str, keep_default_na=False)
    frame = frame.sample(n=ROWS, random_state=1).reset_index(drop=True)
    csv = folder / "bank-small.csv"
    frame.to_csv(csv, sep=";", index=False)
    return csv, mapping_file(BANK_MARKETING, folder / "bank.toml")


def split_like_stream(data, seed: int, test_fraction: float):
    """The rows build_stream deals to train and test (a seeded draw per row, in file order)."""
    is_test = np.random.default_rng(seed).random(len(data)) < test_fraction
    return data.subset(~is_test), data.subset(is_test)


# --------------------------------------------------------------------------- features


@pytest.mark.shared_data
def test_streamed_features_equal_in_memory_features(bank_csv, tmp_path):
    """Chunked pass (odd chunk size) -> the mapping's public pipeline and the same float32 vectors."""
    csv, _ = bank_csv
    table = build_stream(csv, BANK_MARKETING, tmp_path, seed=3, test_fraction=0.25, chunk_rows=777)
    train, test = split_like_stream(load_csv(csv, BANK_MARKETING), 3, 0.25)
    assert (len(table.train), len(table.test)) == (len(train), len(test))
    pipe = FeaturePipeline.public(BANK_MARKETING)  # declared bounds: no statistic of the rows
    assert table.pipeline == pipe
    for rows, ref in ((table.train, train), (table.test, test)):
        X, y = rows.encode(slice(0, len(rows)))
        np.testing.assert_allclose(X, pipe.transform(ref), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(y, ref.labels)
        np.testing.assert_array_equal(rows.labels, ref.labels)
    # Built once: a second call reuses the files.
    again = build_stream(csv, BANK_MARKETING, tmp_path, seed=3, test_fraction=0.25, chunk_rows=5000)
    assert again.reused and again.folder == table.folder


def test_streamed_vocabulary_without_declared_categories(tmp_path):
    """Undeclared categories: sorted values of the training rows; test-only values encode as 0s."""
    spec = DatasetSpec(name="toy", task="churn", label="churned", positive=("1",), negative=("0",),
                       categorical=("plan",), numeric=("spend",), missing={"spend": "zero"})
    rng = np.random.default_rng(0)
    n = 3_000
    frame = pd.DataFrame({
        "plan": rng.choice(["gold", "basic", "silver", "trial"], n),
        "spend": [f"{v:.2f}" if i % 50 else "" for i, v in enumerate(rng.gamma(2.0, 30.0, n))],
        "churned": rng.integers(0, 2, n).astype(str),
    })
    frame.loc[n - 1, "plan"] = "only-in-the-last-row"
    csv = tmp_path / "toy.csv"
    frame.to_csv(csv, index=False)
    table = build_stream(csv, spec, tmp_path / "cache", seed=0, test_fraction=0.2, chunk_rows=400)
    train, test = split_like_stream(load_csv(csv, spec), 0, 0.2)
    pipe = FeaturePipeline.fit(train)
    assert table.pipeline.categorical == pipe.categorical
    X, _ = table.test.encode(slice(0, len(table.test)))
    np.testing.assert_allclose(X, pipe.transform(test), atol=1e-6)
    assert any("empty values set to 0" in note for note in table.train.notes)


def test_streamed_bad_rows_are_reported_with_file_lines(tmp_path):
    spec = DatasetSpec(name="toy", task="churn", label="y", positive=("1",), negative=("0",),
                       numeric=("x",))
    csv = tmp_path / "bad.csv"
    csv.write_text("x,y\n" + "1.0,0\n" * 30 + "oops,1\n")
    from fedpact.errors import DataValidationError

    with pytest.raises(DataValidationError) as err:
        build_stream(csv, spec, tmp_path / "cache", chunk_rows=10)
    assert "lines 32-32" in str(err.value) and "'oops'" in str(err.value)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataValidationError, match="the file is empty"):
        build_stream(empty, spec, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written left behind


# --------------------------------------------------------------------------- the node's path


def bank_job(tmp_path: Path, **kw) -> JobConfig:
    settings = {"dataset": "bank", "rounds": 2, "batch_size": 64, "learning_rate": 0.1,
                "dp": False, "seed": 0, "home": str(tmp_path / "home")}
    settings.update(kw)
    return JobConfig(**settings)


@pytest.mark.shared_data
def test_node_streams_a_csv_above_the_threshold(bank_csv, tmp_path, monkeypatch):
    csv, mapping = bank_csv
    monkeypatch.delenv("FEDPACT_STREAM_ROWS", raising=False)
    assert count_data_rows(csv) == ROWS
    job = bank_job(tmp_path)
    small = load_node_data({"data-csv": str(csv), "mapping": str(mapping), "stream-rows": 0}, job)
    big = load_node_data({"data-csv": str(csv), "mapping": str(mapping), "stream-rows": ROWS - 1,
                          "state-dir": str(tmp_path / "node")}, job)
    assert not isinstance(small.train, StreamedRows)
    assert isinstance(big.train, StreamedRows) and isinstance(big.test, StreamedRows)
    assert (tmp_path / "node" / "stream").is_dir()
    assert len(big.train) + len(big.test) == ROWS
    assert big.partner == small.partner == "bank-marketing"
    assert pipeline_for(big).layout() == pipeline_for(small).layout()
    monkeypatch.setenv("FEDPACT_STREAM_ROWS", "5")
    assert stream_threshold() == 5
    assert stream_threshold("7") == 7


@pytest.mark.shared_data
def test_streamed_training_scores_like_in_memory_training(bank_csv, tmp_path):
    """Plain SGD, 3 local epochs from the same start on the same rows (only the batch order
    differs): held-out ROC-AUC within 0.02 of each other."""
    csv, mapping = bank_csv
    job = bank_job(tmp_path, local_epochs=3)
    streamed = load_node_data({"data-csv": str(csv), "mapping": str(mapping), "stream-rows": 1000,
                               "state-dir": str(tmp_path / "s")}, job)
    memory = NodeData("bank-marketing", *split_like_stream(load_csv(csv, BANK_MARKETING), job.seed,
                                                           job.test_fraction))
    aucs = {}
    for name, node in (("memory", memory), ("streamed", streamed)):
        start = build_model(job.model, pipeline_for(node).n_features, seed=job.seed).state_dict()
        update = train_round(node, start, job, tmp_path / name, 1)
        assert update.rows == len(node.train)
        result = evaluate_round(node, update.weights, job, tmp_path / name, job.rounds,
                                membership_audit=True)
        # What leaves the node: the score histograms (exact here: this job has no DP).
        aucs[name] = metrics_from_released(result.pos, result.neg)["roc_auc"]
        assert 0.35 < result.metrics["membership-auc"] < 0.65
    assert aucs["memory"] > 0.7 and aucs["streamed"] > 0.7, aucs
    assert abs(aucs["memory"] - aucs["streamed"]) < 0.02, aucs


@pytest.mark.shared_data
@pytest.mark.parametrize("batch_size", [64, 61])  # 61: 105 batches, Opacus takes 104 steps
def test_streamed_dp_spends_the_in_memory_epsilon(bank_csv, tmp_path, batch_size):
    """Same rows, same plan: the streamed round's accountant history and ε equal the in-memory
    round's and the plan's, within the target — also for a size where Opacus' Poisson loader runs
    one step fewer than the loader has batches (and records the rate 1 / steps)."""
    csv, mapping = bank_csv
    job = bank_job(tmp_path, dp=True, batch_size=batch_size, target_epsilon=2.0, target_delta=1e-5)
    streamed = load_node_data({"data-csv": str(csv), "mapping": str(mapping), "stream-rows": 1,
                               "state-dir": str(tmp_path / "s")}, job)
    train, test = split_like_stream(load_csv(csv, BANK_MARKETING), job.seed, job.test_fraction)
    memory = NodeData("bank-marketing", train, test)
    assert len(memory.train) == len(streamed.train)
    sigma, q, steps = plan_for(job, len(streamed.train))
    histories, eps = {}, {}
    for name, node in (("memory", memory), ("streamed", streamed)):
        start = build_model(job.model, pipeline_for(node).n_features, seed=0).state_dict()
        for rnd in (1, 2):
            update = train_round(node, start, job, tmp_path / name, rnd)
            start = update.weights
        state = AccountantStore(tmp_path / name / "accountants").load(job.job_id, "bank-marketing")
        histories[name], eps[name] = state.history, update.metrics["epsilon"]
    assert histories["memory"] == histories["streamed"]
    assert eps["memory"] == eps["streamed"]
    assert histories["streamed"] == [(sigma, q, 2 * steps)]
    expected = epsilon_of([(sigma, q, 2 * steps)], job.target_delta)
    assert eps["streamed"] == pytest.approx(expected, rel=1e-12)
    assert 0 < eps["streamed"] <= job.target_epsilon


def test_poisson_sample_includes_each_row_with_probability_q():
    rng = np.random.default_rng(0)
    n, q, draws = 5_000, 0.02, 2_000
    hits = np.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = poisson_sample(rng, n, q)
        assert np.all(np.diff(idx) > 0) and (len(idx) == 0 or (idx[0] >= 0 and idx[-1] < n))
        hits[idx] += 1
        sizes.append(len(idx))
    assert np.mean(sizes) == pytest.approx(n * q, rel=0.01)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.1)  # binomial batch sizes
    # Every row is picked at rate q: the per-row counts look binomial(draws, q).
    assert hits.mean() == pytest.approx(draws * q, rel=0.01)
    assert hits.var() == pytest.approx(draws * q * (1 - q), rel=0.1)
    assert np.array_equal(poisson_sample(rng, 10, 1.0), np.arange(10))
    assert len(PoissonBatches(1000, 1 / 93)) == int(1 / (1 / 93))  # Opacus' count: 92


def test_memoised_epsilon_equals_the_accountant():
    history = [(1.1, 0.01, 300), (1.1, 0.01, 200), (0.9, 0.02, 50)]
    assert _epsilon(history, 1e-5, "rdp") == pytest.approx(epsilon_of(history, 1e-5), rel=1e-12)
    assert _epsilon([], 1e-5, "rdp") == 0.0


# --------------------------------------------------------------------------- many partners


@pytest.fixture(scope="module")
def bank(shared_data):
    data = load_dataset("bank", data_dir=shared_data)
    data.features["_row"] = np.arange(len(data))
    return data


@pytest.mark.shared_data
@pytest.mark.parametrize("scheme", ["iid", "period", "dirichlet"])
def test_hundred_partners_cover_every_row_exactly_once(bank, scheme):
    parts = partition(bank, scheme, 100, seed=4)
    assert [p.name for p in parts] == partition_names("bank-marketing", scheme, 100)
    rows = np.concatenate([p.data.features["_row"].to_numpy() for p in parts])
    assert len(rows) == len(bank)
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(bank)))
    for p in parts:
        np.testing.assert_array_equal(p.data.labels, bank.labels[p.data.features["_row"].to_numpy()])
        # Enough of each class for the node's stratified train/test split.
        assert p.data.labels.sum() >= 2 and (1 - p.data.labels).sum() >= 2
        train, test = p.data.split(0.2, 0)
        assert len(train) + len(test) == len(p.data)


@pytest.mark.shared_data
def test_dirichlet_split_is_label_skewed_and_deterministic(bank):
    a = [p.data.positive_rate for p in partition(bank, "dirichlet", 20, seed=1)]
    b = [p.data.positive_rate for p in partition(bank, "dirichlet", 20, seed=1)]
    iid = [p.data.positive_rate for p in partition(bank, "iid", 20, seed=1)]
    assert a == b
    assert np.std(a) > 3 * np.std(iid)


def test_dirichlet_floor_and_alpha():
    labels = np.array([0] * 900 + [1] * 100, dtype=np.float32)
    parts = dirichlet_indices(labels, 40, alpha=0.1, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    for rows in parts:
        assert (labels[rows] == 1).sum() >= DIRICHLET_FLOOR and (labels[rows] == 0).sum() >= DIRICHLET_FLOOR
    from fedpact.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        dirichlet_indices(labels, 3, alpha=0.0)


@pytest.mark.shared_data
def test_a_worker_parses_and_splits_the_file_once_for_all_its_nodes(shared_data, tmp_path):
    """A simulation worker serves many virtual nodes: one parse and split, not one per message."""
    from fedpact.federation import node_data

    node_data._partitions.cache_clear()
    node_data._simulated.cache_clear()
    job = JobConfig(dataset="bank", partitioning="dirichlet", num_partitions=100, seed=2,
                    home=str(tmp_path))
    config = {"data-dir": str(shared_data)}
    nodes = [load_node_data({**config, "partition-id": i}, job) for i in range(100)]
    again = [load_node_data({**config, "partition-id": i}, job) for i in range(100)]
    assert node_data._partitions.cache_info().misses == 1
    assert all(a is b for a, b in zip(nodes, again, strict=True))
    assert [n.partner for n in nodes] == partition_names("bank-marketing", "dirichlet", 100)
    assert sum(len(n.train) + len(n.test) for n in nodes) == 45_211
