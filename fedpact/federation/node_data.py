"""Which rows a partner node trains on: its own CSV (deployment) or a simulated partition."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from fedpact.models.datasets import PartnerData, load_dataset, load_partner_csv

from .job import JobConfig
from .partition import partition


@dataclass
class NodeData:
    """A partner's name and its local train and test rows."""

    partner: str
    train: PartnerData
    test: PartnerData

    @property
    def columns(self) -> list[str]:
        return list(self.train.spec.features)


@lru_cache(maxsize=8)
def _simulated(dataset: str, scheme: str, n: int, seed: int, test_fraction: float, index: int,
               data_dir: str | None) -> NodeData:
    parts = partition(load_dataset(dataset, data_dir), scheme, n, seed=seed)
    part = parts[index]
    train, test = part.data.split(test_fraction, seed)
    return NodeData(part.name, train, test)


@lru_cache(maxsize=8)
def _own_csv(csv: str, mapping: str, name: str, seed: int, test_fraction: float) -> NodeData:
    data = load_partner_csv(csv, mapping)
    train, test = data.split(test_fraction, seed)
    return NodeData(name or data.spec.name, train, test)


def load_node_data(node_config, job: JobConfig) -> NodeData:
    """Rows for this node: `data-csv` + `mapping` from the node's own config, else its partition."""
    node_config = dict(node_config)
    if "data-csv" in node_config:
        return _own_csv(str(node_config["data-csv"]), str(node_config["mapping"]),
                        str(node_config.get("partner", "")), job.seed, job.test_fraction)
    index = int(node_config.get("partition-id", 0))
    data_dir = node_config.get("data-dir")
    return _simulated(job.dataset, job.partitioning, job.num_partitions, job.seed,
                      job.test_fraction, index, str(data_dir) if data_dir else None)
