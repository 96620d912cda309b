"""One error type for every expected failure, so the CLI can print it without a stack trace.

An expected failure (bad config, corrupt data, exhausted budget, wrong key...) must tell the
user what is wrong *and* how to fix it. Carrying the fix as a field keeps every raise site honest.
"""

from __future__ import annotations


class FedveilError(Exception):
    """An expected, user-facing failure: `problem` says what went wrong, `fix` what to do."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" Fix: {fix}" if fix else ""))


class ConfigError(FedveilError):
    """The federation TOML or a CLI flag is invalid."""


class DataError(FedveilError):
    """A data source is missing, corrupt, or does not match the expected schema."""


class BudgetExhausted(FedveilError):
    """Training one more round would exceed the organization's privacy budget."""


class SecurityError(FedveilError):
    """A payload failed a cryptographic or protocol check (tampered, replayed, wrong key...)."""
