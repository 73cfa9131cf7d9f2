"""Identifier normalisation before matching: e-mail addresses, phone numbers (E.164), generic IDs.

Two partners only match if they write the same customer the same way, so every identifier is
brought to one canonical form first. An identifier that cannot be normalised is counted under a
reason (``invalid_by_reason``) and takes no part in the match: it is never matched as it stands.
"""

from __future__ import annotations

import enum
import math
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedpact.errors import ConfigurationError, parse_choice

ConsentFilter = Callable[[Sequence[str]], np.ndarray]
"""Given the raw subject ids of the rows, return a boolean array: True where the row may take part."""


class IdKind(str, enum.Enum):  # noqa: UP042 - the documented (str, Enum) form
    """What kind of identifier a column holds; decides how it is normalised."""

    EMAIL = "email"
    PHONE = "phone"
    STRING = "string"

    @classmethod
    def parse(cls, value: IdKind | str) -> IdKind:
        return parse_choice(cls, value, "identifier kind")


# Reasons an identifier is rejected (the keys of NormalizedIds.invalid_by_reason).
MISSING = "missing"
EMPTY = "empty"
NOT_TEXT = "not_text"
TOO_LONG = "too_long"
CONTROL_CHARACTERS = "control_characters"
MISSING_AT = "missing_at"
MULTIPLE_AT = "multiple_at"
INTERNAL_WHITESPACE = "internal_whitespace"
BAD_LOCAL_PART = "bad_local_part"
NON_ASCII_LOCAL_PART = "non_ascii_local_part"
BAD_DOMAIN = "bad_domain"
NOT_A_NUMBER = "not_a_number"
UNKNOWN_COUNTRY = "unknown_country_code"
TOO_SHORT = "too_short"
PHONE_TOO_LONG = "too_long_for_a_phone_number"
INVALID_NUMBER = "invalid_number"

REASONS = frozenset({
    MISSING, EMPTY, NOT_TEXT, TOO_LONG, CONTROL_CHARACTERS, MISSING_AT, MULTIPLE_AT,
    INTERNAL_WHITESPACE, BAD_LOCAL_PART, NON_ASCII_LOCAL_PART, BAD_DOMAIN, NOT_A_NUMBER,
    UNKNOWN_COUNTRY, TOO_SHORT, PHONE_TOO_LONG, INVALID_NUMBER,
})

MAX_STRING_ID_LENGTH = 256


@dataclass(frozen=True)
class NormalizedIds:
    """The canonical identifiers of one party's rows, and why the others were left out.

    ``values[i]`` is the normalised identifier of input row ``rows[i]``; rows that failed
    normalisation are counted in ``invalid_by_reason`` and rows without consent in
    ``excluded_by_consent``; neither appears in ``values``.
    """

    kind: IdKind
    values: list[str]
    rows: np.ndarray
    total: int
    invalid_by_reason: dict[str, int] = field(default_factory=dict)
    excluded_by_consent: int = 0
    _unique: list[str] | None = field(default=None, repr=False, compare=False)
    """The distinct values in first-seen order, when the vectorised path already computed them."""

    @property
    def valid(self) -> int:
        return len(self.values)

    @property
    def invalid(self) -> int:
        return sum(self.invalid_by_reason.values())

    def unique(self) -> list[str]:
        """The distinct identifiers, in first-seen order."""
        if self._unique is not None:
            return list(self._unique)
        return list(dict.fromkeys(self.values))

    def inverse(self, unique: list[str]) -> np.ndarray:
        """For each valid row, the position of its identifier in `unique`."""
        index = {v: i for i, v in enumerate(unique)}
        return np.fromiter(map(index.__getitem__, self.values), dtype=np.int64,
                           count=len(self.values))

    def summary(self) -> dict:
        """Counts only (safe for the audit ledger): never an identifier."""
        return {
            "kind": self.kind.value,
            "rows": self.total,
            "valid": self.valid,
            "invalid": self.invalid,
            "invalid_by_reason": dict(sorted(self.invalid_by_reason.items())),
            "excluded_by_consent": self.excluded_by_consent,
        }


# --------------------------------------------------------------------------- entropy

LOW_ENTROPY_KINDS = frozenset({IdKind.PHONE})
"""Kinds whose every value can be enumerated: a numbering plan holds at most ~10^10 numbers."""
ENUMERABLE_DIGITS = 12
"""A `string` identifier of at most this many digits (and separators) is enumerable: 10^12
keyed hashes are days of one core, minutes of a GPU (customer numbers, dates of birth)."""
ENUMERABLE_SHARE = 0.1
"""A `string` column counts as low-entropy when at least this share of its values is."""
_SEPARATORS = re.compile(r"[\s./:_-]+")
_ENTROPY_SAMPLE = 20_000


def _short_number(value: str) -> bool:
    digits = _SEPARATORS.sub("", value)
    return 0 < len(digits) <= ENUMERABLE_DIGITS and digits.isascii() and digits.isdigit()


def enumeration_risk(kind: IdKind | str, values: Sequence[str]) -> str | None:
    """Why keyed hashes of these identifiers can be reversed by whoever holds the key, or None.

    Low-entropy (enumerable) identifiers: every phone number (`IdKind.PHONE`), and a `string`
    column of which at least 10 % of the values (on an even sample of at most 20,000) are
    numbers of at most 12 digits, separators aside — customer numbers, dates of birth
    (``1984-03-02``), postcodes. E-mail addresses and other text are not counted (guessable,
    not enumerable). A heuristic floor: an identifier with a fixed prefix and a short counter
    (``CUST-000123``) is enumerable too, and is not detected; judge the column, not the check.
    The text names no identifier (it may go to the partner as the reason of an abort).
    """
    kind = IdKind.parse(kind)
    if kind in LOW_ENTROPY_KINDS:
        return "phone numbers are low-entropy (a numbering plan has at most ~10^10)"
    if kind is not IdKind.STRING or not values:
        return None
    step = max(1, len(values) // _ENTROPY_SAMPLE)
    sample = values[::step]
    share = sum(_short_number(v) for v in sample if isinstance(v, str)) / len(sample)
    if share >= ENUMERABLE_SHARE:
        return (f"{share:.0%} of the ids are numbers of at most {ENUMERABLE_DIGITS} digits, "
                f"low-entropy (at most 10^{ENUMERABLE_DIGITS} candidates)")
    return None


# --------------------------------------------------------------------------- e-mail

_LOCAL_CHARS = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{1,59}})")
_WS_RE = re.compile(r"\s")

GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
"""Gmail ignores dots in the local part and anything after '+'; googlemail.com is gmail.com."""

SUBADDRESS_DOMAINS = frozenset({
    "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "msn.com",
    "icloud.com", "me.com", "mac.com", "protonmail.com", "proton.me", "pm.me", "fastmail.com",
})
"""Providers that deliver ``name+tag@`` to ``name@`` (sub-addressing), so the tag is dropped."""


class _EmailNormalizer:
    """Per-value e-mail normalisation; domains (few, repeated) are checked once and cached."""

    def __init__(self, provider_rules: bool):
        self.provider_rules = provider_rules
        self._domains: dict[str, str | None] = {}

    def _domain(self, domain: str) -> str | None:
        if len(self._domains) > 100_000:
            self._domains.clear()
        if domain.isascii():
            ok = _DOMAIN_RE.fullmatch(domain) is not None and len(domain) <= 253
            norm = domain if ok else None
        else:
            norm = _idna(domain)
        if norm is not None and self.provider_rules and norm == "googlemail.com":
            norm = "gmail.com"
        self._domains[domain] = norm
        return norm

    def __call__(self, raw: str) -> tuple[str | None, str | None]:
        s = raw.strip().lower()
        if s.count("@") != 1 or len(s) > 254:
            return None, _email_reason(s)
        local, _, domain = s.partition("@")
        if (not local or len(local) > 64 or _LOCAL_CHARS.fullmatch(local) is None
                or local[0] == "." or local[-1] == "." or ".." in local):
            return None, _email_reason(s)
        norm_domain = self._domains.get(domain, "")
        if norm_domain == "":
            norm_domain = self._domain(domain)
        if norm_domain is None:
            return None, _email_reason(s) or BAD_DOMAIN
        if self.provider_rules:
            if norm_domain in SUBADDRESS_DOMAINS and "+" in local:
                local = local.partition("+")[0]
            if norm_domain == "gmail.com":
                local = local.replace(".", "")
            if not local:
                return None, BAD_LOCAL_PART
        return f"{local}@{norm_domain}", None


def _idna(domain: str) -> str | None:
    """ASCII (punycode) form of an internationalised domain, or None if it is not a domain."""
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    return ascii_domain if _DOMAIN_RE.fullmatch(ascii_domain) else None


def _email_reason(s: str) -> str | None:
    """Why `s` (trimmed, lower-cased) is not an address (None: only its domain can be at fault)."""
    if not s:
        return EMPTY
    if _control(s):
        return CONTROL_CHARACTERS
    if _WS_RE.search(s):
        return INTERNAL_WHITESPACE
    if len(s) > 254:
        return TOO_LONG
    at = s.count("@")
    if at == 0:
        return MISSING_AT
    if at > 1:
        return MULTIPLE_AT
    local = s.partition("@")[0]
    if not local.isascii():
        return NON_ASCII_LOCAL_PART
    if (not local or len(local) > 64 or _LOCAL_CHARS.fullmatch(local) is None
            or local[0] == "." or local[-1] == "." or ".." in local):
        return BAD_LOCAL_PART
    return None


def _control(s: str) -> bool:
    """True if `s` holds a control or invisible format character (tab, NUL, zero-width space...)."""
    return not s.isprintable() and any(unicodedata.category(c) in ("Cc", "Cf") for c in s)


_ASCII_SPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
"""The ASCII characters str.strip() removes (str.isspace() is true for exactly these below 128)."""
_LOCAL_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_FAST_EMAIL = rf"^{_LOCAL_ATOM}(?:\.{_LOCAL_ATOM})*@[a-z0-9.-]+$"
"""What the vectorised path accepts: one '@', a local part as `_EmailNormalizer` accepts it (the
allowed characters, no leading, trailing or double dot) and a domain of DNS characters (checked
per distinct domain by `_EmailNormalizer._domain`)."""
FAST_PATH_MIN_ROWS = 2048
_POLARS_FORKED = False
"""True in a process forked from one that had imported polars: polars' thread pool does not
survive fork() (a forked child that uses it can hang), so such a child keeps to the per-row path."""


def _note_fork() -> None:
    global _POLARS_FORKED
    if "polars" in sys.modules:
        _POLARS_FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_note_fork)


def _emails_vectorised(raw: list, normalizer: _EmailNormalizer):
    """Plain ASCII e-mail addresses normalised column-wise with polars; the rest left to Python.

    Returns (normalised value or None per row, rows still to do one by one, mask of rows done,
    the distinct values in first-seen order when no row is left to do), or None when the
    column is not all text/None (the caller then normalises every row one by one). Exactly what
    `normalizer(value)` returns for every row it accepts: the same strip (ASCII whitespace),
    lower-casing, local-part rules, the same domain check (run once per distinct domain) and the
    same provider rules; any row that could differ (non-ASCII, quoted, too long, an unusual
    domain, provider rules that empty the local part) goes to the per-row path instead.
    """
    import polars as pl

    try:
        col = pl.Series("v", raw, dtype=pl.String, strict=True)
    except (TypeError, ValueError, pl.exceptions.PolarsError):
        return None
    text = col.str.strip_chars(_ASCII_SPACE).str.to_lowercase()
    at = text.str.find("@", literal=True)
    ok = ((col.str.len_bytes() == col.str.len_chars()) & (text.str.len_bytes() <= 254)
          & text.str.contains(_FAST_EMAIL) & (at <= 64)).fill_null(False)
    domain = text.str.slice(at + 1)
    # An ASCII domain that passes the check is its own canonical form, except googlemail.com.
    canon = {d: normalizer._domain(d) for d in domain.filter(ok).unique().to_list()}
    if any(c is not None and c != d and not (normalizer.provider_rules and d == "googlemail.com")
           for d, c in canon.items()):  # pragma: no cover - defensive: keep the per-row path exact
        return None
    ok = ok & domain.is_in([d for d, c in canon.items() if c is not None])
    result = text
    if normalizer.provider_rules:
        gmail = domain.is_in(["gmail.com", "googlemail.com"])
        changed = ok & (gmail | (domain.is_in(sorted(SUBADDRESS_DOMAINS))
                                 & text.str.contains("+", literal=True)))
        idx = np.flatnonzero(changed.to_numpy())
        if len(idx):
            sub = pl.DataFrame({"t": text.gather(idx), "at": at.gather(idx),
                                "g": gmail.gather(idx)})
            local = pl.col("t").str.slice(0, pl.col("at"))
            plus = local.str.find("+", literal=True).fill_null(pl.col("at"))
            local = local.str.slice(0, plus)
            local = pl.when("g").then(local.str.replace_all(".", "", literal=True)).otherwise(local)
            dom = pl.when("g").then(pl.lit("gmail.com")).otherwise(
                pl.col("t").str.slice(pl.col("at") + 1))
            fixed = sub.select(local.alias("local"), dom.alias("dom"))
            empty = (fixed["local"].str.len_bytes() == 0).to_numpy()
            new = fixed.select(pl.col("local") + "@" + pl.col("dom")).to_series()
            result = text.scatter(idx, new)
            if empty.any():  # e.g. "+tag@gmail.com": the per-row path names the reason
                ok = ok.scatter(idx[empty], False)
    values = pl.select(pl.when(ok).then(result)).to_series()
    ok_np = ok.to_numpy()
    todo = np.flatnonzero(~ok_np)
    unique = values.filter(ok).unique(maintain_order=True).to_list() if len(todo) == 0 else None
    return values.to_list(), todo, ok_np, unique


# --------------------------------------------------------------------------- phone


def _phone_normalizer(default_region: str | None) -> Callable[[str], tuple[str | None, str | None]]:
    import phonenumbers
    from phonenumbers import NumberParseException, PhoneNumberFormat

    region = None
    if default_region is not None:
        region = default_region.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ConfigurationError(
                f"default_region {default_region!r} is not a region phonenumbers knows "
                "(use an ISO 3166 code such as GB, US, DE, FR, IN, BR)"
            )
    parse_errors = {
        NumberParseException.INVALID_COUNTRY_CODE: UNKNOWN_COUNTRY,
        NumberParseException.NOT_A_NUMBER: NOT_A_NUMBER,
        NumberParseException.TOO_SHORT_AFTER_IDD: TOO_SHORT,
        NumberParseException.TOO_SHORT_NSN: TOO_SHORT,
        NumberParseException.TOO_LONG: PHONE_TOO_LONG,
    }
    parse, is_valid, fmt, e164 = (phonenumbers.parse, phonenumbers.is_valid_number,
                                  phonenumbers.format_number, PhoneNumberFormat.E164)
    length_reasons = {
        phonenumbers.ValidationResult.TOO_SHORT: TOO_SHORT,
        phonenumbers.ValidationResult.TOO_LONG: PHONE_TOO_LONG,
        phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: UNKNOWN_COUNTRY,
    }

    def one(raw: str) -> tuple[str | None, str | None]:
        s = raw.strip()
        if not s:
            return None, EMPTY
        if len(s) > 64:
            return None, PHONE_TOO_LONG
        try:
            number = parse(s, region)
        except NumberParseException as exc:
            return None, parse_errors.get(exc.error_type, NOT_A_NUMBER)
        if not is_valid(number):
            why = phonenumbers.is_possible_number_with_reason(number)
            return None, length_reasons.get(why, INVALID_NUMBER)
        return fmt(number, e164), None

    return one


# --------------------------------------------------------------------------- generic string

_SPACE_RUN = re.compile(r"\s+")


def _string_normalizer(case_sensitive: bool) -> Callable[[str], tuple[str | None, str | None]]:
    def one(raw: str) -> tuple[str | None, str | None]:
        s = raw.strip()
        if not s:
            return None, EMPTY
        if not s.isascii():
            s = unicodedata.normalize("NFKC", s).strip()
        s = _SPACE_RUN.sub(" ", s)
        if _control(s):
            return None, CONTROL_CHARACTERS
        if len(s) > MAX_STRING_ID_LENGTH:
            return None, TOO_LONG
        return (s if case_sensitive else s.casefold()), None

    return one


# --------------------------------------------------------------------------- entry point


def identifier_normalizer(
    kind: IdKind | str,
    *,
    default_region: str | None = None,
    provider_rules: bool = True,
    case_sensitive: bool = False,
) -> Callable[[str], tuple[str | None, str | None]]:
    """The per-value function behind `normalize_ids`: text -> (normalised, None) | (None, reason)."""
    kind = IdKind.parse(kind)
    if kind is IdKind.EMAIL:
        return _EmailNormalizer(provider_rules)
    if kind is IdKind.PHONE:
        return _phone_normalizer(default_region)
    return _string_normalizer(case_sensitive)


def normalize_ids(
    values: Iterable[object],
    kind: IdKind | str,
    default_region: str | None = None,
    *,
    provider_rules: bool = True,
    case_sensitive: bool = False,
    subjects: Sequence[str] | None = None,
    consent_filter: ConsentFilter | None = None,
) -> NormalizedIds:
    """Normalise one party's identifiers; count the invalid ones per reason, never match them.

    `kind` is ``email`` (trim, lower-case, IDNA domain, and with `provider_rules` Gmail dots and
    ``+tags`` of providers that support sub-addressing), ``phone`` (E.164; numbers without a
    ``+`` country code are read in `default_region`) or ``string`` (trim, NFKC, collapse inner
    whitespace, case-folded unless `case_sensitive`). `consent_filter`, if given, is applied to the
    raw `subjects` (default: the raw values) before anything else; rows it refuses are counted in
    ``excluded_by_consent``.
    """
    kind = IdKind.parse(kind)
    one = identifier_normalizer(kind, default_region=default_region,
                                provider_rules=provider_rules, case_sensitive=case_sensitive)
    raw = values if isinstance(values, list) else list(values)
    total = len(raw)
    allowed: np.ndarray | None = None
    excluded = 0
    if consent_filter is not None:
        who = raw if subjects is None else list(subjects)
        if len(who) != total:
            raise ConfigurationError(
                f"subjects has {len(who)} entries but there are {total} identifiers; "
                "give one subject id per row"
            )
        allowed = np.asarray(consent_filter([_subject_text(s) for s in who]), dtype=bool)
        if allowed.shape != (total,):
            raise ConfigurationError(
                f"consent_filter returned an array of shape {allowed.shape}; expected ({total},)"
            )
        excluded = int(total - allowed.sum())

    reasons: Counter[str] = Counter()
    if (kind is IdKind.EMAIL and isinstance(one, _EmailNormalizer)
            and total >= FAST_PATH_MIN_ROWS and not _POLARS_FORKED):
        fast = _emails_vectorised(raw if allowed is None else
                                  [v for v, ok in zip(raw, allowed, strict=True) if ok], one)
        if fast is not None:
            kept = np.arange(total) if allowed is None else np.flatnonzero(allowed)
            values, todo, present, unique = fast
            for k in todo.tolist():
                norm, reason = _one_row(raw[kept[k]], one)
                values[k] = norm
                if norm is None:
                    reasons[reason] += 1  # type: ignore[index]
                else:
                    present[k] = True
            out_rows = kept[present]
            out = values if len(out_rows) == len(values) else [v for v in values if v is not None]
            result = NormalizedIds(kind=kind, values=out, rows=out_rows.astype(np.int64),
                                   total=total, invalid_by_reason=dict(reasons),
                                   excluded_by_consent=excluded)
            if unique is not None:
                object.__setattr__(result, "_unique", unique)
            return result

    out: list[str] = []
    rows: list[int] = []
    append, append_row = out.append, rows.append
    for i, v in enumerate(raw):
        if allowed is not None and not allowed[i]:
            continue
        if type(v) is not str:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                reasons[MISSING] += 1
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int, np.integer)):
                reasons[NOT_TEXT] += 1
                continue
            v = str(v)
        norm, reason = one(v)
        if norm is None:
            reasons[reason] += 1  # type: ignore[index]
        else:
            append(norm)
            append_row(i)
    return NormalizedIds(kind=kind, values=out, rows=np.asarray(rows, dtype=np.int64),
                         total=total, invalid_by_reason=dict(reasons),
                         excluded_by_consent=excluded)


def _one_row(v: object, one: Callable[[str], tuple[str | None, str | None]]
             ) -> tuple[str | None, str | None]:
    """One row by the per-value path (the loop of `normalize_ids`, for the vectorised path's rest)."""
    if type(v) is not str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None, MISSING
        if isinstance(v, bool) or not isinstance(v, (str, int, np.integer)):
            return None, NOT_TEXT
        v = str(v)
    return one(v)


def _subject_text(value: object) -> str:
    if isinstance(value, str):
        return value.strip()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def normalize_one(value: str, kind: IdKind | str, default_region: str | None = None, **options) -> str:
    """Normalise a single identifier or raise InvalidIdentifier naming the reason."""
    norm, reason = identifier_normalizer(kind, default_region=default_region, **options)(value)
    if norm is None:
        raise InvalidIdentifier(reason or NOT_TEXT)
    return norm


class InvalidIdentifier(ValueError):
    """An identifier that cannot be normalised; `reason` is one of REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
