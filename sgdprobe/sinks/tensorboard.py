"""TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``.

Each measurement is flushed to disk before the optimizer step returns, so a run killed at any point
has every finished measurement on disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sgdprobe.errors import ConfigError
from sgdprobe.plugin_manager import hookimpl


class TensorBoardSink:
    """Scalars under their tags, events as text and as ``probe/events/<kind>`` counters, and one
    custom-scalars layout putting each quantity beside its threshold."""

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        logdir = os.fspath(logdir)
        try:
            os.makedirs(logdir, exist_ok=True)
            probe_file = os.path.join(logdir, ".sgdprobe-write-test")
            with open(probe_file, "w"):
                pass
            os.remove(probe_file)
        except OSError as exc:
            raise ConfigError(
                f"cannot write TensorBoard logs to {logdir!r} ({exc.strerror}); pass a writable logdir= "
                "or logdir=None to keep results in memory only."
            ) from None
        self.logdir = logdir
        self._writer_class = SummaryWriter
        self.writer = SummaryWriter(log_dir=logdir, purge_step=purge_step)
        self._event_counts: dict[str, int] = {}

    def resume(self, step: int) -> None:
        """Continue the run from a checkpoint taken at ``step``: events after it (written by the run
        that crashed or was stopped) are hidden by TensorBoard (``purge_step``), the new ones appended."""
        self.writer.close()
        self.writer = self._writer_class(log_dir=self.logdir, purge_step=step + 1)

    def add_layout(self, charts: Mapping[str, Mapping[str, list[str]]]) -> None:
        """``{category: {chart title: [tags]}}`` drawn as multi-line charts."""
        layout = {
            category: {title: ["Multiline", list(tags)] for title, tags in group.items()}
            for category, group in charts.items()
            if group
        }
        if layout:
            self.writer.add_custom_scalars(layout)

    @hookimpl
    def sgdprobe_log(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    @hookimpl
    def sgdprobe_event(self, step: int, kind: str, source: str, message: str) -> None:
        self._event_counts[kind] = self._event_counts.get(kind, 0) + 1
        self.writer.add_scalar(f"probe/events/{kind}", self._event_counts[kind], global_step=step)
        self.writer.add_text(f"probe/events/{source}", f"step {step} [{kind}] {message}", global_step=step)
        self.writer.flush()

    @hookimpl
    def sgdprobe_close(self) -> None:
        self.writer.close()
