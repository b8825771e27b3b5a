"""When to measure."""

from __future__ import annotations

from sgdprobe.errors import ConfigError


class Schedule:
    """Decides, step by step, whether to measure.

    - ``every=n`` (int): steps n, 2n, 3n, ... (deterministic; the first measured step is n).
    - ``every="auto"`` (default): a time budget. Measure at the first step (so that a misconfigured
      plugin fails at once, and the curves start at the start), then whenever the time spent measuring
      so far *plus the expected cost of one more measurement* (the last one's) is at most ``overhead``
      (default 5 %) of the training time seen so far. While measurements cost about the same, the
      budget therefore holds at every step, not only on average: the probe's time stays within
      ``overhead`` × training time + the first measurement (a measurement dearer than the one before
      it can overshoot by the difference). Cheap models get frequent measurements, expensive ones rare
      ones.
      The measured steps depend on timing, so two runs may measure at different steps (training itself
      is unaffected); use an integer for reproducible steps.
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
        self.last_seconds = 0.0

    def due(self, step: int) -> bool:
        """Whether to measure after optimizer step ``step`` (counted from 1)."""
        if self.every == "auto":
            if self.measurements == 0:
                return True
            return self.measure_seconds + self.last_seconds <= self.overhead * self.train_seconds
        return step % self.every == 0

    def record(self, seconds: float) -> None:
        """Account one measurement (attempted or not) that took ``seconds`` of wall time."""
        self.measure_seconds += seconds
        self.measurements += 1
        self.last_seconds = seconds

    def state_dict(self) -> dict:
        return {
            "train_seconds": self.train_seconds,
            "measure_seconds": self.measure_seconds,
            "measurements": self.measurements,
            "last_seconds": self.last_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.train_seconds = float(state["train_seconds"])
        self.measure_seconds = float(state["measure_seconds"])
        self.measurements = int(state["measurements"])
        self.last_seconds = float(state.get("last_seconds", 0.0))
