"""Timing, machine description and optional peers, shared by every benchmark."""

from __future__ import annotations

import datetime
import gc
import importlib
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import torch

PEERS = {
    "pyhessian": "pyhessian",
    "curvlinops": "curvlinops-for-pytorch",
    "hessian_eigenthings": "hessian-eigenthings",
    "backpack": "backpack-for-pytorch",
    "cockpit": "cockpit-for-pytorch",
}


def _pkg_resources_shim() -> None:
    """cockpit 1.0.2 imports ``pkg_resources`` (for its own version string only), which setuptools ≥ 81
    no longer ships; give it the two names it uses, backed by importlib.metadata."""
    try:
        import pkg_resources  # noqa: F401

        return
    except ImportError:
        pass
    shim = types.ModuleType("pkg_resources")

    class DistributionNotFound(Exception):
        pass

    def get_distribution(name):
        try:
            return types.SimpleNamespace(version=importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError as exc:
            raise DistributionNotFound(name) from exc

    shim.DistributionNotFound = DistributionNotFound
    shim.get_distribution = get_distribution
    sys.modules["pkg_resources"] = shim


def peer(module: str) -> Any | None:
    """Import an optional peer; ``None`` (and the reason in :data:`MISSING`) when it is not usable."""
    if module in MISSING:
        return None
    if os.environ.get("SGDPROBE_BENCH_NO_PEERS"):
        MISSING[module] = "not used (--no-peers)"
        return None
    try:
        if module == "cockpit":
            _pkg_resources_shim()
        return importlib.import_module(module)
    except Exception as exc:  # not installed, or a missing dependency of it
        MISSING[module] = f"{type(exc).__name__}: {exc}"
        return None


MISSING: dict[str, str] = {}


def why(module: str) -> str:
    """Why a peer is skipped, for the tables."""
    return "peer not available: " + MISSING.get(module, "not installed")


def peer_versions() -> dict[str, str]:
    out = {}
    for dist in PEERS.values():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1):
    """Median wall time of ``fn()`` over ``repeats`` after ``warmup`` calls (synchronized on CUDA).
    Returns ``(median_seconds, all_seconds, last_result)``."""
    result = None
    for _ in range(warmup):
        result = fn()
        sync(device)
    times = []
    for _ in range(repeats):
        gc.collect()
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3, warmup: int = 1):
    """Time several tools round-robin (warm-up round first, then ``repeats`` rounds), so that every tool
    sees the same machine load; a shared or throttled machine then moves the ratios far less than the
    absolute times. Returns ``{label: {"seconds": median, "all_seconds": [...], "results": [...]}}`` or
    ``{label: {"error": "..."}}`` for a tool that raised (it is dropped from later rounds)."""
    out: dict[str, dict[str, Any]] = {label: {"all_seconds": [], "results": []} for label in fns}
    for round_ in range(warmup + repeats):
        for label, fn in fns.items():
            if "error" in out[label]:
                continue
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            try:
                result = fn()
                sync(device)
            except Exception as exc:
                out[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                continue
            if round_ >= warmup:
                out[label]["all_seconds"].append(time.perf_counter() - t0)
                out[label]["results"].append(result)
    for entry in out.values():
        if "error" not in entry:
            entry["seconds"] = statistics.median(entry["all_seconds"])
    return out


class PeakMemory:
    """Peak memory of a block above the memory in use at entry: on CUDA the allocator's peak; on the
    CPU the peak resident set size, sampled every 0.2 ms by a thread (large tensors are mmapped by the
    C allocator and given back when freed, so the resident size follows them; a peak shorter than the
    sampling interval can be missed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(0, max(self._peak, rss_bytes()) - self._base)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "peers": peer_versions(),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except Exception:
        info["cpu"] = platform.processor() or "unknown"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def rel_err(values, reference) -> float:
    """Largest relative error of ``values`` against ``reference`` (both sorted descending first)."""
    a = sorted((float(v) for v in values), reverse=True)
    b = sorted((float(v) for v in reference), reverse=True)[: len(a)]
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)
