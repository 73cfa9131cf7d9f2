"""How subject ids and purposes are compared: one normalisation for grant, withdraw, check and
pseudonym, so that "１１" (fullwidth), "11\u200b" (a zero-width space), " C-7 " and "c-7", or the
purposes "Model_Training" and "model training", cannot silently name different things.

Subject ids follow the rule declared in the registry (`ledger_meta.subject_id_rule`):

- `nfkc-casefold/1` (the default of ledgers created since issue #15): Unicode NFKC (fullwidth
  and other compatibility forms become their plain equivalents), invisible format characters
  (category Cf: zero-width spaces and joiners, byte-order marks, soft hyphens, direction marks)
  removed, surrounding white space trimmed and inner runs collapsed to one space, then case
  folded: ids are case-insensitive. Leading zeros are kept: "013" and "13" are different ids.
- `nfkc/1`: the same, case-sensitive (declare it before the first subject is recorded, for id
  schemes where case matters).
- `nfc/1`: what ledgers that recorded subjects before revision 0003 used (NFC, trimmed,
  case-sensitive); their pseudonyms are in the chain, so the rule stays with them.

Purposes are compared by their key: NFKC, format characters removed, case folded, and every run
of white space, '_' and '-' made one '_' ("Model Training", "model-training" and "MODEL_TRAINING"
are the purpose `model_training`). Events keep the purpose as it was written (cleaned of
invisible characters and extra spaces); withdrawals are recorded under the spelling of the
consent they withdraw.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

from fedpact.audit.events import LedgerError

DEFAULT_ID_RULE = "nfkc-casefold/1"
CASE_SENSITIVE_ID_RULE = "nfkc/1"
LEGACY_ID_RULE = "nfc/1"

_SEPARATORS = re.compile(r"[\s_\-]+")


def clean_text(value: str) -> str:
    """NFKC, invisible format characters removed, white space trimmed and collapsed."""
    text = unicodedata.normalize("NFKC", value)
    if not text.isascii():
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.split())


def purpose_key(purpose: Any) -> str:
    """The key purposes are compared by (see the module docstring)."""
    if not isinstance(purpose, str):
        raise LedgerError(f"purpose must be text, got {purpose!r}")
    return _SEPARATORS.sub("_", clean_text(purpose).casefold()).strip("_")


def _legacy(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def _case_folded(text: str) -> str:
    return clean_text(text).casefold()


ID_RULES: dict[str, Callable[[str], str]] = {
    DEFAULT_ID_RULE: _case_folded,
    CASE_SENSITIVE_ID_RULE: clean_text,
    LEGACY_ID_RULE: _legacy,
}
"""Each rule's function from an id's text to the text that is pseudonymised."""


def id_rule(name: str) -> Callable[[str], str]:
    try:
        return ID_RULES[name]
    except KeyError:
        raise LedgerError(
            f"unknown subject id rule {name!r} (one of {', '.join(sorted(ID_RULES))})"
        ) from None


__all__ = ["CASE_SENSITIVE_ID_RULE", "DEFAULT_ID_RULE", "ID_RULES", "LEGACY_ID_RULE",
           "clean_text", "id_rule", "purpose_key"]
