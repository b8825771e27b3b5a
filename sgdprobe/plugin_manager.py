"""Finding, configuring and validating plugins (pluggy, entry-point group ``sgdprobe``)."""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from sgdprobe import hookspecs
from sgdprobe.errors import ConfigError, ProbeWarning

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT_NAME)
"""Marker for plugin hook implementations: ``@sgdprobe.hookimpl def sgdprobe_measure(self, snapshot)``."""

DEFAULT_PLUGINS: tuple[str, ...] = ("sharpness",)
"""Plugins enabled when ``plugins=None``."""


class _PluginManager(pluggy.PluginManager):
    """Treats every ``sgdprobe_*`` attribute as a hook implementation, marked or not (as pytest does
    for ``pytest_*``), so a forgotten decorator is not silently ignored and a misspelled hook name is
    caught by :meth:`check_pending`."""

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("sgdprobe_"):
            method = getattr(plugin, name, None)
            if inspect.isroutine(method):
                return {
                    "wrapper": False,
                    "hookwrapper": False,
                    "optionalhook": False,
                    "tryfirst": False,
                    "trylast": False,
                    "specname": None,
                }
        return opts


@dataclass
class LoadedPlugin:
    name: str
    obj: Any
    installed: bool = False  # found through an entry point (someone else's code) vs. passed as an object


_SCANNED: dict[tuple[str, ...], dict[str, EntryPoint]] = {}


def available_plugins(refresh: bool = False) -> dict[str, EntryPoint]:
    """Installed plugins by name (entry-point group ``sgdprobe``), built-in ones included.

    Scanning the installed distributions costs ~20 ms (more than a whole measurement on a small model),
    so the result is kept per ``sys.path``: a path added at run time is seen at the next call; a package
    installed into an existing path while the process runs needs ``refresh=True``.
    """
    key = tuple(sys.path)
    if refresh or key not in _SCANNED:
        _SCANNED.clear()
        _SCANNED[key] = {ep.name: ep for ep in entry_points(group=hookspecs.PROJECT_NAME)}
    return dict(_SCANNED[key])


def _instantiate(name: str, target: Any, options: Mapping[str, Any]) -> Any:
    if inspect.isclass(target):
        try:
            inspect.signature(target).bind(**options)
        except TypeError as exc:
            params = [p for p in inspect.signature(target).parameters if p != "self"]
            raise ConfigError(
                f"plugin {name!r} does not take the options {sorted(options)}: {exc}. "
                f"Its options are: {params or 'none'}."
            ) from None
        return target(**options)
    if options:
        raise ConfigError(
            f"plugin {name!r} is a module or an instance and takes no options; got {sorted(options)}"
        )
    return target


def _normalize(spec) -> list[tuple[str | None, Any, Mapping[str, Any]]]:
    """(name, object-or-None, options) for each requested plugin."""
    if spec is None:
        return [(name, None, {}) for name in DEFAULT_PLUGINS]
    if isinstance(spec, str):
        raise ConfigError(
            f"plugins must be a list of names or a mapping of name to options, got the string {spec!r}"
        )
    if isinstance(spec, Mapping):
        out = []
        for name, options in spec.items():
            if options is None or options is True:
                options = {}
            if not isinstance(options, Mapping):
                raise ConfigError(f"options for plugin {name!r} must be a dict, got {type(options).__name__}")
            out.append((name, None, options))
        return out
    out = []
    for item in spec:
        if isinstance(item, str):
            out.append((item, None, {}))
        elif inspect.isclass(item):
            raise ConfigError(
                f"plugin {item.__name__} was passed as a class; pass an instance ({item.__name__}()) "
                "or register it under a name in the 'sgdprobe' entry-point group."
            )
        else:
            out.append((getattr(item, "name", None) or type(item).__name__, item, {}))
    return out


def load_plugins(spec) -> list[LoadedPlugin]:
    """Resolve the user's ``plugins=`` argument into instances.

    A name that is not installed, or an option a plugin does not take, is a :class:`ConfigError`.
    An installed plugin that fails to import is reported (:class:`ProbeWarning`) and skipped, so a
    broken third-party package cannot stop training.
    """
    installed = available_plugins()
    loaded: list[LoadedPlugin] = []
    seen = set()
    for name, obj, options in _normalize(spec):
        if name in seen:
            raise ConfigError(f"plugin {name!r} is listed twice")
        seen.add(name)
        if obj is None:
            if name not in installed:
                raise ConfigError(
                    f"unknown plugin {name!r}. Installed plugins: {sorted(installed)}. Third-party "
                    "plugins register in the 'sgdprobe' entry-point group, or pass the plugin object itself."
                )
            try:
                target = installed[name].load()
            except Exception as exc:
                warnings.warn(
                    f"sgdprobe: plugin {name!r} ({installed[name].value}) failed to import and is skipped: "
                    f"{type(exc).__name__}: {exc}",
                    ProbeWarning,
                    stacklevel=3,
                )
                continue
            loaded.append(LoadedPlugin(name, _instantiate(name, target, options), installed=True))
        else:
            loaded.append(LoadedPlugin(name, obj))
    return loaded


def make_plugin_manager(plugins: list[LoadedPlugin], sinks: list[Any]) -> pluggy.PluginManager:
    """A plugin manager with the hook specifications, the plugins and the sinks, each validated as it is
    registered (argument names, and ``check_pending`` for hook names that do not exist).

    An invalid plugin passed as an object is a :class:`ConfigError` (your code: fix it now); an invalid
    *installed* plugin is reported and skipped.
    """
    pm = _PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for plugin in [*plugins, *(LoadedPlugin(f"sink:{type(s).__name__}", s) for s in sinks)]:
        try:
            pm.register(plugin.obj, name=plugin.name)
            pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if pm.is_registered(plugin.obj):
                pm.unregister(plugin.obj)
            message = (
                f"plugin {plugin.name!r} has an invalid hook implementation: {exc}. Hook names and their "
                "arguments are listed in sgdprobe.hookspecs (e.g. sgdprobe_measure(snapshot))."
            )
            if not plugin.installed:
                raise ConfigError(message) from None
            warnings.warn(f"sgdprobe: {message} It is skipped.", ProbeWarning, stacklevel=3)
    return pm


def call_one(impl, **kwargs):
    """Call one hook implementation with the arguments it declares (pluggy's opt-in rule)."""
    return impl.function(*[kwargs[name] for name in impl.argnames])
