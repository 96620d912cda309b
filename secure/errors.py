"""The expected-failure types of `fedveil.secure`, kept here so this layer imports nothing above it.

`fedveil.platform.errors` re-exports them and derives its own errors (config, data, budget) from
`FedveilError`, so the CLI prints the `error:`/`fix:` lines for a failure raised here too.
"""

from __future__ import annotations


class FedveilError(Exception):
    """An expected, user-facing failure: `problem` says what went wrong, `fix` what to do."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" Fix: {fix}" if fix else ""))


class SecurityError(FedveilError):
    """A payload failed a cryptographic or protocol check (tampered, replayed, wrong key...)."""


class RangeError(FedveilError, ValueError):
    """A value does not fit the encoding's range, so the aggregate would silently wrap; refused instead.

    Also a ValueError, so callers that treat a bad payload as a rejected client keep doing so.
    """
