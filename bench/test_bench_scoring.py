"""Scoring 1M rows with an exported model: rows/s for TorchScript and ONNX, and peak memory.

Run with `make bench` (or `.venv/bin/python -m pytest -m bench -s bench/test_bench_scoring.py`).
The rows are the 7,043 real telco customers repeated to 1,000,000 (renumbered ids); the model is
the default MLP (46 inputs, 32 hidden units) on the public telco layout with a calibration
correction, exported by fedpact.models.export. Each measurement runs in a fresh Python process
and reports its own peak resident memory (VmHWM from /proc/self/status), so one runtime's peak is
not counted against the other:

- `model, one call`: the model's two input arrays for all 1M rows already in memory, one call;
- `model, chunks`: the same through `scoring.score_rows` (131,072-row chunks, the CLI's path);
- `CSV end to end`: `read_scoring_rows` of a 1M-row CSV (validation with the training rules)
  + `score_rows`, i.e. what `fedpact model score` does, without writing the output.

Every run checks that the 1M scores equal the scores of the 7,043 distinct rows scored alone in
one small batch (row independence at scale) and that ONNX equals TorchScript.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedpact.models.datasets import TELCO_CHURN, load_dataset
from fedpact.models.export import export_onnx, export_torchscript
from fedpact.models.features import FeaturePipeline
from fedpact.models.networks import build_model
from fedpact.models.scoring import Calibration
from fedpact.service.api.testing import write_mapping

pytestmark = pytest.mark.bench

ROWS = 1_000_000

_CHILD = """
import json, sys, time
import numpy as np
from fedpact.models.export import load_exported
from fedpact.models.scoring import encode_inputs, read_scoring_rows, score_rows

def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

mode, model_path, data_path, mapping = sys.argv[1:5]
model = load_exported(model_path)
base = peak_mib()
if mode == "csv":
    t0 = time.perf_counter()
    data = read_scoring_rows(data_path, mapping, layout=model.layout)
    t1 = time.perf_counter()
    frame, _ = score_rows(model, data)
    t2 = time.perf_counter()
    scores = frame["score"].to_numpy()
    out = {"read_s": t1 - t0, "score_s": t2 - t1, "seconds": t2 - t0}
else:
    arrays = np.load(data_path)
    numeric, categorical = arrays["numeric"], arrays["categorical"]
    model.score(numeric[:1000], categorical[:1000])  # warm-up
    if mode == "chunks":  # what score_rows does with the encoded inputs
        t0 = time.perf_counter()
        parts = [model.score(numeric[i:i + 131072], categorical[i:i + 131072])
                 for i in range(0, len(numeric), 131072)]
        scores = np.concatenate(parts)
        t2 = time.perf_counter()
    else:
        t0 = time.perf_counter()
        scores = model.score(numeric, categorical)
        t2 = time.perf_counter()
    out = {"seconds": t2 - t0}
out.update(rows=len(scores), rows_per_s=len(scores) / out["seconds"], peak_mib=peak_mib(),
           loaded_mib=base, runtime=model.runtime)
np.save(sys.argv[5], scores)
print(json.dumps(out))
"""


def _run(mode: str, model: Path, data: Path, mapping: Path, scores: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), mode, str(model), str(data),
                             str(mapping), str(scores)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_scoring")
    telco = load_dataset("telco")
    layout = FeaturePipeline.public(TELCO_CHURN).layout()
    width = sum(len(v) for v in layout["categorical"].values()) + len(layout["numeric"])
    net = build_model("mlp", width, seed=4)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(9))
    torch.save({"state_dict": net.state_dict(), "model": "mlp", "layout": layout}, folder / "model.pt")
    cal = Calibration(0.9, 0.6, "platt")
    export_torchscript(folder / "model.pt", folder / "model.ts.pt", card={"model": "bench@1"}, calibration=cal)
    export_onnx(folder / "model.pt", folder / "model.onnx", card={"model": "bench@1"}, calibration=cal)
    # 1M rows: the real rows repeated, ids renumbered
    reps = -(-ROWS // len(telco))
    index = np.tile(np.arange(len(telco)), reps)[:ROWS]
    frame = telco.features.iloc[index].reset_index(drop=True)
    frame.insert(0, "customerID", [f"c{i:07d}" for i in range(ROWS)])
    frame.to_csv(folder / "rows.csv", index=False)
    from fedpact.models.scoring import encode_inputs

    numeric, categorical = encode_inputs(frame, layout)
    np.savez(folder / "rows.npz", numeric=numeric, categorical=categorical)
    mapping = write_mapping(TELCO_CHURN, folder / "telco.toml")
    # the distinct rows, scored in one small batch (TorchScript): the reference for every run
    from fedpact.models.export import load_exported

    n, c = encode_inputs(telco.features, layout)
    reference = load_exported(folder / "model.ts.pt").score(n, c)[index]
    return folder, mapping, reference


def test_scoring_one_million_rows(setup):
    folder, mapping, reference = setup
    results = {}
    for runtime, model in (("torchscript", folder / "model.ts.pt"), ("onnx", folder / "model.onnx")):
        for mode, data in (("call", folder / "rows.npz"), ("chunks", folder / "rows.npz"),
                           ("csv", folder / "rows.csv")):
            scores_path = folder / f"scores-{runtime}-{mode}.npy"
            results[(runtime, mode)] = r = _run(mode, model, data, mapping, scores_path)
            scores = np.load(scores_path)
            assert len(scores) == ROWS
            diff = float(np.abs(scores - reference).max())
            r["max_diff_vs_rows_alone"] = diff
            assert diff <= 1e-6, (runtime, mode, diff)
    print()
    print(f"{'runtime':12} {'mode':8} {'seconds':>8} {'rows/s':>12} {'peak MiB':>9} {'after load':>10} "
          f"{'max |Δ| vs small batch':>22}")
    for (runtime, mode), r in results.items():
        print(f"{runtime:12} {mode:8} {r['seconds']:8.2f} {r['rows_per_s']:12,.0f} {r['peak_mib']:9.0f} "
              f"{r['loaded_mib']:10.0f} {r['max_diff_vs_rows_alone']:22.1e}"
              + (f"  (read+validate {r['read_s']:.2f} s, score {r['score_s']:.2f} s)" if mode == "csv" else ""))
    pd.DataFrame([{"runtime": k[0], "mode": k[1], **v} for k, v in results.items()]).to_json(
        folder / "results.json", orient="records")
