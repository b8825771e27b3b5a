"""Where measurements go: TensorBoard event files, the console. (The in-memory history is kept by
the probe itself.) Sinks are plugins that implement ``sgdprobe_log`` and ``sgdprobe_event``."""

from sgdprobe.sinks.console import ConsoleSink
from sgdprobe.sinks.tensorboard import TensorBoardSink

__all__ = ["ConsoleSink", "TensorBoardSink"]
