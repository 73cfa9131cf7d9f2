"""The coordinator's released AUC by measurement: histogram bins and the ε share of evaluation.

The coordinator's ROC-AUC comes from the partners' DP score histograms (10 bins on logit
−5…3, Gaussian noise σ_eval = `eval_noise_multiplier` per bin and partner, after the last round;
`local_round.evaluate_round`, `models.metrics`). Two ways to tighten it:

- more bins: free in ε (one row is one count in one bin, L2 sensitivity 1 whatever the bin
  count), but every bin gets its own noise;
- a smaller σ_eval: a larger share of the job's ε for the evaluation, so DP-SGD's σ rises
  (`local_round.plan_for` composes both) and the model itself may get worse.

For each σ_eval this trains the job the nodes' own way (Flower-less FedAvg over `train_round`:
the same DP-SGD, accountant plan, CSPRNG sampling and public encoding as a job), takes the exact
pooled held-out ROC-AUC of the final model, then, for each bin count, the released AUC over
`draws` independent noise draws of the release mechanism (the exact per-bin counts of
`models.metrics.release_histogram` on that bin layout + N(0, σ_eval²) per bin and partner, pooled,
`metrics_from_released`). The noise is drawn here, not by `evaluate_round`, so that one trained
model can be released many times; the mechanism is the same.

    .venv/bin/python bench/tune_eval_release.py telco segment '[10, 5, 3]' '[10, 20, 40]' 3

Arguments: data set, partitioning, JSON list of σ_eval, JSON list of bin layouts (a bin count,
edges evenly spaced on logit −5…3 as today's 10, or [bins, lowest, highest logit edge]), training runs per σ_eval (default 3), noise draws per
run (default 200), and a JSON object of JobConfig settings over the demo's (e.g. Caravan's
`demo.DEMO_TUNED` settings). Prints one Markdown row per (σ_eval, bins): DP-SGD σ, exact AUC (mean ± sd
over runs), the binned AUC without noise, the released AUC (mean), its mean error against the
exact AUC and the RMS of that error. ε = 1, δ = 1e-5, the demo's settings otherwise. A σ_eval
whose evaluation alone would spend the job's ε is refused by the planner (ConfigurationError).
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

import fedpact.models.metrics as metrics
from fedpact.federation.job import JobConfig
from fedpact.federation.local_round import _scores, model_from_weights, pipeline_for, train_round
from fedpact.federation.node_data import simulated_partner
from fedpact.models.networks import build_model
from fedpact.service.demo import DEMO_DEFAULTS

DEFAULT_EDGES = metrics.RELEASE_LOGIT_EDGES.copy()


def train(dataset: str, partitioning: str, sigma_eval: float, settings=None):
    """One job's training; returns (DP-SGD σ, [(labels, scores) per partner's held-out rows])."""
    job = JobConfig(dataset=dataset, partitioning=partitioning, require_consent=False,
                    membership_audit=False, target_epsilon=1.0, target_delta=1e-5,
                    eval_noise_multiplier=sigma_eval, **{**DEMO_DEFAULTS, **(settings or {})})
    nodes = [simulated_partner(job, i) for i in range(job.num_partitions)]
    pipe = pipeline_for(nodes[0])
    w = {k: v.numpy() for k, v in
         build_model(job.model, pipe.n_features, seed=job.seed).state_dict().items()}
    sigma = 0.0
    with tempfile.TemporaryDirectory() as d:
        for r in range(1, job.rounds + 1):
            ups = [train_round(n, w, job, Path(d) / n.partner.replace("/", "_"), r) for n in nodes]
            sigma = float(ups[0].metrics["noise-multiplier"])
            tot = sum(u.rows for u in ups)
            w = {k: sum(np.asarray(u.weights[k], np.float64) * u.rows for u in ups) / tot for k in w}
    model = model_from_weights(w, pipe.n_features, job)
    return sigma, [(n.test.labels, _scores(model, pipeline_for(n), n.test)) for n in nodes]


def released(held_out, layout, sigma_eval: float, draws: int, rng) -> tuple[float, np.ndarray]:
    """(binned AUC without noise, released AUCs over `draws` noise draws) on the bin `layout`:
    a bin count (logit −5…3, as today) or [bins, lowest logit edge, highest logit edge]."""
    bins, lo, hi = (layout, DEFAULT_EDGES[0], DEFAULT_EDGES[-1]) if isinstance(layout, int | float) \
        else layout
    bins = int(bins)
    metrics.RELEASE_LOGIT_EDGES = np.linspace(lo, hi, bins + 1)
    try:
        hists = [metrics.release_histogram(y, s) for y, s in held_out]
        pos, neg = sum(h[0] for h in hists), sum(h[1] for h in hists)
        clean = metrics.metrics_from_released(pos, neg)["roc_auc"]
        aucs = []
        for _ in range(draws):
            noisy = [(p + sigma_eval * rng.standard_normal(bins),
                      n + sigma_eval * rng.standard_normal(bins)) for p, n in hists]
            aucs.append(metrics.metrics_from_released(sum(h[0] for h in noisy),
                                                      sum(h[1] for h in noisy))["roc_auc"])
        return clean, np.asarray(aucs)
    finally:
        metrics.RELEASE_LOGIT_EDGES = DEFAULT_EDGES


def main(argv: list[str]) -> None:
    dataset, partitioning = argv[0], argv[1]
    sigmas, bin_counts = json.loads(argv[2]), json.loads(argv[3])
    runs = int(argv[4]) if len(argv) > 4 else 3
    draws = int(argv[5]) if len(argv) > 5 else 200
    settings = json.loads(argv[6]) if len(argv) > 6 else {}
    rng = np.random.default_rng()
    print(f"\n{dataset} / {partitioning}, ε = 1, {runs} runs × {draws} noise draws, "
          f"settings {json.dumps({**DEMO_DEFAULTS, **settings})}\n")
    print("| σ_eval | DP-SGD σ | bins | ROC-AUC exact | binned, no noise | released (mean) | "
          "released − exact | RMS error |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sigma_eval in sigmas:
        t0 = time.perf_counter()
        trained = [train(dataset, partitioning, float(sigma_eval), settings) for _ in range(runs)]
        exact = np.array([roc_auc_score(np.concatenate([y for y, _ in h]),
                                        np.concatenate([s for _, s in h])) for _, h in trained])
        for bins in bin_counts:
            clean, errs, means = [], [], []
            for (_, held_out), ex in zip(trained, exact, strict=True):
                c, aucs = released(held_out, bins, float(sigma_eval), draws, rng)
                clean.append(c)
                means.append(aucs.mean())
                errs.append(aucs - ex)
            errs = np.concatenate(errs)
            shown = bins if isinstance(bins, int | float) else f"{bins[0]} on logit {bins[1]}…{bins[2]}"
            print(f"| {sigma_eval} | {np.mean([s for s, _ in trained]):.3f} | {shown} | "
                  f"{exact.mean():.3f} ± {exact.std():.3f} | {np.mean(clean):.3f} | "
                  f"{np.mean(means):.3f} | {errs.mean():+.3f} | {np.sqrt((errs ** 2).mean()):.3f} |",
                  flush=True)
        print(f"<!-- σ_eval {sigma_eval}: {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
