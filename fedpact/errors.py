"""Errors a user can act on. The CLI prints their message and exits non-zero, never a traceback."""

from __future__ import annotations


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
