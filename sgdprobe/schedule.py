"""When to measure."""

from __future__ import annotations

from sgdprobe.errors import ConfigError


class Schedule:
    """Decides, step by step, whether to measure.

    - ``every=n`` (int): steps n, 2n, 3n, ... (deterministic; the first measured step is n).
    - ``every="auto"`` (default): a time budget. Measure at the first step, then whenever the time
      spent measuring so far is at most ``overhead`` (default 5 %) of the training time seen so far.
      Cheap models get frequent measurements, expensive ones rare ones, and the total overhead stays
      near ``overhead`` whatever the model. The measured steps depend on timing, so two runs may measure
      at different steps (training itself is unaffected); use an integer for reproducible steps.
    """

    def __init__(self, every: int | str = "auto", overhead: float = 0.05):
        if every != "auto" and not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"every must be a positive integer or 'auto', got {every!r}")
        if not (0 < overhead <= 10):
            raise ConfigError(f"overhead must be a fraction in (0, 10], got {overhead!r}")
        self.every = every
        self.overhead = overhead
        self.train_seconds = 0.0
        self.measure_seconds = 0.0
        self.measurements = 0

    def due(self, step: int) -> bool:
        if self.every == "auto":
            return self.measurements == 0 or self.measure_seconds <= self.overhead * self.train_seconds
        return step % self.every == 0

    def state_dict(self) -> dict:
        return {
            "train_seconds": self.train_seconds,
            "measure_seconds": self.measure_seconds,
            "measurements": self.measurements,
        }

    def load_state_dict(self, state: dict) -> None:
        self.train_seconds = float(state["train_seconds"])
        self.measure_seconds = float(state["measure_seconds"])
        self.measurements = int(state["measurements"])
