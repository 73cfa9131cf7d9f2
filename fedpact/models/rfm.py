"""Point-in-time marketing features and labels from one partner's purchase log.

At a cut-off instant C, features use only purchases with timestamp < C: recency, frequency,
monetary value, tenure, inter-purchase times, RFM quintile scores (ranked among this partner's own
customers), exponentially time-decayed activity and the trend of the last period against the one
before. Labels look at the window C <= timestamp < C + H days: churn (no purchase), propensity (a
purchase, of one category if given) and lifetime value (the spend). Rows of the table are the
customers with at least one purchase before C. Everything is a pure function of the log passed in.

`RFMBuilder` consumes a log chunk by chunk and keeps a fixed set of numbers per customer, so memory
grows with the number of customers, not with the number of transactions.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import polars as pl

from fedpact.errors import ConfigurationError, DataValidationError, FedpactError
from fedpact.models.transactions import (
    AMOUNT,
    CATEGORY,
    CUSTOMER,
    DEFAULT_CHUNK_ROWS,
    TIMESTAMP,
    LoadReport,
    TransactionLog,
    TransactionReader,
    TransactionSpec,
    to_polars,
)

if TYPE_CHECKING:
    from fedpact.models.datasets import DatasetSpec, PartnerData

DAY_NS = 86_400 * 10**9
DEFAULT_HALF_LIFE_DAYS = 30.0
DEFAULT_TREND_DAYS = 90.0

RFM_FEATURES = (
    "recency_days",           # days from the last purchase to the cut-off
    "frequency",              # purchases (transactions) before the cut-off
    "monetary_total",         # their total amount
    "monetary_mean",          # mean amount per purchase
    "tenure_days",            # days from the first purchase to the cut-off
    "ipt_mean_days",          # mean days between purchase occasions (distinct timestamps)
    "ipt_std_days",           # their standard deviation
    "ipt_max_days",           # the longest of them
    "overdue_ratio",          # recency_days / max(ipt_mean_days, 1)
    "r_score",                # 1..5, quintile of recency among this partner's customers (5 = recent)
    "f_score",                # 1..5, quintile of frequency
    "m_score",                # 1..5, quintile of monetary_total
    "rfm_score",              # r + f + m (3..15)
    "decayed_frequency",      # sum of 2^(-age / half-life) over purchases
    "decayed_spend",          # sum of amount * 2^(-age / half-life)
    "frequency_last_period",  # purchases in [C - P, C)
    "frequency_prev_period",  # purchases in [C - 2P, C - P)
    "trend_frequency",        # (last - prev) / (last + prev), 0 when both are 0
    "trend_spend",            # the same for spend
)
# Public ranges of the RFM features (days inside a 273-day observation window before the cut-off;
# counts and US-dollar amounts clipped where a long tail carries little signal; scores 1..5).
RFM_BOUNDS = {
    "recency_days": (0, 273), "frequency": (0, 30), "monetary_total": (0, 1000),
    "monetary_mean": (0, 200), "tenure_days": (0, 273), "ipt_mean_days": (0, 273),
    "ipt_std_days": (0, 150), "ipt_max_days": (0, 273), "overdue_ratio": (0, 20),
    "r_score": (1, 5), "f_score": (1, 5), "m_score": (1, 5), "rfm_score": (3, 15),
    "decayed_frequency": (0, 10), "decayed_spend": (0, 300), "frequency_last_period": (0, 10),
    "frequency_prev_period": (0, 10), "trend_frequency": (-1, 1), "trend_spend": (-1, 1),
}
CATEGORY_FEATURES = ("category_frequency", "category_spend")
LABELS = ("churn", "propensity", "ltv")

# The CDNOW log shipped in the Lifetimes wheel: 69,659 purchases by 23,570 customers, all of whom
# made their first purchase in January–March 1997; the log runs to 1998-06-30. The cut-off leaves
# every customer at least six months of history, and the 180-day label window (to 1998-03-29) ends
# inside the log. CDNOW customers buy rarely: a shorter window would call many active ones churned.
CDNOW_FILE = "CDNOW_master.txt"
CDNOW_CUTOFF = pd.Timestamp("1997-10-01")  # features: purchases 1997-01-01 .. 1997-09-30
CDNOW_HORIZON_DAYS = 180.0
CDNOW_TRANSACTIONS = TransactionSpec(
    name="cdnow", customer="customer_id", timestamp="date", amount="dollar_value",
    timestamp_format="%Y%m%d", separator="whitespace", purpose="model_training",
)


def _timestamp(value, what: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} = {value!r} is not a date/time") from None
    if ts is pd.NaT:
        raise ConfigurationError(f"{what} = {value!r} is not a date/time")
    return ts.tz_convert(None) if ts.tzinfo is not None else ts


def _positive(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
        raise ConfigurationError(f"{what} = {value!r}: must be a positive number of days")
    return float(value)


def quintile_scores(values, *, higher_is_better: bool = True) -> np.ndarray:
    """1..5 by quintile of rank among the given rows; tied values share a score (average rank).

    The same as ceil(5 * pandas' rank(method="average", pct=True)).
    """
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return np.zeros(0, np.int64)
    uniq, inverse, counts = np.unique(v if higher_is_better else -v, return_inverse=True,
                                      return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    return np.clip(np.ceil(5 * average_rank[inverse] / len(v)), 1, 5).astype(np.int64)


def _share_change(last: np.ndarray, prev: np.ndarray) -> np.ndarray:
    total = last + prev
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (last - prev) / np.where(total > 0, total, 1), 0.0)


@dataclass
class RFMTable:
    """Features (one row per customer, indexed by customer id) and, with a horizon, the labels."""

    features: pd.DataFrame
    labels: pd.DataFrame | None
    first_purchase: pd.Series
    cutoff: pd.Timestamp
    horizon_days: float | None
    half_life_days: float
    trend_days: float
    category: str | None
    observed_until: pd.Timestamp | None
    source: str
    report: LoadReport | None = None

    def __len__(self) -> int:
        return len(self.features)

    def cohorts(self, freq: str = "M") -> pd.Series:
        """Each customer's acquisition cohort: the period of the first purchase, e.g. '1997-02'."""
        return self.first_purchase.dt.to_period(freq).astype(str)

    def to_partner_data(self, spec: DatasetSpec | None = None, *, task: str = "churn",
                        extra: dict[str, pd.Series] | None = None) -> PartnerData:
        """The table as a `PartnerData` for the training pipeline, labelled by `task`.

        `spec` defaults to all RFM features (numeric) with label column `task`; `extra` adds
        columns (indexed by customer id) that the spec lists, e.g. an acquisition cohort.
        """
        from fedpact.models.datasets import DatasetSpec, validate_frame

        if task not in ("churn", "propensity"):
            raise ConfigurationError(f"task = {task!r}: choose churn or propensity (ltv is a "
                                     "regression target: use table.labels['ltv'])")
        if self.labels is None:
            raise ConfigurationError("this table has no labels: build it with horizon_days")
        if spec is None:
            spec = DatasetSpec(name="rfm", task=task, label=task, positive=("1",), negative=("0",),
                               numeric=tuple(self.features.columns), id_column=CUSTOMER)
        frame = self.features.copy()
        for name, column in (extra or {}).items():
            frame[name] = column.reindex(frame.index).to_numpy()
        frame[spec.label] = self.labels[task].to_numpy()
        frame = frame.rename_axis(spec.id_column or CUSTOMER).reset_index()
        data = validate_frame(frame, spec, source=self.source)
        data.notes.append(
            f"features at cut-off {self.cutoff:%Y-%m-%d %H:%M}, label window {self.horizon_days:g} "
            f"days, half-life {self.half_life_days:g} days, trend period {self.trend_days:g} days")
        return data


class CustomerCodes:
    """Dense integer codes for customer ids across chunks, in order of first appearance.

    Ids are looked up by a 64-bit hash in a sorted table; a second, independent 64-bit hash of
    every id is compared with the one stored for its code, so two ids can only be merged if both
    hashes collide at once (about 2^-128 per pair); a clash of the first hash alone raises.
    """

    SEEDS = (0x5EED_F00D, 0xC0FF_EE11)

    def __init__(self):
        self._hashes = np.zeros(0, np.uint64)  # sorted first hashes
        self._codes = np.zeros(0, np.int64)  # the code of each of them
        self._check = np.zeros(0, np.uint64)  # second hash, by code
        self._ids: list[pl.Series] = []  # ids in code order, in pieces
        self.size = 0

    def hash(self, ids: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        return tuple(ids.hash(seed=s).to_numpy() for s in self.SEEDS)

    @property
    def ids(self) -> pl.Series:
        """Every id seen; position = code."""
        if len(self._ids) != 1:
            self._ids = [pl.concat(self._ids) if self._ids else pl.Series(CUSTOMER, [], pl.String)]
        return self._ids[0]

    def lookup(self, hashes: np.ndarray, checks: np.ndarray, first_rows: np.ndarray,
               ids: pl.Series) -> np.ndarray:
        """Codes for the distinct, sorted `hashes` (with `checks`, the second hash) of one chunk.

        Unseen ids get new codes in the order of `first_rows` (where each first appears in the
        chunk); `ids` are the chunk's ids by row, read only for the new ones and for messages.
        """
        pos = np.searchsorted(self._hashes, hashes)
        codes = np.full(len(hashes), -1, dtype=np.int64)
        if self.size:
            at = np.minimum(pos, self.size - 1)
            found = self._hashes[at] == hashes
            codes[found] = self._codes[at[found]]
            clash = found & (self._check[np.maximum(codes, 0)] != checks)
            if clash.any():
                i = int(np.flatnonzero(clash)[0])
                raise _hash_clash(self.ids[int(codes[i])], ids[int(first_rows[i])])
        new = np.flatnonzero(codes < 0)
        if len(new):
            new = new[np.argsort(first_rows[new])]  # distinct rows: no ties
            codes[new] = np.arange(self.size, self.size + len(new))
            order = np.argsort(hashes[new], kind="stable")
            self._hashes = np.insert(self._hashes, pos[new][order], hashes[new][order])
            self._codes = np.insert(self._codes, pos[new][order], codes[new][order])
            self._check = np.concatenate([self._check, checks[new]])
            self._ids.append(ids.gather(first_rows[new]))
            self.size += len(new)
        return codes


def _hash_clash(a, b) -> FedpactError:
    return FedpactError(
        f"customer ids {a!r} and {b!r} have the same 64-bit hash; feature building stops rather "
        "than risk merging two customers (expected about once in 10^7 logs of a million "
        "customers): please report it")


# Per-customer state: two timestamps (int64 ns) and sixteen float64 sums (counts are exact in
# float64 below 2^53).
_T_FIRST, _T_LAST = range(2)
(_N, _OCC, _N_LAST, _N_PREV, _CAT_N, _FUT_N, _FUT_CAT, _SPEND, _GAP_SQ, _GAP_MAX, _DEC_N,
 _DEC_SPEND, _SPEND_LAST, _SPEND_PREV, _CAT_SPEND, _FUT_SPEND) = range(16)


class RFMBuilder:
    """Accumulates point-in-time features and labels over chunks of a validated log.

    Memory holds 144 bytes per customer (plus the id) and one chunk. Chunks may come in any order
    as long as each customer's purchases before the cut-off arrive in time order across chunks
    (within a chunk any order is fine): a log sorted by timestamp, or by customer then timestamp,
    qualifies. A violation raises rather than give wrong gap statistics.
    """

    def __init__(self, cutoff, *, horizon_days: float | None = None,
                 half_life_days: float = DEFAULT_HALF_LIFE_DAYS,
                 trend_days: float = DEFAULT_TREND_DAYS, category: str | None = None):
        self.cutoff = _timestamp(cutoff, "cutoff")
        self.horizon_days = _positive(horizon_days, "horizon_days")
        self.half_life_days = _positive(half_life_days, "half_life_days")
        self.trend_days = _positive(trend_days, "trend_days")
        self.category = category
        self._c = self.cutoff.as_unit("ns").value
        self._end = (self._c + round(self.horizon_days * DAY_NS)) if self.horizon_days else self._c
        self.customers = CustomerCodes()
        self._t = np.zeros((0, 2), np.int64)
        self._s = np.zeros((0, 16), np.float64)
        self.max_seen: int | None = None
        self.rows = 0

    def _grow(self, size: int) -> None:
        capacity = len(self._t)
        if size <= capacity:
            return
        capacity = max(size, capacity + capacity // 2, 1024)
        for name in ("_t", "_s"):
            old = getattr(self, name)
            grown = np.zeros((capacity, old.shape[1]), old.dtype)
            grown[: len(old)] = old
            setattr(self, name, grown)

    def add(self, chunk: pl.DataFrame | pd.DataFrame) -> None:
        """Fold one chunk of validated transactions (canonical columns) into the state."""
        frame = chunk if isinstance(chunk, pl.DataFrame) else to_polars(chunk)
        if not frame.height:
            return
        if self.category is not None and CATEGORY not in frame.columns:
            raise ConfigurationError(
                f"category = {self.category!r} needs the log's category column; map it with "
                "category = COLUMN in the transaction mapping")
        ts = frame[TIMESTAMP].cast(pl.Datetime("ns")).to_physical().to_numpy()
        self.rows += len(ts)
        top = int(ts.max())
        self.max_seen = top if self.max_seen is None else max(self.max_seen, top)
        keep = ts < self._end  # purchases before the cut-off and in the label window
        if not keep.any():
            return
        if not keep.all():
            frame, ts = frame.filter(pl.Series(keep)), ts[keep]
        ids = frame[CUSTOMER]
        hashes, checks = self.customers.hash(ids)
        order = np.lexsort((ts, hashes))  # by customer, then time
        hashes, checks, ts = hashes[order], checks[order], ts[order]
        amount = frame[AMOUNT].to_numpy()[order]
        is_cat = ((frame[CATEGORY] == self.category).to_numpy()[order] if self.category is not None
                  else None)
        m = len(ts)
        starts = np.empty(m, dtype=bool)
        starts[0] = True
        np.not_equal(hashes[1:], hashes[:-1], out=starts[1:])
        start_idx = np.flatnonzero(starts)
        group = np.cumsum(starts) - 1
        clash = np.flatnonzero(checks != checks[start_idx][group])
        if len(clash):
            i = int(clash[0])
            raise _hash_clash(ids[int(order[start_idx[group[i]]])], ids[int(order[i])])
        first_rows = np.minimum.reduceat(order, start_idx)
        cust = self.customers.lookup(hashes[start_idx], checks[start_idx], first_rows, ids)
        self._grow(self.customers.size)
        self._fold(cust, start_idx, ts, amount, is_cat)

    def _fold(self, cust: np.ndarray, start_idx: np.ndarray, ts: np.ndarray, amount: np.ndarray,
              is_cat: np.ndarray | None) -> None:
        """Add one chunk's rows, sorted by customer then time (groups start at `start_idx`)."""
        def total(values: np.ndarray) -> np.ndarray:
            return np.add.reduceat(values, start_idx)

        T, S = self._t[cust], self._s[cust]
        pre = ts < self._c  # within each customer: purchases before the cut-off come first
        fut = ~pre
        n_pre = total(pre.astype(np.int64))
        has_pre = n_pre > 0
        seen = S[:, _N] > 0
        first_pre = ts[start_idx]
        last_pre = ts[start_idx + np.maximum(n_pre - 1, 0)]
        prev_last = T[:, _T_LAST]
        late = seen & has_pre & (first_pre < prev_last)
        if late.any():
            i = int(np.flatnonzero(late)[0])
            raise DataValidationError("transaction stream", [
                f"customer {self.customers.ids[int(cust[i])]!r}: a purchase at "
                f"{pd.Timestamp(first_pre[i])} was read after one at {pd.Timestamp(prev_last[i])}; "
                "chunked feature building needs each customer's purchases in time order (sort the "
                "log by timestamp), or load the whole log with load_transactions and call build_rfm"])
        # Gaps between purchase occasions (distinct timestamps of one customer), including the gap
        # from the last purchase read in earlier chunks.
        gaps = np.empty(len(ts), dtype=np.int64)
        gaps[0] = 0
        np.subtract(ts[1:], ts[:-1], out=gaps[1:])
        gaps[fut] = 0
        gaps[start_idx] = np.where(seen & has_pre, first_pre - prev_last, 0)
        occasion = gaps > 0
        occasion[start_idx] |= has_pre & ~seen
        gap_days = gaps / DAY_NS
        age_days = (self._c - ts) / DAY_NS
        weight = np.where(pre, np.exp2(-age_days / self.half_life_days), 0.0)
        in_last = pre & (age_days <= self.trend_days)
        in_prev = pre & ~in_last & (age_days <= 2 * self.trend_days)
        spent = np.where(pre, amount, 0.0)

        T[:, _T_FIRST] = np.where(seen | ~has_pre, T[:, _T_FIRST], first_pre)
        T[:, _T_LAST] = np.where(has_pre, last_pre, prev_last)
        S[:, _N] += n_pre
        S[:, _OCC] += total(occasion.astype(np.float64))
        S[:, _N_LAST] += total(in_last.astype(np.float64))
        S[:, _N_PREV] += total(in_prev.astype(np.float64))
        S[:, _FUT_N] += total(fut.astype(np.float64))
        S[:, _SPEND] += total(spent)
        S[:, _GAP_SQ] += total(gap_days * gap_days)
        S[:, _GAP_MAX] = np.maximum(S[:, _GAP_MAX], np.maximum.reduceat(gap_days, start_idx))
        S[:, _DEC_N] += total(weight)
        S[:, _DEC_SPEND] += total(weight * amount)
        S[:, _SPEND_LAST] += total(np.where(in_last, amount, 0.0))
        S[:, _SPEND_PREV] += total(np.where(in_prev, amount, 0.0))
        S[:, _FUT_SPEND] += total(np.where(fut, amount, 0.0))
        if is_cat is not None:
            S[:, _CAT_N] += total((is_cat & pre).astype(np.float64))
            S[:, _CAT_SPEND] += total(np.where(is_cat, spent, 0.0))
            S[:, _FUT_CAT] += total((is_cat & fut).astype(np.float64))
        self._t[cust], self._s[cust] = T, S

    def result(self, *, source: str = "transactions", report: LoadReport | None = None,
               observed_until=None) -> RFMTable:
        """The feature table (and labels when a horizon was set) of everything added so far.

        Rows are the customers with a purchase before the cut-off, in order of first appearance
        in the log. With a horizon, the label window must end within the log (`observed_until`,
        by default the latest purchase read); otherwise customers would be labelled churned for
        lack of data.
        """
        size = self.customers.size
        active = self._s[:size, _N] > 0
        if not active.any():
            raise DataValidationError(source, [
                f"no purchase before the cut-off {self.cutoff}: {self.rows:,} valid rows were read"])
        until = (_timestamp(observed_until, "observed_until") if observed_until is not None
                 else pd.Timestamp(self.max_seen))
        if self.horizon_days:
            window_end = pd.Timestamp(self._end)
            if window_end > until + pd.Timedelta(days=1):
                raise ConfigurationError(
                    f"{source}: the label window {self.cutoff} + {self.horizon_days:g} days ends "
                    f"{window_end}, after the log's last purchase ({until}); customers would be "
                    "labelled churned for lack of data: choose an earlier cut-off or a shorter "
                    "horizon, or pass observed_until if the log is complete to a later date")
        if active.all():  # views: no copy of the state
            rows, T, S = np.arange(size), self._t[:size], self._s[:size]
        else:
            rows = np.flatnonzero(active)
            T, S = self._t[rows], self._s[rows]
        index = pd.Index(self.customers.ids.filter(pl.Series(active)).to_numpy(), name=CUSTOMER)
        names = RFM_FEATURES + (CATEGORY_FEATURES if self.category is not None else ())
        block = np.empty((len(names), len(rows)))  # one row per feature: no copy into pandas
        col = dict(zip(names, block, strict=True))
        n, first, last = S[:, _N], T[:, _T_FIRST], T[:, _T_LAST]
        col["recency_days"][:] = (self._c - last) / DAY_NS
        col["frequency"][:] = n
        col["monetary_total"][:] = S[:, _SPEND]
        col["monetary_mean"][:] = S[:, _SPEND] / n
        col["tenure_days"][:] = tenure = (self._c - first) / DAY_NS
        k = S[:, _OCC] - 1
        has_gaps = k > 0
        k_safe = np.where(has_gaps, k, 1)
        ipt_mean = np.where(has_gaps, (last - first) / DAY_NS / k_safe, tenure)
        col["ipt_mean_days"][:] = ipt_mean
        ipt_var = np.where(has_gaps, S[:, _GAP_SQ] / k_safe - ipt_mean**2, 0.0)
        col["ipt_std_days"][:] = np.sqrt(np.clip(ipt_var, 0.0, None))
        col["ipt_max_days"][:] = np.where(has_gaps, S[:, _GAP_MAX], tenure)
        col["overdue_ratio"][:] = col["recency_days"] / np.maximum(ipt_mean, 1.0)
        col["r_score"][:] = quintile_scores(col["recency_days"], higher_is_better=False)
        col["f_score"][:] = quintile_scores(n)
        col["m_score"][:] = quintile_scores(S[:, _SPEND])
        col["rfm_score"][:] = col["r_score"] + col["f_score"] + col["m_score"]
        col["decayed_frequency"][:] = S[:, _DEC_N]
        col["decayed_spend"][:] = S[:, _DEC_SPEND]
        col["frequency_last_period"][:] = S[:, _N_LAST]
        col["frequency_prev_period"][:] = S[:, _N_PREV]
        col["trend_frequency"][:] = _share_change(S[:, _N_LAST], S[:, _N_PREV])
        col["trend_spend"][:] = _share_change(S[:, _SPEND_LAST], S[:, _SPEND_PREV])
        if self.category is not None:
            col["category_frequency"][:] = S[:, _CAT_N]
            col["category_spend"][:] = S[:, _CAT_SPEND]
        features = pd.DataFrame(block.T, index=index, columns=list(names), copy=False)
        labels = None
        if self.horizon_days:
            bought = (S[:, _FUT_CAT] if self.category is not None else S[:, _FUT_N]) > 0
            labels = pd.DataFrame({
                "churn": (S[:, _FUT_N] == 0).astype(np.int64),
                "propensity": bought.astype(np.int64),
                "ltv": S[:, _FUT_SPEND],
            }, index=index)
        first_purchase = pd.Series(first.astype("datetime64[ns]"), index=index, name="first_purchase")
        return RFMTable(features=features, labels=labels, first_purchase=first_purchase,
                        cutoff=self.cutoff, horizon_days=self.horizon_days,
                        half_life_days=self.half_life_days, trend_days=self.trend_days,
                        category=self.category, observed_until=until, source=source,
                        report=report)


def build_rfm(log: TransactionLog | pd.DataFrame, cutoff, *, horizon_days: float | None = None,
              half_life_days: float = DEFAULT_HALF_LIFE_DAYS, trend_days: float = DEFAULT_TREND_DAYS,
              category: str | None = None, observed_until=None) -> RFMTable:
    """Features at `cutoff` (and labels over the next `horizon_days`) from a log held in memory."""
    builder = RFMBuilder(cutoff, horizon_days=horizon_days, half_life_days=half_life_days,
                         trend_days=trend_days, category=category)
    if isinstance(log, TransactionLog):
        frame, source, report = log.frame, log.source, log.report
    else:
        frame, source, report = log, "transaction table", None
    builder.add(frame)
    return builder.result(source=source, report=report, observed_until=observed_until)


def stream_rfm(path: str | Path, spec: TransactionSpec, cutoff, *,
               customers: Iterable[str] | str | Path | None = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS, horizon_days: float | None = None,
               half_life_days: float = DEFAULT_HALF_LIFE_DAYS,
               trend_days: float = DEFAULT_TREND_DAYS, category: str | None = None,
               observed_until=None) -> RFMTable:
    """Read, validate and fold a purchase log chunk by chunk: memory bounded by the customers.

    The next chunk is read and validated in a second thread while the current one is folded in,
    so at most three chunks are held at once.
    """
    reader = TransactionReader(path, spec, customers=customers, chunk_rows=chunk_rows)
    builder = RFMBuilder(cutoff, horizon_days=horizon_days, half_life_days=half_life_days,
                         trend_days=trend_days, category=category)
    for chunk in _read_ahead(reader):
        builder.add(chunk)
    return builder.result(source=str(path), report=reader.report, observed_until=observed_until)


def _read_ahead(chunks: Iterable[pl.DataFrame]) -> Iterable[pl.DataFrame]:
    """Yield from `chunks` while a worker thread produces the next one (polars releases the GIL)."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        slot.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            item = done
        except BaseException as exc:  # handed to the consumer, which raises it
            item = exc
        while not stop.is_set():
            try:
                slot.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    worker = threading.Thread(target=produce, name="fedpact-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = slot.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def ltv_metrics(y_true, y_pred) -> dict[str, float]:
    """Regression metrics for predicted lifetime value (future spend) against the actual spend.

    mae, rmse, r2; spearman (rank correlation); top_decile_share: the share of all actual spend
    made by the 10% of customers with the highest predictions (what a campaign would reach).
    """
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    if y.shape != p.shape or y.ndim != 1 or not len(y):
        raise ConfigurationError(f"ltv_metrics needs two 1-d arrays of equal length, got {y.shape} and {p.shape}")
    err = p - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    top = max(1, int(np.ceil(0.1 * len(y))))
    best = np.argsort(-p, kind="stable")[:top]
    total = float(y.sum())
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
        "spearman": _rank_correlation(y, p),
        "top_decile_share": float(y[best].sum()) / total if total > 0 else float("nan"),
    }


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); nan when either side is constant."""
    ra = pd.Series(a).rank().to_numpy()
    rb = pd.Series(b).rank().to_numpy()
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


# --------------------------------------------------------------------------- CDNOW


def cdnow_log_path() -> Path:
    """CDNOW_master.txt inside the installed Lifetimes wheel, found without importing the package."""
    spec = importlib.util.find_spec("lifetimes")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "datasets" / CDNOW_FILE
        if path.is_file():
            return path
    raise ConfigurationError(
        "dataset 'cdnow' reads CDNOW_master.txt from the Lifetimes package: "
        "pip install Lifetimes==0.11.3")


def cdnow_table(*, cutoff=CDNOW_CUTOFF, horizon_days: float = CDNOW_HORIZON_DAYS,
                half_life_days: float = DEFAULT_HALF_LIFE_DAYS,
                trend_days: float = DEFAULT_TREND_DAYS) -> RFMTable:
    """RFM features and labels of the 23,570 CDNOW customers at the documented cut-off."""
    return stream_rfm(cdnow_log_path(), CDNOW_TRANSACTIONS, cutoff, horizon_days=horizon_days,
                      half_life_days=half_life_days, trend_days=trend_days)


def cdnow_churn(spec: DatasetSpec) -> PartnerData:
    """The built-in `cdnow` data set: RFM features + acquisition cohort, churn label (see spec)."""
    table = cdnow_table()
    return table.to_partner_data(spec, task=spec.task, extra={"cohort": table.cohorts("M")})
