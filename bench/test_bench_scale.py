"""Scale benchmarks: 100 simulated partners, and a 10M-row partner trained from disk.

Run with `make bench` (or: .venv/bin/python -m pytest -m bench -s -p no:cacheprovider
--timeout 3600 bench/test_bench_scale.py). Every measured run is a fresh child process (this
file, run as a script), so the numbers carry no state of the pytest process:

- simulations: wall time, time per round, and the peak memory of the child's whole process tree
  (the ServerApp, Ray's GCS/raylet and the Ray workers that host the virtual nodes), sampled
  every 0.2 s from /proc as the sum of RSS and the sum of PSS (shared pages split between
  processes, so PSS does not count torch's libraries once per worker);
- the 10M-row partner: bank-full.csv rows resampled *with replacement* (seeded) into a CSV in a
  temporary folder; then the node's own code path (`load_node_data` + `train_round`) with the
  file streamed to disk, each phase in its own process, peak = that process's ru_maxrss (which
  includes the memory-mapped pages it touched). Baseline: the in-memory path on 1M rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MiB = 2 ** 20
MEMORY_LIMIT_MB = 2048
# Smaller sizes for a quick try of this file: FEDPACT_BENCH_PARTNERS="3,10" FEDPACT_BENCH_ROWS="20000,50000".
PARTNERS = [int(v) for v in os.environ.get("FEDPACT_BENCH_PARTNERS", "3,100").split(",")]
ROWS = [int(v) for v in os.environ.get("FEDPACT_BENCH_ROWS", "1000000,10000000").split(",")]


# --------------------------------------------------------------------------- measuring


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) if it is gone."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


class TreePeak:
    """Peak of the summed RSS and PSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.rss = self.pss = self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _descendants(self.pid)
            sizes = [_memory(p) for p in pids]
            rss, pss = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
            if rss > self.rss:
                self.rss, self.processes = rss, len(pids)
            self.pss = max(self.pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_child(*args: str, timeout: float = 3000, env: dict | None = None) -> tuple[dict, TreePeak, float]:
    """Run this file as a script with `args`; return its last JSON line, the tree peak, wall s."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE), *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    with TreePeak(proc.pid) as peak:
        out, _ = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, f"child {args} failed ({proc.returncode}):\n{out[-3000:]}"
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]), peak, wall


# --------------------------------------------------------------------------- children


def child_simulation(partners: int, scheme: str, rounds: int, home: str) -> dict:
    """One DP propensity job on bank marketing in Flower's simulation engine."""
    from fedpact.audit import Ledger
    from fedpact.federation.coordinator import partner_datasets
    from fedpact.federation.job import JobConfig
    from fedpact.federation.simulation import run_simulated_job
    from fedpact.privacy.budget import PrivacyBudgets

    job = JobConfig(dataset="bank", partitioning=scheme, num_partitions=partners, rounds=rounds,
                    batch_size=64, learning_rate=0.3, target_epsilon=1.0, target_delta=1e-5,
                    home=home)
    with Ledger.open(job.ledger_path) as ledger:
        for name in partner_datasets(job):
            PrivacyBudgets(ledger).set(name, 10.0, 1e-4, actor="partner_admin:bench")
    marks = []
    started = time.perf_counter()
    result = run_simulated_job(job, on_round=lambda r, _: marks.append(time.perf_counter() - started))
    wall = time.perf_counter() - started
    eps = [p.epsilon for p in result.partners]
    return {"partners": len(result.partners), "rounds": len(result.rounds), "wall_s": wall,
            "round_marks_s": marks, "roc_auc": result.final.get("roc_auc"),
            "eps_max": max(eps), "eps_min": min(eps), "target_epsilon": job.target_epsilon,
            "train_rows_min": min(p.train_rows for p in result.partners),
            "train_rows_max": max(p.train_rows for p in result.partners)}


def child_write_csv(rows: int, path: str) -> dict:
    """bank-full.csv data lines drawn uniformly *with replacement* (seed 0), its header on top."""
    import numpy as np

    from fedpact.models.datasets import shared_data_dir

    started = time.perf_counter()
    header, *lines = (shared_data_dir() / "bank-full.csv").read_text().splitlines()
    lines = np.array(lines, dtype=object)
    rng = np.random.default_rng(0)
    with open(path, "w") as fh:
        fh.write(header + "\n")
        for start in range(0, rows, 1_000_000):
            fh.write("\n".join(lines[rng.integers(0, len(lines), min(1_000_000, rows - start))]) + "\n")
    return {"rows": rows, "bytes": os.path.getsize(path), "seconds": time.perf_counter() - started}


def child_partner(csv: str, mapping: str, state_dir: str, mode: str, dp: str, evaluate: str) -> dict:
    """Load (or stream) one partner CSV and train one local epoch through the node's code path."""
    import resource

    import numpy as np

    from fedpact.federation.job import JobConfig
    from fedpact.federation.local_round import evaluate_round, pipeline_for, train_round
    from fedpact.federation.node_data import load_node_data
    from fedpact.models.networks import build_model

    private = dp == "dp"
    job = JobConfig(dataset="bank", rounds=1, local_epochs=1, batch_size=256, learning_rate=0.05,
                    dp=private, target_epsilon=1.0, target_delta=1e-8, job_id=f"bench-{mode}-{dp}",
                    home=state_dir)
    node_config = {"data-csv": csv, "mapping": mapping, "state-dir": state_dir,
                   "stream-rows": 1 if mode == "stream" else 0}
    t0 = time.perf_counter()
    node = load_node_data(node_config, job)
    loaded = time.perf_counter() - t0
    weights = build_model(job.model, pipeline_for(node).n_features, seed=0).state_dict()
    t0 = time.perf_counter()
    update = train_round(node, weights, job, Path(state_dir) / "node", 1)
    trained = time.perf_counter() - t0
    out = {"mode": mode, "dp": private, "train_rows": len(node.train), "test_rows": len(node.test),
           "load_s": loaded, "train_s": trained, "rows_per_s": len(node.train) / trained,
           "epsilon": update.metrics["epsilon"], "noise_multiplier": update.metrics["noise-multiplier"],
           "steps": update.metrics["steps"], "loss": update.metrics["train-loss"]}
    if evaluate == "eval":
        t0 = time.perf_counter()
        result = evaluate_round(node, update.weights, job)
        out["roc_auc"], out["eval_s"] = result.metrics["roc-auc"], time.perf_counter() - t0
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["finite"] = bool(all(np.isfinite(v.numpy()).all() for v in update.weights.values()))
    return out


# --------------------------------------------------------------------------- benchmarks


@pytest.mark.bench
def test_hundred_simulated_partners(tmp_path, shared_data):
    """5-round DP propensity job: 3 vs 100 partners (iid) and 100 partners (Dirichlet label skew)."""
    runs = []
    for partners, scheme in ((PARTNERS[0], "iid"), (PARTNERS[1], "iid"), (PARTNERS[1], "dirichlet")):
        doc, peak, wall = run_child("sim", str(partners), scheme, "5", str(tmp_path / f"{scheme}-{partners}"))
        marks = doc["round_marks_s"]
        per_round = (marks[-1] - marks[0]) / (len(marks) - 1)
        runs.append((partners, scheme, doc, peak, wall, per_round))
        assert doc["rounds"] == 5 and doc["partners"] == partners
        assert doc["eps_max"] <= doc["target_epsilon"], doc  # every partner within its target
    print("\n| partners | split | rows/partner (train) | job wall | process wall | to round 1 "
          "| per later round | peak tree RSS | peak tree PSS | processes | ε max | ROC-AUC |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for partners, scheme, doc, peak, wall, per_round in runs:
        print(f"| {partners} | {scheme} | {doc['train_rows_min']}–{doc['train_rows_max']} | "
              f"{doc['wall_s']:.1f} s | {wall:.1f} s | {doc['round_marks_s'][0]:.1f} s | {per_round:.1f} s | "
              f"{peak.rss / MiB:.0f} MiB | {peak.pss / MiB:.0f} MiB | {peak.processes} | "
              f"{doc['eps_max']:.3f} | {doc['roc_auc']:.3f} |")
    base = runs[0][5]
    for partners, scheme, *_, per_round in runs[1:]:
        print(f"per-round ratio {partners} {scheme} / {PARTNERS[0]} iid: {per_round / base:.1f}x")


@pytest.mark.bench
def test_ten_million_row_partner(tmp_path, shared_data):
    """One local epoch on a 10M-row partner CSV streamed from disk, with and without DP-SGD;
    baseline: the in-memory path and the streamed path on 1M rows."""
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from test_scale import mapping_file

    from fedpact.models.datasets import BANK_MARKETING

    mapping = str(mapping_file(BANK_MARKETING, tmp_path / "bank.toml"))
    results = []
    for rows in ROWS:
        csv = str(tmp_path / f"bank-{rows}.csv")
        written, _, _ = run_child("csv", str(rows), csv)
        print(f"\nwrote {rows:,} resampled rows ({written['bytes'] / MiB:.0f} MiB) in {written['seconds']:.1f} s")
        state = str(tmp_path / f"node-{rows}")
        modes = [("stream", "plain", "eval"), ("stream", "plain", "-"), ("stream", "dp", "-")]
        if rows == ROWS[0]:
            modes += [("memory", "plain", "-"), ("memory", "dp", "-")]
        for mode, dp, evaluate in modes:
            doc, peak, _ = run_child("partner", csv, mapping, state, mode, dp, evaluate)
            doc["rows"] = rows
            doc["first"] = evaluate == "eval"  # the first streamed run builds the on-disk rows
            results.append(doc)
            print(json.dumps(doc))
            if rows == ROWS[-1]:
                assert doc["max_rss_mb"] <= MEMORY_LIMIT_MB, doc
            if doc["dp"]:
                assert 0 < doc["epsilon"] <= 1.0
    print("\n| rows in file | path | DP | train rows | load / build | local epoch | rows/s | peak RSS | ε |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for doc in results:
        load = f"{doc['load_s']:.1f} s" + (" (build)" if doc["first"] else "")
        print(f"| {doc['rows']:,} | {doc['mode']} | {'DP-SGD' if doc['dp'] else 'plain'} | "
              f"{doc['train_rows']:,} | {load} | {doc['train_s']:.1f} s | {doc['rows_per_s']:,.0f} | "
              f"{doc['max_rss_mb']:.0f} MiB | {doc['epsilon']:.3f} |")
    aucs = [d for d in results if "roc_auc" in d]
    for d in aucs:
        print(f"held-out ROC-AUC after one plain epoch, {d['rows']:,} rows: {d['roc_auc']:.3f} "
              f"(scored {d['test_rows']:,} rows in {d['eval_s']:.1f} s)")


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    if what == "sim":
        partners, scheme, rounds, home = rest
        doc = child_simulation(int(partners), scheme, int(rounds), home)
    elif what == "csv":
        doc = child_write_csv(int(rest[0]), rest[1])
    elif what == "partner":
        doc = child_partner(*rest)
    else:
        raise SystemExit(f"unknown child {what!r}")
    print(json.dumps(doc), flush=True)
