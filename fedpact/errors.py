"""Errors a user can act on. The CLI prints their message and exits non-zero, never a traceback."""

from __future__ import annotations

import enum
import os
import re
from typing import TypeVar

_E = TypeVar("_E", bound=enum.Enum)


class FedpactError(Exception):
    """Base of every error whose message is meant for the person running fedpact."""

    exit_code = 2


class ConfigurationError(FedpactError):
    """A job, mapping or command-line setting is missing or out of range."""


class DataValidationError(FedpactError):
    """A partner's data file does not match its mapping; `problems` lists each one."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{source}: {len(self.problems)} {noun} found:\n{lines}")


def parse_choice(choices: type[_E], value: _E | str, what: str) -> _E:
    """The member of the string enum `choices` named by `value` (case and surrounding spaces
    ignored), or a ConfigurationError that names `what` and lists the supported values."""
    if isinstance(value, choices):
        return value
    try:
        return choices(str(value).strip().lower())
    except ValueError:
        raise ConfigurationError(
            f"{what} {value!r} is not supported; use one of: "
            + ", ".join(str(member.value) for member in choices)
        ) from None


class Problem(str):
    """One problem of a `DataValidationError`: the full text for the partner (line numbers, example
    values) and `safe`, the text that may leave the partner's node (no line numbers, no cell
    values). A plain `str` problem is its own safe text, after `node_safe_reason`'s scrubbing."""

    safe: str

    def __new__(cls, text: str, safe: str | None = None) -> Problem:
        obj = super().__new__(cls, text)
        obj.safe = text if safe is None else safe
        return obj

    def __reduce__(self):
        return (Problem, (str(self), self.safe))


# An absolute path: /..., ~/..., C:\... or \\server\... (not the "/" inside "n/a" or "a/b").
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/\\-])(?:[A-Za-z]:[\\/]|\\\\|~/|/)[^\s'\",;:()\[\]{}]+")
_LINE_PARTS = (
    # models.streaming: "in lines 2-100001 (line numbers below count from line 2): ..."
    re.compile(r"\bin lines \d+\s*-\s*\d+ \(line numbers below count from line \d+\):\s*"),
    re.compile(r"^lines \d+\s*-\s*\d+:\s*"),
    # "; lines 3, 5, 6, …", "at line 4, column 'x' (character 7)", "on lines 5-9", "(line 12)"
    re.compile(r"[;,]?\s*\(?\b(?:at |on |in |from )?lines? \d+(?:\s*(?:,|-|–)\s*\d+)*(?:,\s*…)?"
               r"(?:,\s*column [^\s;,)]+(?: \(character \d+\))?)?\)?"),
)
_EXAMPLES = re.compile(r",?\s*\(?\be\.g\. .*?(?=\)?;\s|\)?$)")
_SAFE_PROBLEMS = 20
_SAFE_CHARS = 300


def _scrub(text: str, dataset: str, paths: tuple[str, ...] = (), label: str | None = None) -> str:
    label = dataset if label is None else label
    for path in sorted({p for p in paths if p}, key=len, reverse=True):
        text = text.replace(path, label)
    text = _ABSOLUTE_PATH.sub(label, text)
    for pattern in _LINE_PARTS:
        text = pattern.sub("", text)
    text = re.sub(r"\s*;\s*(?:;\s*)+", "; ", text)
    text = re.sub(r"^\s*[;,]\s*|\s*[;,]\s*$", "", text.strip())
    return text if len(text) <= _SAFE_CHARS else text[:_SAFE_CHARS] + "…"


def node_safe_reason(exc: BaseException, dataset: str, *, path_label: str | None = None) -> str:
    """`exc` as a message that may leave the partner's node (a refusal reason sent to the
    coordinator): it names `dataset` and the columns and problems, with file paths replaced by
    `path_label` (default: `dataset`) and without line numbers or cell values (ids, example values)."""
    paths: tuple[str, ...] = ()
    if isinstance(exc, DataValidationError):
        paths = (exc.source, os.path.abspath(exc.source)) if exc.source else ()
        problems = []
        for problem in exc.problems:
            text = problem.safe if isinstance(problem, Problem) else _EXAMPLES.sub("", str(problem))
            text = _scrub(text, dataset, paths, path_label)
            if text and text not in problems:
                problems.append(text)
        more = len(problems) - _SAFE_PROBLEMS
        shown = problems[:_SAFE_PROBLEMS] + ([f"… and {more} more"] if more > 0 else [])
        noun = "problem" if len(problems) == 1 else "problems"
        return f"{dataset}: {len(problems)} {noun} found:\n" + "\n".join(f"  - {p}" for p in shown)
    if isinstance(exc, OSError):
        paths = tuple(str(p) for p in (exc.filename, exc.filename2) if p)
        text = exc.strerror or type(exc).__name__
    elif isinstance(exc, FedpactError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = _scrub(text, dataset, paths, path_label)
    if text == dataset or text.startswith(f"{dataset}:"):
        return text
    return f"{dataset}: {text}"
