"""One error type for every expected failure, so the CLI can print it without a stack trace.

An expected failure (bad config, corrupt data, exhausted budget, wrong key...) must tell the
user what is wrong *and* how to fix it. Carrying the fix as a field keeps every raise site honest.
"""

from __future__ import annotations

# The base type and the security errors live in the bottom layer (secure/ imports nothing above it);
# re-exported here so every role catches one FedveilError.
from fedveil.secure.errors import FedveilError, RangeError, SecurityError

__all__ = ["FedveilError", "SecurityError", "RangeError", "ConfigError", "DataError", "BudgetExhausted"]


class ConfigError(FedveilError):
    """The federation TOML or a CLI flag is invalid."""


class DataError(FedveilError):
    """A data source is missing, corrupt, or does not match the expected schema."""


class BudgetExhausted(FedveilError):
    """Training one more round would exceed the organization's privacy budget."""
