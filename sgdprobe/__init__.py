"""sgdprobe: attach to any PyTorch optimizer with one line and watch the stability of training.

    probe = sgdprobe.attach(optimizer, model, loss_fn, data=(x_probe, y_probe), logdir="runs/exp1")

Public surface: :func:`attach`, :func:`measure`, :class:`Probe`, :class:`Snapshot`, :data:`hookimpl`
(and the hook specifications in :mod:`sgdprobe.hookspecs`), :class:`ProbeConfig`, the linear-algebra
building blocks in :mod:`sgdprobe.linalg`, and the errors.
"""

from sgdprobe.config import ProbeConfig, require_per_example, require_sizes
from sgdprobe.errors import ConfigError, MeasurementError, ProbeWarning
from sgdprobe.linalg import Eigenpairs, HessianVectorProduct, lanczos
from sgdprobe.optim_info import OptimizerInfo, describe_optimizer, stability_threshold
from sgdprobe.plugin_manager import DEFAULT_PLUGINS, available_plugins, hookimpl
from sgdprobe.probe import Probe, attach, measure
from sgdprobe.snapshot import Snapshot

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PLUGINS",
    "ConfigError",
    "Eigenpairs",
    "HessianVectorProduct",
    "MeasurementError",
    "OptimizerInfo",
    "Probe",
    "ProbeConfig",
    "ProbeWarning",
    "Snapshot",
    "attach",
    "available_plugins",
    "describe_optimizer",
    "hookimpl",
    "lanczos",
    "measure",
    "require_per_example",
    "require_sizes",
    "stability_threshold",
]
