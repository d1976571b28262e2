"""Errors stealguard raises on bad input. Each message says what was wrong and what to do."""

from __future__ import annotations


class StealguardError(Exception):
    """Base class: every error the library raises on purpose."""


class UnknownNameError(StealguardError, KeyError):
    """An unknown dataset, model, defense or attack name. Lists the valid names."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} {name!r}; valid {kind} names: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class DatasetNotFoundError(StealguardError, FileNotFoundError):
    """A dataset file is missing: the message names the path looked at and how to provide it."""


class ArtifactError(StealguardError):
    """An artifact (safetensors + manifest) is missing, corrupt, or does not match its manifest."""


class InputError(StealguardError, ValueError):
    """Images of the wrong shape, dtype or range, or non-finite values."""


class QueryBudgetExceeded(StealguardError):
    """A black box refused a batch that would cross its query budget; nothing was answered."""

    def __init__(self, requested: int, used: int, budget: int) -> None:
        self.requested, self.used, self.budget = requested, used, budget
        super().__init__(
            f"query budget exceeded: batch of {requested} would bring the count to "
            f"{used + requested} > budget {budget} ({budget - used} left); nothing of this "
            f"batch was answered"
        )


class ConfigError(StealguardError, ValueError):
    """An invalid option or combination of options."""
