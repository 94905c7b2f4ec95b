"""User-facing errors: each carries the exit code the CLI returns and one sentence for the user.

Exit codes follow DESIGN.md: 0 ok, 1 ran but a budget failed, 2 bad input or usage,
3 internal error.  Raise these from library code; never print.
"""

from __future__ import annotations


class EdgepruneError(Exception):
    """Base of every error edgeprune reports to a user instead of a traceback."""

    exit_code = 3


class BadInputError(EdgepruneError):
    """The user gave us something we cannot work with; the message says what and how to fix it."""

    exit_code = 2


class UnsupportedModelError(BadInputError):
    """The model is valid ONNX but uses something edgeprune cannot handle."""


class CalibrationDataError(BadInputError):
    """Calibration or evaluation data does not fit the model's inputs."""


class TargetUnavailableError(EdgepruneError):
    """The target's execution provider is not installed here, so it cannot be measured."""

    exit_code = 2


class BudgetError(EdgepruneError):
    """The compile ran but the accuracy (or size/latency) budget did not hold."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class VerificationError(EdgepruneError):
    """A pass produced a model that fails the checker or ORT: a bug in edgeprune, not the input."""

    exit_code = 3
