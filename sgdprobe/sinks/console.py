"""One short line per measurement on the console (``attach(..., verbose=True)``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from sgdprobe.plugin_manager import hookimpl


class ConsoleSink:
    """Prints ``[sgdprobe] step 120  sharpness/lambda_max=38.1  sharpness/eos_ratio=0.95 ...``."""

    def __init__(self, stream=None, max_items: int = 6):
        self.stream = stream or sys.stderr
        self.max_items = max_items

    @hookimpl
    def sgdprobe_log(self, step: int, scalars: Mapping[str, float]) -> None:
        items = [(k, v) for k, v in scalars.items() if not k.startswith("probe/")][: self.max_items]
        body = "  ".join(f"{k}={v:.4g}" for k, v in items)
        seconds = scalars.get("probe/seconds")
        tail = f"  ({seconds:.2f}s)" if seconds is not None else ""
        print(f"[sgdprobe] step {step}  {body}{tail}", file=self.stream, flush=True)
