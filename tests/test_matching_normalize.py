"""Identifier normalisation: one canonical form per customer, invalid values counted by reason."""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpact.errors import ConfigurationError
from fedpact.privacy.matching import REASONS, InvalidIdentifier, normalize_ids, normalize_one

LOCAL = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=20)
LABEL = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=12)
TLD = st.sampled_from(["com", "org", "de", "co.uk", "IO", "Net"])
PROVIDER = st.sampled_from(["gmail.com", "googlemail.com", "outlook.com", "example.com"])
SPACE = st.sampled_from(["", " ", "  ", "\t", "\n", " \u00a0"])
PHONES = {  # (region, national format, E.164)
    "GB": ("020 7946 0018", "+442079460018"),
    "US": ("(212) 555-0142", "+12125550142"),
    "DE": ("030 901820", "+4930901820"),
    "FR": ("01 42 68 53 00", "+33142685300"),
    "IN": ("098765 43210", "+919876543210"),
    "BR": ("(11) 96123-4567", "+5511961234567"),
}


@st.composite
def emails(draw):
    local = draw(LOCAL).strip(".")
    if not local or ".." in local:
        local = "x"
    domain = draw(st.one_of(PROVIDER, st.builds(lambda a, t: f"{a}.{t}", LABEL, TLD)))
    tag = draw(st.one_of(st.just(""), st.builds(lambda t: "+" + t, LABEL)))
    return f"{local}{tag}@{domain}"


def _norm(value: str, kind: str, region: str | None = None):
    try:
        return normalize_one(value, kind, region)
    except InvalidIdentifier as exc:
        return ("invalid", exc.reason)


@settings(max_examples=150, deadline=None)
@given(emails(), SPACE, SPACE)
def test_email_is_idempotent_and_case_and_whitespace_insensitive(email, left, right):
    once = normalize_one(email, "email")
    assert normalize_one(once, "email") == once
    for variant in (email.upper(), email.lower(), email.swapcase(), left + email + right):
        assert normalize_one(variant, "email") == once


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(PHONES)), SPACE, st.booleans())
def test_phone_is_idempotent_and_format_insensitive(region, pad, international):
    national, e164 = PHONES[region]
    written = e164 if international else national
    assert normalize_one(pad + written + pad, "phone", region) == e164
    assert normalize_one(e164, "phone", region) == e164  # idempotent
    spaced = " ".join(e164[i:i + 3] for i in range(0, len(e164), 3))
    assert normalize_one(spaced, "phone", "US") == e164  # +country code beats the default region


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "-_ ", min_size=1, max_size=30),
       SPACE)
def test_string_ids_idempotent_and_case_insensitive_by_default(value, pad):
    got = _norm(pad + value + pad, "string")
    assert got == _norm(value.upper(), "string") == _norm(value.lower(), "string")
    if not isinstance(got, tuple):
        assert _norm(got, "string") == got
        assert normalize_one(value, "string", case_sensitive=True) == " ".join(value.split())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40), st.sampled_from(["email", "phone", "string"]))
def test_any_text_is_either_normalised_or_rejected_with_a_known_reason(text, kind):
    got = _norm(text, kind, "GB")
    if isinstance(got, tuple):
        assert got[1] in REASONS
    else:
        assert got == _norm(got, kind, "GB")  # whatever is accepted is a fixed point


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "!#$%&*=?^{}~ ", max_size=30))
def test_garbage_without_at_sign_is_never_an_email(text):
    assert _norm(text, "email") in {("invalid", r) for r in REASONS}


@pytest.mark.parametrize("raw,expected", [
    ("  John.Smith+newsletter@GMAIL.com ", "johnsmith@gmail.com"),
    ("j.o.h.n.smith@googlemail.com", "johnsmith@gmail.com"),
    ("Jane.Doe+work@Outlook.com", "jane.doe@outlook.com"),
    ("Jane.Doe+work@example.com", "jane.doe+work@example.com"),  # unknown provider: tag kept
    ("user@BÜCHER.de", "user@xn--bcher-kva.de"),
])
def test_email_provider_rules(raw, expected):
    assert normalize_one(raw, "email") == expected


def test_provider_rules_can_be_switched_off():
    assert normalize_one("J.Smith+x@gmail.com", "email", provider_rules=False) == "j.smith+x@gmail.com"


@pytest.mark.parametrize("raw,reason", [
    ("", "empty"), ("   ", "empty"), ("no-at-sign.example.com", "missing_at"),
    ("a@b@example.com", "multiple_at"), ("john smith@example.com", "internal_whitespace"),
    (".john@example.com", "bad_local_part"), ("jo..hn@example.com", "bad_local_part"),
    ("john@localhost", "bad_domain"), ("john@-example.com", "bad_domain"),
    ("jöhn@example.com", "non_ascii_local_part"), ("jo\u200bhn@example.com", "control_characters"),
    ("+@gmail.com", "bad_local_part"),
])
def test_invalid_emails_name_their_reason(raw, reason):
    assert _norm(raw, "email") == ("invalid", reason)


@pytest.mark.parametrize("raw,region,reason", [
    ("12", "GB", "too_short"), ("not a number", "GB", "not_a_number"),
    ("020 7946 0018", None, "unknown_country_code"), ("+44 20 7946 001", "GB", "invalid_number"),
    ("+1 555 555 55555555555555555", "US", "too_long_for_a_phone_number"),
])
def test_invalid_phones_name_their_reason(raw, region, reason):
    assert _norm(raw, "phone", region) == ("invalid", reason)


def test_normalize_ids_counts_invalid_per_reason_and_keeps_row_positions():
    raw = ["a@example.com", None, float("nan"), "", "bad", "B@Example.com ", "a@example.com", 42]
    ids = normalize_ids(raw, "email")
    assert ids.values == ["a@example.com", "b@example.com", "a@example.com"]
    assert ids.rows.tolist() == [0, 5, 6]
    assert ids.invalid_by_reason == {"missing": 2, "empty": 1, "missing_at": 2}
    assert ids.total == len(raw) and ids.valid + ids.invalid == len(raw)
    assert ids.unique() == ["a@example.com", "b@example.com"]
    assert ids.inverse(ids.unique()).tolist() == [0, 1, 0]
    assert "a@example.com" not in str(ids.summary())


def test_consent_filter_applies_to_raw_subjects_before_normalisation():
    raw = ["A@x.com", "b@x.com", "not-an-email", "c@x.com"]
    subjects = ["s1", "s2", "s3", "s4"]
    seen = []

    def consent(subj):
        seen.append(list(subj))
        return np.array([s in {"s1", "s3"} for s in subj])

    ids = normalize_ids(raw, "email", subjects=subjects, consent_filter=consent)
    assert seen == [subjects]
    assert ids.values == ["a@x.com"] and ids.rows.tolist() == [0]
    assert ids.excluded_by_consent == 2
    assert ids.invalid_by_reason == {"missing_at": 1}  # s3 consented but is not an address


def test_bad_settings_name_the_parameter():
    with pytest.raises(ConfigurationError, match="default_region"):
        normalize_ids(["+44 20 7946 0018"], "phone", "ZZ")
    with pytest.raises(ConfigurationError, match="kind"):
        normalize_ids(["x"], "fax")
    with pytest.raises(ConfigurationError, match="consent_filter"):
        normalize_ids(["x"], "string", consent_filter=lambda s: np.ones(3, dtype=bool))


# Text that reaches every branch of the vectorised e-mail path: ASCII and not, whitespace the
# per-row strip() removes (\x1c-\x1f, \x85, NBSP), provider domains, '+' tags, dots and garbage.
NASTY = st.lists(st.one_of(
    st.builds(lambda sp1, e, sp2, up: (sp1 + (e.upper() if up else e) + sp2),
              SPACE | st.sampled_from(["\x1c", "\x1f ", "\x85", "\x0b"]), emails(),
              SPACE | st.sampled_from(["\x1d", "\r\n"]), st.booleans()),
    st.text(alphabet=string.ascii_letters + "@.+-_ \t\"!~'", max_size=24),
    st.text(max_size=16),
    st.sampled_from(["+tag@gmail.com", "a.+b@gmail.com", "a.+b@outlook.com", "A.B+c@GoogleMail.com",
                     "x@xn--bcher-kva.ch", "a@-x.com", "a" * 65 + "@x.com", "ü@x.com", "a@ü.de",
                     "İ@x.com", "a@x.c0m", "", None, "a@b@c.com", "a@1.2.3.4"]),
), min_size=1, max_size=60)


def _fast_and_slow(values, **options):
    from fedpact.privacy.matching import normalize as norm_module

    saved = norm_module.FAST_PATH_MIN_ROWS
    try:
        norm_module.FAST_PATH_MIN_ROWS = 0
        fast = normalize_ids(values, "email", **options)
        norm_module.FAST_PATH_MIN_ROWS = 10**12
        slow = normalize_ids(values, "email", **options)
    finally:
        norm_module.FAST_PATH_MIN_ROWS = saved
    return fast, slow


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NASTY, st.booleans())
def test_vectorised_email_path_equals_the_per_row_path(values, provider_rules):
    """The polars fast path gives exactly the per-row results: values, rows, reasons, order."""
    fast, slow = _fast_and_slow(values, provider_rules=provider_rules)
    assert fast.values == slow.values
    assert fast.rows.tolist() == slow.rows.tolist()
    assert fast.invalid_by_reason == slow.invalid_by_reason
    assert fast.unique() == list(dict.fromkeys(slow.values))


def test_vectorised_email_path_with_consent_and_mixed_types():
    raw = [" A.B+x@GMail.com", "bad", 7, None, "c@x.org", "c@x.org", "ü@x.com", float("nan")] * 5
    subjects = [f"s{i}" for i in range(len(raw))]

    def consent(subj):
        return np.array([int(s[1:]) % 3 != 0 for s in subj])

    text_only = [v if isinstance(v, str) or v is None else str(v) for v in raw]
    for column in (raw, text_only):  # mixed types fall back to the per-row path as a whole
        fast, slow = _fast_and_slow(column, subjects=subjects, consent_filter=consent)
        assert (fast.values, fast.rows.tolist(), fast.invalid_by_reason,
                fast.excluded_by_consent) == (slow.values, slow.rows.tolist(),
                                              slow.invalid_by_reason, slow.excluded_by_consent)
        assert fast.unique() == slow.unique() and fast.excluded_by_consent == 14


def _normalise_in_child(conn):
    ids = normalize_ids([f"User{i}@Example.org " for i in range(5000)], "email")
    conn.send((ids.valid, ids.unique()[:2]))


def test_a_forked_child_does_not_hang_on_polars():
    """polars' thread pool does not survive fork(): a child forked after polars ran keeps to the
    per-row path instead of hanging."""
    import multiprocessing as mp

    normalize_ids([f"u{i}@x.org" for i in range(5000)], "email")  # polars runs in this process
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_normalise_in_child, args=(send,))
    child.start()
    try:
        assert recv.poll(60), "the forked child hung"
        assert recv.recv() == (5000, ["user0@example.org", "user1@example.org"])
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
