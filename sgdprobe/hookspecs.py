"""The sgdprobe plugin contract.

A plugin is any object (usually a class instance) with methods named after the hooks below and
decorated with :data:`sgdprobe.hookimpl`. It may implement any subset of them, and a hook
implementation may take *fewer* arguments than the specification (pluggy's opt-in rule), so new
arguments can be added here without breaking plugins.

Plugins are found through the ``sgdprobe`` entry-point group::

    [project.entry-points.sgdprobe]
    my_diagnostic = "my_package.module:MyDiagnostic"

An entry point that names a class is instantiated once per probe with the options the user gave
(``attach(..., plugins={"my_diagnostic": {"k": 3}})``), so unknown options fail at attach time with
the class's own ``TypeError`` turned into an error that names the plugin. An entry point that names
a module or an instance is registered as it is and takes no options.

Flow of one measurement (after ``optimizer.step()``, when the schedule says so)::

    Snapshot(step) -> sgdprobe_measure(snapshot) on each plugin, isolated and timed
                   -> sgdprobe_log(step, scalars) on each sink

Every hook is called with keyword arguments only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from sgdprobe.config import ProbeConfig
    from sgdprobe.snapshot import Snapshot

PROJECT_NAME = "sgdprobe"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@hookspec
def sgdprobe_configure(config: ProbeConfig) -> None:
    """Check the setup and prepare, once, when the probe is attached (before any training step).

    Raise :class:`sgdprobe.ConfigError` with a message that names the fix when the plugin cannot
    work with this model, optimizer or data (e.g. per-example gradients on a model whose forward
    mixes examples). This is the place to fail: after attach, failures are skipped, not raised.

    :param config: what the probe was attached to (model, optimizer, data, batch and dataset sizes).
    """


@hookspec
def sgdprobe_requirements() -> list[str]:
    """Declare what the probe must prepare for this plugin before each measurement.

    Known requirements: ``"update"``: a copy of the parameters is taken before each *measured*
    optimizer step so that :attr:`Snapshot.update` (θ_{t+1} − θ_t) is available. It costs one
    parameter copy per measured step, so it is taken only when some plugin asks.
    """


@hookspec
def sgdprobe_measure(snapshot: Snapshot) -> Mapping[str, float] | None:
    """Measure at the snapshot's parameters and return scalars keyed by tag.

    Tags are ``"<plugin_name>/<quantity>"`` (``"sharpness/lambda_max"``). Values are Python
    floats or 0-d tensors. Return ``None`` to log nothing at this step. Shared heavy work
    (Hessian eigenpairs, per-example gradients) must come from the snapshot's cached methods so
    that it runs once per step for all plugins.

    An exception raised here is caught by the probe: the plugin's measurement is skipped at this
    step, the reason is logged, and training goes on.
    """


@hookspec
def sgdprobe_layout() -> Mapping[str, list[str]] | None:
    """Return TensorBoard custom-scalar charts: ``{chart title: [tag, tag, ...]}``.

    Tags on one chart are drawn together (e.g. a quantity and its stability threshold).
    """


@hookspec
def sgdprobe_log(step: int, scalars: Mapping[str, float]) -> None:
    """Write one measurement's scalars (sinks implement this; all plugins' results, merged)."""


@hookspec
def sgdprobe_event(step: int, kind: str, source: str, message: str) -> None:
    """Record an event: ``kind`` is ``"skip"``, ``"warning"`` or ``"disabled"``; ``source`` names
    the plugin or component it concerns."""


@hookspec
def sgdprobe_state_dict() -> Mapping[str, Any] | None:
    """Return this plugin's state for a checkpoint (tensors, numbers, strings, lists and dicts
    only, so that ``torch.load(weights_only=True)`` can read it back)."""


@hookspec
def sgdprobe_load_state_dict(state: Mapping[str, Any]) -> None:
    """Restore what :func:`sgdprobe_state_dict` returned (called only for plugins that saved state)."""


@hookspec
def sgdprobe_close() -> None:
    """Release resources and flush (the probe is being closed)."""
