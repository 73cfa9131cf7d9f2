"""Errors a user can act on. The CLI prints their message and exits non-zero, never a traceback."""

from __future__ import annotations

import enum
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
