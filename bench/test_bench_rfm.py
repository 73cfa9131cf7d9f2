"""RFM feature building at scale: a 10M-row purchase log, streamed in chunks vs loaded whole.

Run with `make bench` (or `.venv/bin/python -m pytest -m bench -s bench/test_bench_rfm.py`).
Each measurement runs in a fresh Python process and reports its own peak resident memory (VmHWM
from /proc/self/status; ru_maxrss is not used because it keeps the parent's peak across fork+exec).
Two logs, both sorted by time, 1997-01-01 .. 1998-06-30, cut-off 1997-10-01, 180-day labels:

- `cdnow x144`: the real CDNOW log repeated 144 times with renumbered customers (10M rows,
  3.39M customers, about 3 purchases each: the hardest shape, state grows with customers);
- `retail 250k`: 250,000 customers with about 40 purchases each (synthetic, uniform dates,
  log-normal amounts); also at 2.5M rows, to show that memory does not grow with rows.

The naive baseline is what one would write first: pandas.read_csv of the whole file, then groupby
recency / frequency / monetary / churn. Both report the same checksums of those four columns.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fedpact.models.rfm import CDNOW_TRANSACTIONS, cdnow_log_path
from fedpact.models.transactions import load_transactions

pytestmark = pytest.mark.bench

ROWS = 10_000_000
CUTOFF = "1997-10-01"
HORIZON = 180

_PRELUDE = """
import json, sys, time
import numpy as np, pandas as pd

def peak_mib():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024

path, cutoff, horizon = sys.argv[1], pd.Timestamp(sys.argv[2]), float(sys.argv[3])
imports_mib = peak_mib()
t0 = time.perf_counter()
"""
_REPORT = """
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rows": rows, "customers": int(len(freq)),
                  "peak_mib": peak_mib(), "imports_mib": imports_mib,
                  "check": [float(freq.sum()), round(float(spend.sum()), 2),
                            float(recency.sum()), int(churn.sum())]}))
"""
STREAMING = _PRELUDE + """
from fedpact.models.rfm import stream_rfm
from fedpact.models.transactions import TransactionSpec
table = stream_rfm(path, TransactionSpec(), cutoff, horizon_days=horizon)
rows = table.report.rows_read
f = table.features
freq, spend, recency, churn = f["frequency"], f["monetary_total"], f["recency_days"], table.labels["churn"]
""" + _REPORT
NAIVE = _PRELUDE + """
df = pd.read_csv(path, dtype={"customer_id": str})
df["timestamp"] = pd.to_datetime(df["timestamp"], format="%Y-%m-%d")
rows = len(df)
past = df[df["timestamp"] < cutoff]
g = past.groupby("customer_id")
freq, spend = g.size(), g["amount"].sum()
recency = (cutoff - g["timestamp"].max()) / pd.Timedelta(days=1)
window = df[(df["timestamp"] >= cutoff) & (df["timestamp"] < cutoff + pd.Timedelta(days=horizon))]
churn = ~freq.index.isin(window["customer_id"].unique())
""" + _REPORT


def _run(script: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(path), CUTOFF,
                          str(HORIZON)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write(frame: pl.DataFrame, path: Path) -> Path:
    frame.select(
        pl.col("customer_id"),
        pl.col("timestamp").dt.strftime("%Y-%m-%d"),
        pl.col("amount").round(2),
    ).write_csv(path)
    return path


def cdnow_tiled(path: Path, rows: int) -> Path:
    """The CDNOW log repeated with renumbered customers, merged in time order."""
    base = _cdnow_polars()
    copies = -(-rows // base.height)
    tiled = (base.join(pl.DataFrame({"copy": np.arange(copies)}), how="cross")
             .sort(["timestamp", "copy"], maintain_order=True).head(rows)
             .with_columns(pl.format("{}-{}", pl.col("copy"), pl.col("customer_id")).alias("customer_id")))
    return _write(tiled, path)


def _cdnow_polars() -> pl.DataFrame:
    frame = load_transactions(cdnow_log_path(), CDNOW_TRANSACTIONS).frame
    return pl.DataFrame({"customer_id": frame["customer_id"].to_numpy(dtype=object),
                         "timestamp": frame["timestamp"].to_numpy(),
                         "amount": frame["amount"].to_numpy()})


def retail(path: Path, rows: int, customers: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    days = np.sort(rng.integers(0, 546, rows))
    frame = pl.DataFrame({
        "customer_id": rng.integers(0, customers, rows),
        "timestamp": np.datetime64("1997-01-01") + days.astype("timedelta64[D]"),
        "amount": rng.lognormal(3.0, 0.8, rows),
    }).with_columns(pl.format("C{}", pl.col("customer_id")).alias("customer_id"))
    return _write(frame, path)


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rfm-bench")
    return {
        "cdnow x144, 10M rows": cdnow_tiled(folder / "cdnow_x144.csv", ROWS),
        "retail 250k, 10M rows": retail(folder / "retail_10m.csv", ROWS, 250_000),
        "retail 250k, 2.5M rows": retail(folder / "retail_2m5.csv", ROWS // 4, 250_000),
    }


def test_streaming_vs_naive_feature_building(logs):
    print("\n| log | method | rows | customers | seconds | rows/s | peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    results = {}
    for name, path in logs.items():
        for method, script in (("streamed (polars chunks of 1M)", STREAMING),
                               ("naive (pandas, whole file)", NAIVE)):
            r = _run(script, path)
            results[name, method] = r
            print(f"| {name} | {method} | {r['rows']:,} | {r['customers']:,} | {r['seconds']:.1f} | "
                  f"{r['rows'] / r['seconds']:,.0f} | {r['peak_mib']:,.0f} |")
    for name in logs:
        streamed, naive = (results[name, m] for m in ("streamed (polars chunks of 1M)",
                                                      "naive (pandas, whole file)"))
        assert streamed["rows"] == naive["rows"]
        assert streamed["customers"] == naive["customers"]
        np.testing.assert_allclose(streamed["check"], naive["check"], rtol=1e-9)
    for method in ("streamed (polars chunks of 1M)", "naive (pandas, whole file)"):
        small, large = (results[f"retail 250k, {n} rows", method] for n in ("2.5M", "10M"))
        print(f"{method}, retail 250k: peak {small['peak_mib']:,.0f} MiB at 2.5M rows, "
              f"{large['peak_mib']:,.0f} MiB at 10M rows (imports alone: {large['imports_mib']:,.0f})")
    small, large = (results[f"retail 250k, {n} rows", "streamed (polars chunks of 1M)"]
                    for n in ("2.5M", "10M"))
    assert large["peak_mib"] < 1.25 * small["peak_mib"]  # streamed: memory does not grow with rows
