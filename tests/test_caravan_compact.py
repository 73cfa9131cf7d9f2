"""The compact Caravan mapping the demo's Caravan job uses: same rows and partner datasets as
`caravan`, a smaller public layout (docs/benchmarks.md, "Small partners: Caravan")."""

from fedpact.federation.coordinator import partner_datasets
from fedpact.federation.job import JobConfig
from fedpact.models.datasets import CARAVAN_COMPACT, CARAVAN_INSURANCE, load_dataset
from fedpact.models.features import FeaturePipeline
from fedpact.service.demo import DEMO_TUNED, demo_jobs


def test_compact_caravan_keeps_the_rows_and_drops_the_duplicated_columns():
    full, compact = load_dataset("caravan"), load_dataset("caravan-compact")
    assert len(compact) == len(full) == 5_822
    assert (compact.labels == full.labels).all()
    assert "MOSTYPE" not in compact.features.columns
    assert not [c for c in compact.features.columns if c.startswith("A")]
    assert set(compact.features.columns) < set(full.features.columns)
    pipe = FeaturePipeline.public(CARAVAN_COMPACT)
    assert pipe.is_public and pipe.n_features == 72
    assert FeaturePipeline.public(CARAVAN_INSURANCE).n_features == 134


def test_compact_caravan_has_the_same_partner_datasets_and_budgets():
    def names(dataset):
        return partner_datasets(JobConfig(dataset=dataset, partitioning="segment", num_partitions=3))

    assert names("caravan-compact") == names("caravan")


def test_the_demo_caravan_job_uses_the_compact_mapping_and_its_tuned_settings(tmp_path):
    caravan = [job for job in demo_jobs(tmp_path) if job.task == "propensity"]
    assert [job.dataset for job in caravan] == ["caravan-compact"]
    assert set(DEMO_TUNED) == {"caravan-compact"}
