"""Partner purchase logs: one row per transaction (customer, timestamp, amount, channel, category).

Structural problems (file missing or empty, a mapped column absent, a file that does not parse, a
bad mapping file) raise `DataValidationError` at once. Problems of single rows — an empty customer
id, a customer missing from the partner's customer list, an empty or unreadable timestamp, an
amount that is empty, not a number, infinite or negative — set that row aside with its reason; the
good rows are kept, and each reason is reported with its column, row count and line numbers.

Logs are read and validated in chunks (`TransactionReader`) with polars, so a log of any length
passes through bounded memory; `load_transactions` gathers the chunks of a log that fits in memory
into one pandas table. CSV with a one-character separator and Parquet are read by polars; logs
whose columns are separated by runs of blanks (`separator = "whitespace"`) by pandas.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from fedpact.errors import ConfigurationError, DataValidationError

# Canonical column names of a validated log, whatever the partner's file calls them.
CUSTOMER, TIMESTAMP, AMOUNT, CHANNEL, CATEGORY = (
    "customer_id", "timestamp", "amount", "channel", "category")
DEFAULT_CHUNK_ROWS = 1_000_000
PARQUET_SUFFIXES = (".parquet", ".pq")
WHITESPACE = "whitespace"
_ROW = "__fedpact_row"
_EXAMPLES = 3
_LINES = 5
# ISO 8601 forms read when no timestamp_format is given ("T" or a blank between date and time;
# a trailing "Z" means UTC). Offsets are converted to UTC; times without one are taken as they are.
ISO_FORMATS = ("%Y-%m-%d", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S%.f%z",
               "%Y-%m-%d %H:%M%z")
# What datetime64[ns] can hold (1677-09-21 .. 2262-04-11); times outside it are unreadable.
_NS_MIN, _NS_MAX = pd.Timestamp.min.ceil("us"), pd.Timestamp.max.floor("us")


@dataclass(frozen=True)
class TransactionSpec:
    """Which column of a partner's purchase log holds what, and how to read it."""

    name: str = "transactions"
    customer: str = "customer_id"
    timestamp: str = "timestamp"
    amount: str = "amount"
    channel: str | None = None
    category: str | None = None
    timestamp_format: str | None = None  # strftime-style format such as "%Y%m%d"; None: ISO 8601
    separator: str = ","  # one character, or "whitespace" for runs of blanks
    customers_file: str | None = None  # optional list of the partner's known customer ids
    purpose: str = "feature_building"

    @property
    def roles(self) -> dict[str, str]:
        """Canonical name -> the partner's column name, for the columns this spec reads."""
        roles = {CUSTOMER: self.customer, TIMESTAMP: self.timestamp, AMOUNT: self.amount}
        if self.channel:
            roles[CHANNEL] = self.channel
        if self.category:
            roles[CATEGORY] = self.category
        return roles

    def validate(self, origin: str) -> None:
        """Check the spec itself; `origin` names the mapping file in messages."""
        problems = []
        for role in ("customer", "timestamp", "amount"):
            if not getattr(self, role):
                problems.append(f"{role} (the column holding the {role}) is not set")
        columns = [c for c in self.roles.values() if c]
        dup = sorted({c for c in columns if columns.count(c) > 1})
        if dup:
            problems.append(f"columns mapped to more than one role: {dup}")
        if self.separator != WHITESPACE and len(self.separator.encode()) != 1:
            problems.append(f"separator = {self.separator!r}: use one character such as ',', ';', "
                            f"'\\t' or '|', or {WHITESPACE!r} for runs of blanks")
        if problems:
            raise DataValidationError(origin, problems)


@dataclass
class RejectedRows:
    """Rows set aside for one reason: how many, the first line numbers and a few example values."""

    column: str
    reason: str  # completes "N of M rows …", e.g. "have a negative amount"
    count: int = 0
    lines: list[int] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def message(self, rows_read: int, unit: str = "lines") -> str:
        shown = [e for e in self.examples if e != ""]
        examples = (", e.g. " + ", ".join(repr(e) for e in shown)) if shown else ""
        more = ", …" if self.count > len(self.lines) else ""
        lines = ", ".join(str(n) for n in self.lines)
        return (f"column {self.column!r}: {self.count:,} of {rows_read:,} rows {self.reason}"
                f"{examples}; {unit} {lines}{more}; these rows were set aside")


@dataclass
class LoadReport:
    """What reading a log found: rows read, rows kept, and each reason rows were set aside."""

    source: str
    rows_read: int = 0
    rows_rejected: int = 0
    rejected: dict[str, RejectedRows] = field(default_factory=dict)
    unit: str = "lines"  # what the numbers in messages count: file lines (header = 1) or rows

    @property
    def rows_kept(self) -> int:
        return self.rows_read - self.rows_rejected

    @property
    def problems(self) -> list[str]:
        """One message per reason, naming column, row count and line numbers."""
        return [r.message(self.rows_read, self.unit) for r in self.rejected.values() if r.count]

    def summary(self) -> str:
        return (f"{self.source}: {self.rows_read:,} rows read, {self.rows_kept:,} kept, "
                f"{self.rows_rejected:,} set aside")

    def raise_if_rejected(self) -> None:
        """Strict mode: any row set aside becomes an error naming every reason."""
        if self.rows_rejected:
            raise DataValidationError(self.source, self.problems)

    def _add(self, key: str, column: str, reason: str, mask: pl.Series, text: pl.Series,
             lines: pl.Series) -> None:
        count = int(mask.sum())
        if not count:
            return
        entry = self.rejected.setdefault(key, RejectedRows(column, reason))
        entry.count += count
        if len(entry.lines) < _LINES:
            entry.lines.extend(lines.filter(mask).head(_LINES - len(entry.lines)).to_list())
        if len(entry.examples) < _EXAMPLES:
            for value in text.filter(mask).unique(maintain_order=True).head(_EXAMPLES).to_list():
                if value not in entry.examples and len(entry.examples) < _EXAMPLES:
                    entry.examples.append(value)


@dataclass
class TransactionLog:
    """A partner's validated purchases in canonical columns, and the report of what was set aside."""

    frame: pd.DataFrame
    spec: TransactionSpec
    report: LoadReport

    @property
    def source(self) -> str:
        return self.report.source

    def __len__(self) -> int:
        return len(self.frame)


# --------------------------------------------------------------------------- pandas <-> polars
# Without pyarrow, polars and pandas exchange columns as numpy arrays (text as object arrays).


def to_pandas(frame: pl.DataFrame) -> pd.DataFrame:
    """A canonical polars chunk as a pandas table."""
    return pd.DataFrame({c: frame[c].to_numpy() for c in frame.columns})


def to_polars(frame: pd.DataFrame) -> pl.DataFrame:
    """A canonical pandas table (see `as_transaction_frame`) as a polars chunk."""
    frame = as_transaction_frame(frame)
    columns = {
        CUSTOMER: pl.Series(CUSTOMER, frame[CUSTOMER].astype(str).to_numpy(dtype=object), pl.String),
        TIMESTAMP: pl.Series(TIMESTAMP, frame[TIMESTAMP].to_numpy(dtype="datetime64[ns]")),
        AMOUNT: pl.Series(AMOUNT, frame[AMOUNT].to_numpy(dtype=np.float64)),
    }
    for col in (CHANNEL, CATEGORY):
        if col in frame.columns:
            columns[col] = pl.Series(col, frame[col].astype(str).to_numpy(dtype=object), pl.String)
    return pl.DataFrame(columns)


def as_transaction_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Check that an in-memory table has the canonical columns and types of a validated log."""
    source = "transaction table"
    missing = [c for c in (CUSTOMER, TIMESTAMP, AMOUNT) if c not in frame.columns]
    if missing:
        raise DataValidationError(source, [
            f"column {c!r} is missing; the table has {', '.join(map(str, frame.columns))}"
            for c in missing])
    if not pd.api.types.is_datetime64_any_dtype(frame[TIMESTAMP]):
        raise DataValidationError(source, [
            f"column {TIMESTAMP!r} must hold datetimes (it holds {frame[TIMESTAMP].dtype}); "
            "read files with load_transactions, which parses and validates them"])
    problems = []
    if frame[TIMESTAMP].isna().any():
        problems.append(f"column {TIMESTAMP!r}: {int(frame[TIMESTAMP].isna().sum())} missing timestamps")
    amounts = pd.to_numeric(frame[AMOUNT], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(amounts) | (amounts < 0)
    if bad.any():
        problems.append(f"column {AMOUNT!r}: {int(bad.sum())} negative, infinite or missing amounts")
    if frame[CUSTOMER].isna().any():
        problems.append(f"column {CUSTOMER!r}: {int(frame[CUSTOMER].isna().sum())} missing customer ids")
    if problems:
        raise DataValidationError(source, problems + ["read files with load_transactions, which "
                                                      "sets such rows aside with their reasons"])
    if frame[TIMESTAMP].dt.tz is not None:
        frame = frame.assign(**{TIMESTAMP: frame[TIMESTAMP].dt.tz_convert(None)})
    return frame


# --------------------------------------------------------------------------- mapping files

_MAPPING_KEYS = {
    "name", "customer", "timestamp", "amount", "channel", "category", "timestamp_format",
    "separator", "customers", "purpose",
}


def load_transaction_mapping(path: str | Path) -> TransactionSpec:
    """Read a TOML or YAML mapping file describing a purchase log (see docs/rfm.md).

    The settings may sit at the top level or under a `[transactions]` table; a `customers` path
    is taken relative to the mapping file.
    """
    # Imported here: datasets.py imports rfm.py, which imports this module, at load time.
    from fedpact.models.datasets import read_mapping_document

    path = Path(path)
    doc = read_mapping_document(path, "transactions")
    problems = [f"unknown setting {k!r}" for k in doc if k not in _MAPPING_KEYS]
    for required in ("customer", "timestamp", "amount"):
        if not doc.get(required):
            problems.append(f"required setting {required!r} (the column holding the {required}) is missing")
    for key, value in doc.items():
        if key in _MAPPING_KEYS and not isinstance(value, str | int | float):
            problems.append(f"setting {key!r} must be a single value, not a {type(value).__name__}")
    if problems:
        raise DataValidationError(str(path), problems + [f"allowed settings: {sorted(_MAPPING_KEYS)}"])

    def text_or_none(key: str) -> str | None:
        value = doc.get(key)
        return None if value in (None, "") else str(value)

    customers = text_or_none("customers")
    if customers and not Path(customers).is_absolute():
        customers = str(path.parent / customers)
    spec = TransactionSpec(
        name=str(doc.get("name") or path.stem),
        customer=str(doc["customer"]),
        timestamp=str(doc["timestamp"]),
        amount=str(doc["amount"]),
        channel=text_or_none("channel"),
        category=text_or_none("category"),
        timestamp_format=text_or_none("timestamp_format"),
        separator=str(doc.get("separator", ",")),
        customers_file=customers,
        purpose=str(doc.get("purpose", "feature_building")),
    )
    spec.validate(str(path))
    return spec


def load_customer_list(path: str | Path, column: str | None = None) -> pl.Series:
    """Known customer ids from a CSV with a header: `column` if present, else its only column."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), ["customer list not found"])
    try:
        frame = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.NoDataError:
        raise DataValidationError(str(path), ["the customer list is empty"]) from None
    except pl.exceptions.PolarsError as exc:
        raise DataValidationError(str(path), [f"cannot be parsed as CSV: {exc}"]) from None
    names = {c.strip(): c for c in frame.columns}
    if column and column in names:
        ids = frame[names[column]]
    elif len(frame.columns) == 1:
        ids = frame[frame.columns[0]]
    else:
        raise DataValidationError(str(path), [
            f"cannot tell which column holds the customer ids: expected {column!r} or a single "
            f"column; the file has {', '.join(frame.columns[:25])}"])
    ids = ids.str.strip_chars().drop_nulls()
    ids = ids.filter(ids != "").unique()
    if ids.is_empty():
        raise DataValidationError(str(path), ["the customer list holds no customer ids"])
    return ids


# --------------------------------------------------------------------------- reading


def _text(series: pl.Series) -> pl.Series:
    """A column as stripped text, with missing cells as ''."""
    if series.dtype != pl.String:
        series = series.cast(pl.String)
    return series.str.strip_chars().fill_null("")


def _strptime(text: pl.Series, fmt: str) -> pl.Series:
    parsed = text.str.to_datetime(fmt, strict=False, exact=True, time_unit="us")
    if getattr(parsed.dtype, "time_zone", None):
        parsed = parsed.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return parsed


def parse_timestamps(text: pl.Series, fmt: str | None = None) -> pl.Series:
    """Text to datetimes (microseconds, UTC without zone); null where a value does not parse.

    With `fmt`, every value must match it; without, any of the ISO 8601 forms in ISO_FORMATS.
    """
    if fmt:
        return _strptime(text, fmt)
    normal = text.str.replace("T", " ", literal=True)
    if normal.str.ends_with("Z").any():
        normal = normal.str.replace(r"Z$", "+00:00")
    present = normal.filter(normal != "").head(1)
    order = list(ISO_FORMATS)
    if len(present):  # try first the form of the first value: usually the form of all of them
        for i, f in enumerate(order):
            if _strptime(present, f).null_count() == 0:
                order.insert(0, order.pop(i))
                break
    parsed = _strptime(normal, order[0])
    for f in order[1:]:
        missing = parsed.is_null() & (normal != "")
        if not missing.any():
            break
        where = missing.arg_true()
        parsed = parsed.scatter(where, _strptime(normal.gather(where), f))
    return parsed


class TransactionReader:
    """Validated chunks of a purchase log, read `chunk_rows` at a time; `report` grows as it reads.

    Iterating yields polars DataFrames holding only good rows, in canonical columns: customer_id
    (text), timestamp (datetime, ns, UTC without zone), amount (float), then channel / category.
    """

    def __init__(self, path: str | Path, spec: TransactionSpec, *,
                 customers: Iterable[str] | str | Path | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS):
        self.path = Path(path)
        self.spec = spec
        if not (isinstance(chunk_rows, int) and chunk_rows >= 1):
            raise ConfigurationError(f"chunk_rows = {chunk_rows!r}: must be a whole number >= 1")
        self.chunk_rows = chunk_rows
        spec.validate(str(self.path))
        customers = customers if customers is not None else spec.customers_file
        self.customers: pl.Series | None
        if customers is None:
            self.customers, self.customers_source = None, None
        elif isinstance(customers, str | Path):
            self.customers = load_customer_list(customers, spec.customer)
            self.customers_source = f"the customer list {customers}"
        else:
            self.customers = _text(pl.Series("ids", [str(c) for c in customers], pl.String)).unique()
            self.customers_source = "the partner's customer list"
        self.parquet = self.path.suffix.lower() in PARQUET_SUFFIXES
        self.report = LoadReport(str(self.path), unit="rows" if self.parquet else "lines")

    # ------------------------------------------------------------------ raw chunks

    def _fail(self, problem: str) -> DataValidationError:
        return DataValidationError(str(self.path), [problem])

    def _column_names(self, columns: list[str]) -> dict[str, str]:
        """Canonical role -> the file's own column name; every mapped column must be there."""
        by_name = {str(c).strip(): c for c in columns}
        roles = self.spec.roles
        missing = [(role, c) for role, c in roles.items() if c not in by_name]
        if missing:
            problems = [f"column {c!r} ({role} in the mapping) is missing; the file has "
                        f"{len(columns)} columns: {', '.join(map(str, columns[:25]))}"
                        for role, c in missing]
            if len(columns) == 1 and not self.parquet:
                for other in (",", ";", "\t", "|"):
                    if other != self.spec.separator and other in str(columns[0]):
                        problems.append(f"only one column was found with separator "
                                        f"{self.spec.separator!r}; the header contains {other!r}: "
                                        f"set separator = {other!r} in the mapping")
                        break
            raise DataValidationError(str(self.path), problems)
        return {role: by_name[c] for role, c in roles.items()}

    def _raw_chunks(self) -> Iterator[pl.DataFrame]:
        if not self.path.is_file():
            raise self._fail("file not found")
        if self.path.stat().st_size == 0:
            raise self._fail("the file is empty: no header row and no data rows")
        if self.spec.separator == WHITESPACE and not self.parquet:
            yield from self._whitespace_chunks()
            return
        try:
            if self.parquet:
                yield from self._parquet_chunks()
            else:
                yield from self._csv_chunks()
        except pl.exceptions.NoDataError:
            raise self._fail("the file is empty: no header row") from None
        except pl.exceptions.PolarsError as exc:
            what = "Parquet" if self.parquet else f"CSV with separator {self.spec.separator!r}"
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise self._fail(f"cannot be read as {what} after {self.report.rows_read:,} rows: "
                             f"{detail}") from None

    def _parquet_chunks(self) -> Iterator[pl.DataFrame]:
        # Slices of a Parquet scan read only the row groups they need: one chunk in memory at a time.
        lazy = pl.scan_parquet(self.path)
        names = self._column_names(lazy.collect_schema().names())
        lazy = lazy.select([pl.col(c).alias(role) for role, c in names.items()])
        start = 0
        while True:
            chunk = lazy.slice(start, self.chunk_rows).collect()
            if chunk.height == 0:
                return
            yield chunk.with_row_index(_ROW, offset=start)
            start += chunk.height

    def _csv_chunks(self) -> Iterator[pl.DataFrame]:
        """The file in blocks of whole rows (about `chunk_rows` each, at most that), parsed by polars.

        Reading block by block holds one block at a time (polars' own streaming reader runs ahead
        of a slower consumer and buffers the file). A block ends at a line break outside quotes: the
        number of quote characters before it is even.
        """
        sep = self.spec.separator
        with open(self.path, "rb") as fh:
            header = fh.readline()
            columns = pl.read_csv(io.BytesIO(header), separator=sep, infer_schema=False,
                                  raise_if_empty=True).columns
            names = self._column_names(columns)
            sample = fh.read(1 << 16)
            lines = max(1, sample.count(b"\n"))
            block_bytes = max(1 << 16, int(len(sample) / lines * self.chunk_rows))
            pending, start = sample, 0
            while True:
                data = fh.read(block_bytes)
                buf = pending + data
                if not buf:
                    return
                if data:  # cut at the last line break outside quotes; keep the rest for later
                    cut = buf.rfind(b"\n") + 1
                    while cut > 0 and buf.count(b'"', 0, cut) % 2:
                        cut = buf.rfind(b"\n", 0, cut - 1) + 1
                    if cut == 0:
                        pending = buf
                        continue
                    buf, pending = buf[:cut], buf[cut:]
                else:
                    pending = b""
                if not buf.strip(b"\r\n") and not data:
                    return
                chunk = pl.read_csv(io.BytesIO(header + buf), separator=sep, infer_schema=False,
                                    columns=list(names.values()))
                chunk = chunk.select([pl.col(c).alias(role) for role, c in names.items()])
                chunk = chunk.with_row_index(_ROW, offset=start)
                start += chunk.height
                for offset in range(0, chunk.height, self.chunk_rows):  # never more than chunk_rows
                    yield chunk.slice(offset, self.chunk_rows)

    def _whitespace_chunks(self) -> Iterator[pl.DataFrame]:
        try:
            header = pd.read_csv(self.path, sep=r"\s+", nrows=0, dtype=str)
            names = self._column_names([str(c) for c in header.columns])
            reader = pd.read_csv(self.path, sep=r"\s+", dtype=str, keep_default_na=False,
                                 usecols=list(names.values()), chunksize=self.chunk_rows,
                                 skip_blank_lines=False)
            start = 0
            for chunk in reader:
                columns = {role: pl.Series(role, chunk[c].to_numpy(dtype=object), pl.String)
                           for role, c in names.items()}
                frame = pl.DataFrame(columns).with_row_index(_ROW, offset=start)
                start += len(chunk)
                yield frame
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise self._fail(f"cannot be read as columns separated by blanks after "
                             f"{self.report.rows_read:,} rows: {exc}") from None

    # ------------------------------------------------------------------ validation

    def _validate(self, raw: pl.DataFrame) -> pl.DataFrame:
        spec, report = self.spec, self.report
        n = raw.height
        if n and raw[_ROW][0] != report.rows_read:  # chunks must arrive in file order
            raise self._fail(f"internal: chunk starting at row {raw[_ROW][0]} arrived after "
                             f"{report.rows_read} rows")
        lines = raw[_ROW] + (1 if self.parquet else 2)  # header = line 1
        report.rows_read += n
        bad = pl.Series(np.zeros(n, dtype=bool))

        customer = _text(raw[CUSTOMER])
        empty = customer == ""
        report._add("customer-empty", spec.customer, "have an empty customer id", empty, customer, lines)
        bad |= empty
        if self.customers is not None:
            unknown = ~customer.is_in(self.customers) & ~empty
            report._add("customer-unknown", spec.customer,
                        f"name a customer that is not in {self.customers_source}", unknown,
                        customer, lines)
            bad |= unknown

        raw_ts = raw[TIMESTAMP]
        ts_text = _text(raw_ts)
        if raw_ts.dtype == pl.Date or isinstance(raw_ts.dtype, pl.Datetime):  # typed (Parquet)
            ts = raw_ts.cast(pl.Datetime("us", getattr(raw_ts.dtype, "time_zone", None)))
            if getattr(ts.dtype, "time_zone", None):
                ts = ts.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
            empty = raw_ts.is_null()
        else:
            ts = parse_timestamps(ts_text, spec.timestamp_format)
            empty = ts_text == ""
        in_range = ((ts >= _NS_MIN) & (ts <= _NS_MAX)).fill_null(False)
        if not in_range.all():
            ts = ts.scatter((~in_range).arg_true(), None)
        unreadable = ~in_range & ~empty
        reason = (f"have a timestamp that does not match the format {spec.timestamp_format!r}"
                  if spec.timestamp_format else
                  "have a timestamp that is not an ISO 8601 date or date-time")
        report._add("timestamp-empty", spec.timestamp, "have an empty timestamp", empty, ts_text, lines)
        report._add("timestamp-unreadable", spec.timestamp, reason + " between 1678 and 2261",
                    unreadable, ts_text, lines)
        bad |= empty | unreadable

        raw_amount = raw[AMOUNT]
        amount_text = _text(raw_amount)
        if raw_amount.dtype.is_numeric():
            amount = raw_amount.cast(pl.Float64)
            empty = amount.is_null()
        else:
            amount = amount_text.cast(pl.Float64, strict=False)
            empty = amount_text == ""
        not_number = ((amount.is_null() & ~empty) | amount.is_nan()).fill_null(False)
        infinite = amount.is_infinite().fill_null(False)
        negative = (amount < 0).fill_null(False) & ~infinite
        report._add("amount-empty", spec.amount, "have an empty amount", empty, amount_text, lines)
        report._add("amount-not-number", spec.amount, "have an amount that is not a number",
                    not_number, amount_text, lines)
        report._add("amount-infinite", spec.amount, "have an infinite amount", infinite,
                    amount_text, lines)
        report._add("amount-negative", spec.amount, "have a negative amount", negative,
                    amount_text, lines)
        bad |= empty | not_number | infinite | negative

        report.rows_rejected += int(bad.sum())
        columns = [customer.alias(CUSTOMER), ts.cast(pl.Datetime("ns")).alias(TIMESTAMP),
                   amount.alias(AMOUNT)]
        columns += [_text(raw[role]).alias(role) for role in (CHANNEL, CATEGORY) if role in raw.columns]
        return pl.DataFrame(columns).filter(~bad)

    def __iter__(self) -> Iterator[pl.DataFrame]:
        any_rows = False
        for raw in self._raw_chunks():
            any_rows = any_rows or raw.height > 0
            yield self._validate(raw)
        if not any_rows:
            raise self._fail("the file has a header but no data rows")
        if self.report.rows_kept == 0:
            raise DataValidationError(str(self.path), [
                f"none of the {self.report.rows_read:,} rows can be used", *self.report.problems])


def load_transactions(path: str | Path, spec: TransactionSpec | str | Path, *,
                      customers: Iterable[str] | str | Path | None = None,
                      strict: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> TransactionLog:
    """Read and validate a whole purchase log (CSV or Parquet) into memory.

    `spec` is a TransactionSpec or the path of a mapping file; `customers` (ids, or a CSV of them)
    overrides the mapping's `customers` list. Bad rows are set aside with their reasons in
    `log.report`; with `strict=True` any bad row raises DataValidationError instead.
    """
    if not isinstance(spec, TransactionSpec):
        spec = load_transaction_mapping(spec)
    reader = TransactionReader(path, spec, customers=customers, chunk_rows=chunk_rows)
    chunks = list(reader)
    if strict:
        reader.report.raise_if_rejected()
    return TransactionLog(frame=to_pandas(pl.concat(chunks)), spec=spec, report=reader.report)
