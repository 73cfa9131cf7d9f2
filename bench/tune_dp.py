"""DP-SGD settings by measurement: Flower-less FedAvg over the nodes' own `train_round` (the same
DP-SGD, accountant, CSPRNG sampling and public encoding as a job), the exact pooled held-out
ROC-AUC per run.

    .venv/bin/python bench/tune_dp.py caravan segment \
        '[{"rounds": 15, "batch_size": 768, "learning_rate": 2.0, "max_grad_norm": 0.25}]' 5

Arguments: data set, partitioning, a JSON list of settings, runs per setting (default 3), and
optionally a comma list of job seeds (each seed is another train/held-out split and model start;
the runs are made for every seed, and the mean and sd are over all of them).
A setting holds JobConfig fields plus two encoding keys, each a change of the mapping only
(public, no statistic of any row):
  "drop":  feature columns left out of the mapping (fnmatch patterns, e.g. ["MOSTYPE", "A*"]);
  "zero_init": true starts the global model at zero weights (build_model draws the logistic
           regression's weights uniformly in ±1/√inputs from the job seed) — a change of the
           model's initialisation, measured here, not a job setting today;
  "zero_based": true declares each bound [lo, hi] as [2·lo − hi, hi], so that the public
           pipeline's [-1, 1] map sends lo → 0 and hi → 1 (a [0, 1] scaling; values are still
           clipped to public bounds).
Prints mean and sd of the AUC per setting (docs/benchmarks.md). With `refs` as the settings
argument it prints the non-private references instead (centralised on the pooled rows, and the
local models averaged; models.baselines.compare_baselines) on the encoding of each "drop":

    .venv/bin/python bench/tune_dp.py caravan segment refs '[[], ["MOSTYPE", "A*"]]' 0,1,2
"""
import fnmatch
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from fedpact.federation.job import JobConfig
from fedpact.federation.local_round import _scores, model_from_weights, pipeline_for, train_round
from fedpact.federation.node_data import NodeData, simulated_partner
from fedpact.models.networks import build_model


def encoded(node: NodeData, drop=(), zero_based=False) -> NodeData:
    """The node with its mapping changed: columns in `drop` left out, bounds zero-based."""
    if not drop and not zero_based:
        return node
    spec = node.train.spec

    def keep(cols):
        return tuple(c for c in cols if not any(fnmatch.fnmatchcase(c, p) for p in drop))

    numeric = keep(spec.numeric)
    bounds = {c: spec.bounds[c] for c in numeric}
    if zero_based:
        bounds = {c: (2 * lo - hi, hi) for c, (lo, hi) in bounds.items()}
    categorical = keep(spec.categorical)
    spec = replace(spec, categorical=categorical, numeric=numeric, bounds=bounds,
                   categories={c: spec.categories[c] for c in categorical})

    def cut(part):
        return replace(part, spec=spec, features=part.features[list(spec.features)])

    return NodeData(node.partner, cut(node.train), cut(node.test))


def run(dataset, partitioning, drop=(), zero_based=False, zero_init=False, **kw):
    job = JobConfig(dataset=dataset, partitioning=partitioning, require_consent=False,
                    membership_audit=False, **kw)
    nodes = [encoded(simulated_partner(job, i), drop, zero_based) for i in range(job.num_partitions)]
    pipe = pipeline_for(nodes[0])
    w = {k: v.numpy() for k, v in build_model(job.model, pipe.n_features, seed=job.seed).state_dict().items()}
    if zero_init:  # the global model starts at all-zero weights instead of build_model's random ones
        w = {k: np.zeros_like(v) for k, v in w.items()}
    with tempfile.TemporaryDirectory() as d:
        for r in range(1, job.rounds + 1):
            ups = [train_round(n, w, job, Path(d) / n.partner.replace("/", "_"), r) for n in nodes]
            tot = sum(u.rows for u in ups)
            w = {k: sum(np.asarray(u.weights[k], np.float64) * u.rows for u in ups) / tot for k in w}
    model = model_from_weights(w, pipe.n_features, job)
    y = np.concatenate([n.test.labels for n in nodes])
    s = np.concatenate([_scores(model, pipeline_for(n), n.test) for n in nodes])
    return roc_auc_score(y, s)


def refs(dataset, partitioning, drop=(), **kw):
    """Centralised and averaged-local non-private ROC-AUC on the pooled held-out rows, with the
    references' own plain-SGD settings (as the demo's comparison table)."""
    from fedpact.models.baselines import compare_baselines

    job = JobConfig(dataset=dataset, partitioning=partitioning, require_consent=False, **kw)
    nodes = [encoded(simulated_partner(job, i), drop) for i in range(job.num_partitions)]
    report = compare_baselines([n.train for n in nodes], [n.test for n in nodes], kind=job.model,
                               seed=job.seed)
    return report.centralised["roc_auc"], report.local_ensemble["roc_auc"]


if __name__ == "__main__":
    dataset, part = sys.argv[1], sys.argv[2]
    if sys.argv[3] == "refs":
        seeds = [int(x) for x in sys.argv[5].split(",")] if len(sys.argv) > 5 else [0]
        for drop in json.loads(sys.argv[4]) if len(sys.argv) > 4 else [[]]:
            t = time.time()
            both = np.array([refs(dataset, part, drop, seed=seed) for seed in seeds])
            print(dataset, part, {"drop": drop}, "seeds", seeds,
                  "centralised AUC", " ".join(f"{a:.4f}" for a in both[:, 0]), f"mean {both[:, 0].mean():.4f}",
                  "| local averaged AUC", " ".join(f"{a:.4f}" for a in both[:, 1]), f"mean {both[:, 1].mean():.4f}",
                  f"{time.time() - t:.0f}s", flush=True)
        sys.exit()
    grid = json.loads(sys.argv[3])
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    seeds = [int(x) for x in sys.argv[5].split(",")] if len(sys.argv) > 5 else [None]
    for kw in grid:
        t = time.time()
        per_seed = {seed: [run(dataset, part, **kw, **({} if seed is None else {"seed": seed}))
                           for _ in range(reps)] for seed in seeds}
        aucs = [a for runs in per_seed.values() for a in runs]
        detail = " ".join(f"{a:.3f}" for a in aucs) if seeds == [None] else " ".join(
            f"seed {seed}: {np.mean(runs):.3f}" for seed, runs in per_seed.items())
        print(dataset, part, kw, f"AUC mean {np.mean(aucs):.4f} sd {np.std(aucs):.4f}",
              f"n {len(aucs)}", detail, f"{time.time() - t:.0f}s", flush=True)
