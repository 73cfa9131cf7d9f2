"""DP-SGD settings by measurement: Flower-less FedAvg over the nodes' own `train_round` (the same
DP-SGD, accountant and public encoding as a job), the exact pooled held-out ROC-AUC per run.

    .venv/bin/python bench/tune_dp.py caravan segment \
        '[{"rounds": 15, "batch_size": 768, "learning_rate": 2.0, "max_grad_norm": 0.25}]' 5

Arguments: data set, partitioning, a JSON list of JobConfig settings, runs per setting (default 3).
Prints mean and sd of the AUC per setting (docs/benchmarks.md, "Privacy–utility curve").
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from fedpact.federation.job import JobConfig
from fedpact.federation.local_round import _scores, model_from_weights, pipeline_for, train_round
from fedpact.federation.node_data import simulated_partner
from fedpact.models.networks import build_model


def run(dataset, partitioning, **kw):
    job = JobConfig(dataset=dataset, partitioning=partitioning, require_consent=False,
                    membership_audit=False, **kw)
    nodes = [simulated_partner(job, i) for i in range(job.num_partitions)]
    pipe = pipeline_for(nodes[0])
    w = {k: v.numpy() for k, v in build_model(job.model, pipe.n_features, seed=job.seed).state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        for r in range(1, job.rounds + 1):
            ups = [train_round(n, w, job, Path(d) / n.partner.replace("/", "_"), r) for n in nodes]
            tot = sum(u.rows for u in ups)
            w = {k: sum(np.asarray(u.weights[k], np.float64) * u.rows for u in ups) / tot for k in w}
    model = model_from_weights(w, pipe.n_features, job)
    y = np.concatenate([n.test.labels for n in nodes])
    s = np.concatenate([_scores(model, pipeline_for(n), n.test) for n in nodes])
    return roc_auc_score(y, s)

if __name__ == "__main__":
    dataset, part = sys.argv[1], sys.argv[2]
    grid = json.loads(sys.argv[3])
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    for kw in grid:
        t = time.time()
        aucs = [run(dataset, part, **kw) for _ in range(reps)]
        print(dataset, part, kw, f"AUC mean {np.mean(aucs):.4f} sd {np.std(aucs):.4f}",
              f"{time.time() - t:.0f}s", flush=True)
