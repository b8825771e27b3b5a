"""Exceptions and warnings raised by sgdprobe."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad input at attach time. The message says what to change."""


class MeasurementError(RuntimeError):
    """A measurement cannot be taken at this step (e.g. the loss is not finite).

    Raised inside a measurement; the probe catches it, skips the measurement and logs the reason.
    """


class ProbeWarning(UserWarning):
    """A measurement was skipped, a plugin was disabled, or a quantity is unavailable."""
