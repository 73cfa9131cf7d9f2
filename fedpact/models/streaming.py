"""Out-of-core local training: a partner table too large for memory, kept as compact arrays on disk.

`build_stream` reads a partner CSV once, in chunks (`pandas.read_csv(chunksize=...)`): each chunk is
validated by the same `validate_frame` as the in-memory loader, its rows are dealt to train or test
by a seeded draw, and appended to raw binary files — category codes (int32), numbers (float64,
as parsed) and labels (uint8). The feature statistics the in-memory `FeaturePipeline.fit` computes
on the training rows (means and standard deviations, merged chunk by chunk with Chan's formula;
categories as declared, else the sorted values seen in training rows) come out of the same pass.

`StreamedRows` opens those files as `np.memmap` and encodes a batch of rows on request with the
fitted pipeline's arithmetic, so its feature vectors are the in-memory path's. A map-style
`torch` Dataset over it (`__getitems__`: one gather per batch) feeds:

- `shuffled_loader` — plain shuffled mini-batches (no DP);
- `poisson_loader` — Poisson sampling at rate q for DP-SGD, drawn in O(q·n) per step from
  geometric gaps between selected rows: the same law as Opacus' `UniformWithReplacementSampler`
  (every row independently with probability q), which draws n uniforms per step and so costs
  O(n²/batch) per epoch — an hour per epoch at 8M rows. Rate and steps are the ones the
  accountant records (`local_round.plan_for`), so its history is the in-memory path's.

Memory is bounded by the batch plus the pages of the memmaps the OS keeps resident: about
(4·categorical + 8·numeric + 1) bytes a row, 85 bytes for bank marketing (0.85 GB at 10M rows).
No Flower and no privacy accounting here: `fedpact.federation.local_round` uses these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fedpact.errors import ConfigurationError, DataValidationError
from fedpact.models.datasets import DatasetSpec, validate_frame
from fedpact.models.features import CLIP_SD, FeaturePipeline, undeclared_settings

# Partner CSVs with more data rows than this train from disk (node-config `stream-rows` or the
# environment variable FEDPACT_STREAM_ROWS override it; 0 turns streaming off). At 1M bank rows
# the streamed path was already faster and smaller than the in-memory one (docs/benchmarks.md).
DEFAULT_STREAM_ROWS = 1_000_000
DEFAULT_CHUNK_ROWS = 250_000
FORMAT_VERSION = 2  # 2: public pipelines (declared bounds) are stored with their bounds
_PARTS = ("train", "test")


def stream_threshold(configured=None) -> int:
    """Rows above which a partner's CSV is streamed: `configured`, else $FEDPACT_STREAM_ROWS, else
    DEFAULT_STREAM_ROWS; 0 means never."""
    value = configured if configured not in (None, "") else os.environ.get("FEDPACT_STREAM_ROWS")
    if value in (None, ""):
        return DEFAULT_STREAM_ROWS
    try:
        rows = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"stream-rows = {value!r}: give a number of rows (0 = never stream)") from None
    if rows < 0:
        raise ConfigurationError(f"stream-rows = {rows}: must be 0 (never) or positive")
    return rows


_ROW_COUNTS: dict[tuple[str, int, int], int] = {}


def count_data_rows(path: str | Path) -> int:
    """Data rows of a CSV (newlines after the header), without parsing; cached per file version."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _ROW_COUNTS:
        lines, last = 0, b"\n"
        with open(path, "rb") as fh:
            while block := fh.read(1 << 24):
                lines += block.count(b"\n")
                last = block[-1:]
        if last != b"\n":
            lines += 1  # no newline after the last row
        _ROW_COUNTS[key] = max(0, lines - 1)
    return _ROW_COUNTS[key]


# --------------------------------------------------------------------------- the on-disk rows


@dataclass
class StreamedRows:
    """Rows of one partner (its train or its test part) on disk, encoded on demand.

    Quacks like `PartnerData` where the federation needs it (`spec`, `source`, `notes`, `labels`,
    `ids`, `len()`); there is no `features` table — use `encode` or `dataset()`.
    """

    spec: DatasetSpec
    source: str
    folder: Path
    rows: int
    pipeline: FeaturePipeline
    lookups: list[np.ndarray]
    notes: list[str] = field(default_factory=list)
    ids = None  # no subject ids are kept: consent cannot be enforced on streamed rows (yet)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self._maps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        sizes = [len(v) for v in self.pipeline.categorical.values()]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)[:-1]
        self._mu = np.array([self.pipeline.means[c] for c in self.pipeline.numeric], dtype=np.float64)
        self._sd = np.array([self.pipeline.scales[c] for c in self.pipeline.numeric], dtype=np.float64)
        bounds = self.pipeline.bounds
        self._lo = np.array([bounds[c][0] if c in bounds else -np.inf for c in self.pipeline.numeric])
        self._hi = np.array([bounds[c][1] if c in bounds else np.inf for c in self.pipeline.numeric])

    def __len__(self) -> int:
        return self.rows

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    @property
    def features(self):
        raise AttributeError("streamed rows have no in-memory feature table; use encode() or dataset()")

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._maps is None:
            n, c, p = self.rows, len(self.pipeline.categorical), len(self.pipeline.numeric)

            def open_(name: str, dtype, shape):
                if n == 0 or 0 in shape:
                    return np.zeros(shape, dtype)
                return np.memmap(self.folder / name, dtype=dtype, mode="r", shape=shape)

            self._maps = (open_("codes.bin", np.int32, (n, c)), open_("num.bin", np.float64, (n, p)),
                          open_("y.bin", np.uint8, (n,)))
        return self._maps

    @property
    def labels(self) -> np.ndarray:
        """0/1 labels as float32 (4 bytes a row in memory: 32 MB for 8M rows)."""
        return np.asarray(self._arrays()[2], dtype=np.float32)

    @property
    def positive_rate(self) -> float:
        return float(self.labels.mean()) if self.rows else float("nan")

    def encode(self, index: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """Feature matrix (float32, the fitted pipeline's layout) and labels of the rows in `index`."""
        codes_mm, num_mm, y_mm = self._arrays()
        codes, num, y = codes_mm[index], num_mm[index], y_mm[index]
        k = len(y)
        X = np.zeros((k, self.pipeline.n_features), dtype=np.float32)
        for j, lookup in enumerate(self.lookups):
            final = lookup[codes[:, j]]
            hit = np.flatnonzero(final >= 0)
            X[hit, self._offsets[j] + final[hit]] = 1.0
        if len(self._mu):
            # The arithmetic of FeaturePipeline.transform, column for column.
            num = np.clip(num, self._lo, self._hi)  # declared bounds (public pipelines)
            X[:, self.pipeline.n_features - len(self._mu):] = np.clip((num - self._mu) / self._sd, -CLIP_SD, CLIP_SD)
        return X, y.astype(np.float32)

    def chunks(self, size: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(X, y) over all rows in file order, `size` rows at a time."""
        for start in range(0, self.rows, size):
            yield self.encode(slice(start, min(start + size, self.rows)))

    def dataset(self) -> RowsDataset:
        return RowsDataset(self)


class RowsDataset(Dataset):
    """Map-style Dataset over streamed rows; a DataLoader fetches a whole batch with one gather."""

    def __init__(self, rows: StreamedRows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        X, y = self.rows.encode(np.array([int(i)]))
        return torch.from_numpy(X[0]), torch.from_numpy(y)[0]

    def __getitems__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.sort(np.asarray(indices, dtype=np.int64))  # file order: fewer page faults
        X, y = self.rows.encode(index)
        return torch.from_numpy(X), torch.from_numpy(y)


def _as_batch(batch):
    """`__getitems__` already returns the batch as (X, y) tensors."""
    return batch


class ShuffledBatches(Sampler):
    """Each epoch a fresh permutation of the rows, cut into batches (the last one smaller)."""

    def __init__(self, n: int, batch_size: int, seed: int | None = 0):
        self.n, self.batch_size = n, batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return max(1, -(-self.n // self.batch_size))

    def __iter__(self):
        order = self.rng.permutation(self.n)
        for start in range(0, self.n, self.batch_size):
            yield order[start:start + self.batch_size]


def poisson_sample(rng: np.random.Generator, n: int, q: float) -> np.ndarray:
    """Each of `n` rows independently with probability `q`, sorted, in O(q·n) time.

    The gaps between successes of independent Bernoulli(q) trials are i.i.d. Geometric(q), so
    walking geometric gaps selects exactly the rows a coin per row would.
    """
    if q >= 1.0:
        return np.arange(n, dtype=np.int64)
    if q <= 0.0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    picked, position = [], -1
    expected = n * q
    while True:
        gaps = rng.geometric(q, size=int(expected + 6 * math.sqrt(expected) + 16))
        index = position + np.cumsum(gaps)
        if index[-1] >= n:
            picked.append(index[index < n])
            return np.concatenate(picked)
        picked.append(index)
        position = int(index[-1])


class PoissonBatches(Sampler):
    """Opacus' Poisson batches (rows i.i.d. with probability q; `int(1 / q)` batches an epoch)."""

    def __init__(self, n: int, sample_rate: float, seed: int | None = 0, steps: int | None = None):
        if not 0 < sample_rate <= 1:
            raise ConfigurationError(f"sampling rate {sample_rate} is outside (0, 1]")
        self.n, self.sample_rate = n, sample_rate
        self.steps = steps if steps is not None else int(1 / sample_rate)  # as Opacus counts them
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield poisson_sample(self.rng, self.n, self.sample_rate)


def shuffled_loader(rows: StreamedRows, batch_size: int, *, seed: int | None = 0) -> DataLoader:
    """Shuffled mini-batches over streamed rows; len() = ceil(rows / batch) like `make_loader`."""
    return DataLoader(rows.dataset(), batch_sampler=ShuffledBatches(len(rows), batch_size, seed),
                      collate_fn=_as_batch)


def poisson_loader(rows: StreamedRows, sample_rate: float, *, steps: int | None = None,
                   seed: int | None = 0) -> DataLoader:
    """Poisson-sampled batches for DP-SGD (what Opacus' DPDataLoader yields, at O(q·n) a step):
    `steps` batches (default int(1 / sample_rate), Opacus' count), each row in a batch with
    probability `sample_rate`."""
    return DataLoader(rows.dataset(), batch_sampler=PoissonBatches(len(rows), sample_rate, seed, steps),
                      collate_fn=_as_batch)


@torch.no_grad()
def predict_rows(model: torch.nn.Module, rows: StreamedRows, batch_size: int = 65_536) -> np.ndarray:
    """Predicted probability of the positive class for every row, in file order."""
    model.eval()
    out = [torch.sigmoid(model(torch.from_numpy(X)).squeeze(-1)).numpy() for X, _ in rows.chunks(batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --------------------------------------------------------------------------- building the files


@dataclass
class StreamedTable:
    """A partner CSV on disk: its train and test rows and the pipeline fitted on the train rows."""

    train: StreamedRows
    test: StreamedRows
    pipeline: FeaturePipeline
    folder: Path
    seconds: float = 0.0
    reused: bool = False


class _Moments:
    """Count, mean and sum of squared deviations per column, merged chunk by chunk (Chan et al.)."""

    def __init__(self, columns: int):
        self.n = 0
        self.mean = np.zeros(columns)
        self.m2 = np.zeros(columns)

    def add(self, values: np.ndarray) -> None:
        k = len(values)
        if k == 0:
            return
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * k / total)
        self.n = total


def _key(csv: Path, spec: DatasetSpec, seed: int, test_fraction: float) -> str:
    st = csv.stat()
    doc = json.dumps({"csv": str(csv.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
                      "spec": repr(spec), "seed": seed, "test": test_fraction,
                      "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:20]


def _open(folder: Path, spec: DatasetSpec) -> StreamedTable:
    meta = json.loads((folder / "meta.json").read_text())
    pipeline = FeaturePipeline.from_dict(meta["pipeline"])
    lookups = [np.asarray(v, dtype=np.int64) for v in meta["lookups"]]
    parts = {name: StreamedRows(spec, meta["source"], folder / name, meta["rows"][name], pipeline,
                                lookups, list(meta["notes"])) for name in _PARTS}
    return StreamedTable(parts["train"], parts["test"], pipeline, folder, meta["seconds"], reused=True)


def build_stream(csv_path: str | Path, spec: DatasetSpec, cache_dir: str | Path, *, seed: int = 0,
                 test_fraction: float = 0.2, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> StreamedTable:
    """The partner's CSV as on-disk train/test rows under `cache_dir` (reused while the file, the
    mapping, the seed and the test fraction are unchanged).

    Rows go to test with probability `test_fraction` (a seeded draw per row, independent of the
    chunk size) — a random split, not the stratified one of the in-memory loader.
    """
    import time

    csv = Path(csv_path)
    if not csv.is_file():
        raise DataValidationError(str(csv), ["file not found"])
    if "median" in spec.missing.values():
        cols = [c for c, p in spec.missing.items() if p == "median"]
        raise ConfigurationError(
            f"{csv}: missing = \"median\" for {cols} needs the whole column; a streamed file supports "
            "\"zero\", \"drop\" or \"error\" (or raise stream-rows to load the file in memory)")
    folder = Path(cache_dir) / f"stream-{_key(csv, spec, seed, test_fraction)}"
    if (folder / "meta.json").is_file():
        return _open(folder, spec)
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp-"))
    for name in _PARTS:
        (tmp / name).mkdir(parents=True)
    stack = contextlib.ExitStack()
    files = {(name, kind): stack.enter_context(open(tmp / name / f"{kind}.bin", "wb"))  # noqa: SIM115
             for name in _PARTS for kind in ("codes", "num", "y")}
    rng = np.random.default_rng(seed)
    vocab: list[dict[str, int]] = [{} for _ in spec.categorical]
    seen_in_train: list[np.ndarray] = [np.zeros(0, bool) for _ in spec.categorical]
    moments = _Moments(len(spec.numeric))
    counts = {name: 0 for name in _PARTS}
    notes: list[str] = []
    line = 2  # file line of the chunk's first row (header = line 1)
    try:
        reader = pd.read_csv(csv, sep=spec.separator, dtype=str, keep_default_na=False,
                             chunksize=chunk_rows)
        for chunk in reader:
            first_line, line = line, line + len(chunk)
            try:
                part = validate_frame(chunk.reset_index(drop=True), spec, source=str(csv))
            except DataValidationError as exc:
                raise DataValidationError(str(csv), [
                    f"in lines {first_line}-{line - 1} (line numbers below count from line "
                    f"{first_line}): {p}" for p in exc.problems]) from None
            for note in part.notes:
                if len(notes) < 20 and note not in notes:
                    notes.append(f"lines {first_line}-{line - 1}: {note}")
            k = len(part)
            codes = np.empty((k, len(spec.categorical)), dtype=np.int32)
            for j, col in enumerate(spec.categorical):
                local, uniques = pd.factorize(part.features[col], sort=False)
                table = vocab[j]
                to_global = np.array([table.setdefault(v, len(table)) for v in uniques], dtype=np.int32)
                codes[:, j] = to_global[local] if k else 0
            num = part.features[list(spec.numeric)].to_numpy(dtype=np.float64)
            is_test = rng.random(k) < test_fraction
            for name, mask in (("train", ~is_test), ("test", is_test)):
                files[(name, "codes")].write(np.ascontiguousarray(codes[mask]).tobytes())
                files[(name, "num")].write(np.ascontiguousarray(num[mask]).tobytes())
                files[(name, "y")].write(part.labels[mask].astype(np.uint8).tobytes())
                counts[name] += int(mask.sum())
            train_codes = codes[~is_test]
            for j in range(len(spec.categorical)):
                used = np.bincount(train_codes[:, j], minlength=len(vocab[j])) > 0
                grown = np.zeros(len(vocab[j]), bool)
                grown[:len(seen_in_train[j])] = seen_in_train[j]
                seen_in_train[j] = grown | used
            moments.add(num[~is_test])
    except BaseException as exc:  # nothing half-written stays behind
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, pd.errors.EmptyDataError):
            raise DataValidationError(str(csv), ["the file is empty: no header row and no data rows"]) from None
        if isinstance(exc, pd.errors.ParserError | UnicodeDecodeError):
            raise DataValidationError(
                str(csv), [f"cannot be parsed as CSV with separator {spec.separator!r}: {exc}"]) from None
        raise
    stack.close()
    if counts["train"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataValidationError(str(csv), ["no data rows for training"])

    # The pipeline FeaturePipeline.fit would give on the training rows.
    categorical, lookups = {}, []
    for j, col in enumerate(spec.categorical):
        declared = spec.categories.get(col)
        values = list(vocab[j])
        cats = tuple(declared) if declared else tuple(sorted(v for v, s in zip(values, seen_in_train[j], strict=True) if s))
        position = {v: i for i, v in enumerate(cats)}
        categorical[col] = cats
        lookups.append(np.array([position.get(v, -1) for v in values], dtype=np.int64))
    means, scales = {}, {}
    for i, col in enumerate(spec.numeric):
        means[col] = float(moments.mean[i])
        sd = math.sqrt(max(moments.m2[i], 0.0) / moments.n)
        scales[col] = sd if sd > 1e-12 else 1.0
    pipeline = FeaturePipeline(categorical=categorical, numeric=tuple(spec.numeric), means=means, scales=scales)
    if not undeclared_settings(spec):  # the mapping fixes the encoding: no statistic of the rows
        pipeline = FeaturePipeline.public(spec)
    meta = {"format": FORMAT_VERSION, "source": str(csv), "rows": counts, "pipeline": pipeline.to_dict(),
            "lookups": [lk.tolist() for lk in lookups], "notes": notes,
            "seconds": time.perf_counter() - started}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    table = _open(folder, spec)
    table.reused = False
    return table
