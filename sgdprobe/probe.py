"""Attach to an optimizer, decide when to measure, run the plugins in isolation, send results to sinks.

Measurements are taken right after ``optimizer.step()`` (a step post-hook), at the new parameters
θ_{t+1}, on the fixed probe data: the training batch's graph is gone by then, and a fixed probe set
makes successive measurements comparable. The step index counts optimizer steps since attach.
"""

from __future__ import annotations

import atexit
import time
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from sgdprobe.config import DEFAULT_PER_EXAMPLE_MAX_MEMORY, ProbeConfig, build_config, unwrap_optimizer
from sgdprobe.errors import ConfigError, MeasurementError, ProbeWarning
from sgdprobe.plugin_manager import call_one, load_plugins, make_plugin_manager
from sgdprobe.schedule import Schedule
from sgdprobe.sinks import ConsoleSink, TensorBoardSink
from sgdprobe.snapshot import Snapshot


class Probe:
    """A probe attached to one optimizer. Use :func:`attach` to make one.

    :ivar history: ``{tag: [(step, value), ...]}`` of everything measured, always kept in memory.
    :ivar events: ``[(step, kind, source, message), ...]``: skips, warnings, disabled plugins.
    :ivar step: optimizer steps seen since attach.
    """

    def __init__(
        self,
        config: ProbeConfig,
        plugins,
        *,
        schedule: Schedule,
        sinks: list[Any],
        max_failures: int = 3,
        raise_errors: bool = False,
    ):
        self.config = config
        self.schedule = schedule
        self.sinks = sinks
        self.max_failures = max_failures
        self.raise_errors = raise_errors
        self.plugin_names = [p.name for p in plugins]
        self.pm = make_plugin_manager(plugins, sinks)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.events: list[tuple[int, str, str, str]] = []
        self.step = 0
        self.disabled: set[str] = set()
        self._failures: dict[str, int] = defaultdict(int)
        self._handles: list[Any] = []
        self._measuring = False
        self._observed_batch_size: int | None = None
        self._pre_step_params: dict[str, torch.Tensor] | None = None
        self._due: bool | None = None  # the pre-step hook's decision for the step under way
        self._last_time: float | None = None
        self._closed = False
        self.pm.hook.sgdprobe_configure(config=config)
        self.requirements = {r for reqs in self.pm.hook.sgdprobe_requirements() for r in (reqs or [])}
        charts: dict[str, dict[str, list[str]]] = {}
        for impl in self.pm.hook.sgdprobe_layout.get_hookimpls():
            layout = call_one(impl)
            if layout:
                charts[impl.plugin_name] = dict(layout)
        for sink in sinks:
            if hasattr(sink, "add_layout"):
                sink.add_layout(charts)
        ref = weakref.ref(self)
        self._atexit = lambda: (probe := ref()) is not None and probe.close()
        atexit.register(self._atexit)  # interpreter exit flushes every sink

    # ----------------------------------------------------------------- hooks on the training loop
    def _install(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        if "update" in self.requirements:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        if self.config.batch_size is None:
            self._handles.append(model.register_forward_pre_hook(self._observe_batch, with_kwargs=True))

    def _observe_batch(self, module, args, kwargs) -> None:
        if self._measuring or not torch.is_grad_enabled():
            return
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            self._observed_batch_size = int(first.shape[0])

    def _pre_step(self, optimizer, args, kwargs) -> None:
        # With a pre-step hook the decision is taken here, once, so that a measured step always has
        # its update (the time budget could change its answer during the step).
        self._due = self.schedule.due(self.step + 1)
        if self._due:
            names = dict(self.config.model.named_parameters())
            self._pre_step_params = {n: names[n].detach().clone() for n in self.config.param_names}

    def _post_step(self, optimizer, args, kwargs) -> None:
        now = time.perf_counter()
        if self._last_time is not None:
            self.schedule.train_seconds += now - self._last_time
        self.step += 1
        try:
            due, self._due = (self.schedule.due(self.step) if self._due is None else self._due), None
            if due:
                self.measure_now()
        except Exception as exc:  # never let the probe stop a training step
            if self.raise_errors:
                raise
            self._event("skip", "probe", f"measurement failed: {type(exc).__name__}: {exc}")
        self._last_time = time.perf_counter()

    # ----------------------------------------------------------------- one measurement
    def measure_now(self) -> dict[str, float]:
        """Measure at the current parameters with every enabled plugin; returns the logged scalars.

        Failures are isolated: a plugin that raises is skipped at this step (reported as an event and
        a warning), and disabled after ``max_failures`` failures in a row.
        """
        start = time.perf_counter()
        self._measuring = True
        update = None
        if self._pre_step_params is not None:
            names = dict(self.config.model.named_parameters())
            update = {n: names[n].detach() - p for n, p in self._pre_step_params.items()}
            self._pre_step_params = None
        scalars: dict[str, float] = {}
        try:
            snapshot = Snapshot(
                self.config, self.step, update=update, observed_batch_size=self._observed_batch_size
            )
            bad = [n for n, p in snapshot.params.items() if not torch.isfinite(p).all()]
            if bad:
                raise MeasurementError(
                    f"parameters are not finite ({', '.join(bad[:3])}) after step {self.step}"
                )
            scalars = self._run_plugins(snapshot)
        except Exception as exc:
            if self.raise_errors:
                raise
            if _is_oom(exc) and self.config.device.type == "cuda":
                torch.cuda.empty_cache()
            reason = f"{type(exc).__name__}: {exc}"
            self._event("skip", "probe", f"measurement skipped at step {self.step}: {reason}")
        finally:
            self._measuring = False
        if scalars:
            scalars["probe/seconds"] = time.perf_counter() - start
            self._log(scalars)
        self.schedule.record(time.perf_counter() - start)  # the sinks' time counts against the budget
        return scalars

    def _run_plugins(self, snapshot: Snapshot) -> dict[str, float]:
        scalars: dict[str, float] = {}
        device = self.config.device
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        impls = {impl.plugin_name: impl for impl in self.pm.hook.sgdprobe_measure.get_hookimpls()}
        for name in [*self.plugin_names, *[n for n in impls if n not in self.plugin_names]]:
            impl = impls.get(name)
            if impl is None or name in self.disabled:
                continue
            t0 = time.perf_counter()
            try:
                with torch.random.fork_rng(devices=fork_devices):
                    out = call_one(impl, snapshot=snapshot)
                out = _as_scalars(name, out)
                self._failures[name] = 0
            except Exception as exc:
                if self.raise_errors:
                    raise
                if _is_oom(exc) and device.type == "cuda":
                    torch.cuda.empty_cache()
                self._plugin_failed(name, exc)
                continue
            scalars.update(out)
            scalars[f"probe/seconds/{name}"] = time.perf_counter() - t0
        return scalars

    def _plugin_failed(self, name: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self._event("skip", name, f"plugin {name!r} skipped at step {self.step}: {reason}")
        if isinstance(exc, MeasurementError):
            return  # the state at this step (NaN loss, no convergence), not a bug: do not count it
        self._failures[name] += 1
        if self._failures[name] >= self.max_failures:
            self.disabled.add(name)
            self._event(
                "disabled", name, f"plugin {name!r} disabled after {self._failures[name]} failures in a row"
            )

    def _log(self, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.history[tag].append((self.step, value))
        for impl in self.pm.hook.sgdprobe_log.get_hookimpls():
            try:
                call_one(impl, step=self.step, scalars=scalars)
            except Exception as exc:  # a broken sink must not stop training either
                warnings.warn(f"sgdprobe sink {impl.plugin_name} failed: {exc}", ProbeWarning, stacklevel=2)

    def _event(self, kind: str, source: str, message: str) -> None:
        self.events.append((self.step, kind, source, message))
        warnings.warn(f"sgdprobe: {message}", ProbeWarning, stacklevel=3)
        for impl in self.pm.hook.sgdprobe_event.get_hookimpls():
            try:
                call_one(impl, step=self.step, kind=kind, source=source, message=message)
            except Exception:  # pragma: no cover - reported by the warning above already
                pass

    # ----------------------------------------------------------------- lifecycle
    def state_dict(self) -> dict[str, Any]:
        """The probe's position and plugin state, loadable with ``torch.load(weights_only=True)``."""
        plugins = {}
        for impl in self.pm.hook.sgdprobe_state_dict.get_hookimpls():
            state = call_one(impl)
            if state is not None:
                plugins[impl.plugin_name] = dict(state)
        return {
            "step": self.step,
            "schedule": self.schedule.state_dict(),
            "warm_start": {str(k): v.detach().cpu() for k, v in self.config.warm_start.items()},
            "disabled": sorted(self.disabled),
            "plugins": plugins,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (call right after attaching to the restored optimizer)."""
        self.step = int(state["step"])
        self.schedule.load_state_dict(state["schedule"])
        self.config.warm_start = {
            k == "True": v.to(self.config.device) for k, v in state.get("warm_start", {}).items()
        }
        self.disabled = set(state.get("disabled", []))
        saved = state.get("plugins", {})
        for impl in self.pm.hook.sgdprobe_load_state_dict.get_hookimpls():
            if impl.plugin_name in saved:
                call_one(impl, state=saved[impl.plugin_name])
        for sink in self.sinks:
            if hasattr(sink, "resume"):
                sink.resume(self.step)

    def close(self) -> None:
        """Remove the hooks and flush and close every sink. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.pm.hook.sgdprobe_close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # interpreter exit or garbage collection: flush what is left
        try:
            self.close()
        except Exception:
            pass

    @property
    def logdir(self) -> str | None:
        for sink in self.sinks:
            if isinstance(sink, TensorBoardSink):
                return sink.logdir
        return None

    def latest(self) -> dict[str, float]:
        """The last logged value of every tag."""
        return {tag: values[-1][1] for tag, values in self.history.items()}


def _as_scalars(name: str, out: Any) -> dict[str, float]:
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise TypeError(
            f"sgdprobe_measure of plugin {name!r} must return a dict of tag -> number, got {type(out)}"
        )
    result = {}
    for tag, value in out.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise TypeError(f"plugin {name!r} returned a non-scalar tensor for {tag!r}")
            value = value.item()
        result[str(tag)] = float(value)
    return result


def _is_oom(exc: Exception) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _make_sinks(logdir, verbose: bool) -> list[Any]:
    sinks: list[Any] = []
    if logdir is not False:
        if logdir is None:
            logdir = time.strftime("runs/sgdprobe-%Y%m%d-%H%M%S")
        sinks.append(TensorBoardSink(logdir))
    if verbose:
        sinks.append(ConsoleSink())
    return sinks


def attach(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Any,
    *,
    logdir: str | None | bool = None,
    every: int | str = "auto",
    overhead: float = 0.05,
    plugins: list | Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    num_batches: int = 1,
    verbose: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    hvp_method: str = "reuse",
    lanczos_tol: float = 1e-3,
    lanczos_max_iter: int = 100,
    per_example_chunk: int | None = None,
    per_example_max_memory: int = DEFAULT_PER_EXAMPLE_MAX_MEMORY,
    max_failures: int = 3,
) -> Probe:
    """Attach a probe to ``optimizer``: after each of its steps that the schedule picks, measure.

    The training loop does not change. Use as a context manager or call :meth:`Probe.close`.

    :param optimizer: any ``torch.optim.Optimizer`` (built-in or subclass); hooks go on its ``step``.
    :param model: the model being trained (``torch.compile``/DDP wrappers are unwrapped).
    :param loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, the training objective.
    :param data: the probe data: one batch ``(inputs, targets)`` (a tuple), or an iterable of batches of
        which the first ``num_batches`` are taken once and reused at every measurement.
    :param logdir: TensorBoard directory; ``None`` makes ``runs/sgdprobe-<time>``; ``False`` disables
        TensorBoard (results stay in :attr:`Probe.history`).
    :param every: measure every ``every`` steps, or ``"auto"`` to keep the time overhead near ``overhead``.
    :param plugins: plugin names, or ``{name: {option: value}}``, or plugin objects; ``None`` = defaults.
    :param batch_size: training batch size B (read from a DataLoader or the training forward if omitted).
    :param dataset_size: training set size N (read from a DataLoader's dataset if omitted).
    :param verbose: print one line per measurement.
    :param seed: seeds dropout masks and random start vectors inside measurements (never the training RNG).
    :param dtype: measurement dtype (default float32, or float64 for a float64 model).
    :param hvp_method: ``"reuse"``, ``"double_backward"`` or ``"forward_over_reverse"`` (see linalg.hvp).
    :param lanczos_tol: Ritz residual tolerance relative to the largest Ritz value.
    :param lanczos_max_iter: Lanczos iteration cap; an unconverged run is reported as such.
    :param per_example_chunk: at most this many examples per chunk of the per-example engine (noise
        kernel, gradient covariance, generalized sharpness); ``None``: set by ``per_example_max_memory``.
    :param per_example_max_memory: about this many bytes of per-example work per chunk (default 256 MiB);
        an out-of-memory error inside a chunk halves it and retries.
    :param max_failures: a plugin failing this many measurements in a row is disabled.
    """
    inner_optimizer = unwrap_optimizer(optimizer)
    if not isinstance(inner_optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"attach() needs a torch.optim.Optimizer (or subclass), got {type(optimizer).__name__}"
        )
    schedule = Schedule(every, overhead)
    config = build_config(
        model,
        inner_optimizer,
        loss_fn,
        data,
        num_batches=num_batches,
        batch_size=batch_size,
        dataset_size=dataset_size,
        seed=seed,
        dtype=dtype,
        hvp_method=hvp_method,
        lanczos_tol=lanczos_tol,
        lanczos_max_iter=lanczos_max_iter,
        per_example_chunk=per_example_chunk,
        per_example_max_memory=per_example_max_memory,
    )
    loaded = load_plugins(plugins)
    probe = Probe(
        config, loaded, schedule=schedule, sinks=_make_sinks(logdir, verbose), max_failures=max_failures
    )
    probe._install(inner_optimizer, model)
    return probe


def measure(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Any,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    plugins: list | Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int | None = None,
    dataset_size: int | None = None,
    num_batches: int = 1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    hvp_method: str = "reuse",
    lanczos_tol: float = 1e-3,
    lanczos_max_iter: int = 100,
    per_example_chunk: int | None = None,
    per_example_max_memory: int = DEFAULT_PER_EXAMPLE_MAX_MEMORY,
) -> dict[str, float]:
    """One measurement at the current parameters, with the same plugins and no hooks.

    Thresholds use ``optimizer``'s hyper-parameters if given, else plain gradient descent with ``lr``
    (``lr`` overrides the optimizer's rate). Errors are raised, not skipped. The keyword arguments are
    those of :func:`attach`.
    """
    config = build_config(
        model,
        unwrap_optimizer(optimizer) if optimizer is not None else None,
        loss_fn,
        data,
        num_batches=num_batches,
        batch_size=batch_size,
        dataset_size=dataset_size,
        lr=lr,
        seed=seed,
        dtype=dtype,
        hvp_method=hvp_method,
        lanczos_tol=lanczos_tol,
        lanczos_max_iter=lanczos_max_iter,
        per_example_chunk=per_example_chunk,
        per_example_max_memory=per_example_max_memory,
    )
    probe = Probe(config, load_plugins(plugins), schedule=Schedule(1), sinks=[], raise_errors=True)
    try:
        scalars = probe.measure_now()
    finally:
        probe.close()
    return {k: v for k, v in scalars.items() if not k.startswith("probe/") or k == "probe/seconds"}
